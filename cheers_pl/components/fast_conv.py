"""The CPU fast path of the convolution stacks: the pixel decoder D, the VAE decoder and encoder.

At the released sizes nearly all of CHEERS' CPU time outside the LLM is 3x3 convolutions of the
VAE-style decoder D(z_t) (run on every understanding image, at every sampler step and twice per
image in a training step) and of the VAE. Those convolutions already run near the core's peak
FLOP rate, so this path saves work and memory traffic around them, computing the same function:

* **Upsample as four 2x2 convolutions.** A nearest 2x upsample followed by a 3x3 convolution is,
  for each of the four output phases (row and column parity), a 2x2 convolution of the
  low-resolution input whose taps are sums of the 3x3 taps. 4/9 of the multiply-adds, and the
  upsampled tensor is never built (:func:`upsample_conv`).
* **GroupNorm + SiLU** with the activation in place when no gradient is recorded, the residual
  added in place, and diffusers' ``/ output_scale_factor`` skipped when it is 1.0 (an exact no-op).
* **The allocator keeps freed memory** (:func:`tune_cpu_allocator`): by default glibc hands the
  large freed activation buffers back to the kernel between calls, so every call page-faults
  ~100 MB of fresh zeroed pages at the released tiny size (~20% of a decoder pass).

Everything else (attention blocks, unusual resnet variants) runs the diffusers module itself. The
outputs equal the plain modules' up to float rounding (tests/test_fast_paths.py).

Not channels-last: measured on CPU (oneDNN, fp32, one thread) the 3x3 convolutions ran no faster
in that layout, PyTorch's channels-last GroupNorm kernel was ~10x less accurate (1.7e-5 against
1e-6 from float64 on a (2, 32, 128, 128) input), and channels-last convolutions ~4x; the
contiguous layout keeps the fast path within 1e-5 of the plain one.
``torch.compile`` (:func:`compiled`) is a separate switch; on a CPU where the convolutions
dominate it measured no gain (``make bench``), so it is off by default.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_TUNED: list[bool] = []  # [result] once tried


def tune_cpu_allocator() -> bool:
    """Tell glibc's malloc to keep freed memory in the process (once; True where it applied).

    Sets ``M_MMAP_THRESHOLD`` to 256 MiB and ``M_TRIM_THRESHOLD`` to 1 GiB, so activation
    buffers below 256 MiB come from the heap and freed ones are reused instead of being returned
    to the kernel and page-faulted back in. Process-wide; the resident set then stays near its
    peak instead of shrinking between calls. Opt out with ``CHEERS_TUNE_MALLOC=0``. No-op off
    glibc (macOS, Windows, musl).
    """
    if _TUNED:
        return _TUNED[0]
    ok = False
    if os.environ.get("CHEERS_TUNE_MALLOC", "1") != "0" and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_threshold = -1, -3
            ok = bool(libc.mallopt(m_mmap_threshold, 256 << 20)) and bool(
                libc.mallopt(m_trim_threshold, 1 << 30)
            )
        except (OSError, AttributeError):
            ok = False
    _TUNED.append(ok)
    return ok


# -- pieces ------------------------------------------------------------------------------------
def gn_silu(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """SiLU(GroupNorm(x)); the SiLU in place unless a gradient is being recorded."""
    h = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(h, inplace=not torch.is_grad_enabled())


def _phase_weights(w: Tensor) -> list[Tensor]:
    """The four 2x2 kernels (phase (py, px) at index 2 py + px) of a 3x3 kernel after a 2x upsample.

    Output row 2i + py reads upsampled rows 2i + py - 1 .. 2i + py + 1, i.e. low-resolution rows
    (i - 1, i, i) for py = 0 and (i, i, i + 1) for py = 1: taps (0 | 1 + 2) and (0 + 1 | 2)."""
    rows = (
        torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),
        torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2),
    )
    out = []
    for r in rows:
        out.append(torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1))
        out.append(torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1))
    return out


def upsample_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(interpolate(x, scale_factor=2, mode="nearest"))`` for a 3x3, stride-1, pad-1 conv.

    x (N, C, H, W) -> (N, K, 2H, 2W); four 2x2 convolutions of the zero-padded low-resolution
    input (phase (py, px) gives the outputs (2i + py, 2j + px)), interleaved."""
    n, _, h, w = x.shape
    xp = F.pad(x, (1, 1, 1, 1))
    phases = [
        F.conv2d(xp[:, :, py : py + h + 1, px : px + w + 1], k, conv.bias)
        for (py, px), k in zip(((0, 0), (0, 1), (1, 0), (1, 1)), _phase_weights(conv.weight), strict=True)
    ]
    k = phases[0].shape[1]
    y = torch.stack(phases, 0).view(2, 2, n, k, h, w)
    return y.permute(2, 3, 4, 0, 5, 1).reshape(n, k, 2 * h, 2 * w)


def _upsampler_ok(u: nn.Module) -> bool:
    conv = getattr(u, "conv", None)
    return (
        getattr(u, "interpolate", False)
        and getattr(u, "use_conv", False)
        and not getattr(u, "use_conv_transpose", True)
        and getattr(u, "norm", None) is None
        and getattr(u, "name", "conv") == "conv"
        and isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


def upsample(u: nn.Module, x: Tensor) -> Tensor:
    """A diffusers ``Upsample2D`` (nearest 2x, then its conv), as :func:`upsample_conv` where it fits."""
    return upsample_conv(u.conv, x) if _upsampler_ok(u) else u(x)


def _resnet_ok(r: nn.Module) -> bool:
    return (
        getattr(r, "upsample", 1) is None
        and getattr(r, "downsample", 1) is None
        and isinstance(getattr(r, "nonlinearity", None), nn.SiLU)
        and isinstance(getattr(r, "norm1", None), nn.GroupNorm)
        and isinstance(getattr(r, "norm2", None), nn.GroupNorm)
        and getattr(r, "time_embedding_norm", "default") == "default"
    )


def resnet(r: nn.Module, x: Tensor) -> Tensor:
    """A diffusers ``ResnetBlock2D`` without time embedding: x + conv2(act(gn2(conv1(act(gn1(x))))))."""
    if not _resnet_ok(r):
        return r(x, None)
    h = r.conv1(gn_silu(r.norm1, x))
    h = r.conv2(r.dropout(gn_silu(r.norm2, h)))
    shortcut = r.conv_shortcut(x) if r.conv_shortcut is not None else x
    # In place into conv2's fresh output (its backward does not keep it), unless autocast left a
    # low-precision h and a float shortcut: those add up in float, as in the plain block.
    in_place = h.dtype == torch.promote_types(h.dtype, shortcut.dtype)
    h = h.add_(shortcut) if in_place else h + shortcut
    if r.output_scale_factor != 1.0:
        h = h / r.output_scale_factor
    return h


def _mid_block(mid: nn.Module, h: Tensor) -> Tensor:
    h = resnet(mid.resnets[0], h)
    for attn, res in zip(mid.attentions, mid.resnets[1:], strict=True):
        if attn is not None:
            h = attn(h, temb=None)
        h = resnet(res, h)
    return h


def _checkpointing(module: nn.Module) -> bool:
    """diffusers' gradient checkpointing is on and recording: leave it to the module itself."""
    return torch.is_grad_enabled() and bool(getattr(module, "gradient_checkpointing", False))


def decoder_supported(decoder: nn.Module) -> bool:
    """Whether ``decoder`` is a diffusers ``Decoder`` this path knows (else it runs as it is)."""
    names = ("conv_in", "mid_block", "up_blocks", "conv_norm_out", "conv_act", "conv_out")
    return (
        all(hasattr(decoder, n) for n in names)
        and isinstance(decoder.conv_norm_out, nn.GroupNorm)
        and isinstance(decoder.conv_act, nn.SiLU)
        and type(decoder.mid_block).__name__ == "UNetMidBlock2D"
        and all(type(b).__name__ == "UpDecoderBlock2D" for b in decoder.up_blocks)
    )


def decoder_forward(decoder: nn.Module, z: Tensor) -> Tensor:
    """The diffusers ``Decoder`` on z (N, C, h, w) -> (N, 3, H, W), by the fast pieces."""
    tune_cpu_allocator()
    if not decoder_supported(decoder) or _checkpointing(decoder):
        return decoder(z)
    h = decoder.conv_in(z)
    h = _mid_block(decoder.mid_block, h)
    for block in decoder.up_blocks:
        for r in block.resnets:
            h = resnet(r, h)
        for u in block.upsamplers or ():
            h = upsample(u, h)
    return decoder.conv_out(gn_silu(decoder.conv_norm_out, h))


def encoder_forward(encoder: nn.Module, x: Tensor) -> Tensor:
    """A diffusers ``Encoder`` (its down-samplers pad asymmetrically, so they run as they are) with
    the fast resnets and the allocator tuned."""
    tune_cpu_allocator()
    names = ("conv_in", "down_blocks", "mid_block", "conv_norm_out", "conv_act", "conv_out")
    if not (
        all(hasattr(encoder, n) for n in names)
        and isinstance(encoder.conv_norm_out, nn.GroupNorm)
        and isinstance(encoder.conv_act, nn.SiLU)
        and type(encoder.mid_block).__name__ == "UNetMidBlock2D"
        and all(type(b).__name__ == "DownEncoderBlock2D" for b in encoder.down_blocks)
    ) or _checkpointing(encoder):
        return encoder(x)
    h = encoder.conv_in(x)
    for block in encoder.down_blocks:
        for r in block.resnets:
            h = resnet(r, h)
        for d in block.downsamplers or ():
            h = d(h)
    h = _mid_block(encoder.mid_block, h)
    return encoder.conv_out(gn_silu(encoder.conv_norm_out, h))


# -- torch.compile switch -----------------------------------------------------------------------
_COMPILED: dict[int, object] = {}


def compiled(fn, key: int):
    """``torch.compile(fn)`` (cached under ``key``), or ``fn`` itself with a one-line note when
    compiling is unavailable here (no C++ compiler, unsupported platform)."""
    if key in _COMPILED:
        return _COMPILED[key]
    try:
        out = torch.compile(fn, dynamic=False)
    except Exception as err:  # noqa: BLE001 - any failure means: run eagerly
        print(f"cheers: torch.compile unavailable ({type(err).__name__}); running eagerly", file=sys.stderr)
        out = fn
    _COMPILED[key] = out
    return out


def run_compiled(fn, key: int, *args):
    """``compiled(fn, key)(*args)``; a compile failure on the first call falls back to ``fn`` (one line)."""
    c = compiled(fn, key)
    try:
        return c(*args)
    except Exception as err:  # noqa: BLE001
        if c is fn:
            raise
        print(f"cheers: torch.compile failed ({type(err).__name__}); running eagerly", file=sys.stderr)
        _COMPILED[key] = fn
        return fn(*args)
