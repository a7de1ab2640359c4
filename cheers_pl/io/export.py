"""Exported model folders, and one loader for every model format of the kit.

An exported folder loads on its own, with no other file (``cheers export CKPT --out DIR``)::

    DIR/config.json                          {"architectures": ["CheersModel"], "cheers_pl_version",
                                              "spec": the self-contained spec, "source_spec", ...}
    DIR/model-00001-of-0000N.safetensors     the CheersModel state dict, sharded
    DIR/model.safetensors.index.json         {"metadata": {"total_size", "tied"}, "weight_map"}
    DIR/tokenizer/                           the model's tokenizer, saved with save_pretrained

``config.json["spec"]`` is the model's spec rewritten so that it needs no outside file: the
tokenizer becomes the ``pretrained`` flavor of ``tokenizer/`` (a path relative to the folder),
and a ``pretrained`` VAE, SigLIP or LLM (whose config lives in a component folder) becomes the
``paper`` flavor with its resolved config as overrides, so the same modules are built with random
weights and the folder's tensors then replace every one of them. Export checks that this spec
resolves to the same component configs as the original, which is kept as ``source_spec``.
Tensors that share storage (the LM head tied to the token embedding) are saved once; the index's
``metadata.tied`` maps each dropped name to the one kept.

:func:`load_any` reads any of: a Lightning ``.ckpt`` of any stage (the spec in its
``hyper_parameters``), an exported folder, or a converted folder (``model.safetensors`` plus
``cheers_spec.json``, the spec as a dict). Every tensor must fit: a missing, unexpected or
mis-shaped one is a ``ValueError`` that names them.

A LoRA checkpoint (:mod:`cheers_pl.finetune`: only the adapters, ``checkpoint["lora"]`` naming
the base model and its hash) loads as a base + adapter pair: the base it names (or ``base=``,
any of the formats above) is loaded, its hash checked, the adapters put on it
(:func:`load_lora_checkpoint`); ``merge_lora=True`` folds them in. ``cheers export ADAPTER.ckpt
--merge-lora --out DIR`` writes the merged model as a plain exported folder.
:func:`read_model_state` reads the model state of any of these (a stage's ``init_from``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from cheers_pl import __version__
from cheers_pl.io.integrity import check as check_integrity
from cheers_pl.io.sharded import is_sharded_checkpoint, read_sharded
from cheers_pl.spec import CheersSpec, ComponentSpec
from cheers_pl.stages.weights import check_fit, model_state, read_checkpoint

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
TOKENIZER_DIR = "tokenizer"
SHARD = "model-{:05d}-of-{:05d}.safetensors"
SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
CONVERTED_SPEC, CONVERTED_WEIGHTS = "cheers_spec.json", "model.safetensors"
ARCHITECTURE = "CheersModel"
LORA_KEY = "lora"  # cheers_pl.finetune.lora.CHECKPOINT_KEY: a LoRA checkpoint's record
EXPECTED = (
    "a Lightning .ckpt of a cheers-pl stage, an exported folder (config.json + "
    f"{INDEX}), or a converted folder ({CONVERTED_WEIGHTS} + {CONVERTED_SPEC})"
)
# Config fields that say where a config came from, not what it builds.
_BOOKKEEPING = {"_name_or_path", "name_or_path", "architectures", "transformers_version", "model_type"}
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


# -- sizes and shards ------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """Bytes of ``2000000``, ``"2GB"`` (10^9), ``"500MiB"`` (2^20) ...; raises naming the value."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
        if not m:
            raise ValueError(f"max_shard_size={size!r}: expected bytes or e.g. '2GB', '500MB', '1GiB'")
        value = int(float(m.group(1)) * _UNITS[m.group(2) or "B"])
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r} must be > 0")
    return value


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def dedupe_tied(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(state with each tensor shared by several names kept once, {dropped name: kept name}).

    Identical views of one storage (a tied LM head) keep the first name; other tensors that
    overlap a storage are cloned, since safetensors refuses shared memory.
    """
    out: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: dict[tuple, int] = {}
    for name, t in state.items():
        storage = (t.device, t.untyped_storage().data_ptr())
        view = (*storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in seen:
            tied[name] = seen[view]
            continue
        seen[view] = name
        storages[storage] = storages.get(storage, 0) + 1
        out[name] = t
    for name, t in out.items():
        shared = storages[(t.device, t.untyped_storage().data_ptr())] > 1
        t = t.detach().cpu()
        out[name] = t.clone() if shared else t.contiguous()
    return out, tied


def split_shards(state: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    """Consecutive groups of tensors of at most ``max_bytes`` each (a bigger tensor gets its own)."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        if shards[-1] and size + _nbytes(t) > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += _nbytes(t)
    return shards


# -- the self-contained spec ---------------------------------------------------------------------
def _config_dict(cfg: Any) -> dict[str, Any]:
    """A component config as a plain dict without bookkeeping fields (for comparing two configs)."""
    if hasattr(cfg, "to_dict"):
        d = cfg.to_dict()
        d["attn_implementation"] = getattr(cfg, "_attn_implementation", None)
    elif hasattr(cfg, "kwargs"):  # VAEConfig
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.kwargs.items()}
    else:
        d = asdict(cfg)
    return json.loads(json.dumps({k: v for k, v in d.items() if k not in _BOOKKEEPING}, default=str))


def _as_paper(kind: str, resolved: Any) -> ComponentSpec:
    """The ``paper`` flavor with overrides that rebuild a ``pretrained`` component's config."""
    from cheers_pl import registry

    if kind == "vae":
        valid = set(registry.config("vae", "paper").kwargs) | _vae_keys()
        return ComponentSpec("paper", None, {k: v for k, v in resolved.kwargs.items() if k in valid})
    base = _config_dict(registry.config(kind, "paper"))
    ours = _config_dict(resolved)
    attn = ours.pop("attn_implementation", None)
    base.pop("attn_implementation", None)
    overrides = {k: v for k, v in ours.items() if base.get(k, object()) != v and k in base}
    if kind == "llm" and attn not in (None, "sdpa"):
        overrides["attn_implementation"] = attn
    return ComponentSpec("paper", None, overrides)


def _vae_keys() -> set[str]:
    import inspect

    from diffusers import AutoencoderKLFlux2

    return set(inspect.signature(AutoencoderKLFlux2.__init__).parameters) - {"self"}


def portable_spec(spec: CheersSpec, tokenizer_path: str = TOKENIZER_DIR) -> CheersSpec:
    """``spec`` with every component buildable without outside files (see the module docstring).

    Raises ``ValueError`` naming the fields if the rewritten spec would resolve differently.
    """
    resolved = spec.resolve()
    parts: dict[str, ComponentSpec] = {"tokenizer": ComponentSpec("pretrained", tokenizer_path)}
    for kind in ("vae", "semantic_encoder", "llm"):
        comp = getattr(spec, kind)
        parts[kind] = _as_paper(kind, getattr(resolved, kind)) if comp.flavor == "pretrained" else comp
    fields = {k: v for k, v in asdict(spec).items() if k not in parts}
    new = CheersSpec(**fields, **parts)
    if any(getattr(spec, k).flavor == "pretrained" for k in ("vae", "semantic_encoder", "llm")):
        again = new.resolve()
        for kind in ("vae", "semantic_encoder", "llm"):
            a, b = _config_dict(getattr(resolved, kind)), _config_dict(getattr(again, kind))
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            if diff:
                raise ValueError(
                    f"export: cannot rebuild the {kind} config without its folder; {diff} differ"
                )
    return new


# -- export ------------------------------------------------------------------------------------------
def export_model(
    model, out_dir: str | Path, max_shard_size: int | str = "2GB", overwrite: bool = False
) -> Path:
    """Write ``model`` (a CheersModel) as a self-contained folder; returns the folder.

    An existing non-empty folder is refused unless ``overwrite``, which first removes the files an
    export writes (so no stale shard of an earlier export stays behind).
    """
    from cheers_pl.finetune.lora import is_lora

    if is_lora(model):
        raise ValueError(
            "export: this model has unmerged LoRA adapters; merge them first "
            "(cheers export --merge-lora, or cheers_pl.finetune.lora.merge_lora)"
        )
    out = check_export_dir(out_dir, overwrite)
    max_bytes = parse_size(max_shard_size)
    if out.is_dir() and any(out.iterdir()):
        _remove_export(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = portable_spec(model.spec)
    state, tied = dedupe_tied(model.state_dict())
    shards = split_shards(state, max_bytes)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = SHARD.format(i, len(shards))
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {
        "metadata": {"total_size": sum(map(_nbytes, state.values())), "tied": tied},
        "weight_map": weight_map,
    }
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    model.processor.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    config = {
        "architectures": [ARCHITECTURE],
        "cheers_pl_version": __version__,
        "torch_version": torch.__version__,
        "spec": asdict(spec),
        "source_spec": asdict(model.spec),
        "image_size": model.image_size,
        "tokens_per_image": model.tokens_per_image,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in state.values()}),
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def check_export_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """``out_dir`` if an export may write there; else ``ValueError`` / ``FileExistsError`` saying why.

    It must be a folder (or not exist, under a writable folder) and be empty unless ``overwrite``.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"export: --out {out} is a file; name a folder (it is created if missing)")
    existing = next((p for p in (out, *out.absolute().parents) if p.exists()), out)
    if not existing.is_dir():
        raise ValueError(f"export: --out {out} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"export: --out {out} cannot be written: {existing} is not writable")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"export: {out} is not empty (pass overwrite=True / --overwrite)")
    return out


def _remove_export(out: Path) -> None:
    for path in out.iterdir():
        if SHARD_RE.fullmatch(path.name) or path.name in (INDEX, CONFIG):
            path.unlink()
    if (out / TOKENIZER_DIR).is_dir():
        shutil.rmtree(out / TOKENIZER_DIR)


# -- loading -----------------------------------------------------------------------------------------
def detect_format(path: str | Path) -> str:
    """``"checkpoint"``, ``"exported"`` or ``"converted"``; raises naming the path and what was expected."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}; expected {EXPECTED}")
    if path.is_file() or is_sharded_checkpoint(path):
        return "checkpoint"
    if (path / CONFIG).is_file() and ARCHITECTURE in _read_json(path / CONFIG).get("architectures", []):
        return "exported"
    if (path / CONVERTED_SPEC).is_file() and (path / CONVERTED_WEIGHTS).is_file():
        return "converted"
    found = sorted(p.name for p in path.iterdir())[:8]
    raise ValueError(f"{path} is not a cheers-pl model folder (it holds {found}); expected {EXPECTED}")


def weight_files(path: str | Path) -> list[Path]:
    """The files holding a model's tensors (its identity for a repro card), in a stable order."""
    path = Path(path)
    kind = detect_format(path)
    if kind == "checkpoint":
        return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    if kind == "converted":
        return [path / CONVERTED_WEIGHTS]
    return sorted({path / f for f in _read_json(path / INDEX)["weight_map"].values()})


def load_any(path: str | Path, base: str | Path | None = None, merge_lora: bool = False):
    """A CheersModel (eval mode, on CPU) from a stage ``.ckpt``, an exported or a converted folder,
    or a LoRA checkpoint with its base (``base``: another base than the one it names; its hash is
    checked all the same). ``merge_lora``: a LoRA model comes back with its adapters merged."""
    kind = detect_format(path)
    if base is not None and kind != "checkpoint":
        raise ValueError(f"base={base} is for a LoRA checkpoint; {path} is an {kind} folder")
    if kind == "exported":
        return load_exported(path)
    if kind == "converted":
        return load_converted(path)
    return load_checkpoint(path, base=base, merge_lora=merge_lora)


def _exported_spec_and_state(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(the spec with its tokenizer path made absolute, the whole state) of an exported folder."""
    if not (folder / CONFIG).is_file():
        raise ValueError(f"{folder} has no {CONFIG}; expected an exported cheers-pl folder")
    config = _read_json(folder / CONFIG)
    spec = dict(config["spec"])
    tok = dict(spec.get("tokenizer") or {})
    if tok.get("flavor") == "pretrained" and tok.get("path") and not Path(tok["path"]).is_absolute():
        spec["tokenizer"] = {**tok, "path": str(folder / tok["path"])}
    if not (folder / INDEX).is_file():
        raise ValueError(f"{folder} has no {INDEX}; the export is incomplete")
    index = _read_json(folder / INDEX)
    state: dict[str, Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: shard {name} named in {INDEX} is missing")
        state.update(load_file(str(folder / name)))
    for dropped, kept in index.get("metadata", {}).get("tied", {}).items():
        if kept in state:
            state.setdefault(dropped, state[kept])
    return spec, state


def load_exported(folder: str | Path):
    """The CheersModel of an exported folder (:func:`export_model`), needing no other file."""
    folder = Path(folder)
    spec, state = _exported_spec_and_state(folder)
    return build_and_load(spec, state, folder)


def load_converted(folder: str | Path):
    """A converted folder: ``cheers_spec.json`` (the spec as a dict) and ``model.safetensors``."""
    folder = Path(folder)
    spec = _read_json(folder / CONVERTED_SPEC)
    if isinstance(spec.get("spec"), dict):
        spec = spec["spec"]
    return build_and_load(spec, load_file(str(folder / CONVERTED_WEIGHTS)), folder)


def _read_checkpoint(path: Path) -> Any:
    """A checkpoint file (integrity-checked) or sharded folder, read with ``weights_only=True``."""
    try:
        ckpt = (
            read_sharded(path)
            if is_sharded_checkpoint(path)
            else torch.load(path, map_location="cpu", weights_only=True)
        )
    except Exception as err:  # pickle, zip and weights_only errors alike
        raise ValueError(
            f"{path} cannot be read as a checkpoint ({type(err).__name__}: {err}); expected {EXPECTED}"
        ) from None
    if not is_sharded_checkpoint(path):
        check_integrity(ckpt, path)  # a flipped bit: refused naming the file
    return ckpt


def load_checkpoint(path: str | Path, base: str | Path | None = None, merge_lora: bool = False):
    """A Lightning checkpoint of any stage: the spec in ``hyper_parameters``, the ``model.*`` tensors;
    a LoRA checkpoint: its base with the adapters (:func:`load_lora_checkpoint`)."""
    path = Path(path)
    return _from_checkpoint(_read_checkpoint(path), path, base, merge_lora)


def _from_checkpoint(ckpt: Any, path: Path, base: str | Path | None = None, merge_lora: bool = False):
    if isinstance(ckpt, dict) and LORA_KEY in ckpt:
        return load_lora_checkpoint(ckpt, path, base, merge_lora)
    if base is not None:
        raise ValueError(f"base={base} is for a LoRA checkpoint; {path} is a full checkpoint (no adapters)")
    spec = (ckpt.get("hyper_parameters") or {}).get("spec") if isinstance(ckpt, dict) else None
    if not isinstance(spec, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(
            f"{path} is not a cheers-pl stage checkpoint (no hyper_parameters['spec'] and "
            f"state_dict); expected {EXPECTED}"
        )
    state = ckpt["state_dict"]
    model_state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return build_and_load(spec, model_state or state, path)


def load_lora_checkpoint(
    ckpt: dict, path: str | Path, base: str | Path | None = None, merge_lora: bool = False
):
    """A LoRA checkpoint's base + adapter pair: the base it names (``base``: another path; any
    format) loaded, its hash checked against the recorded one, the adapters injected and loaded
    (every one of them). ``merge_lora``: merged into the base weights before returning."""
    from cheers_pl.finetune import lora as lo

    record = ckpt[LORA_KEY]
    spec = lo.LoraSpec.from_value(record.get("config"))
    saved = record.get("base") or {}
    base_path = str(base) if base is not None else lo.find_base(saved)
    if base_path is None:
        if saved.get("path") is None:
            raise ValueError(
                f"{path}: a LoRA checkpoint of a run without init_from (adapters on the spec's random "
                "weights): there is no base model to load; pass the base with base= / --base"
            )
        raise ValueError(
            f"{path}: the base model its LoRA adapters were trained on, {saved.get('path')} "
            f"(absolute: {saved.get('abspath')}), is not there; pass where it is now with base= / --base"
        )
    model = load_any(base_path, merge_lora=True)
    current = lo.base_record(base_path, detect_format(base_path), lo.base_digest(model))
    if current["sha256"] != saved.get("sha256"):
        raise ValueError(lo.base_mismatch_message(saved, current, str(path)))
    lo.apply_lora(model, spec)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    lo.load_adapter_state(model, state, path)
    if merge_lora:
        lo.merge_lora(model)
    return model.eval()


def read_model_state(path: str | Path) -> dict[str, Tensor]:
    """The CheersModel state (names without ``model.``) of a stage checkpoint, an exported or a
    converted folder, or a LoRA checkpoint (its base with the adapters merged): a stage's
    ``init_from``. Tensors are as saved (dtypes kept)."""
    from cheers_pl.finetune.lora import base_state

    path = Path(path)
    kind = detect_format(path)
    if kind == "exported":
        return _exported_spec_and_state(path)[1]
    if kind == "converted":
        return load_file(str(path / CONVERTED_WEIGHTS))
    ckpt = read_checkpoint(path)
    if LORA_KEY in ckpt:
        return base_state(load_lora_checkpoint(ckpt, path, merge_lora=True))
    return model_state(ckpt)


def build_and_load(spec: dict[str, Any] | CheersSpec, state: dict[str, Tensor], source: str | Path):
    """Build the spec's CheersModel and load ``state`` into it: every tensor, same shapes and dtypes."""
    from cheers_pl.model import CheersModel

    if isinstance(spec, dict):
        try:
            spec = CheersSpec(**spec)
        except TypeError as err:
            raise ValueError(f"{source}: the saved spec does not fit this kit's CheersSpec ({err})") from None
    model = CheersModel(spec)
    load_state_strict(model, state, source)
    return model.eval()


def load_state_strict(model, state: dict[str, Tensor], source: str | Path) -> None:
    """Load ``state`` into ``model``, refusing any missing, unexpected or mis-shaped tensor.

    A name missing from ``state`` whose tensor the model ties to a present one is filled from it.
    Each tensor keeps its saved dtype (the model's tensor is cast first, ties preserved).
    """
    own = model.state_dict()
    state = dict(state)
    for group in _alias_groups(own):
        present = [k for k in group if k in state]
        for k in group:
            if k not in state and present:
                state[k] = state[present[0]]
    check_fit(own, state, source)
    for name, value in state.items():
        if own[name].dtype != value.dtype:
            _module_tensor(model, name).data = own[name].data.to(value.dtype)
    model.load_state_dict(state, strict=True)


def _alias_groups(state: dict[str, Tensor]) -> list[list[str]]:
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        groups.setdefault(key, []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _module_tensor(model, name: str) -> Tensor:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    return getattr(module, leaf)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds {type(data).__name__}, expected a JSON object")
    return data


# -- command ----------------------------------------------------------------------------------------
def _load_for_export(path: str, merge_lora: bool, base: str | None):
    """The model ``cheers export`` writes: a LoRA checkpoint only with ``merge_lora`` (merged), any
    other format only without it. The checkpoint file is read once."""
    kind = detect_format(path)
    ckpt = _read_checkpoint(Path(path)) if kind == "checkpoint" else None
    lora = isinstance(ckpt, dict) and LORA_KEY in ckpt
    if lora and not merge_lora:
        raise ValueError(
            f"{path} is a LoRA checkpoint (adapters only); pass --merge-lora to write its base with the "
            "adapters merged in"
        )
    if merge_lora and not lora:
        raise ValueError(f"--merge-lora: {path} is not a LoRA checkpoint (it holds no adapters)")
    if ckpt is not None:
        return _from_checkpoint(ckpt, Path(path), base, merge_lora=True)
    return load_any(path)


def main(argv: list[str] | None = None) -> int:
    """``cheers export MODEL --out DIR``: any model format -> a self-contained exported folder
    (``--merge-lora``: a LoRA checkpoint's base with its adapters merged in)."""
    from cheers_pl.cli_help import make_parser

    parser = make_parser(
        "cheers export",
        "Export a model (stage .ckpt, exported or converted folder) "
        "as a self-contained Hugging-Face-style folder: config.json, safetensors shards, tokenizer/.",
    )
    parser.add_argument("model", metavar="CKPT", help="a stage .ckpt, an exported or a converted folder")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--max-shard-size", default="2GB", help="largest shard, e.g. 2GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    parser.add_argument(
        "--merge-lora",
        action="store_true",
        help="CKPT is a LoRA checkpoint: load its base, merge the adapters in, write a plain folder",
    )
    parser.add_argument(
        "--base",
        help="with --merge-lora: the base model (any format) when it is no longer where the LoRA "
        "checkpoint says; its hash must match the recorded one",
    )
    args = parser.parse_args(argv)
    if args.base and not args.merge_lora:
        parser.error("--base is for --merge-lora (a LoRA checkpoint's base model)")
    try:
        parse_size(args.max_shard_size)
        check_export_dir(args.out, args.overwrite)  # before the (slow) load
        model = _load_for_export(args.model, args.merge_lora, args.base)
        out = export_model(model, args.out, args.max_shard_size, args.overwrite)
    except (ValueError, OSError) as err:
        parser.exit(2, f"cheers export: error: {err}\n")
    index = _read_json(out / INDEX)
    n_shards = len(set(index["weight_map"].values()))
    print(
        f"exported {args.model} -> {out}: {len(index['weight_map'])} tensors, {n_shards} shard(s), "
        f"{index['metadata']['total_size'] / 1e6:.1f} MB"
    )
    return 0
