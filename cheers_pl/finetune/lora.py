"""LoRA adapters on a :class:`~cheers_pl.model.CheersModel`, through ``peft``.

:class:`LoraSpec` is the ``lora:`` block of a stage's config (``experiments/finetune/lora.yaml``)::

    lora: {rank: 16, alpha: 32, dropout: 0.05,
           llm_targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj],
           head_targets: [],        # the same names, in the CFM head's DiT blocks (both stages)
           projector: false}        # the projector MLP's two Linear layers

:func:`apply_lora` injects the adapters with ``peft.inject_adapter_in_model`` on exactly the
named ``nn.Linear`` modules (their full names, so SigLIP's own ``q_proj`` ... are never matched)
and freezes every other weight. An adapted module ``X`` then holds ``X.base_layer.weight`` (the
frozen base) and ``X.lora_A.default.weight`` / ``X.lora_B.default.weight`` (the adapter, B = 0
at the start so the model starts as its base). :func:`merge_lora` folds ``W + (alpha / rank) B A``
into the base weights with peft's ``merge`` and puts the plain ``nn.Linear`` back, so a merged
model has the base model's names and exports / loads as any other.

The base's identity is :func:`base_digest`: a SHA-256 of its state dict (names sorted, adapter
tensors left out, ``.base_layer`` names mapped back, floating tensors as float32), the same
whether the base came from a stage checkpoint, an exported folder or a converted release.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import Tensor, nn

from cheers_pl.io.integrity import _feed

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "default"  # peft's adapter name: part of every adapter tensor's name
CHECKPOINT_KEY = "lora"  # the checkpoint entry naming the base and the LoRA config
RECORD_VERSION = 1


@dataclass
class LoraSpec:
    """What LoRA adapts, and how (checked when built: the error names the key and the valid choices).

    Attributes:
        rank: the adapters' rank r (>= 1).
        alpha: the scale numerator: an adapter adds ``(alpha / rank) * B A x``.
        dropout: dropout on an adapter's input while training, in [0, 1).
        llm_targets: projections of every Qwen2 decoder layer that get an adapter (attention
            ``q/k/v/o_proj``, MLP ``gate/up/down_proj``).
        head_targets: the same projections in the CFM head's DiT blocks (stage A and stage B).
        projector: also adapt the projector MLP's two Linear layers (``mlp.0``, ``mlp.2``).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    llm_targets: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    head_targets: list[str] = field(default_factory=list)
    projector: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank={self.rank!r} must be an integer >= 1")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ValueError(f"lora.alpha={self.alpha!r} must be a number > 0")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout!r} must be in [0, 1)")
        for key in ("llm_targets", "head_targets"):
            value = getattr(self, key)
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ValueError(
                    f"lora.{key}={value!r} must be a list; valid choices are {list(PROJECTIONS)}"
                )
            unknown = [v for v in value if v not in PROJECTIONS]
            if unknown:
                raise ValueError(f"lora.{key}: unknown {unknown}; valid choices are {list(PROJECTIONS)}")
            setattr(self, key, [p for p in PROJECTIONS if p in value])  # canonical order, once each
        if not isinstance(self.projector, bool):
            raise ValueError(f"lora.projector={self.projector!r} must be true or false")
        if not (self.llm_targets or self.head_targets or self.projector):
            raise ValueError(
                "lora adapts nothing: lora.llm_targets and lora.head_targets are empty and "
                f"lora.projector is false; name at least one of {list(PROJECTIONS)}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_value(cls, value: LoraSpec | dict | None) -> LoraSpec | None:
        """A :class:`LoraSpec` from itself, a dict (a checkpoint's record, a Python call) or None."""
        if value is None or isinstance(value, LoraSpec):
            return value
        if hasattr(value, "as_dict"):  # a jsonargparse Namespace
            value = value.as_dict()
        if not isinstance(value, dict):
            raise ValueError(f"lora={value!r} must be a mapping of {[f.name for f in fields(cls)]}")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(valid))
        if unknown:
            raise ValueError(f"lora: unknown key(s) {unknown}; valid keys are {valid}")
        return cls(**value)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- where the adapters go --------------------------------------------------------------------------
def target_modules(model: nn.Module, lora: LoraSpec) -> list[str]:
    """Full names of the ``nn.Linear`` modules of ``model`` (a CheersModel) that ``lora`` adapts."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        leaf = name.rpartition(".")[2]
        llm = name.startswith("llm.") and ".layers." in name and leaf in lora.llm_targets
        head = name.startswith("cfm_head.") and "_blocks." in name and leaf in lora.head_targets
        projector = lora.projector and name.startswith("projector.mlp.")
        if llm or head or projector:
            names.append(name)
    if not names:
        raise ValueError(f"lora matches no Linear module of this model ({lora})")
    return names


def peft_config(model: nn.Module, lora: LoraSpec):
    """The ``peft.LoraConfig`` of ``lora`` for ``model``: exact module names, no bias training."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules(model, lora),
        bias="none",
    )


def apply_lora(model: nn.Module, lora: LoraSpec) -> list[str]:
    """Inject ``lora``'s adapters into ``model`` in place and freeze everything else.

    Returns the names (as in ``model.named_parameters()``) of the adapter parameters: the only
    ones left with ``requires_grad``. The adapters are created on the device and in the dtype of
    the layer they adapt.
    """
    from peft import inject_adapter_in_model

    if is_lora(model):
        raise ValueError("this model already has LoRA adapters")
    inject_adapter_in_model(peft_config(model, lora), model, adapter_name=ADAPTER)
    names = adapter_parameter_names(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    return sorted(names)


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds peft adapter layers (not yet merged)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def _tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def adapter_parameter_names(model: nn.Module) -> set[str]:
    """Names of the adapter tensors: those of a tuner layer that are not its ``base_layer``'s."""
    names = set()
    for prefix, layer in _tuner_layers(model).items():
        for name, _ in layer.named_parameters():
            if not name.startswith("base_layer."):
                names.add(f"{prefix}.{name}")
    return names


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors of ``model`` under their ``model.state_dict()`` names."""
    names = adapter_parameter_names(model)
    return {k: v for k, v in model.state_dict().items() if k in names}


def base_name(name: str) -> str:
    """A state-dict name of an adapted model -> the base model's name (``.base_layer.`` dropped)."""
    return name.replace(".base_layer.", ".")


def base_state(model: nn.Module) -> dict[str, Tensor]:
    """The base model's state of ``model`` (adapted or not): adapter tensors out, names mapped back."""
    adapters = adapter_parameter_names(model)
    return {base_name(k): v for k, v in model.state_dict().items() if k not in adapters}


def base_digest(model: nn.Module) -> str:
    """SHA-256 (hex) of ``model``'s base state: names sorted, floating tensors as float32.

    Reads every base tensor once (on CPU; about 1-2 GB/s), so a paper-size model takes seconds.
    """
    h = hashlib.sha256()
    state = base_state(model)
    for name in sorted(state):
        t = state[name].detach()
        _feed(h, name)
        _feed(h, t.float() if t.is_floating_point() else t)
    return h.hexdigest()


def load_base_state(
    model: nn.Module,
    state: dict[str, Tensor],
    source: Any,
    allow_missing: tuple[str, ...] = (),
    allow_unexpected: tuple[str, ...] = (),
) -> None:
    """Load a base model's ``state`` into the base layers of an adapted ``model``; the adapters stay.

    Every base tensor must be there with its shape (``ValueError`` naming them otherwise), but for
    the name prefixes an ablation adds or removes (as :func:`cheers_pl.stages.weights.check_fit`).
    """
    from cheers_pl.stages.weights import check_fit

    adapters = adapter_parameter_names(model)
    own = {k: v for k, v in model.state_dict().items() if k not in adapters}
    to_own = {base_name(k): k for k in own}
    check_fit({base_name(k): v for k, v in own.items()}, state, source, allow_missing, allow_unexpected)
    model.load_state_dict({to_own[k]: v for k, v in state.items() if k in to_own}, strict=False)


def load_adapter_state(model: nn.Module, state: dict[str, Tensor], source: Any) -> None:
    """Load adapter tensors (``model.state_dict()`` names) into an adapted ``model``: all of them,
    no other tensor, same shapes (``ValueError`` naming the misfits otherwise)."""
    from cheers_pl.stages.weights import check_fit

    own = adapter_state(model)
    check_fit(own, state, source)
    model.load_state_dict(state, strict=False)


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight (peft's ``merge``, NaN-checked) and put the plain
    base layer back in its place; ``model`` then has the base model's modules and names. In place;
    returns ``model``."""
    layers = _tuner_layers(model)
    if not layers:
        raise ValueError("this model has no LoRA adapters to merge")
    for name, layer in layers.items():
        layer.merge(safe_merge=True)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of ``model`` (shared tensors counted once)."""
    seen: dict[int, tuple[int, bool]] = {}
    for p in model.parameters():
        seen[id(p)] = (p.numel(), p.requires_grad)
    return sum(n for n, t in seen.values() if t), sum(n for n, _ in seen.values())


# -- the base's record in a checkpoint -----------------------------------------------------------
def base_record(path: str | None, fmt: str | None, digest: str) -> dict[str, Any]:
    """``{"path", "abspath", "format", "sha256"}``: the base a LoRA run started from (path None:
    the spec's seeded random weights)."""
    import os

    return {
        "path": None if path is None else str(path),
        "abspath": None if path is None else os.path.abspath(path),
        "format": fmt,
        "sha256": digest,
    }


def checkpoint_record(lora: LoraSpec, base: dict[str, Any], n_adapters: int) -> dict[str, Any]:
    """The ``checkpoint["lora"]`` entry: version, LoRA config, base record, peft version, tensor count."""
    import peft

    return {
        "version": RECORD_VERSION,
        "config": lora.as_dict(),
        "base": dict(base),
        "peft_version": peft.__version__,
        "adapter_tensors": n_adapters,
    }


def describe_base(base: dict[str, Any]) -> str:
    """``runs/x/last.ckpt (sha256 0123456789ab...)``, or the random-weights wording."""
    where = base.get("path") or "the spec's random initial weights (no init_from)"
    return f"{where} (sha256 {str(base.get('sha256'))[:12]}...)"


def base_mismatch_message(saved: dict[str, Any], current: dict[str, Any], what: str) -> str:
    """One line: the adapters were trained on ``saved``'s base, ``current`` is another."""
    return (
        f"{what}: the LoRA adapters were trained on the base model {describe_base(saved)}, but the "
        f"base model here is {describe_base(current)}: another model (or the same path with other "
        "weights), so the adapters would not fit it; they are not loaded. Point at the base they "
        "were trained on (init_from / --base), or start a new LoRA run from this one"
    )


def find_base(record: dict[str, Any]) -> str | None:
    """The recorded base's path that exists now (its absolute path, else the path as given)."""
    import os

    for key in ("abspath", "path"):
        path = record.get(key)
        if path and os.path.exists(path):
            return path
    return None
