"""``benchmarks/bench_lora.py`` at the tiny size: LoRA trains, saves and holds less than the full step."""

from __future__ import annotations

from benchmarks import bench_lora


def test_bench_lora_rows_compare_a_lora_step_with_a_full_one():
    rows = [bench_lora.measure("tiny", mode, rank=4) for mode in ("full", "lora")]
    full, lora = rows
    assert full["total"] + lora["trainable"] == lora["total"]  # the adapters come on top of the base
    assert lora["trainable"] < 0.05 * full["trainable"]
    assert lora["checkpoint_bytes"] < 0.2 * full["checkpoint_bytes"]
    # >= 0 only: inside the suite the allocator may reuse memory freed by earlier tests (fast_conv
    # keeps glibc from returning it), so a step's peak need not rise above the resident set
    assert lora["peak_step_mib"] >= 0 and full["peak_step_mib"] >= 0
    text = bench_lora.table(rows)
    assert "| tiny | full stage IV |" in text and "| tiny | LoRA r=4 |" in text
