"""GPU figures of the paper-size model: training step time, tokens/s, MFU; sampler seconds per image.

    python benchmarks/gpu_figures.py [--json gpu.json]                          (``make bench-gpu``)
    python benchmarks/gpu_figures.py --size tiny --device cpu --dtype fp32       (CPU check, seconds)

One prepared run for wherever a GPU is: ``CheersSpec.paper()`` with random weights (no downloads;
the zero-initialised layers get small random values, as ``benchmarks/bench.py`` does, so that the
sampler does real work), on one device.

* Training: stage II (everything trains but the frozen VAE and SigLIP's unused pooling head), bf16
  autocast over fp32 master weights (what Lightning's ``precision: bf16-mixed`` does), gradient
  checkpointing on (``cheers_pl.stages.base.enable_gradient_checkpointing``), forward + backward +
  gradient clipping (1.0, as the stage YAMLs) + AdamW step on one fixed mixed batch. The batch
  (:func:`training_batch`) cycles understanding (one image + question + long answer), generation
  (long caption + one ``<image_gen>`` image) and text samples, each filled with text to exactly
  ``--seq`` tokens (no padding), built with the model's processor like ``smoke.mixed_batch``.
  Reported: median step time after warm-up, tokens/s (every token of the batch, image placeholders
  included), samples/s, peak GPU memory (``torch.cuda.max_memory_allocated`` over the timed steps),
  model FLOPs per step, MFU and HFU.
* Model FLOPs (:func:`count_flops`): ``torch.utils.flop_counter.FlopCounterMode`` over ONE whole
  forward + backward of the model on the actual batch, with gradient checkpointing OFF (so the
  count has no recompute), run on a meta-device copy of the model (:func:`meta_flops`: FLOPs
  depend on shapes only, so this needs no memory and no device time; if the forward cannot run on
  meta, the real model is counted on the device instead, and if that runs out of memory, one
  sample of each kind, summed with its multiplicity: exact, as every FLOP is per sample). The
  counter's shape formulas cover matmuls, convolutions and the fused attention kernels (norms and
  element-wise ops count 0, as usual); attention is counted in full (no causal or image-block
  discount). Two adjustments, both to count model and not hardware FLOPs: the fused attention
  backward formulas also count the score recompute ``Q K^T`` of flash-style kernels, which is
  dropped (4/5 of the formula: dV, dP, dQ, dK; the math path's count); CPU's fused attention
  (absent from the counter's table) gets the same formulas. The same pass attributes every
  counted op to the model's top-level component that ran it: in the forward by module hooks, in
  the backward by the autograd node (labelled from the component's outputs). As a check, the LLM
  part should equal

      6 * N_ne * B * L  +  12 * n_layers * d_attn * B * L^2  +  6 * d * V * n_sup

  (N_ne: LLM parameters without the embedding / tied LM head; B x L: the batch; d_attn = heads x
  head_dim; the last term is the LM head, which runs only on the n_sup supervised positions; the
  non-matmul parameters (norms, biases) make the first term a slight over-estimate), printed beside
  the counted value. The CFM head runs on generation images only (256 tokens at stage A, 1024 at
  stage B); SigLIP and the pixel decoder D on every image; the frozen VAE encoder forward only.
  At paper size, 8 x 1024 tokens (3 und, 3 gen, 2 text): 1.47e14 FLOPs per step, LLM 51%, D 31%,
  SigLIP 12%, VAE encoder 5%, CFM head 2%. A second count with checkpointing ON gives the hardware
  FLOPs (with recompute) for the HFU. MFU = model FLOPs per step / median step time / peak, with
  the dense bf16 peak of the device looked up by name in :data:`PEAK_BF16` (``--peak-tflops``
  overrides; on CPU, in fp32, or on an unknown device: "n/a" unless given).
* Sampler: ``CheersModel.generate`` (text-prefix KV cache, CFG rows batched) at cfg 9.5, shift 0.5,
  ``--sample-steps`` (80) Euler steps, ``--images`` prompts in one call, in bf16 autocast; seconds
  per image = median call time / images (``torch.cuda.synchronize`` around each call). Then
  ``cheers_pl.model.generate_reference`` (the straightforward loop) for 1 image, beside ours for 1
  image, if the budget allows; else reported as skipped.
  Every phase that fails is reported as such (traceback on stderr) and the run goes on.

Time budget (``--time-budget``, default 420 s from the start of ``main``; imports are outside it):
timed training steps stop once another would pass 50% of it, the sampler (whose cost is estimated
from 1- and 2-step warm-up calls) fits its images and repeats into 90% of it (fewer images, or
skipped, if not), the reference into the rest; every cut is printed. At paper size on an H100/H200
the whole run is expected to take about 2 minutes, well inside the budget.

Output: a markdown header line (UTC date, device, torch, dtype) and tables as ``benchmarks/bench.py``
prints them; ``--json PATH`` writes the same numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_backward_flop_count, sdpa_flop_count

try:  # run as a script: benchmarks/ is on sys.path
    from bench import PROMPTS, build, table
except ImportError:  # imported as benchmarks.gpu_figures (the tests)
    from benchmarks.bench import PROMPTS, build, table

from cheers_pl.components.llm import IGNORE
from cheers_pl.model import CheersModel, generate_reference, parameter_summary
from cheers_pl.spec import CheersSpec
from cheers_pl.stages.base import enable_gradient_checkpointing

CFG_SCALE, SHIFT = 9.5, 0.5
TRAIN_SHARE, SAMPLER_SHARE = 0.5, 0.9  # of the time budget: training stops at 50%, the sampler at 90%
KINDS = ("und", "gen", "text")
PRECISION = {
    "bf16": "bf16 autocast over fp32 master weights (as Lightning's bf16-mixed)",
    "fp32": "fp32 (no autocast)",
}
# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s; the first entry whose substrings all occur in
# torch.cuda.get_device_name() (case-insensitive) wins, so the more specific names come first.
PEAK_BF16: list[tuple[tuple[str, ...], float]] = [
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (("H200", "NVL"), 835e12),
    (("H200",), 989e12),  # also GH200
    (("H800",), 989e12),
    (("B200",), 2250e12),
    (("A100",), 312e12),
    (("A800",), 312e12),
    (("L40S",), 362e12),
    (("L40",), 181e12),
    (("L4",), 121e12),
]
SIZES = {"paper": CheersSpec.paper, "tiny": CheersSpec.tiny}
DEFAULT_SHAPE = {"paper": (8, 1024), "tiny": (3, 128)}  # (--batch, --seq) per --size


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a device named like ``torch.cuda.get_device_name()``; None if unknown."""
    name = device_name.lower()
    for needles, peak in PEAK_BF16:
        if all(n.lower() in name for n in needles):
            return peak
    return None


# -- the training batch ---------------------------------------------------------------------------
_FILLER = (
    "the", "cat", "sat", "on", "a", "red", "sofa", "and", "looked", "at", "cup", "of", "coffee", "in",
    "light", "morning", "with", "blue", "sky", "over", "lake",
)  # fmt: skip


def _chat(kind: str, text: str) -> tuple[list[dict[str, str]], int]:
    """(messages, number of images) of one sample of ``kind`` whose free text is ``text``."""
    if kind == "und":
        return [
            {"role": "user", "content": "<image>\nDescribe the picture in detail."},
            {"role": "assistant", "content": text},
        ], 1
    if kind == "gen":
        return [{"role": "user", "content": text}, {"role": "assistant", "content": "<image_gen>"}], 1
    if kind == "text":
        return [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": text}], 0
    raise ValueError(f"sample kind {kind!r}; valid kinds are {list(KINDS)}")


def filled_sample(processor, kind: str, seq: int) -> dict[str, Tensor]:
    """One processor sample of ``kind`` ("und", "gen", "text") filled with text to ``seq`` tokens.

    The text is words that are one token each (with their leading space), so the length is hit
    exactly. Returns ``input_ids`` (L,) and ``labels`` (L,) with L = ``seq`` (or, should the
    tokenizer not allow it, the closest length below; then the batch is padded). Raises if ``seq``
    is shorter than the sample's fixed part (template, question, image span).
    """
    tok = processor.tokenizer
    vocab = [w for w in _FILLER if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1] or _FILLER
    words = lambda n: " ".join(vocab[i % len(vocab)] for i in range(n))  # noqa: E731
    encode = lambda n: processor.encode(*_chat(kind, words(n)))  # noqa: E731
    fixed = len(encode(0)["input_ids"])
    if fixed > seq:
        raise ValueError(f"--seq {seq} is shorter than a {kind!r} sample's fixed part ({fixed} tokens)")
    n, best = seq - fixed, encode(0)
    for _ in range(32):  # words are ~1 token each: a few corrections reach seq exactly
        sample = encode(n)
        length = len(sample["input_ids"])
        if length <= seq and length > len(best["input_ids"]):
            best = sample
        if length == seq:
            break
        n = max(0, n + (seq - length) if length < seq else n - max(1, (length - seq) // 2))
    return best


def training_batch(
    model: CheersModel, batch_size: int, seq: int, mix: tuple[str, ...] = KINDS, seed: int = 0
) -> dict[str, Tensor]:
    """A training batch of ``batch_size`` samples cycling through ``mix``, each ``seq`` tokens long.

    Returns the model's batch format: ``input_ids``, ``attention_mask``, ``labels`` (B, seq),
    ``images`` (N, 3, S, S) random in [0, 1] (one per "und"/"gen" sample, in sample order; absent if
    none), and the processor's gather indices (``batch_index``) as the data module sends them.
    """
    if batch_size < 1:
        raise ValueError(f"--batch must be >= 1, got {batch_size}")
    p, size = model.processor, model.image_size
    kinds = [mix[i % len(mix)] for i in range(batch_size)]
    batch = p.collate([filled_sample(p, kind, seq) for kind in kinds])
    n_img = sum(kind != "text" for kind in kinds)
    if n_img:
        g = torch.Generator().manual_seed(seed)
        batch["images"] = torch.rand((n_img, 3, size, size), generator=g)
    if hasattr(p, "batch_index"):
        batch.update(p.batch_index(batch["input_ids"], batch["attention_mask"], batch["labels"]))
    return batch


def to_device(batch: dict[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# -- FLOP counting ---------------------------------------------------------------------------------
def _without_recompute(formula: Callable[..., int]) -> Callable[..., int]:
    """A fused attention backward formula minus its score recompute (4 of its 5 equal matmuls)."""

    def counted(*args: Any, **kwargs: Any) -> int:
        return formula(*args, **kwargs) * 4 // 5

    counted._get_raw = True  # already takes raw arguments (FlopCounterMode must not re-wrap it)
    return counted


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value) * 4 // 5


def flop_overrides() -> dict[Any, Callable[..., int]]:
    """``custom_mapping`` for FlopCounterMode: model (not hardware) FLOPs of fused attention."""
    aten = torch.ops.aten
    out: dict[Any, Callable[..., int]] = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
    }
    for name in (
        "_scaled_dot_product_efficient_attention_backward",
        "_scaled_dot_product_flash_attention_backward",
        "_scaled_dot_product_cudnn_attention_backward",
        "_efficient_attention_backward",
        "_flash_attention_backward",
    ):
        packet = getattr(aten, name, None)
        if packet is not None and packet in flop_registry:
            out[packet] = _without_recompute(flop_registry[packet])
    return out


_LABEL, _OTHER = "cheers_component", "other"


class _ComponentFlops(TorchDispatchMode):
    """Counts FLOPs (with ``registry``'s formulas) per component: [forward, backward].

    Forward ops go to the innermost hooked module running (``stack``); backward ops to the
    component label of the autograd node executing them (``torch._C._current_autograd_node``).
    """

    def __init__(self, registry: dict[Any, Callable[..., int]]):
        super().__init__()
        self.registry = registry
        self.stack: list[str] = []
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            flops = int(formula(*args, **kwargs, out_val=out))
            node = torch._C._current_autograd_node()
            if node is None:
                self.counts[self.stack[-1] if self.stack else _OTHER][0] += flops
            else:
                self.counts[node.metadata.get(_LABEL, _OTHER)][1] += flops
        return out


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _label_graph(output: Any, component: str) -> None:
    """Label the not yet labelled autograd nodes behind ``output``'s tensors with ``component``."""
    todo = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node is None or _LABEL in node.metadata:
            continue
        node.metadata[_LABEL] = component
        todo.extend(n for n, _ in node.next_functions)


@contextlib.contextmanager
def _component_hooks(model: nn.Module, counter: _ComponentFlops) -> Iterator[None]:
    """Hooks on every module of each top-level child: keep ``counter.stack``; label the graph."""
    handles = []
    for name, child in model.named_children():
        for module in child.modules():

            def pre(_module, _args, name=name) -> None:
                counter.stack.append(name)

            def post(_module, _args, output, name=name) -> None:
                counter.stack.pop()
                _label_graph(output, name)

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class FlopCount:
    """FLOPs of one training step (forward + backward) on a batch.

    Attributes:
        total: FlopCounterMode's count of the whole forward + backward.
        forward: its count of the forward alone.
        by_component: top-level child (and "other") -> [forward, backward].
        how: "whole batch" or how it was counted instead.
    """

    total: int
    forward: int
    by_component: dict[str, list[int]] = field(default_factory=dict)
    how: str = "whole batch"

    def __add__(self, other: FlopCount) -> FlopCount:
        names = list(dict.fromkeys([*self.by_component, *other.by_component]))
        zero = [0, 0]
        comp = {
            k: [
                a + b
                for a, b in zip(self.by_component.get(k, zero), other.by_component.get(k, zero), strict=True)
            ]
            for k in names
        }
        return FlopCount(self.total + other.total, self.forward + other.forward, comp, self.how)

    def scaled(self, n: int) -> FlopCount:
        comp = {k: [n * f, n * b] for k, (f, b) in self.by_component.items()}
        return FlopCount(n * self.total, n * self.forward, comp, self.how)


def count_flops(
    model: CheersModel,
    batch: dict[str, Tensor],
    autocast: contextlib.AbstractContextManager | None = None,
    by_component: bool = True,
) -> FlopCount:
    """Count one forward + backward of ``model`` on ``batch`` (whatever checkpointing is set).

    The gradients are cleared afterwards; nothing is stepped. ``autocast`` (entered around the
    forward) makes the count see the same kernels as the timed steps.
    """
    device = model.placeholder_ids.device
    gen = None if device.type == "meta" else torch.Generator(device=device).manual_seed(0)
    counter = FlopCounterMode(display=False, custom_mapping=flop_overrides())
    comp = _ComponentFlops(counter.flop_registry)
    hooks = _component_hooks(model, comp) if by_component else contextlib.nullcontext()
    modes = comp if by_component else contextlib.nullcontext()
    try:
        with hooks, counter, modes:
            with autocast or contextlib.nullcontext():
                out = model(batch, generator=gen)
            forward = counter.get_total_flops()
            out.loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
    components = {k: list(v) for k, v in comp.counts.items()} if by_component else {}
    return FlopCount(counter.get_total_flops(), forward, components)


def count_step_flops(
    model: CheersModel,
    batch: dict[str, Tensor],
    kinds: list[str],
    make_one: Callable[[str], dict[str, Tensor]],
    autocast: contextlib.AbstractContextManager | None = None,
) -> FlopCount:
    """:func:`count_flops` on the whole batch; on out-of-memory, per kind x its count in ``kinds``."""
    try:
        return count_flops(model, batch, autocast)
    except torch.OutOfMemoryError:
        pass
    _free_memory()
    total = None
    for kind in dict.fromkeys(kinds):
        one = count_flops(model, make_one(kind), autocast).scaled(kinds.count(kind))
        total = one if total is None else total + one
        _free_memory()
    total.how = "one sample per kind x its count (the whole batch ran out of memory)"
    return total


def meta_flops(spec: CheersSpec, batch: dict[str, Tensor]) -> tuple[FlopCount, int]:
    """(model FLOPs of one step, without recompute; its FLOPs with checkpointing's recompute).

    Counted on a meta-device copy of the model (as stage II: everything trains but the VAE) and
    ``batch`` (CPU or any device): shapes only, so no memory and no device time. Raises if the
    forward reads a device value on the host (meta tensors have none).
    """
    with torch.device("meta"):
        meta = CheersModel(spec)
    set_stage_two_trainable(meta)
    meta.train()
    on_meta = to_device(batch, "meta")
    count = count_flops(meta, on_meta)
    count.how = "whole batch, on the meta device"
    enable_gradient_checkpointing(meta)
    return count, count_flops(meta, on_meta, by_component=False).total


def llm_analytic_flops(model: CheersModel, batch: dict[str, Tensor]) -> int:
    """6 N_ne B L + 12 n_layers d_attn B L^2 + 6 d V n_sup (see the module docstring)."""
    llm, cfg = model.llm.model, model.resolved.llm
    emb = llm.get_input_embeddings().weight
    tied = {id(emb), id(llm.lm_head.weight)}
    n_ne = sum(p.numel() for p in llm.parameters() if id(p) not in tied)
    b, length = batch["input_ids"].shape
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_attn = cfg.num_attention_heads * head_dim
    labels = batch["labels"].masked_fill(~batch["attention_mask"].bool(), IGNORE)
    n_sup = int((labels[:, 1:] != IGNORE).sum())
    return (
        6 * n_ne * b * length
        + 12 * cfg.num_hidden_layers * d_attn * b * length**2
        + 6 * cfg.hidden_size * emb.shape[0] * n_sup
    )


# -- measuring ------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Clock:
    """Seconds since the start of the run and the budget's deadlines."""

    def __init__(self, budget: float):
        self.start, self.budget = time.perf_counter(), budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self, share: float) -> float:
        """Seconds until ``share`` of the budget is used (negative when past it)."""
        return share * self.budget - self.elapsed()


def timed_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn``, synchronised on ``device`` before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def set_stage_two_trainable(model: CheersModel) -> None:
    """As ``CheersModule.set_trainable`` with ``trains="all"``: all but the VAE and SigLIP's head."""
    model.requires_grad_(True)
    model.vae.requires_grad_(False)
    head = getattr(model.semantic_encoder.vit, "head", None)
    if head is not None:
        head.requires_grad_(False)


def train_figures(
    model: CheersModel,
    batch: dict[str, Tensor],
    autocast: contextlib.AbstractContextManager,
    warmup: int,
    steps: int,
    clock: Clock,
    notes: list[str],
) -> dict[str, Any]:
    """Warm-up then timed training steps (see the module docstring); stops at TRAIN_SHARE of the budget."""
    device = model.placeholder_ids.device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    gen = torch.Generator(device=device).manual_seed(0)
    losses: list[float] = []

    def step() -> None:
        with autocast:
            out = model(batch, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(out.loss.detach())

    model.train()
    warm = [timed_call(step, device) for _ in range(warmup)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    for i in range(steps):
        if times and clock.left(TRAIN_SHARE) < statistics.median(times):
            notes.append(
                f"training: stopped after {i} of {steps} timed steps ({TRAIN_SHARE:.0%} of the "
                f"{clock.budget:g} s budget reached)"
            )
            break
        times.append(timed_call(step, device))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    opt.zero_grad(set_to_none=True)
    model.eval()
    tokens = int(batch["attention_mask"].sum())
    median = statistics.median(times)
    return dict(
        step_s=median,
        step_s_all=times,
        warmup_s=warm,
        steps=len(times),
        samples=batch["input_ids"].shape[0],
        seq=batch["input_ids"].shape[1],
        tokens=tokens,
        tokens_per_s=tokens / median,
        samples_per_s=batch["input_ids"].shape[0] / median,
        peak_mem_bytes=peak,
        last_loss=float(losses[-1]) if losses else None,
    )


def sampler_figures(
    model: CheersModel,
    autocast: contextlib.AbstractContextManager,
    images: int,
    steps: int,
    repeats: int,
    clock: Clock,
    notes: list[str],
    reference: bool = True,
) -> dict[str, Any]:
    """Seconds per image of ``generate`` (``images`` prompts in one call) and of the reference (1 image)."""
    device = model.placeholder_ids.device
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(images)]
    kw = dict(cfg_scale=CFG_SCALE, shift=SHIFT, seed=0)

    def ours(n: int, k: int) -> Callable[[], object]:
        def call() -> object:
            with autocast:
                return model.generate(prompts[:n], steps=k, **kw)

        return call

    def ref(k: int) -> Callable[[], object]:
        def call() -> object:
            with autocast:
                return generate_reference(model, prompts[:1], steps=k, **kw)

        return call

    def estimate(make: Callable[[int], Callable[[], object]]) -> float:
        """Seconds of a ``steps``-step call, from warm-up calls of 1 (twice) and 2 steps."""
        timed_call(make(1), device)  # first call: kernel selection, allocator growth
        one, two = timed_call(make(1), device), timed_call(make(2), device)
        per_step = max(two - one, 0.0)
        return max(one - per_step, 0.0) + steps * per_step

    model.eval()
    out: dict[str, Any] = dict(cfg_scale=CFG_SCALE, shift=SHIFT, steps=steps, image_size=model.image_size)
    est = estimate(lambda k: ours(images, k))
    left = clock.left(SAMPLER_SHARE)
    n = images
    if est > left:
        n = min(images, math.floor(images * left / est)) if est > 0 else images
        if n < 1:
            notes.append(f"sampler: skipped (estimated {est:.0f} s for {images} images, {left:.0f} s left)")
            out["ours"] = None
        else:
            notes.append(f"sampler: {n} instead of {images} images to fit the budget ({left:.0f} s left)")
    if n >= 1:
        times: list[float] = []
        while len(times) < repeats:
            if times and clock.left(SAMPLER_SHARE) < statistics.median(times):
                notes.append(f"sampler: {len(times)} of {repeats} repeats (budget)")
                break
            times.append(timed_call(ours(n, steps), device))
        median = statistics.median(times)
        out["ours"] = dict(images=n, call_s=median, s_per_image=median / n, runs=len(times), estimate_s=est)

    out["reference"] = out["ours_1"] = None
    if not reference:
        notes.append("reference sampler: skipped (--no-reference)")
        return out
    if clock.left(1.0) <= 0:
        notes.append("reference sampler: skipped (budget spent)")
        return out
    est_ref = estimate(ref)
    est_one = est / images if n == 1 else estimate(lambda k: ours(1, k))
    left = clock.left(1.0)
    if est_ref + est_one > left:
        notes.append(
            f"reference sampler: skipped (estimated {est_ref + est_one:.0f} s with ours at 1 image, "
            f"{left:.0f} s left)"
        )
        return out
    ref_s = timed_call(ref(steps), device)
    one_s = out["ours"]["call_s"] if n == 1 and out["ours"] else timed_call(ours(1, steps), device)
    out["reference"] = dict(images=1, s_per_image=ref_s, runs=1, estimate_s=est_ref)
    out["ours_1"] = dict(images=1, s_per_image=one_s, runs=1)
    out["speedup_1"] = ref_s / one_s
    return out


# -- output ---------------------------------------------------------------------------------------
def _flops(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} FLOP"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _gib(n: int | None) -> str:
    return "n/a (CPU)" if n is None else f"{n / 2**30:,.1f} GiB"


def render(r: dict[str, Any]) -> str:
    """The markdown report of a results dict (as written to ``--json``)."""
    lines = [
        f"# CHEERS GPU figures: {r['date_utc']} UTC, {r['device_name']}, torch {r['torch']}, "
        f"{r['precision']}, size {r['size']}",
        "",
        "## Parameters\n",
        table(
            ["component", "parameters", "trainable"],
            [[n, f"{a:,}", f"{t:,}"] for n, a, t in r["params"]]
            + [["total", f"{r['params_total']:,}", f"{r['params_trainable']:,}"]],
        ),
    ]
    t, f = r.get("train"), r.get("flops")
    lines.append(
        f"\n## Training step ({r['batch_desc']}; gradient checkpointing on; forward + backward + clip "
        "+ AdamW)\n"
    )
    if t is None:
        lines.append(f"not measured: {r.get('train_error', 'n/a')}")
    else:
        headers = [
            "batch (samples x tokens)", "tokens/step", "step time (median)", "tokens/s", "samples/s",
            "model FLOPs/step", "achieved", "MFU", "HFU (with recompute)", "peak memory",
        ]  # fmt: skip
        row = [
            f"{t['samples']} x {t['seq']}", f"{t['tokens']:,}",
            f"{t['step_s'] * 1e3:,.1f} ms ({t['steps']} steps)", f"{t['tokens_per_s']:,.0f}",
            f"{t['samples_per_s']:.2f}", _flops(f and f["total"]),
            f"{_flops(r.get('achieved_flops_s'))}/s", _pct(r.get("mfu")), _pct(r.get("hfu")),
            _gib(t["peak_mem_bytes"]),
        ]  # fmt: skip
        lines.append(table(headers, [row]))
        peak = r.get("peak_flops_s")
        lines.append(f"\npeak: {_flops(peak) + '/s' if peak else 'n/a'} ({r['peak_source']})")
    if f is not None:
        lines.append(f"\n## Model FLOPs per training step (FlopCounterMode, no recompute; {f['how']})\n")
        rows = []
        for name, (fw, bw) in f["by_component"].items():
            rows.append([name, _flops(fw), _flops(bw), _flops(fw + bw), _pct((fw + bw) / f["total"])])
        rows.append(
            ["total", _flops(f["forward"]), _flops(f["total"] - f["forward"]), _flops(f["total"]), ""]
        )
        lines.append(table(["component", "forward", "backward", "forward + backward", "share"], rows))
        lines.append(
            "\nLLM check: 6 N_ne B L + 12 n_layers d_attn B L^2 + 6 d V n_sup = "
            f"{_flops(f['llm_analytic'])}; counted {_flops(f['llm_counted'])} (ratio {f['llm_ratio']:.4f})."
            f"\nWith recompute (checkpointing on): {_flops(f.get('with_recompute'))}."
        )
    s = r.get("sampler")
    weights = f"; {s['weights']} weights" if s else ""
    lines.append(f"\n## Sampler (cfg {CFG_SCALE:g}, shift {SHIFT:g}, Euler{weights})\n")
    if s is None:
        lines.append(f"not measured: {r.get('sampler_error', 'n/a')}")
    else:
        rows = []
        for key, label in (
            ("ours", "generate (KV cache, CFG rows batched)"),
            ("ours_1", "generate, 1 image"),
            ("reference", "generate_reference (no cache), 1 image"),
        ):
            v = s.get(key)
            if v is None:
                rows.append([label, f"{s['image_size']} px", "skipped", "", ""])
            else:
                shape = f"{v['images']} x {s['steps']}"
                rows.append([label, f"{s['image_size']} px", shape, f"{v['s_per_image']:.3f}", v["runs"]])
        lines.append(table(["sampler", "image", "images x steps", "s/image", "runs"], rows))
        if s.get("speedup_1"):
            lines.append(f"\nspeed-up of generate over generate_reference at 1 image: {s['speedup_1']:.2f}x")
    lines.append("\n## Notes\n")
    lines += [f"- {n}" for n in r["notes"]] or ["- none: every measurement ran in full"]
    took = ", ".join(f"{k} {v:.1f} s" for k, v in r["phase_s"].items())
    lines.append(f"\n(total {r['total_s']:.0f} s of a {r['budget_s']:g} s budget: {took})")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="paper")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--dtype", choices=list(PRECISION), default=None, help="default: bf16 on cuda, fp32 on cpu"
    )
    parser.add_argument("--batch", type=int, default=None, help="samples per step (paper: 8, tiny: 3)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sample (paper: 1024, tiny: 128)")
    parser.add_argument("--mix", default=",".join(KINDS), help="sample kinds cycled over the batch")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps (median)")
    parser.add_argument("--sample-steps", type=int, default=80, help="Euler steps per image")
    parser.add_argument("--images", type=int, default=4, help="prompts in one generate call")
    parser.add_argument("--sample-repeats", type=int, default=2, help="timed generate calls (median)")
    parser.add_argument("--time-budget", type=float, default=420.0, help="seconds for the whole run")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak for the MFU (dense TFLOP/s)")
    parser.add_argument("--no-reference", action="store_true", help="skip generate_reference")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    default_b, default_l = DEFAULT_SHAPE[args.size]
    args.batch, args.seq = args.batch or default_b, args.seq or default_l
    args.mix = tuple(k.strip() for k in args.mix.split(",") if k.strip())
    bad = [k for k in args.mix if k not in KINDS]
    if bad or not args.mix:
        parser.error(f"--mix: unknown kinds {bad}; use a comma list of {list(KINDS)}")
    for name in ("train_steps", "sample_steps", "images", "sample_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def phase(name: str, notes: list[str], fn: Callable[[], Any]) -> Any:
    """``fn()``, or None with a note (and the traceback on stderr) if it fails: a run always reports."""
    try:
        return fn()
    except torch.OutOfMemoryError as e:
        notes.append(f"{name}: out of memory ({_first_line(e)})")
    except Exception as e:
        traceback.print_exc()
        notes.append(f"{name}: failed ({_first_line(e)})")
    finally:
        _free_memory()
    return None


def flop_figures(
    spec: CheersSpec,
    model: CheersModel,
    cpu_batch: dict[str, Tensor],
    batch: dict[str, Tensor],
    kinds: list[str],
    autocast: contextlib.AbstractContextManager,
    notes: list[str],
) -> dict[str, Any] | None:
    """Model FLOPs (no recompute) and hardware FLOPs (with recompute) of one step; enables checkpointing.

    On the meta device (:func:`meta_flops`); if that fails, ``model`` itself on its device (whole
    batch, or per kind on out-of-memory) before and after its checkpointing is enabled.
    """
    device = model.placeholder_ids.device
    count, with_recompute = None, None
    try:
        count, with_recompute = meta_flops(spec, cpu_batch)
    except Exception as e:  # e.g. a forward that reads a device value on the host
        notes.append(f"FLOP count: the meta-device pass failed ({_first_line(e)}); counted on {device}")
        seq = cpu_batch["input_ids"].shape[1]
        make_one = lambda kind: to_device(training_batch(model, 1, seq, (kind,)), device)  # noqa: E731
        count = phase("FLOP count", notes, lambda: count_step_flops(model, batch, kinds, make_one, autocast))
    enable_gradient_checkpointing(model)
    if count is None:
        return None
    if with_recompute is None:
        hw = phase("FLOP count with recompute", notes, lambda: count_flops(model, batch, autocast, False))
        with_recompute = hw.total if hw is not None else None
    flops = asdict(count)
    flops["llm_analytic"] = llm_analytic_flops(model, cpu_batch)
    flops["llm_counted"] = sum(count.by_component.get("llm", [0, 0]))
    flops["llm_ratio"] = flops["llm_counted"] / flops["llm_analytic"]
    flops["with_recompute"] = with_recompute
    other = sum(map(sum, count.by_component.values())) - count.total
    if other:
        notes.append(f"FLOP count: the components add up to {other:+,} FLOPs beside the total")
    return flops


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"gpu_figures: --device cuda was asked for but no CUDA device is available (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}); run it on a GPU machine, or pass "
            "--device cpu (e.g. --size tiny --device cpu for a quick check)"
        )
    threads = os.environ.get("CHEERS_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    elif args.device == "cpu":
        torch.set_num_threads(1)
    clock = Clock(args.time_budget)
    device = torch.device(args.device)
    bf16 = args.dtype == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    notes: list[str] = []

    spec = SIZES[args.size]()
    model = build(spec)  # CPU, seeded, zero inits randomised
    set_stage_two_trainable(model)
    model.to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    r: dict[str, Any] = dict(
        date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        device_name=name, torch=torch.__version__, dtype=args.dtype, precision=PRECISION[args.dtype],
        size=args.size, budget_s=args.time_budget, build_s=clock.elapsed(), threads=torch.get_num_threads(),
        params=parameter_summary(model), params_total=sum(p.numel() for p in model.parameters()),
        params_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        notes=notes,
    )  # fmt: skip
    kinds = [args.mix[i % len(args.mix)] for i in range(args.batch)]
    counts = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
    r["batch_desc"] = f"{args.batch} x {args.seq} tokens: " + ", ".join(f"{n} {k}" for k, n in counts.items())
    cpu_batch = training_batch(model, args.batch, args.seq, args.mix)
    batch = to_device(cpu_batch, device)

    model.train()
    r["phase_s"] = phases = {"build": clock.elapsed()}
    r["flops"] = flop_figures(spec, model, cpu_batch, batch, kinds, autocast, notes)
    phases["flops"] = clock.elapsed() - sum(phases.values())
    r["train"] = phase(
        "training",
        notes,
        lambda: train_figures(model, batch, autocast, args.warmup_steps, args.train_steps, clock, notes),
    )
    phases["train"] = clock.elapsed() - sum(phases.values())
    if r["train"] is None:
        r["train_error"] = notes[-1]

    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    source = "--peak-tflops" if peak else None
    if peak is None and device.type == "cuda" and bf16:
        peak = peak_flops(name)
        source = f"dense bf16 peak of {name!r}" if peak else f"unknown device {name!r}: pass --peak-tflops"
    r["peak_flops_s"] = peak
    r["peak_source"] = source or f"{name}, {args.dtype}: pass --peak-tflops for an MFU"
    r["achieved_flops_s"] = r["mfu"] = r["hfu"] = None
    if r["train"] is not None and r["flops"] is not None:
        r["achieved_flops_s"] = r["flops"]["total"] / r["train"]["step_s"]
        if peak:
            r["mfu"] = r["achieved_flops_s"] / peak
            hw = r["flops"].get("with_recompute")
            r["hfu"] = hw / r["train"]["step_s"] / peak if hw else None

    def sampler() -> dict[str, Any]:
        out = sampler_figures(
            model, autocast, args.images, args.sample_steps, args.sample_repeats, clock, notes,
            reference=not args.no_reference,
        )  # fmt: skip
        out["weights"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        return out

    r["sampler"] = phase("sampler", notes, sampler)
    phases["sampler"] = clock.elapsed() - sum(phases.values())
    if r["sampler"] is None:
        r["sampler_error"] = notes[-1]

    r["total_s"] = clock.elapsed()
    print(render(r))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
