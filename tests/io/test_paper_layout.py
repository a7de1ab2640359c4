"""``cheers prepare``: three component downloads -> the exact folders stage I's YAML reads."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from cheers_pl import registry
from cheers_pl.cli import main as cheers
from cheers_pl.io import bfl_vae
from cheers_pl.io.paper_layout import PAPER_LAYOUT, missing_component_paths, missing_message

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "cheers_pl/assets/qwen2.5-tokenizer"


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    """Tiny stand-ins of the three public downloads, in their published layouts."""
    from diffusers import AutoencoderKLFlux2
    from transformers import Qwen2ForCausalLM, SiglipConfig, SiglipModel

    root = tmp_path_factory.mktemp("downloads")
    torch.manual_seed(0)
    vit = registry.config("semantic_encoder", "tiny").to_dict()
    text = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99
    )
    SiglipModel(SiglipConfig(text_config=text, vision_config=vit)).save_pretrained(root / "siglip2")
    Qwen2ForCausalLM(registry.config("llm", "tiny")).save_pretrained(root / "qwen")
    for f in TOKENIZER.iterdir():
        shutil.copy(f, root / "qwen" / f.name)
    vae = AutoencoderKLFlux2(**registry.config("vae", "tiny").kwargs)
    bfl = bfl_vae.diffusers_to_bfl(vae.state_dict())
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(root / "ae.safetensors"))
    return root


def _stage1_components(checkpoints: Path) -> dict:
    """Stage I's YAML components, with its ``checkpoints/`` moved under ``checkpoints``."""
    cfg = yaml.safe_load((REPO / "experiments/stage1_alignment.yaml").read_text())
    comps = cfg["model"]["init_args"]["spec"]
    for comp in comps.values():
        if isinstance(comp, dict) and comp.get("path", "").startswith("checkpoints/"):
            comp["path"] = str(checkpoints / comp["path"].removeprefix("checkpoints/"))
    return comps


def test_prepare_writes_the_folders_stage1_reads(downloads, tmp_path, capsys):
    out = tmp_path / "checkpoints"
    comps = _stage1_components(out)
    assert {k for k, _ in missing_component_paths(comps)} == {"vae", "semantic_encoder", "llm", "tokenizer"}
    args = ["prepare", "--siglip", str(downloads / "siglip2"), "--qwen", str(downloads / "qwen")]
    args += ["--vae", str(downloads / "ae.safetensors"), "--out", str(out)]
    args += ["--vae-config", str(_vae_config(tmp_path))]
    assert cheers(args) == 0
    assert "ready for stage I" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(name for name, _, _ in PAPER_LAYOUT.values())
    assert missing_component_paths(comps) == []  # exactly the YAML's paths
    for kind in ("vae", "semantic_encoder", "llm", "tokenizer"):  # each loads through its flavor
        assert registry.build(kind, "pretrained", path=comps[kind]["path"]) is not None


def _vae_config(tmp_path: Path) -> Path:
    import json

    path = tmp_path / "vae-config.json"
    path.write_text(json.dumps(registry.config("vae", "tiny").kwargs))
    return path


def test_prepare_refuses_a_qwen_without_tokenizer_in_one_line(downloads, tmp_path, capsys):
    qwen = tmp_path / "qwen-weights-only"
    shutil.copytree(downloads / "qwen", qwen)
    (qwen / "vocab.json").unlink()
    args = ["prepare", "--siglip", str(downloads / "siglip2"), "--qwen", str(qwen)]
    with pytest.raises(SystemExit) as exc:
        cheers([*args, "--vae", str(downloads / "ae.safetensors"), "--out", str(tmp_path / "c")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vocab.json" in err and "Qwen/Qwen2.5-1.5B-Instruct" in err
    assert not (tmp_path / "c").exists()  # checked before anything is written


def test_the_missing_message_names_every_folder_its_source_and_the_command():
    text = missing_message([("vae", "checkpoints/flux2-vae"), ("llm", "checkpoints/qwen2.5-1.5b-instruct")])
    for word in ("checkpoints/flux2-vae", "qwen2.5-1.5b-instruct", "google/siglip2-so400m-patch16-512",
                 "black-forest-labs/FLUX.2-dev", "cheers prepare --siglip"):  # fmt: skip
        assert word in text


def test_cheers_fit_refuses_stage1_without_its_folders_in_one_message(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here
    args = ["fit", "-c", str(REPO / "experiments/stage1_alignment.yaml")]
    with pytest.raises(SystemExit) as exc:
        cheers([*args, "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for word in ("checkpoints/flux2-vae", "checkpoints/siglip2-so400m-patch16-512", "cheers prepare"):
        assert word in err
    assert "Traceback" not in err
