"""``CheersModule``: the LightningModule every training stage shares.

The shared step: a mixed batch -> ``L = L_AR + lambda * L_FM`` (the model computes both), with
the losses, per-task text losses and sample counts and the HFI gate statistics logged:

    train/loss, train/loss_text, train/loss_fm, train/loss_text/<task>, train/samples/<task>,
    train/text_tokens, train/gen_images, hfi/gate_mean, hfi/gate_abs_mean, hfi/gate_std

AdamW (weight decay 0) with a linear warm-up over ``warmup_ratio`` of the run, then a constant
or cosine schedule (transformers' schedule functions). Gradient clipping (1.0) and bf16 mixed
precision are Trainer settings in the experiment YAMLs. The CheersModel is built in
``configure_model`` (so a config prints and a module instantiates without allocating weights);
``init_from`` loads the previous stage's weights (weights only: new optimiser and schedule): a
stage checkpoint, an exported or a converted folder, or a LoRA checkpoint (merged). ``lora``
trains LoRA adapters instead of the stage's modules (:mod:`cheers_pl.finetune`): everything
else is frozen and the checkpoints hold the adapters only.
Subclasses say what trains (``trains``) and their default learning rate and schedule.
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.utils.checkpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from cheers_pl.components.dit import DiTBlock
from cheers_pl.components.processor import CheersProcessor
from cheers_pl.data.schema import TASKS
from cheers_pl.distributed import RunGuard
from cheers_pl.finetune import training as lora_training
from cheers_pl.finetune.lora import LoraSpec, adapter_parameter_names
from cheers_pl.io.sharded import is_sharded_checkpoint
from cheers_pl.model import CheersModel, CheersOutput, build_processor
from cheers_pl.spec import CheersSpec
from cheers_pl.stages import rng
from cheers_pl.stages.freezing import apply_freeze, check_freeze
from cheers_pl.stages.nonfinite import NonFiniteLedger
from cheers_pl.stages.weights import check_fit

SCHEDULES = ("constant", "cosine")
TRAINS = ("new", "all")


class CheersModule(L.LightningModule):
    """Trains a :class:`CheersModel`; see the module docstring.

    Args:
        spec: the model (components, modes); saved in the checkpoint's hyperparameters.
        lr: peak learning rate after warm-up.
        schedule: ``"constant"`` or ``"cosine"`` (to zero at ``max_steps``) after warm-up.
        warmup_ratio: fraction of the run spent warming up linearly from 0.
        weight_decay: AdamW weight decay (the paper: 0).
        betas: AdamW betas.
        init_from: the model whose weights start this one: a checkpoint of the previous stage, an
            exported folder (``cheers export``), a converted release, or a LoRA checkpoint (its
            base with the adapters merged). With ``lora``: the base model the adapters train on.
        gradient_checkpointing: recompute activations in the backward pass of the LLM's decoder
            layers, SigLIP's encoder layers and the CFM head's DiT blocks (non-reentrant
            ``torch.utils.checkpoint``; training only). For single-device or DDP runs; with
            ``CheersFSDPStrategy`` use its ``activation_checkpointing`` instead (same units).
        compile_head: ``torch.compile`` the CFM head (``nn.Module.compile``: in place, so
            parameter names and checkpoints are unchanged). The first steps pay the compile.
        compile_options: keyword arguments of ``torch.compile`` for the head (``mode``,
            ``backend``, ``dynamic``, ...), e.g. ``{"mode": "max-autotune"}``.
        fast: the VAE and the pixel decoder D on their CPU fast path
            (:mod:`cheers_pl.components.fast_conv`; same outputs within 1e-5 in fp32). False: the
            plain diffusers modules.
        compile_decoders: also ``torch.compile`` the fast VAE decoder and D (the first call
            compiles; measured no faster on CPU, so off by default).
        skip_nonfinite: skip an optimiser step whose loss or gradient is not finite: the
            gradients are dropped before the step, so no weight or optimiser state changes (the
            step counter and the LR schedule still advance, as with AMP's skipped steps). Each
            skip is counted (``train/nonfinite_skips``) and warned about with the batch's sample
            ids. Costs one host read per step (the finiteness flag); False turns it off.
        max_nonfinite_steps: stop the run after this many skipped steps in a row, naming their
            sample ids (0: never stop).
        freeze: top-level modules to keep fixed on top of what the stage trains (``llm``,
            ``semantic_encoder``, ``pixel_decoder``, ``projector``, ``cfm_head``); checked here
            (:func:`cheers_pl.stages.freezing.check_freeze`): unknown names and a list that
            leaves nothing to train fail before any weight exists.
        collective_timeout_s: the process group's timeout (seconds): a collective that some rank
            never joins (ranks running different steps) then ends the run with a line naming the
            likely cause instead of hanging (:class:`cheers_pl.distributed.RunGuard`).
        sigterm_grace_s: after SIGTERM, a process whose main thread is stuck in a collective for
            this long exits (code 143, no checkpoint); otherwise SIGTERM stops the run at the next
            batch with a last checkpoint (``save_last``) and exit code 143. 0: never.
        lora: train LoRA adapters (:class:`~cheers_pl.finetune.lora.LoraSpec`: rank, alpha,
            dropout, target modules) on ``init_from``'s weights, every other weight frozen (whatever
            the stage trains otherwise; ``freeze`` must then be empty). Checkpoints hold only the
            adapters (plus optimiser state) and name the base and its hash, checked on resume
            (:mod:`cheers_pl.finetune.training`). Single device or DDP (not sharded strategies).
    """

    trains: str = "all"

    def __init__(
        self,
        spec: CheersSpec | None = None,
        lr: float = 1e-4,
        schedule: str = "constant",
        warmup_ratio: float = 0.02,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        init_from: str | None = None,
        gradient_checkpointing: bool = False,
        compile_head: bool = False,
        compile_options: dict | None = None,
        fast: bool = True,
        compile_decoders: bool = False,
        skip_nonfinite: bool = True,
        max_nonfinite_steps: int = 10,
        freeze: list[str] | None = None,
        collective_timeout_s: float = 1800.0,
        sigterm_grace_s: float = 60.0,
        lora: LoraSpec | None = None,
    ):
        super().__init__()
        spec = spec or CheersSpec()
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}; valid choices are {list(SCHEDULES)}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={warmup_ratio} must be in [0, 1)")
        if lr <= 0:
            raise ValueError(f"lr={lr} must be > 0")
        if max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps={max_nonfinite_steps} must be >= 0 (0: never stop)")
        if self.trains not in TRAINS:
            raise ValueError(
                f"{type(self).__name__}.trains={self.trains!r}; valid choices are {list(TRAINS)}"
            )
        if init_from is not None:
            init_from = os.path.normpath(init_from)  # "run/stage2/../stage1" before run/stage2 exists
        if init_from is not None and not (Path(init_from).exists() or is_sharded_checkpoint(init_from)):
            raise FileNotFoundError(f"init_from: no checkpoint at {init_from}")
        if init_from is not None:
            from cheers_pl.io.export import detect_format  # here: io.export imports the stages

            try:
                detect_format(init_from)  # a folder that is no model: refused naming what it holds
            except ValueError as err:
                raise ValueError(f"init_from: {err}") from None
        self.resolved = spec.resolve()  # configs only: bad sizes, flavors and missing folders fail here
        lora = LoraSpec.from_value(lora)
        if lora is not None and freeze:
            raise ValueError(
                f"freeze={list(freeze)} with lora: every base weight is already frozen and only the adapters "
                "train; choose what adapts with lora.llm_targets / lora.head_targets / lora.projector"
            )
        self.lora = lora
        self._lora_base: dict | None = None
        if lora is not None:
            self.strict_loading = False  # a LoRA checkpoint holds the adapters only (checked on load)
        self.freeze = check_freeze(freeze, self.trains, spec)
        self.spec, self.lr, self.schedule, self.warmup_ratio = spec, lr, schedule, warmup_ratio
        self.weight_decay, self.betas, self.init_from = weight_decay, tuple(betas), init_from
        self.gradient_checkpointing = gradient_checkpointing
        self.compile_head, self.compile_options = compile_head, dict(compile_options or {})
        self.fast, self.compile_decoders = bool(fast), bool(compile_decoders)
        self.skip_nonfinite, self.max_nonfinite_steps = skip_nonfinite, max_nonfinite_steps
        self.guard = RunGuard(collective_timeout_s, sigterm_grace_s)  # checks both values
        self.nonfinite = NonFiniteLedger()
        self._pending_rng: dict | None = None
        self.save_hyperparameters(ignore=["spec", "lora"])
        self.hparams["spec"] = asdict(spec)
        self.hparams["lora"] = lora.as_dict() if lora is not None else None
        self.model: CheersModel | None = None
        self._processor = None

    @property
    def processor(self) -> CheersProcessor:
        """The model's processor, available before ``configure_model`` (the DataModule needs it at setup)."""
        if self.model is not None:
            return self.model.processor
        if self._processor is None:
            self._processor = build_processor(self.spec, self.resolved)
        return self._processor

    @property
    def image_size(self) -> int:
        return self.resolved.image_size

    # -- model ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = CheersModel(self.spec)
        self.model.fast, self.model.compile_decoders = self.fast, self.compile_decoders and self.fast
        if self.init_from is not None:
            report = self._load_init_from()
            for what, names in report.items():
                if names:
                    rank_zero_info(
                        f"init_from {self.init_from}: {what.replace('_', ' ')}: {len(names)} tensors"
                    )
        if self.lora is not None:
            lora_training.attach(self)
        self.set_trainable()
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        if self.compile_head:
            self.model.cfm_head.compile(**self.compile_options)

    def _load_init_from(self) -> dict[str, list[str]]:
        """Load ``init_from``'s weights (any model format); report what an ablation kept or ignored."""
        from cheers_pl.io.export import read_model_state

        allow_missing, allow_unexpected = self.ablation_allowances()
        state = read_model_state(self.init_from)
        own = self.model.state_dict()
        check_fit(own, state, self.init_from, allow_missing, allow_unexpected)
        self.model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        return {"kept_initial": sorted(set(own) - set(state)), "ignored": sorted(set(state) - set(own))}

    def ablation_allowances(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(missing, unexpected) name prefixes this spec's ablations add / remove vs a standard model."""
        missing, unexpected = [], []
        if self.spec.hfi == "none":
            unexpected.append("cfm_head.hfi_gate.gate.")
        if self.spec.pixel_reconstruct == "latent":
            missing.append("semantic_encoder.latent_patch_embedding.")
            unexpected.append("pixel_decoder.")
        return tuple(missing), tuple(unexpected)

    def set_trainable(self) -> None:
        """``trains="all"``: everything but the frozen VAE (and SigLIP's unused pooling head).
        ``trains="new"`` (stage I): only the modules CHEERS adds, and the added tokens' embedding rows.
        Then the modules named in ``freeze`` are frozen. With ``lora``: the adapters only."""
        m = self.model
        if self.lora is not None:
            adapters = adapter_parameter_names(m)
            for name, p in m.named_parameters():
                p.requires_grad_(name in adapters)
            return
        m.requires_grad_(True)
        m.vae.requires_grad_(False)
        head = getattr(m.semantic_encoder.vit, "head", None)
        if head is not None:
            head.requires_grad_(False)
        if self.trains == "new":
            self._train_new_only()
        apply_freeze(m, self.freeze)

    def _train_new_only(self) -> None:
        m = self.model
        for module in (m.llm, m.semantic_encoder, m.pixel_decoder):
            if module is not None:
                module.requires_grad_(False)
        if hasattr(m.semantic_encoder, "latent_patch_embedding"):  # new in the latent ablation
            m.semantic_encoder.latent_patch_embedding.requires_grad_(True)
        embedding = m.llm.model.get_input_embeddings().weight
        embedding.requires_grad_(True)
        rows = torch.zeros(embedding.shape[0], 1, dtype=embedding.dtype, device=embedding.device)
        rows[sorted(self.new_token_ids())] = 1.0
        embedding.register_hook(lambda grad: grad * rows.to(grad))  # lm_head is tied: same tensor

    def new_token_ids(self) -> set[int]:
        """Ids of the tokens CHEERS adds to the vocabulary."""
        p = self.model.processor
        return {p.image_id, p.image_gen_id, p.im_start_id, p.im_end_id, p.null_id}

    def configure_callbacks(self) -> list:
        """:class:`~cheers_pl.distributed.RunGuard`: collective timeout, SIGTERM handling."""
        return [self.guard]

    # -- step ----------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.model(batch)
        self.log_step(out, batch)
        self.nonfinite.observe(out.loss.detach(), batch.get("ids"), batch_idx)
        return out.loss

    # -- faults and resume -------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer) -> None:
        """Drop the gradients of a step whose loss or gradient is not finite (``skip_nonfinite``)."""
        if not self.skip_nonfinite:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        finite = self.nonfinite.finite(grads)
        finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.nonfinite.passed()
            return
        for p in self.parameters():
            p.grad = None  # the optimiser skips parameters without a gradient: nothing moves
        message = self.nonfinite.skipped(self.global_step)
        rank_zero_warn(message)
        self.log("train/nonfinite_skips", float(self.nonfinite.total), rank_zero_only=True)
        if self.max_nonfinite_steps and self.nonfinite.in_a_row >= self.max_nonfinite_steps:
            raise RuntimeError(
                f"{self.nonfinite.in_a_row} optimiser steps in a row had a non-finite loss or gradient "
                f"(max_nonfinite_steps={self.max_nonfinite_steps}); stopping. {self.nonfinite.report()}"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = rng.gather()  # a collective: every rank runs this hook
        checkpoint["nonfinite"] = self.nonfinite.state_dict()
        if self.lora is not None:
            lora_training.strip_checkpoint(self, checkpoint)  # adapters only, the base named

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.lora is not None:
            lora_training.restore(self, checkpoint)  # the base's hash, the adapter names
        else:
            lora_training.refuse_lora_checkpoint(checkpoint)
        if "rng_states" in checkpoint:
            self._pending_rng = rng.this_rank(checkpoint["rng_states"])
        if "nonfinite" in checkpoint:
            self.nonfinite.load_state_dict(checkpoint["nonfinite"])

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._pending_rng is not None:  # first batch after a resume: continue the saved draws
            rng.restore(self._pending_rng)
            self._pending_rng = None

    def log_step(self, out: CheersOutput, batch: dict) -> None:
        b = batch["input_ids"].shape[0]
        log = lambda name, value, **kw: self.log(name, value, batch_size=b, **kw)  # noqa: E731
        log("train/loss", out.loss, prog_bar=True)
        log("train/loss_text", out.loss_text)
        log("train/loss_fm", out.loss_fm, prog_bar=True)
        log("train/text_tokens", out.num_text_tokens.float())
        log("train/gen_images", float(out.num_gen_images))
        tasks = batch.get("tasks")
        if tasks is not None:
            for task, n in Counter(tasks).items():
                log(f"train/samples/{task}", float(n))
            for task, loss in task_text_losses(out, batch).items():
                log(f"train/loss_text/{task}", loss)
        if out.gate is not None:
            g = out.gate.detach().float()
            log("hfi/gate_mean", g.mean())
            log("hfi/gate_abs_mean", g.abs().mean())
            log("hfi/gate_std", g.std() if g.numel() > 1 else torch.zeros(()))

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(self).__name__} trains nothing: every parameter is frozen")
        opt = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        total = self.trainer.max_steps
        if total is None or total < 1:
            raise ValueError("set trainer.max_steps: the warm-up and cosine schedules are defined over it")
        warmup = math.ceil(self.warmup_ratio * total)
        if self.schedule == "cosine":
            sched = get_cosine_schedule_with_warmup(opt, warmup, total)
        else:
            sched = get_constant_schedule_with_warmup(opt, warmup)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def task_text_losses(out: CheersOutput, batch: dict) -> dict[str, torch.Tensor]:
    """Token-mean text loss of each task in the batch that has supervised tokens: {task: scalar}.

    With the loader's ``task_index`` (B,) and ``text_counts`` (B ints, host side) the sums run on
    the device and which tasks to report is decided from host values: no device sync. Without
    them (a hand-made batch) the counts are read back from the device.
    """
    tasks = batch["tasks"]
    counts = batch.get("text_counts")
    index = batch.get("task_index")
    if counts is None or index is None:
        counts = out.text_count_rows.tolist()
        index = torch.tensor([TASKS.index(t) for t in tasks], device=out.text_loss_rows.device)
    sums = torch.zeros(len(TASKS), device=out.text_loss_rows.device).index_add_(
        0, index.to(out.text_loss_rows.device), out.text_loss_rows
    )
    per_task = Counter()
    for task, n in zip(tasks, counts, strict=True):
        per_task[task] += n
    return {task: sums[TASKS.index(task)] / n for task, n in per_task.items() if n > 0}


def enable_gradient_checkpointing(model: CheersModel) -> None:
    """Checkpoint the LLM's decoder layers, SigLIP's encoder layers and the CFM head's DiT blocks.

    The two Hugging Face models use their own ``gradient_checkpointing_enable`` (non-reentrant).
    The DiT blocks get an instance-level ``forward`` that runs the class's forward under
    ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` while training with grad enabled
    (plain otherwise): no wrapper module, so parameter names and checkpoints are unchanged.
    """
    kwargs = {"use_reentrant": False}
    model.llm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    vit = model.semantic_encoder.vit
    if getattr(vit, "supports_gradient_checkpointing", False):
        vit.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for block in model.cfm_head.modules():
        if isinstance(block, DiTBlock) and "forward" not in vars(block):
            block.forward = functools.partial(_checkpointed_forward, block)


def _checkpointed_forward(block: torch.nn.Module, *args: torch.Tensor) -> torch.Tensor:
    forward = type(block).forward
    if block.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, block, *args, use_reentrant=False)
    return forward(block, *args)
