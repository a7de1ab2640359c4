"""Exported folders and load_any: round trips, the three formats, and the errors."""

import json
import shutil
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_file

from cheers_pl.io import export as ex
from cheers_pl.model import CheersModel
from cheers_pl.spec import CheersSpec, ComponentSpec
from tests.helpers import randomize_zero_inits

LM_HEAD, EMBED = "llm.model.lm_head.weight", "llm.model.model.embed_tokens.weight"


def tiny_model(seed: int = 0, **fields) -> CheersModel:
    torch.manual_seed(seed)
    model = CheersModel(CheersSpec.tiny(**fields)).eval()
    randomize_zero_inits(model, seed=seed)
    return model


def assert_same_state(a: CheersModel, b: CheersModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def save_ckpt(model: CheersModel, path) -> None:
    state = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"spec": asdict(model.spec)}}, path)


def save_converted(model: CheersModel, folder) -> None:
    folder.mkdir()
    state, _ = ex.dedupe_tied(model.state_dict())  # a converter writes the tied head once too
    save_file(state, str(folder / ex.CONVERTED_WEIGHTS))
    (folder / ex.CONVERTED_SPEC).write_text(json.dumps(asdict(model.spec)))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_export_round_trip(model, tmp_path):
    out = ex.export_model(model, tmp_path / "export", max_shard_size="300KB")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["CheersModel"] and config["cheers_pl_version"]
    assert config["spec"]["tokenizer"] == {"flavor": "pretrained", "path": "tokenizer", "overrides": {}}
    assert config["source_spec"] == asdict(model.spec)
    index = json.loads((out / ex.INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == shards
    assert index["metadata"]["tied"] == {LM_HEAD: EMBED} and LM_HEAD not in index["weight_map"]
    assert set(index["weight_map"]) | {LM_HEAD} == set(model.state_dict())
    assert (out / "tokenizer" / "tokenizer.json").is_file()

    loaded = ex.load_exported(out)
    assert_same_state(model, loaded)
    assert loaded.llm.model.lm_head.weight is loaded.llm.model.model.embed_tokens.weight
    a = model.generate(["a cat"], cfg_scale=3.0, steps=3, seed=1).latents
    b = loaded.generate(["a cat"], cfg_scale=3.0, steps=3, seed=1).latents
    assert torch.equal(a, b)
    images = torch.rand(2, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    questions = ["What is in the picture?", "How many cats?"]
    assert model.answer(images, questions, 6) == loaded.answer(images, questions, 6)


def test_export_needs_no_component_folders(tmp_path):
    """Pretrained components (config + weights from folders) export to a folder that loads alone."""
    base = tiny_model()
    dirs = {k: tmp_path / k for k in ("llm", "vit", "vae", "tok")}
    base.llm.model.save_pretrained(dirs["llm"])
    base.semantic_encoder.vit.save_pretrained(dirs["vit"])
    base.vae.vae.save_pretrained(dirs["vae"])
    base.processor.tokenizer.save_pretrained(dirs["tok"])
    c = ComponentSpec
    spec = CheersSpec.tiny(
        llm=c("pretrained", str(dirs["llm"])),
        semantic_encoder=c("pretrained", str(dirs["vit"])),
        vae=c("pretrained", str(dirs["vae"])),
        tokenizer=c("pretrained", str(dirs["tok"])),
    )
    model = CheersModel(spec).eval()
    randomize_zero_inits(model)
    out = ex.export_model(model, tmp_path / "export")
    for d in dirs.values():
        shutil.rmtree(d)
    loaded = ex.load_any(out)
    assert_same_state(model, loaded)
    assert {loaded.spec.llm.flavor, loaded.spec.vae.flavor, loaded.spec.semantic_encoder.flavor} == {"paper"}
    assert loaded.spec.tokenizer.path == str(out / "tokenizer")


def test_export_keeps_dtypes(tmp_path):
    model = tiny_model()
    model.llm.to(torch.bfloat16)
    loaded = ex.load_exported(ex.export_model(model, tmp_path / "export"))
    assert loaded.llm.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.llm.model.lm_head.weight is loaded.llm.model.model.embed_tokens.weight
    assert_same_state(model, loaded)


def test_load_any_reads_all_three_formats(model, tmp_path):
    save_ckpt(model, tmp_path / "last.ckpt")
    save_converted(model, tmp_path / "converted")
    ex.export_model(model, tmp_path / "exported")
    for path, kind in [("last.ckpt", "checkpoint"), ("converted", "converted"), ("exported", "exported")]:
        assert ex.detect_format(tmp_path / path) == kind
        assert_same_state(model, ex.load_any(tmp_path / path))
    assert ex.weight_files(tmp_path / "converted") == [tmp_path / "converted" / "model.safetensors"]


def test_load_any_refuses_what_it_cannot_read(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ex.load_any(tmp_path / "nowhere")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(ValueError, match=r"other is not a cheers-pl model folder.*expected a Lightning"):
        ex.load_any(other)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt cannot be read as a checkpoint"):
        ex.load_any(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {"model.x": torch.zeros(1)}}, tmp_path / "nospec.ckpt")
    with pytest.raises(ValueError, match=r"nospec.ckpt is not a cheers-pl stage checkpoint"):
        ex.load_any(tmp_path / "nospec.ckpt")


def test_checkpoint_of_another_model_names_the_keys(model, tmp_path):
    state = {"model.encoder.block.0.weight": torch.zeros(3), "model.head.bias": torch.zeros(2)}
    torch.save({"state_dict": state, "hyper_parameters": {"spec": asdict(model.spec)}}, tmp_path / "x.ckpt")
    with pytest.raises(
        ValueError, match=r"x.ckpt does not fit.*missing.*unexpected \['encoder.block.0.weight'"
    ):
        ex.load_any(tmp_path / "x.ckpt")
    bigger = {k: v for k, v in model.state_dict().items()}
    bigger["projector.layernorm.weight"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"1 of another shape \['projector.layernorm.weight \(7,\)"):
        ex.load_state_strict(tiny_model(), bigger, "test")
    spec = {**asdict(model.spec), "no_such_field": 1}
    with pytest.raises(ValueError, match="does not fit this kit's CheersSpec"):
        ex.build_and_load(spec, {}, "old.ckpt")


def test_incomplete_or_occupied_export_folders(model, tmp_path):
    out = ex.export_model(model, tmp_path / "export", max_shard_size="300KB")
    with pytest.raises(FileExistsError, match="not empty"):
        ex.export_model(model, out)
    ex.export_model(model, out, max_shard_size="1GB", overwrite=True)  # no stale shard stays
    assert [p.name for p in out.glob("model-*.safetensors")] == ["model-00001-of-00001.safetensors"]
    (out / "model-00001-of-00001.safetensors").unlink()
    with pytest.raises(ValueError, match="shard model-00001-of-00001.safetensors .* is missing"):
        ex.load_any(out)


def test_parse_size():
    assert ex.parse_size("2GB") == 2 * 10**9 and ex.parse_size("1GiB") == 2**30
    assert ex.parse_size(" 500 mb ") == 5 * 10**8 and ex.parse_size(1234) == 1234
    for bad in ("two", "0", -1):
        with pytest.raises(ValueError, match="max_shard_size"):
            ex.parse_size(bad)


def test_export_command(model, tmp_path, capsys):
    save_ckpt(model, tmp_path / "last.ckpt")
    assert ex.main([str(tmp_path / "last.ckpt"), "--out", str(tmp_path / "export")]) == 0
    assert "1 shard(s)" in capsys.readouterr().out
    assert_same_state(model, ex.load_any(tmp_path / "export"))
    with pytest.raises(SystemExit) as err:
        ex.main([str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "e2")])
    assert err.value.code == 2 and "missing.ckpt" in capsys.readouterr().err
