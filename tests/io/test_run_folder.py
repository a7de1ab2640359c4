"""Versioned run folders (issue 15): a fresh fit of a stage YAML never overwrites an earlier run.

Through the real ``cheers fit -c stageN.yaml -c tiny.yaml`` on small demo shards: each fresh fit
gets ``S/run-*``, ``latest`` moves only when a run finishes (and says so when the new run reached
fewer steps), a fit that fails before its first step leaves no folder, ``--ckpt_path last``
continues in the newest run's folder, a saved ``config.yaml`` reruns beside it, and the next
stage starts from ``latest``. The path rewrite and the link are also tested on their own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from jsonargparse import Namespace

from cheers_pl.cli import main
from cheers_pl.io import run_folder
from cheers_pl.io.resume import versioned_folders

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


@pytest.fixture(autouse=True)
def _no_inherited_run(monkeypatch):
    for key in (run_folder.RUN_DIR_ENV, "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["data", "demo", "--out", str(out), "--digits", "30", "--texts", "20"]) == 0
    return out


def fit(stage: str, root: Path, demo: Path, steps: int, *extra: str) -> int:
    yaml = {"stage1": "stage1_alignment.yaml", "stage2": "stage2_pretrain.yaml"}[stage]
    args = ["fit", "-c", str(EXPERIMENTS / yaml), "-c", str(EXPERIMENTS / "tiny.yaml")]
    args += ["--trainer.default_root_dir", str(root / stage), "--data.root", str(demo)]
    args += ["--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false", *extra]
    return main(args)


def runs(stage: Path) -> list[str]:
    return [p.name for p in run_folder.run_folders(stage)]


def test_fresh_fits_get_their_own_folders_and_latest_moves_only_on_finish(demo, tmp_path, capsys):
    s1 = tmp_path / "stage1"
    assert fit("stage1", tmp_path, demo, 3) == 0
    first = runs(s1)
    assert len(first) == 1 and os.readlink(s1 / "latest") == first[0]
    assert (s1 / "latest" / "checkpoints" / "last.ckpt").is_file()
    configs = list((s1 / first[0]).rglob("config.yaml"))
    assert len(configs) == 1  # the saved config lies in the run's own folder
    marker = json.loads((s1 / first[0] / run_folder.MARKER).read_text())
    assert marker["status"] == "finished" and marker["global_step"] == 3

    # a rerun with fewer steps: its own folder; latest moves, and the line names the longer run
    capsys.readouterr()
    assert fit("stage1", tmp_path, demo, 2) == 0
    second = [r for r in runs(s1) if r not in first]
    assert len(second) == 1 and os.readlink(s1 / "latest") == second[0]
    err = capsys.readouterr().err
    assert f"the previous latest, {first[0]}, reached step 3" in err
    assert (s1 / first[0] / "checkpoints" / "last.ckpt").is_file()  # kept

    # a fit that fails before its first step leaves no folder and does not move latest
    with pytest.raises(FileNotFoundError):
        fit("stage1", tmp_path, demo, 2, "--data.root", str(tmp_path / "nowhere"))
    assert runs(s1) == sorted(first + second) and os.readlink(s1 / "latest") == second[0]
    assert "removed its empty run folder" in capsys.readouterr().err

    # --ckpt_path last: the newest last.ckpt, continued in its own run folder
    assert fit("stage1", tmp_path, demo, 4, "--ckpt_path", "last") == 0
    assert runs(s1) == sorted(first + second)
    resumed = json.loads((s1 / second[0] / run_folder.MARKER).read_text())
    assert resumed["global_step"] == 4 and resumed["resumed"] is True

    # a saved config reruns as a new run beside it (its paths moved into the new folder)
    assert main(["fit", "-c", str(configs[0]), "--trainer.max_steps", "1"]) == 0
    third = [r for r in runs(s1) if r not in first + second]
    assert len(third) == 1 and os.readlink(s1 / "latest") == third[0]
    assert (s1 / third[0] / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in (s1 / first[0] / "checkpoints").iterdir()) == ["last.ckpt"]

    # the next stage starts from latest
    capsys.readouterr()
    assert fit("stage2", tmp_path, demo, 1) == 0
    assert len(runs(tmp_path / "stage2")) == 1


def test_fixed_mode_writes_into_default_root_dir(demo, tmp_path):
    assert fit("stage1", tmp_path, demo, 1, "--run_folder", "fixed") == 0
    assert (tmp_path / "stage1" / "checkpoints" / "last.ckpt").is_file()
    assert runs(tmp_path / "stage1") == [] and not (tmp_path / "stage1" / "latest").exists()


def test_tiny_overlay_writes_under_runs_tiny_by_hand(capsys):
    args = ["fit", "-c", str(EXPERIMENTS / "stage2_pretrain.yaml"), "-c", str(EXPERIMENTS / "tiny.yaml")]
    with pytest.raises(SystemExit):
        main([*args, "--print_config"])
    out = capsys.readouterr().out
    assert "default_root_dir: runs/tiny/stage2" in out
    assert "init_from: runs/tiny/stage2/../stage1/latest/checkpoints/last.ckpt" in out
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(EXPERIMENTS / "stage2_pretrain.yaml"), "--print_config"])
    assert "default_root_dir: runs/paper/stage2" in capsys.readouterr().out


def test_bad_run_folder_mode_fails_at_parse_time_with_the_choices(capsys):
    args = ["fit", "-c", str(EXPERIMENTS / "stage1_alignment.yaml"), "-c", str(EXPERIMENTS / "tiny.yaml")]
    with pytest.raises(SystemExit):
        main([*args, "--run_folder", "timestamped", "--print_config"])
    err = capsys.readouterr().err
    assert "run_folder" in err and "versioned" in err and "fixed" in err


def test_move_paths_moves_only_what_lies_in_the_old_root(tmp_path):
    old, new = tmp_path / "stage2", tmp_path / "stage2" / "run-x"
    cfg = Namespace(
        trainer=Namespace(
            default_root_dir=str(old),
            logger=Namespace(init_args=Namespace(save_dir=str(old))),
            callbacks=[Namespace(init_args=Namespace(dirpath=f"{old}/checkpoints"))],
        ),
        model=Namespace(init_args=Namespace(init_from=f"{old}/../stage1/latest/checkpoints/last.ckpt")),
        data={"root": "data/demo", "other": f"{old}/latest/x", "run": f"{old}/run-old/y"},
        ckpt_path=f"{old}/checkpoints/last.ckpt",
    )
    changed = run_folder.move_paths(cfg, old, new)
    assert cfg.trainer.default_root_dir == str(new)
    assert cfg.trainer.logger.init_args.save_dir == str(new)
    assert cfg.trainer.callbacks[0].init_args.dirpath == str(new / "checkpoints")
    assert cfg.model.init_args.init_from == f"{old}/../stage1/latest/checkpoints/last.ckpt"  # another stage
    assert cfg.data == {"root": "data/demo", "other": f"{old}/latest/x", "run": f"{old}/run-old/y"}
    assert cfg.ckpt_path == f"{old}/checkpoints/last.ckpt"
    assert sorted(changed) == [
        "trainer.callbacks[0].init_args.dirpath",
        "trainer.default_root_dir",
        "trainer.logger.init_args.save_dir",
    ]


def test_fail_removes_only_an_empty_fresh_run(tmp_path):
    stage = tmp_path / "s"
    empty, stepped, resumed = stage / "run-a", stage / "run-b", stage / "run-c"
    for run, was_resumed in ((empty, False), (stepped, False), (resumed, True)):
        run_folder.start(stage, run, was_resumed)
        (run / "tb").mkdir()
    run_folder.end()
    assert "removed" in run_folder.fail(empty, 0, RuntimeError("x"))
    assert not empty.exists()
    (stepped / "checkpoints").mkdir()
    (stepped / "checkpoints" / "step=5.ckpt").write_bytes(b"0")
    assert "marked failed" in run_folder.fail(stepped, 5, RuntimeError("boom"))
    assert run_folder.read_marker(stepped)["status"] == "failed"
    assert "boom" in run_folder.read_marker(stepped)["error"]
    assert "marked failed" in run_folder.fail(resumed, 0, RuntimeError("x")) and resumed.is_dir()
    assert not (stage / "latest").exists()


def test_finish_points_latest_and_names_a_longer_previous_run(tmp_path):
    stage = tmp_path / "s"
    a, b = stage / "run-a", stage / "run-b"
    for run in (a, b):
        run_folder.start(stage, run)
    run_folder.end()
    assert "finished at step 10" in run_folder.finish(stage, a, 10)
    line = run_folder.finish(stage, b, 4)
    assert os.readlink(stage / "latest") == "run-b"
    assert "run-a, reached step 10" in line and str(a / "checkpoints" / "last.ckpt") in line
    assert "more than" not in run_folder.finish(stage, a, 12)


def test_ranks_share_the_launching_process_choice(tmp_path, monkeypatch):
    stage = tmp_path / "s"
    _, run, _, _ = run_folder.choose_run_folder(stage, None)
    run_folder.start(stage, run)
    assert os.environ[run_folder.RUN_DIR_ENV] == str(run)
    assert run_folder.choose_run_folder(stage, None)[1] == run  # a rank started by the launcher
    run_folder.end()
    assert run_folder.RUN_DIR_ENV not in os.environ
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_folder.needs_shared_id()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert not run_folder.needs_shared_id()
    assert run_folder.choose_run_folder(stage, None)[1] == stage / "run-slurm77"


def test_versioned_search_looks_in_every_run_newest_first(tmp_path):
    stage = tmp_path / "s"
    for name in ("run-1", "run-2"):
        (stage / name).mkdir(parents=True)
        (stage / name / run_folder.MARKER).write_text("{}")
    folders = versioned_folders([stage / "checkpoints"], stage)
    assert folders == [
        stage / "run-2" / "checkpoints",
        stage / "run-1" / "checkpoints",
        stage / "checkpoints",
    ]
    # a saved config's root is a run folder: its stage's runs are searched
    assert (
        versioned_folders([stage / "run-1" / "checkpoints"], stage / "run-1")[0]
        == stage / "run-2" / "checkpoints"
    )


def test_a_refusal_while_the_classes_are_built_leaves_no_run_folder(demo, tmp_path, capsys):
    with pytest.raises(SystemExit):
        fit("stage1", tmp_path, demo, 1, "--data.image_size", "64")  # refused after instantiation
    assert runs(tmp_path / "stage1") == []
    err = capsys.readouterr().err
    assert "data.image_size=64" in err and "run folder" not in err
