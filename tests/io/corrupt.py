"""Damage a checkpoint file the way storage does: one flipped bit inside a tensor's bytes."""

from __future__ import annotations

from pathlib import Path

import torch


def flip_a_tensor_bit(path: str | Path) -> None:
    """Flip one bit in the middle of the largest tensor of the checkpoint at ``path``, in place
    (the file still unzips and unpickles: only the value changes)."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    tensors = [v for v in _tensors(ckpt) if v.numel() * v.element_size() >= 64]
    big = max(tensors, key=lambda t: t.numel() * t.element_size()).contiguous()
    raw = big.reshape(-1).view(torch.uint8).numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = data.find(raw[:64])
    assert at >= 0, "tensor bytes not found in the file"
    data[at + len(raw) // 2] ^= 0x04
    path.write_bytes(bytes(data))


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
