"""LoRA fine-tunes through ``cheers fit`` on an own-data set made with the recipes.

Three tiny CPU fits of stage IV + ``experiments/tiny.yaml`` + ``experiments/finetune/lora.yaml``
from an exported base folder: one of STEPS steps; one stopped after HALF steps (same
``max_steps``, so the same cosine schedule) and then resumed with ``--ckpt_path last``; and one
step of the full stage IV (no lora), for the checkpoint size. Then: the loss on the own data is
lower than the base's; the resumed run equals the straight one; the adapter checkpoint is a small
fraction of the full one; ``cheers export --merge-lora`` gives the outputs of the unmerged pair;
``cheers answer --model ADAPTER.ckpt`` loads the pair; another base is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cheers_pl.cli import main
from cheers_pl.finetune.lora import LoraSpec, adapter_parameter_names, base_digest, base_state, is_lora
from cheers_pl.io.export import load_any, load_exported
from cheers_pl.smoke import mixed_batch
from cheers_pl.spec import CheersSpec
from cheers_pl.stages import SFTStage
from tests.finetune.helpers import fixed_batches, mean_loss

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
STEPS, HALF = 12, 6
TOL = dict(rtol=0.0, atol=1e-6)  # fp32 on CPU, one thread: in practice bit-identical
LORA = "{rank: 4, alpha: 8, dropout: 0.1, head_targets: [q_proj, v_proj], projector: true}"
OVERLAY = """
trainer:
  enable_progress_bar: false
  logger: false
  max_steps: {steps}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: ${{trainer.default_root_dir}}/checkpoints
        every_n_train_steps: {every}
        save_last: true
        enable_version_counter: false
    - class_path: tests.stages.step_log.StepLog
      init_args:
        path: ${{trainer.default_root_dir}}/steps.jsonl
{extra}model:
  init_args:
    lr: 1.0e-2
    lora: {lora}
data:
  batch_size: 4
  num_workers: 0
"""
STOP = """    - class_path: tests.finetune.helpers.StopAt
      init_args:
        step: {step}
"""


def fit(root: Path, base: Path, shards: Path, *extra: str, steps=STEPS, every=HALF, stop=None, lora=LORA):
    root.mkdir(parents=True, exist_ok=True)
    overlay = root.parent / f"{root.name}.yaml"
    more = STOP.format(step=stop) if stop else ""
    overlay.write_text(OVERLAY.format(steps=steps, every=every, extra=more, lora=lora))
    configs = ["stage4_sft.yaml", "tiny.yaml", "finetune/lora.yaml"]
    args = ["fit", *(a for c in configs for a in ("-c", str(EXPERIMENTS / c))), "-c", str(overlay)]
    args += ["--model.init_args.init_from", str(base), "--data.root", str(shards)]
    assert main([*args, "--trainer.default_root_dir", str(root), *extra]) == 0


def last(root: Path) -> Path:
    """The newest ``last.ckpt`` under ``root`` (a run folder of it, or its own checkpoints/)."""
    return max(root.rglob("checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)


def steps(root: Path) -> list[dict]:
    rows = [json.loads(line) for p in root.rglob("steps.jsonl") for line in p.read_text().splitlines()]
    return sorted(rows, key=lambda r: r["step"])


def read(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, own_data, base):
    _, shards = own_data
    tmp = tmp_path_factory.mktemp("lora_runs")
    fit(tmp / "straight", base, shards)
    fit(tmp / "resumed", base, shards, stop=HALF)
    assert read(last(tmp / "resumed"))["global_step"] == HALF
    fit(tmp / "resumed", base, shards, "--ckpt_path", "last")
    fit(tmp / "full", base, shards, steps=1, every=1, lora="null")
    return {name: tmp / name for name in ("straight", "resumed", "full")}


def test_a_tiny_lora_fine_tune_lowers_the_loss_on_own_data(runs, own_data, base):
    base_model = load_any(base)
    batches = fixed_batches(base_model, own_data[1])
    before = mean_loss(base_model, batches)
    tuned = load_any(last(runs["straight"]))
    assert is_lora(tuned)
    after = mean_loss(tuned, batches)
    assert after < 0.9 * before, f"own-data loss {before:.3f} -> {after:.3f}"


def test_a_resumed_lora_run_continues_exactly(runs):
    want, got = steps(runs["straight"]), steps(runs["resumed"])
    assert [r["step"] for r in want] == [r["step"] for r in got] == list(range(1, STEPS + 1))
    for mine, theirs in zip(got, want, strict=True):
        assert mine["ids"] == theirs["ids"]
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=TOL["atol"])
    a, b = read(last(runs["resumed"])), read(last(runs["straight"]))
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][name], tensor, **TOL, msg=name)
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert len(opt_a) == len(opt_b) == len(b["state_dict"])  # Adam state of the adapters only
    for pa, pb in zip(opt_a.values(), opt_b.values(), strict=True):
        for key in pb:
            torch.testing.assert_close(pa[key], pb[key], **TOL)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]


def test_the_adapter_checkpoint_is_a_small_fraction_of_a_full_one(runs, base):
    path, full_path = last(runs["straight"]), last(runs["full"])
    ckpt, full = read(path), read(full_path)
    assert "lora" not in full and not set(ckpt["state_dict"]) & set(full["state_dict"])  # adapters only
    assert all(".lora_A." in k or ".lora_B." in k for k in ckpt["state_dict"])
    record = ckpt["lora"]
    assert record["base"]["path"] == str(base) and record["base"]["format"] == "exported"
    assert record["base"]["sha256"] == base_digest(load_any(base))
    assert record["config"] == LoraSpec(rank=4, alpha=8, dropout=0.1, head_targets=["q_proj", "v_proj"],
                                        projector=True).as_dict()  # fmt: skip
    ratio = path.stat().st_size / full_path.stat().st_size
    assert ratio < 0.1, f"adapter checkpoint {path.stat().st_size} B is {ratio:.1%} of the full one"


def test_the_merged_export_gives_the_unmerged_outputs(runs, base, tmp_path, capsys):
    path = last(runs["straight"])
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(path), "--out", str(tmp_path / "refused")])
    assert exit_.value.code == 2 and "--merge-lora" in capsys.readouterr().err
    assert main(["export", str(path), "--merge-lora", "--out", str(tmp_path / "merged")]) == 0
    merged, unmerged, plain = load_exported(tmp_path / "merged"), load_any(path), load_any(base)
    assert not is_lora(merged) and merged.state_dict().keys() == plain.state_dict().keys()
    moved = [k for k, v in merged.state_dict().items() if not torch.equal(v, plain.state_dict()[k])]
    assert moved and all(k.startswith(("llm.", "cfm_head.", "projector.")) for k in moved)
    batch = mixed_batch(plain)
    outs = [
        m(batch, generator=torch.Generator().manual_seed(0), return_logits=True) for m in (merged, unmerged)
    ]
    for field in ("loss", "loss_text", "loss_fm", "logits", "v"):
        torch.testing.assert_close(getattr(outs[0], field), getattr(outs[1], field), rtol=0, atol=1e-5)


def test_answer_loads_a_base_and_adapter_pair(runs, own_data, tmp_path):
    raw, _ = own_data
    image = next((raw / "photos").rglob("*.png"))
    args = ["answer", "--model", str(last(runs["straight"])), "--image", str(image)]
    args += ["--question", "What colour is the shape?", "--max-new-tokens", "3", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "answers")]) == 0
    answers = (tmp_path / "answers" / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 1 and "answer" in json.loads(answers[0])


def _module(ckpt: dict, init_from) -> SFTStage:
    hp = ckpt["hyper_parameters"]
    module = SFTStage(spec=CheersSpec(**hp["spec"]), lora=hp["lora"], init_from=init_from)
    module.configure_model()
    return module


def test_another_base_is_refused_naming_both(runs, base, other_base):
    path = last(runs["straight"])
    ckpt = read(path)
    with pytest.raises(ValueError, match=rf"trained on the base model {base} .*here is {other_base}"):
        _module(ckpt, str(other_base)).on_load_checkpoint(ckpt)
    with pytest.raises(ValueError, match=rf"trained on the base model {base} .*here is {other_base}"):
        load_any(path, base=other_base)
    # cheers fit --ckpt_path drops init_from: the base the checkpoint names is loaded, then checked
    module = _module(ckpt, None)
    module.on_load_checkpoint(ckpt)
    loaded, want = base_state(module.model), base_state(load_any(base))
    assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], want[k]) for k in want)
    moved = {**ckpt, "lora": {**ckpt["lora"], "base": {**ckpt["lora"]["base"], "abspath": str(other_base)}}}
    with pytest.raises(ValueError, match="other weights"):  # the same path now holding another model
        _module(ckpt, None).on_load_checkpoint(moved)


def test_a_full_checkpoint_and_a_lora_one_are_not_mixed_up(runs):
    lora_ckpt, full = read(last(runs["straight"])), read(last(runs["full"]))
    with pytest.raises(ValueError, match="without adapters .* give it as init_from"):
        _module(lora_ckpt, None).on_load_checkpoint(full)
    plain = SFTStage(spec=CheersSpec(**full["hyper_parameters"]["spec"]))
    with pytest.raises(ValueError, match="is a LoRA one"):
        plain.on_load_checkpoint(lora_ckpt)
    assert adapter_parameter_names(_module(lora_ckpt, None).model)
