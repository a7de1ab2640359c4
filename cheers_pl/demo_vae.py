"""Stage 0 of ``make demo``: fit the tiny FLUX.2-style VAE as an autoencoder on the demo images.

CHEERS keeps its VAE frozen, and there are no pretrained weights at the kit's tiny size, so a
random tiny VAE would make every generation and every reconstruction of the demo meaningless.
This module trains the tiny ``AutoencoderKLFlux2`` on reconstruction of the demo images
(posterior mean -> decoder, MSE, plus a small penalty keeping the latents well scaled), sets its
``bn`` running statistics to those of the patchified latents (as FLUX.2's released ``bn`` holds),
and saves it as a diffusers folder for the ``vae`` component's ``pretrained`` flavor::

    python -m cheers_pl.demo_vae --shards demo/generation demo/understanding --out demo/vae

The fit is seeded with its own generators and never touches torch's global RNG. Re-running with
the same size and steps finds ``out/fit.json`` and returns at once (``--force`` refits).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLFlux2
from torch import Tensor

from cheers_pl import registry
from cheers_pl.components.vae import build_vae, patchify
from cheers_pl.data.images import decode_image, resize_crop, to_tensor
from cheers_pl.data.schema import SampleError, from_raw
from cheers_pl.data.shards import expand_shards, read_shard

FIT_FILE = "fit.json"
LATENT_PENALTY = 1e-4


def collect_images(shard_dirs: Sequence[str], size: int, limit: int | None = None) -> Tensor:
    """Every distinct image of the shards, centre-cropped to ``size``: (N, 3, size, size) in [0, 1].

    Images are deduplicated by their encoded bytes (the demo stores each photo in several
    samples); samples that fail the schema or whose image does not decode are skipped.
    """
    seen: set[bytes] = set()
    out: list[Tensor] = []
    for url in expand_shards(list(shard_dirs)):
        for raw in read_shard(url):
            try:
                images = from_raw(raw).images
            except SampleError:
                continue
            for data in images:
                digest = hashlib.sha1(data).digest()
                if digest in seen:
                    continue
                seen.add(digest)
                try:
                    img, _ = decode_image(data)
                except SampleError:
                    continue
                out.append(to_tensor(resize_crop(img, size)))
                if limit is not None and len(out) >= limit:
                    return torch.stack(out)
    if not out:
        raise ValueError(f"no images found in shards {list(shard_dirs)}")
    return torch.stack(out)


def _posterior_mean(vae: AutoencoderKLFlux2, x: Tensor) -> Tensor:
    return vae.encode(x).latent_dist.mean


@torch.no_grad()
def set_bn_stats(vae: AutoencoderKLFlux2, images: Tensor, batch_size: int = 64) -> None:
    """Set ``vae.bn``'s running mean/var to the per-channel stats of the patchified posterior means."""
    vae.eval()
    z = torch.cat(
        [
            patchify(_posterior_mean(vae, images[i : i + batch_size]))
            for i in range(0, len(images), batch_size)
        ]
    )
    vae.bn.running_mean.copy_(z.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(z.var(dim=(0, 2, 3)))
    vae.bn.num_batches_tracked.fill_(1)


def fit_vae(
    images: Tensor,
    steps: int = 400,
    lr: float = 2e-3,
    batch_size: int = 16,
    seed: int = 0,
    flavor_overrides: dict[str, Any] | None = None,
    log_every: int = 50,
    progress: bool = True,
) -> tuple[AutoencoderKLFlux2, list[float]]:
    """Train the tiny VAE to reconstruct ``images`` (N,3,H,W in [0,1]); returns (vae, loss curve).

    The loss is MSE(decode(posterior mean), x) + ``LATENT_PENALTY`` * mean(posterior mean ** 2),
    with random horizontal flips, AdamW and a cosine-decayed learning rate. The weights are
    initialised under a forked RNG seeded with ``seed``; batches and flips come from a private
    ``torch.Generator``, so torch's global RNG state is unchanged. Afterwards ``vae.bn`` holds the
    per-channel mean/var of the patchified latents of ``images`` and the model is in eval mode.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N,3,H,W), got {tuple(images.shape)}")
    cfg = registry.config("vae", "tiny", **(flavor_overrides or {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = build_vae(cfg)
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    vae.requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))
    )
    n = len(images)
    losses: list[float] = []
    order = torch.randperm(n, generator=gen)
    pos = 0
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if pos + min(batch_size, n) > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += len(idx)
        x = images[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        mean = _posterior_mean(vae, x)
        rec = vae.decode(mean).sample
        loss = F.mse_loss(rec, x) + LATENT_PENALTY * mean.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress and (step % log_every == 0 or step == steps):
            print(f"vae fit step {step}/{steps} loss {losses[-1]:.5f} ({time.perf_counter() - start:.1f}s)")
    vae.requires_grad_(False)
    set_bn_stats(vae, images)
    return vae, losses


@torch.no_grad()
def reconstruction_mse(vae: AutoencoderKLFlux2, images: Tensor, batch_size: int = 64) -> float:
    """Mean squared error of decode(posterior mean) against ``images`` (eval mode)."""
    vae.eval()
    total = 0.0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        total += F.mse_loss(vae.decode(_posterior_mean(vae, x)).sample, x, reduction="sum").item()
    return total / images.numel()


def _is_fitted(out: Path, size: int, steps: int) -> bool:
    if not (out / "config.json").is_file() or not (out / FIT_FILE).is_file():
        return False
    try:
        fit = json.loads((out / FIT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return fit.get("size") == size and fit.get("steps") == steps


def fit_and_save(
    shard_dirs: Sequence[str],
    out: str,
    size: int = 32,
    steps: int = 400,
    force: bool = False,
    limit: int | None = None,
    progress: bool = True,
    **kw: Any,
) -> str:
    """Collect the shards' images, fit the tiny VAE and ``save_pretrained(out)``; returns ``out`` absolute.

    The path is absolute because configs and checkpoints store it (``vae.path``): a relative one
    would only load from the folder the fit ran in.

    Also writes ``out/fit.json`` (loss curve, steps, size, image count, final reconstruction MSE).
    If ``out`` already holds a fit with the same size and steps it is kept unless ``force``.
    ``kw`` goes to :func:`fit_vae`.
    """
    folder = Path(out)
    if not force and _is_fitted(folder, size, steps):
        if progress:
            print(f"vae: {folder} already fitted (size {size}, {steps} steps); --force refits")
        return str(folder.resolve())
    images = collect_images(shard_dirs, size, limit=limit)
    start = time.perf_counter()
    vae, losses = fit_vae(images, steps=steps, progress=progress, **kw)
    seconds = time.perf_counter() - start
    mse = reconstruction_mse(vae, images)
    folder.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(folder)
    fit = {
        "size": size,
        "steps": steps,
        "images": len(images),
        "seconds": round(seconds, 2),
        "mse": mse,
        "losses": losses,
        "shards": [str(s) for s in shard_dirs],
    }
    (folder / FIT_FILE).write_text(json.dumps(fit, indent=1) + "\n")
    if progress:
        print(
            f"vae: fitted on {len(images)} images in {seconds:.1f}s, reconstruction MSE {mse:.5f} -> {folder}"
        )
    return str(folder.resolve())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cheers_pl.demo_vae", description=__doc__.splitlines()[0])
    p.add_argument("--shards", nargs="+", required=True, metavar="DIR", help="shard folders/specs")
    p.add_argument("--out", required=True, help="output diffusers folder")
    p.add_argument("--size", type=int, default=32, help="image size (default 32)")
    p.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    p.add_argument("--force", action="store_true", help="refit even if --out holds a matching fit")
    args = p.parse_args(argv)
    fit_and_save(args.shards, args.out, size=args.size, steps=args.steps, force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
