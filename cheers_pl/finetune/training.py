"""LoRA inside a training stage: what :class:`~cheers_pl.stages.base.CheersModule` does with ``lora``.

* ``configure_model``: the base weights are loaded (``init_from``: a stage checkpoint, an
  exported folder, a converted release or a LoRA checkpoint, merged), then :func:`attach`
  injects the adapters; only they train.
* Saving (:func:`strip_checkpoint`): ``state_dict`` keeps the adapter tensors only, and
  ``checkpoint["lora"]`` names the base (its path as given and absolute, its format and the
  SHA-256 of its weights: :func:`cheers_pl.finetune.lora.base_digest`) and the LoRA config. The
  optimiser state, schedule, loop counters, random states and data position are Lightning's /
  the kit's as for any run, so a resume continues exactly.
* Resuming (:func:`restore`): the checkpoint must be a LoRA one with the same LoRA config. When
  the run has no ``init_from`` (``cheers fit --ckpt_path`` drops it: the checkpoint's weights
  replace it) the base the checkpoint names is loaded; either way the base's hash must equal the
  recorded one, else the resume is refused naming both. The adapter tensors must be exactly the
  model's (the module loads with ``strict_loading = False`` since the base is not in the file).

The base hash is computed once per run, when first needed (the base is frozen, so it cannot change
meanwhile): at the first save, or at a resume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cheers_pl.finetune import lora as lo

if TYPE_CHECKING:
    from cheers_pl.stages.base import CheersModule

PREFIX = "model."


def attach(module: CheersModule) -> None:
    """Inject ``module.lora``'s adapters into ``module.model`` (its base weights already loaded)."""
    lo.apply_lora(module.model, module.lora)
    module._lora_base = None  # hashed when first needed


def base_identity(module: CheersModule) -> dict[str, Any]:
    """The run's base record (path, format, hash), hashing the base on the first call."""
    if module._lora_base is None:
        from cheers_pl.io.export import detect_format

        path = module.init_from
        fmt = detect_format(path) if path is not None else None
        module._lora_base = lo.base_record(path, fmt, lo.base_digest(module.model))
    return module._lora_base


def adapter_keys(module: CheersModule) -> set[str]:
    """The checkpoint ``state_dict`` names of the adapter tensors (``model.`` + the model's name)."""
    return {PREFIX + n for n in lo.adapter_parameter_names(module.model)}


def strip_checkpoint(module: CheersModule, checkpoint: dict) -> None:
    """Keep only the adapters in ``checkpoint["state_dict"]`` and add the ``lora`` record."""
    keys = adapter_keys(module)
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise ValueError(
            "lora: this strategy writes no whole state_dict into the checkpoint (a sharded one); LoRA "
            "runs save on a single device or with DDP"
        )
    checkpoint["state_dict"] = {k: v for k, v in state.items() if k in keys}
    checkpoint[lo.CHECKPOINT_KEY] = lo.checkpoint_record(
        module.lora, base_identity(module), len(checkpoint["state_dict"])
    )


def refuse_lora_checkpoint(checkpoint: dict) -> None:
    """A run without ``lora`` must not resume a LoRA checkpoint (it holds no base weights)."""
    if lo.CHECKPOINT_KEY in checkpoint:
        config = checkpoint[lo.CHECKPOINT_KEY].get("config")
        raise ValueError(
            f"the checkpoint is a LoRA one (adapters only, lora={config}) but this run has no lora config; "
            "resume it with the same lora block (cheers fit takes it from the checkpoint), or start a full "
            "run from it with init_from (the adapters are merged into its base)"
        )


def restore(module: CheersModule, checkpoint: dict) -> None:
    """Check a LoRA resume (config, base hash, adapter names), loading the named base if needed."""
    record = checkpoint.get(lo.CHECKPOINT_KEY)
    if record is None:
        raise ValueError(
            "resuming a LoRA run from a checkpoint without adapters (a full stage checkpoint, no 'lora' "
            "entry); to fine-tune from it with LoRA, give it as init_from instead of --ckpt_path"
        )
    saved_config = lo.LoraSpec.from_value(record.get("config"))
    if saved_config != module.lora:
        diff = [
            f"{k}={v!r} in the checkpoint vs {getattr(module.lora, k)!r} in the config"
            for k, v in saved_config.as_dict().items()
            if getattr(module.lora, k) != v
        ]
        raise ValueError(f"resuming a LoRA run: its lora config differs: {'; '.join(diff)}")
    saved = record.get("base") or {}
    if module.init_from is None and saved.get("path") is not None:
        _load_recorded_base(module, saved)
    current = base_identity(module)
    if current["sha256"] != saved.get("sha256"):
        raise ValueError(lo.base_mismatch_message(saved, current, "resuming a LoRA run"))
    state = checkpoint.get("state_dict") or {}
    want = adapter_keys(module)
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise ValueError(
            f"resuming a LoRA run: the checkpoint's adapter tensors do not fit this model: {len(missing)} "
            f"missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
        )


def _load_recorded_base(module: CheersModule, saved: dict[str, Any]) -> None:
    """Load the base a checkpoint names into the adapted model (``init_from`` was dropped)."""
    from cheers_pl.io.export import detect_format, read_model_state

    path = lo.find_base(saved)
    if path is None:
        raise ValueError(
            f"resuming a LoRA run: its base model {saved.get('path')} (absolute: {saved.get('abspath')}) "
            "is not there (cheers fit --ckpt_path loads the base the checkpoint names); put it back there"
        )
    lo.load_base_state(module.model, read_model_state(path), path, *module.ablation_allowances())
    module._lora_base = lo.base_record(saved.get("path"), detect_format(path), lo.base_digest(module.model))
