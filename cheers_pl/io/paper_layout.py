"""``cheers prepare``: the three public component releases as the folders the stage YAMLs read.

Stage I (``experiments/stage1_alignment.yaml``) builds its towers from three local folders under
``checkpoints/``; every later stage starts from the previous stage's checkpoint. ::

    checkpoints/siglip2-so400m-patch16-512   <- google/siglip2-so400m-patch16-512 (SigLIP2; vision tower kept)
    checkpoints/qwen2.5-1.5b-instruct        <- Qwen/Qwen2.5-1.5B-Instruct (weights + tokenizer files)
    checkpoints/flux2-vae                    <- black-forest-labs/FLUX.2-dev ae.safetensors (BFL names)
                                                or its diffusers vae/ folder

``cheers prepare --siglip DIR --qwen DIR --vae FILE_OR_DIR [--out checkpoints]`` checks each
download against its config (every tensor present, shapes right, the Qwen tokenizer there) and
writes exactly that layout, linking files where it can (no second copy of the weights).
:func:`missing_component_paths` is what ``cheers fit`` uses to refuse a stage whose folders
are not there, in one message naming all of them and this command.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# kind: (folder name under --out, the public repository it comes from, what to download)
PAPER_LAYOUT: dict[str, tuple[str, str, str]] = {
    "semantic_encoder": (
        "siglip2-so400m-patch16-512", "google/siglip2-so400m-patch16-512", "the whole repository"
    ),
    "llm": ("qwen2.5-1.5b-instruct", "Qwen/Qwen2.5-1.5B-Instruct", "the whole repository"),
    "vae": ("flux2-vae", "black-forest-labs/FLUX.2-dev", "ae.safetensors (or the diffusers vae/ folder)"),
}  # fmt: skip
TOKENIZER_FILES = ("tokenizer_config.json", "vocab.json", "merges.txt")
PREPARE_COMMAND = "cheers prepare --siglip SIGLIP_DIR --qwen QWEN_DIR --vae FLUX2_AE --out checkpoints"


def layout_help() -> str:
    """The three folders, their sources and the command, as lines for an error or ``--help``."""
    lines = [f"  {name:28s} <- {repo} ({what})" for name, repo, what in PAPER_LAYOUT.values()]
    return "\n".join([*lines, f"  write them with: {PREPARE_COMMAND}"])


def missing_component_paths(spec: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """``(kind, path)`` of every ``flavor: pretrained`` component of a spec whose folder is absent.

    ``spec`` is the stage's ``spec`` as parsed from YAML: its component fields are ``{flavor,
    path}`` mappings (or objects with those attributes); ``tokenizer`` counts as a component.
    """
    missing = []
    for kind, comp in (spec or {}).items():
        if not (isinstance(comp, Mapping) or hasattr(comp, "flavor")):
            continue
        get = comp.get if isinstance(comp, Mapping) else lambda k, c=comp: getattr(c, k, None)
        if get("flavor") == "pretrained" and get("path") and not Path(str(get("path"))).is_dir():
            missing.append((kind, str(get("path"))))
    return missing


def missing_message(missing: Sequence[tuple[str, str]]) -> str:
    """One error for all missing component folders, with where they come from and the command."""
    names = ", ".join(f"{kind}: {path}" for kind, path in missing)
    return (
        f"component folder(s) not found: {names}. Stage I reads three local folders "
        f"(download the public releases, then run `cheers prepare`):\n{layout_help()}"
    )


def prepare(
    siglip: str | Path, qwen: str | Path, vae: str | Path, out: str | Path = "checkpoints", vae_config=None
) -> dict[str, Path]:
    """Check the three downloads and write :data:`PAPER_LAYOUT` under ``out``; returns kind -> folder.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the folder and what is wrong (a missing
    download, a tensor missing or misshapen, no tokenizer files beside Qwen).
    """
    from cheers_pl.io.components import convert_siglip, prepare_qwen, prepare_vae

    srcs = {"semantic_encoder": Path(siglip), "llm": Path(qwen), "vae": Path(vae)}
    absent = [f"{kind}: {p}" for kind, p in srcs.items() if not p.exists()]
    if absent:
        raise FileNotFoundError(f"not found: {', '.join(absent)}")
    missing_tok = [f for f in TOKENIZER_FILES if not (srcs["llm"] / f).is_file()]
    if missing_tok:
        raise FileNotFoundError(
            f"{srcs['llm']}: no {', '.join(missing_tok)}; download the whole {PAPER_LAYOUT['llm'][1]} "
            "repository (the stage YAMLs read the tokenizer from the same folder)"
        )
    out = Path(out)
    folder = {kind: out / name for kind, (name, _, _) in PAPER_LAYOUT.items()}
    written = {
        "semantic_encoder": convert_siglip(srcs["semantic_encoder"], folder["semantic_encoder"])[0],
        "llm": prepare_qwen(srcs["llm"], folder["llm"])[0],
        "vae": prepare_vae(srcs["vae"], folder["vae"], vae_config)[0],
    }
    return written


def build_parser() -> argparse.ArgumentParser:
    from cheers_pl.cli_help import make_parser

    parser = make_parser(
        "cheers prepare",
        "Check the three downloaded component releases and write the folders the stage "
        "YAMLs read:\n" + layout_help(),
        raw_description=True,
    )
    parser.add_argument(
        "--siglip", required=True, help="the downloaded google/siglip2-so400m-patch16-512 folder"
    )
    parser.add_argument("--qwen", required=True, help="the downloaded Qwen/Qwen2.5-1.5B-Instruct folder")
    parser.add_argument(
        "--vae",
        required=True,
        help="FLUX.2's ae.safetensors (BFL names) or a diffusers AutoencoderKLFlux2 folder",
    )
    parser.add_argument("--out", default="checkpoints", help="where to write the three folders")
    parser.add_argument(
        "--vae-config", default=None, help="an AutoencoderKLFlux2 config.json (default: FLUX.2's own sizes)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``cheers prepare --siglip DIR --qwen DIR --vae FILE [--out checkpoints]``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        written = prepare(args.siglip, args.qwen, args.vae, args.out, args.vae_config)
    except (FileNotFoundError, ValueError, OSError) as err:
        parser.exit(2, f"cheers prepare: error: {err}\n")
    for kind, path in written.items():
        print(f"{kind}: {path}")
    print("ready for stage I: make stage1")
    return 0
