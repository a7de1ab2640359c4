"""``--ckpt_path`` is checked against the config before anything is built (issue 14, items 2, 6, 8).

Through the real ``cheers fit -c stageN.yaml -c tiny.yaml`` path, with ``Trainer.fit`` replaced
by a recorder: a checkpoint of another stage, spec or data tasks is refused naming both (unless
``--allow_stage_switch true``); ``--ckpt_path last`` with none is refused naming the folder
(``auto`` starts fresh and says so); a resume does not need the previous stage's ``init_from``;
a missing ``init_from`` names the ``make`` target that writes it. The checkpoints are written by
the kit's own IO from the hyperparameters the CLI gives the real stage modules.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest

from cheers_pl.cli import main
from cheers_pl.io.checkpoint_io import CheersCheckpointIO

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
YAML = {"stage1": "stage1_alignment.yaml", "stage2": "stage2_pretrain.yaml"}
TASKS = {"stage1": ["understanding", "generation"], "stage2": ["understanding", "generation", "text"]}


@pytest.fixture
def recorder(monkeypatch):
    seen: dict = {}

    @functools.wraps(pl.Trainer.fit)  # the same signature: the CLI's fit options come from it
    def fit(self, *args, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(pl.Trainer, "fit", fit)
    return seen


def cli(stage: str, run: Path, *extra: str) -> None:
    args = ["fit", "-c", str(EXPERIMENTS / YAML[stage]), "-c", str(EXPERIMENTS / "tiny.yaml")]
    main([*args, "--trainer.default_root_dir", str(run), *extra])


@pytest.fixture(scope="module")
def hparams(tmp_path_factory):
    """Each stage's hyperparameters as the CLI saves them in its checkpoints (``_class_path`` too)."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        seen: dict = {}
        mp.setattr(pl.Trainer, "fit", functools.wraps(pl.Trainer.fit)(lambda self, **kw: seen.update(kw)))
        for stage in YAML:
            cli(stage, tmp_path_factory.mktemp(stage), "--model.init_args.init_from", "null")
            out[stage] = dict(seen["model"].hparams)
    return out


def write_ckpt(path: Path, hparams: dict, tasks: list[str], **spec_changes) -> Path:
    hp = copy.deepcopy(hparams)
    hp["spec"].update(spec_changes)
    streams = {t: {"epoch": 0, "position": 1} for t in tasks}
    ckpt = {
        "global_step": 2,
        "state_dict": {},
        "hyper_parameters": hp,
        "CheersDataModule": {"world_size": 1, "ranks": [{"dataset_state": {"streams": streams}}]},
    }
    CheersCheckpointIO().save_checkpoint(ckpt, path)
    return path


def refusal(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli(*args)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


# -- item 2 ------------------------------------------------------------------------------------------
def test_a_checkpoint_of_another_stage_is_refused_naming_both(tmp_path, hparams, recorder, capsys):
    stage2 = write_ckpt(tmp_path / "s2.ckpt", hparams["stage2"], TASKS["stage2"])
    line = refusal(capsys, "stage1", tmp_path / "run", "--ckpt_path", str(stage2))
    assert "is stage II (PretrainStage) but the config is stage I (AlignmentStage)" in line
    assert "task(s) ['text']" in line and f"--model.init_args.init_from {stage2}" in line
    assert "--allow_stage_switch true" in line and not recorder

    stage1 = write_ckpt(tmp_path / "s1.ckpt", hparams["stage1"], TASKS["stage1"])
    args = ("--model.init_args.init_from", "null", "--ckpt_path", str(stage1))
    line = refusal(capsys, "stage2", tmp_path / "run2", *args)
    assert "is stage I (AlignmentStage) but the config is stage II (PretrainStage)" in line


def test_a_checkpoint_of_another_spec_is_refused_naming_the_fields(tmp_path, hparams, recorder, capsys):
    other = write_ckpt(tmp_path / "s1.ckpt", hparams["stage1"], TASKS["stage1"], hfi="none", max_length=99)
    line = refusal(capsys, "stage1", tmp_path / "run", "--ckpt_path", str(other))
    assert "spec.hfi='none' in the checkpoint vs 'gated' in the config" in line
    assert "spec.max_length=99 in the checkpoint vs 256 in the config" in line


def test_allow_stage_switch_resumes_under_the_configs_stage(tmp_path, hparams, recorder, capsys):
    stage2 = write_ckpt(tmp_path / "s2.ckpt", hparams["stage2"], TASKS["stage2"])
    cli("stage1", tmp_path / "run", "--ckpt_path", str(stage2), "--allow_stage_switch", "true")
    assert type(recorder["model"]).__name__ == "AlignmentStage"  # not swapped by the merge
    assert recorder["ckpt_path"] == str(stage2)
    assert "--allow_stage_switch: it is stage II" in capsys.readouterr().err


def test_a_matching_checkpoint_resumes(tmp_path, hparams, recorder):
    same = write_ckpt(tmp_path / "s1.ckpt", hparams["stage1"], TASKS["stage1"])
    cli("stage1", tmp_path / "run", "--ckpt_path", str(same))
    assert type(recorder["model"]).__name__ == "AlignmentStage" and recorder["ckpt_path"] == str(same)


# -- item 6 ------------------------------------------------------------------------------------------
def test_ckpt_path_last_without_a_checkpoint_is_refused(tmp_path, recorder, capsys):
    run = tmp_path / "run"
    line = refusal(capsys, "stage1", run, "--ckpt_path", "last")
    assert f"no last.ckpt in {run / 'checkpoints'}" in line and "--ckpt_path auto" in line
    assert not recorder


def test_ckpt_path_auto_starts_fresh_or_resumes_and_says_which(tmp_path, hparams, recorder, capsys):
    run = tmp_path / "run"
    cli("stage1", run, "--ckpt_path", "auto")
    assert recorder["ckpt_path"] is None
    err = capsys.readouterr().err
    assert f"no last.ckpt in {run / 'checkpoints'}" in err and "starting a fresh run" in err
    last = write_ckpt(run / "checkpoints" / "last.ckpt", hparams["stage1"], TASKS["stage1"])
    for choice in ("auto", "last"):
        recorder.clear()
        cli("stage1", run, "--ckpt_path", choice)
        assert recorder["ckpt_path"] == str(last)
        assert f"resuming from {last}" in capsys.readouterr().err


# -- item 8 ------------------------------------------------------------------------------------------
def test_a_resume_does_not_need_the_previous_stages_file(tmp_path, hparams, recorder, capsys):
    gone = tmp_path / "stage1" / "checkpoints" / "last.ckpt"  # stage I's file, deleted since
    hp = {**hparams["stage2"], "init_from": str(gone)}
    ckpt = write_ckpt(tmp_path / "stage2" / "checkpoints" / "last.ckpt", hp, TASKS["stage2"])
    cli("stage2", tmp_path / "stage2", "--ckpt_path", str(ckpt))  # the YAML's init_from is that file too
    assert recorder["model"].init_from is None and recorder["ckpt_path"] == str(ckpt)
    assert f"init_from {gone} is not loaded" in capsys.readouterr().err


def test_a_missing_init_from_names_the_make_target(tmp_path, recorder, capsys):
    line = refusal(capsys, "stage2", tmp_path / "tiny" / "stage2")
    assert f"no checkpoint at {tmp_path / 'tiny' / 'stage1' / 'latest' / 'checkpoints' / 'last.ckpt'}" in line
    assert "`make stage1 PRESET=tiny`" in line and not recorder
