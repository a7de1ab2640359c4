"""LoRA vs full stage IV on CPU: trainable parameters, checkpoint size, peak memory of a step.

    python benchmarks/bench_lora.py [--sizes tiny small] [--rank 16] [--json FILE]   (``make bench``)

For each size (``tiny``: ``CheersSpec.tiny()``; ``small``: the small-but-real shape of
``benchmarks/bench.py``) and each mode, a fresh process builds ``SFTStage`` (random weights, the
zero-initialised layers given small random values) either as the full stage IV (all but the VAE
trains) or with ``experiments/finetune/lora.yaml``'s adapters (Qwen2 attention + MLP, rank
``--rank``, alpha 2 x rank) and measures:

* trainable / total parameters;
* the checkpoint: a real ``Trainer.fit`` of one step on one mixed batch, saved with
  ``trainer.save_checkpoint`` through ``CheersCheckpointIO`` (full: every weight + AdamW state;
  LoRA: adapters + their AdamW state + the base's record);
* the peak memory of the first optimiser step (forward + backward + AdamW step, so the AdamW state
  is allocated in it): the process's peak resident set above its resident set before the step
  (VmHWM reset through /proc/self/clear_refs, as ``bench.py``), i.e. activations, gradients and
  optimiser state; the weights are already resident;
* the median time of three further steps.

One intra-op thread; each (size, mode) in its own process, so freed memory of one does not hide
the next one's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("tiny", "small")


def _spec(size: str):
    from cheers_pl.spec import CheersSpec

    if size == "tiny":
        return CheersSpec.tiny()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench import small_spec  # the one definition of the small size

    return small_spec()


def measure(size: str, mode: str, rank: int) -> dict:
    """One (size, mode) row, in this process (see the module docstring)."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench import peak_rss_delta

    from cheers_pl.finetune.lora import LoraSpec, count_parameters
    from cheers_pl.io.checkpoint_io import CheersCheckpointIO
    from cheers_pl.smoke import mixed_batch
    from cheers_pl.stages import SFTStage

    torch.set_num_threads(1)
    torch.manual_seed(0)
    lora = LoraSpec(rank=rank, alpha=2 * rank, dropout=0.05) if mode == "lora" else None
    module = SFTStage(spec=_spec(size), lora=lora, warmup_ratio=0.0)
    module.configure_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as bench.build: non-trivial velocities (lora_B too: a trained adapter)
        for p in module.model.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model = module.model.train()
    trainable, total = count_parameters(model)
    batch = mixed_batch(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    peak_mib, how = peak_rss_delta(step)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)

    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[CheersCheckpointIO()],
    )
    trainer.fit(module, DataLoader([batch], batch_size=None))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.ckpt"
        trainer.save_checkpoint(path)
        ckpt_bytes = path.stat().st_size
    return {
        "size": size,
        "mode": mode,
        "rank": rank if lora else None,
        "trainable": trainable,
        "total": total,
        "checkpoint_bytes": ckpt_bytes,
        "peak_step_mib": round(peak_mib, 1),
        "memory": how,
        "step_s": round(statistics.median(times), 4),
    }


def _row_in_child(size: str, mode: str, rank: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", size, mode, "--rank", str(rank)]
    env = {**os.environ, "CHEERS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bench_lora: {size} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    """The Markdown table: one line per size and mode, LoRA's ratios to the full step beside it."""
    lines = [
        "| size | mode | trainable params | of total | checkpoint | peak step memory | step |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    full = {r["size"]: r for r in rows if r["mode"] == "full"}

    def ratio(r: dict, key: str) -> str:
        f = full.get(r["size"])
        return f" ({r[key] / f[key]:.1%})" if f is not None and r is not f and f[key] else ""

    for r in rows:
        mode = "full stage IV" if r["mode"] == "full" else f"LoRA r={r['rank']}"
        ckpt = f"{r['checkpoint_bytes'] / 1e6:.2f} MB{ratio(r, 'checkpoint_bytes')}"
        lines.append(
            f"| {r['size']} | {mode} | {r['trainable']:,}{ratio(r, 'trainable')} | "
            f"{r['trainable'] / r['total']:.2%} | {ckpt} | "
            f"{r['peak_step_mib']:.1f} MiB{ratio(r, 'peak_step_mib')} | {r['step_s'] * 1e3:.0f} ms |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from cheers_pl.cli_help import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="bench_lora.py", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES), help="model sizes")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*args.one, args.rank)))
        return 0
    rows = []
    todo = [(s, m) for s in args.sizes for m in ("full", "lora")]
    start = time.perf_counter()
    for k, (size, mode) in enumerate(todo, 1):
        print(
            f"bench_lora: row {k}/{len(todo)} ({time.perf_counter() - start:.0f} s so far): {size} {mode}",
            file=sys.stderr,
            flush=True,
        )
        rows.append(_row_in_child(size, mode, args.rank))
    print("LoRA vs a full stage IV step (CPU, fp32, one thread, one mixed batch):\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
