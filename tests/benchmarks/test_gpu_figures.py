"""benchmarks/gpu_figures.py at tiny size on CPU: the report, the JSON, the FLOP count, the refusals."""

import json
import math

import pytest
import torch

from benchmarks import gpu_figures as gf
from benchmarks.bench import build
from cheers_pl.spec import CheersSpec

FAST = ["--size", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch", "3", "--seq", "96"]
FAST += ["--warmup-steps", "1", "--train-steps", "1", "--sample-steps", "2", "--images", "1"]
FAST += ["--sample-repeats", "1"]


@pytest.fixture(scope="module")
def tiny():
    model = build(CheersSpec.tiny())
    gf.set_stage_two_trainable(model)
    return model.train()


def test_main_prints_the_tables_and_writes_the_json(tmp_path, capsys):
    path = tmp_path / "out" / "gpu.json"
    assert gf.main([*FAST, "--peak-tflops", "0.001", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# CHEERS GPU figures: ") and "UTC, CPU, torch " in out
    for heading in ("## Parameters", "## Training step", "## Model FLOPs per training step", "## Sampler"):
        assert heading in out
    for row in ("| llm |", "| cfm_head |", "| pixel_decoder |", "| generate_reference (no cache), 1 image |"):
        assert row in out
    assert "| 3 x 96 | 288 |" in out  # batch row: samples x tokens, tokens per step

    r = json.loads(path.read_text())
    t, f, s = r["train"], r["flops"], r["sampler"]
    assert t["steps"] == 1 and t["step_s"] > 0 and t["tokens"] == 3 * 96
    assert t["tokens_per_s"] == pytest.approx(t["tokens"] / t["step_s"])
    assert t["peak_mem_bytes"] is None and math.isfinite(t["last_loss"])
    assert f["total"] > f["forward"] > 0 and f["with_recompute"] > f["total"]
    assert r["mfu"] == pytest.approx(f["total"] / t["step_s"] / 1e9)  # --peak-tflops 0.001
    assert s["ours"]["images"] == 1 and s["ours"]["s_per_image"] > 0 and s["reference"]["s_per_image"] > 0
    assert s["steps"] == 2 and s["weights"] == "float32"
    assert r["params_total"] == sum(n for _, n, _ in r["params"])
    assert r["notes"] == []


def test_budget_cuts_are_reported_and_mfu_is_na_on_cpu(tmp_path, capsys):
    path = tmp_path / "gpu.json"
    assert gf.main([*FAST, "--train-steps", "3", "--time-budget", "0", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    r = json.loads(path.read_text())
    assert r["train"]["steps"] == 1  # always one timed step, then the budget stops it
    assert r["mfu"] is None and "| n/a |" in out
    assert r["sampler"]["ours"] is None and r["sampler"]["reference"] is None
    assert any(n.startswith("training: stopped after 1 of 3") for n in r["notes"])
    assert any(n.startswith("sampler: skipped") for n in r["notes"])
    assert "budget" in out


def test_bf16_autocast_path_runs_on_cpu(tmp_path):
    """The GPU run's precision path (bf16 autocast over fp32 weights, training and sampler), at
    tiny size on CPU."""
    path = tmp_path / "gpu.json"
    argv = [a if a != "fp32" else "bf16" for a in FAST]
    argv += ["--batch", "2", "--seq", "80", "--mix", "gen,und", "--no-reference", "--json", str(path)]
    assert gf.main(argv) == 0
    r = json.loads(path.read_text())
    assert r["dtype"] == "bf16" and "autocast" in r["precision"]
    assert math.isfinite(r["train"]["last_loss"]) and r["train"]["step_s"] > 0
    assert r["sampler"]["ours"]["s_per_image"] > 0 and r["sampler"]["weights"] == "float32"


def test_cuda_without_a_gpu_exits_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device is available.*--device cpu"):
        gf.main(["--size", "tiny", "--device", "cuda"])


def test_peak_lookup_by_device_name():
    assert gf.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gf.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gf.peak_flops("NVIDIA H200") == 989e12
    assert gf.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gf.peak_flops("NVIDIA L40S") == 362e12 and gf.peak_flops("NVIDIA L4") == 121e12
    assert gf.peak_flops("Some Future Accelerator") is None


def test_training_batch_fills_every_sample_to_seq(tiny):
    batch = gf.training_batch(tiny, 5, 100)  # und, gen, text, und, gen
    assert batch["input_ids"].shape == (5, 100) and bool(batch["attention_mask"].all())
    assert batch["images"].shape == (4, 3, tiny.image_size, tiny.image_size)
    placeholders = torch.isin(batch["input_ids"], tiny.placeholder_ids).sum()
    assert int(placeholders) == 4 * tiny.tokens_per_image
    assert batch["gen_images"].tolist() == [1, 3]
    with pytest.raises(ValueError, match="shorter than a 'und' sample's fixed part"):
        gf.training_batch(tiny, 1, 20)


def test_flop_count_is_per_sample_matches_the_llm_formula_and_meta(tiny):
    one, two = gf.training_batch(tiny, 3, 96), gf.training_batch(tiny, 6, 96)
    c1, c2 = gf.count_flops(tiny, one), gf.count_flops(tiny, two)
    assert c2.total == 2 * c1.total and c2.forward == 2 * c1.forward  # every FLOP is per sample
    assert sum(map(sum, c1.by_component.values())) == c1.total  # every counted op has a component
    assert c1.by_component["vae"][1] == 0 and c1.by_component["vae"][0] > 0  # frozen: forward only
    fwd, bwd = c1.by_component["llm"]
    assert bwd == pytest.approx(2 * fwd, rel=1e-2)
    # 6 N T + 12 l d L^2 + 6 d V n_sup over-counts only the norm and bias parameters (< 1% here)
    assert fwd + bwd == pytest.approx(gf.llm_analytic_flops(tiny, one), rel=0.02)
    assert fwd + bwd <= gf.llm_analytic_flops(tiny, one)
    meta, with_recompute = gf.meta_flops(tiny.spec, one)
    assert meta.total == c1.total and meta.by_component == c1.by_component
    assert with_recompute > meta.total
    assert all(p.grad is None for p in tiny.parameters())
