"""The released Cheers layout <-> the kit: a tiny released folder loads to the same model and outputs,
the paper-size mapping covers every tensor, leftovers fail by name, component releases convert."""

import copy
import json
from importlib.resources import files

import pytest
import torch
from safetensors.torch import load_file, save_file

from cheers_pl import registry
from cheers_pl.io import bfl_vae, components, released
from cheers_pl.model import CheersModel
from cheers_pl.smoke import mixed_batch
from cheers_pl.spec import COMPONENT_FIELDS, CheersSpec
from tests.helpers import randomize_zero_inits

ASSET = json.loads(files("cheers_pl").joinpath("assets/released-config.json").read_text())
PREFIXES = {  # DESIGN section 7
    "lm_head", "model.language_model", "model.vision_representation", "model.vae_model",
    "model.vae_decoder_projector", "model.und_projector", "model.time_embed", "model.gen_projector",
    "model.hi_gate", "model.hi_projector",
}  # fmt: skip


def tiny_released_config(model: CheersModel) -> dict:
    """The released config.json with the tiny model's sizes, plus the kit's flavor extension."""
    cfg = copy.deepcopy(ASSET)
    llm, vit = model.llm.model.config, model.semantic_encoder.vit.config
    cfg["text_config"] = {k: getattr(llm, k) for k in ASSET["text_config"]}
    cfg["text_config"]["num_hidden_layers"] = llm.num_hidden_layers
    vision = {k: getattr(vit, k) for k in ASSET["vision_representation_config"] if hasattr(vit, k)}
    vision["num_patches"] = (vit.image_size // vit.patch_size) ** 2
    cfg["vision_representation_config"] = {**vision, "model_type": "umm"}
    cfg[released.SPEC_KEY] = {name: {"flavor": "tiny"} for name in COMPONENT_FIELDS}
    return cfg


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = CheersModel(CheersSpec.tiny(compat="released"))
    randomize_zero_inits(model)
    with torch.no_grad():  # distinct running statistics, so that a swapped BatchNorm shows
        for bn in (model.vae.vae.bn, model.pixel_decoder.bn):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory):
    state = released.kit_to_released(tiny.state_dict())
    path = tmp_path_factory.mktemp("released")
    released.save_released_folder(state, path, tiny_released_config(tiny), num_shards=2)
    return path


def outputs(model):
    batch = mixed_batch(model)
    torch.manual_seed(0)
    out = model(batch, generator=torch.Generator().manual_seed(0))
    gen = model.generate(["a cup of coffee"], steps=2, seed=0, cfg_scale=2.0)
    return out, gen


def test_tiny_released_folder_loads_to_the_same_model(tiny, folder):
    assert len(list(folder.glob("model-*-of-00002.safetensors"))) == 2
    assert (folder / released.INDEX_FILE).is_file()
    model, report = released.load_released(folder)
    assert report.ok and not report.missing and not report.unmapped and not report.unexpected
    assert len(report.mapped) == len(tiny.state_dict()) and not report.filled
    assert model.spec.compat == "released"
    ref = tiny.state_dict()
    got = model.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert model.llm.model.lm_head.weight is model.llm.model.model.embed_tokens.weight  # still tied

    (o1, g1), (o2, g2) = outputs(tiny), outputs(model)
    for name in ("loss", "loss_text", "loss_fm"):
        assert torch.equal(getattr(o1, name), getattr(o2, name)), name
    assert torch.equal(g1.latents, g2.latents)
    assert released.load_released_folder(folder).spec == model.spec


def test_paper_mapping_covers_every_tensor():
    spec, notes = released.spec_from_released_config(ASSET)
    assert spec.compat == "released"
    resolved, paper = spec.resolve(), CheersSpec.paper(compat="released").resolve()
    assert resolved.llm.hidden_size == 1536 and resolved.llm.num_hidden_layers == 28
    assert resolved.semantic_encoder.hidden_size == 1152 and resolved.tokens_per_image == 256
    assert resolved.cfm_head == paper.cfm_head and resolved.projector == paper.projector
    with torch.device("meta"):
        model = CheersModel(spec)
    kit = model.state_dict()
    rel = released.kit_to_released(kit)
    assert len(kit) == len(rel) == 1321  # DESIGN: the release has 1321 tensors
    assert {
        k.split(".")[0] if k.startswith("lm_head") else ".".join(k.split(".")[:2]) for k in rel
    } == PREFIXES
    counts = {p: sum(k.startswith(p + ".") for k in rel) for p in PREFIXES}
    assert counts["model.language_model"] == 338 and counts["lm_head"] == 1
    assert counts["model.vision_representation"] == 448  # SigLIP with its pooling head
    assert counts["model.vae_model"] == 251 and counts["model.vae_decoder_projector"] == 143
    assert counts["model.gen_projector"] == 7 * 11 + 5 and counts["model.hi_projector"] == 3 * 11 + 5
    for name in (
        "model.vae_model.encoder.quant_conv.weight",
        "model.vae_model.decoder.post_quant_conv.weight",
        "model.vae_decoder_projector.decoder.post_quant_conv.weight",
        "model.gen_projector.diffusion_head_a.6.adaLN_modulation.1.weight",
        "model.gen_projector.diffusion_head_b.linear.weight",
        "model.hi_projector.diffusion_head_a.2.attn.q_proj.weight",
        "model.hi_projector.diffusion_head_b.norm_final.weight",
        "model.hi_gate.gate.2.weight",
        "model.vision_representation.head.probe",
        "model.language_model.layers.27.mlp.down_proj.weight",
    ):
        assert name in rel, name
    back, report = released.released_to_kit(rel, reference=kit)
    assert report.ok and len(report.mapped) == 1321 and set(back) == set(kit)
    assert {r for r, _ in report.mapped} == set(rel) and {k for _, k in report.mapped} == set(kit)
    assert rel["model.vae_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)  # BFL 1x1 conv
    assert back["vae.vae.encoder.mid_block.attentions.0.to_q.weight"].shape == (512, 512)


def test_lm_head_saved_once_or_twice(tiny):
    rel = released.kit_to_released(tiny.state_dict(), lm_head=False)
    assert "lm_head.weight" not in rel
    kit, report = released.released_to_kit(rel, reference=tiny.state_dict())
    assert (
        "llm.model.lm_head.weight",
        "tied: the LM head is the token embedding (saved once)",
    ) in report.filled
    assert torch.equal(kit["llm.model.lm_head.weight"], tiny.llm.model.lm_head.weight)

    rel = released.kit_to_released(tiny.state_dict())
    rel["lm_head.weight"] = rel["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        released.released_to_kit(rel, reference=tiny.state_dict())


def test_absent_tensors_are_filled_and_reported(tiny):
    ref = tiny.state_dict()
    rel = released.kit_to_released(ref)
    for name in [k for k in rel if "num_batches_tracked" in k or ".head." in k] + [
        "model.vae_decoder_projector.decoder.post_quant_conv.weight",
        "model.vae_decoder_projector.decoder.post_quant_conv.bias",
    ]:
        del rel[name]
    kit, report = released.released_to_kit(rel, reference=ref)
    filled = dict(report.filled)
    assert "pixel_decoder.post_quant_conv.weight" in filled and "vae.vae.bn.num_batches_tracked" in filled
    assert all(k in filled for k in ref if k.startswith("semantic_encoder.vit.head."))
    assert "copied from vae.vae.post_quant_conv.weight" in filled["pixel_decoder.post_quant_conv.weight"]
    assert torch.equal(kit["pixel_decoder.post_quant_conv.weight"], ref["vae.vae.post_quant_conv.weight"])
    assert set(kit) == set(ref) and report.ok

    for name in [k for k in rel if "quant_conv" in k]:
        del rel[name]
    kit, report = released.released_to_kit(rel, reference=ref)
    w = kit["vae.vae.quant_conv.weight"]
    assert torch.equal(w[:, :, 0, 0], torch.eye(w.shape[0]))  # identity = no quant conv


def test_leftover_keys_raise_with_their_names(tiny):
    ref = tiny.state_dict()
    rel = released.kit_to_released(ref)
    rel["model.und_projector.extra.weight"] = torch.zeros(2)
    rel["model.vae_model.encoder.down.0.block.0.bogus.weight"] = torch.zeros(2)
    del rel["model.hi_gate.layer_norm.bias"]
    with pytest.raises(ValueError) as err:
        released.released_to_kit(rel, reference=ref)
    msg = str(err.value)
    assert "model.vae_model.encoder.down.0.block.0.bogus.weight" in msg
    assert "projector.extra.weight" in msg and "cfm_head.hfi_gate.layer_norm.bias" in msg
    kit, report = released.released_to_kit(rel, reference=ref, strict=False)
    assert report.unmapped == ["model.vae_model.encoder.down.0.block.0.bogus.weight"]
    assert report.unexpected == ["projector.extra.weight"]
    assert report.missing == ["cfm_head.hfi_gate.layer_norm.bias"]
    assert "leftovers: 1 released unmapped, 1 kit missing, 1 kit unexpected" in report.summary()


def test_another_models_checkpoint_fails_clearly(tiny, tmp_path):
    other = {"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2), "x_embedder.bias": torch.zeros(2)}
    with pytest.raises(ValueError, match="is this a Cheers checkpoint.*x_embedder.bias"):
        released.released_to_kit(other, reference=tiny.state_dict())
    save_file(other, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(tiny_released_config(tiny)))
    with pytest.raises(ValueError, match="transformer_blocks.0.attn.to_q.weight"):
        released.load_released_folder(tmp_path)


def test_kit_only_tensors_do_not_export():
    with pytest.raises(ValueError, match="latent_patch_embedding"):
        released.kit_to_released({"semantic_encoder.latent_patch_embedding.weight": torch.zeros(1)})


def test_cli_writes_kit_weights_and_spec(tiny, folder, tmp_path, capsys):
    out = tmp_path / "kit"
    assert released.main([str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "leftovers: 0 released unmapped, 0 kit missing" in printed
    spec = CheersSpec(**json.loads((out / released.KIT_SPEC).read_text()))
    assert spec.compat == "released"
    model = CheersModel(spec)
    model.load_state_dict(load_file(str(out / released.KIT_WEIGHTS)), strict=True)
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in model.state_dict().items())

    ckpt = tmp_path / "kit.pt"
    released.main([str(folder), "--out", str(ckpt)])
    from cheers_pl.stages.weights import read_state_dict

    assert set(read_state_dict(ckpt)) == set(tiny.state_dict())


def test_component_releases_convert(tmp_path):
    from diffusers import AutoencoderKLFlux2
    from transformers import Qwen2ForCausalLM, SiglipConfig, SiglipModel

    torch.manual_seed(0)
    vit_cfg = registry.config("semantic_encoder", "tiny").to_dict()
    text = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99
    )
    siglip = SiglipModel(SiglipConfig(text_config=text, vision_config=vit_cfg)).eval()
    siglip.save_pretrained(tmp_path / "siglip-full")
    qwen = Qwen2ForCausalLM(registry.config("llm", "tiny")).eval()
    qwen.save_pretrained(tmp_path / "qwen")
    vae = AutoencoderKLFlux2(**registry.config("vae", "tiny").kwargs)
    bfl = bfl_vae.diffusers_to_bfl(vae.state_dict())
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(tmp_path / "ae.safetensors"))

    folders = components.convert_components(
        siglip=tmp_path / "siglip-full", qwen=tmp_path / "qwen", vae=tmp_path / "ae.safetensors",
        out=tmp_path / "out", vae_config=registry.config("vae", "tiny").kwargs,
    )  # fmt: skip
    assert any("text tower" in n for n in folders.notes)
    assert not any(k.startswith("text_model") for k in load_file(str(folders.siglip / "model.safetensors")))
    enc = registry.build("semantic_encoder", "pretrained", path=str(folders.siglip)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = siglip.vision_model(pixel_values=x).last_hidden_state
        torch.testing.assert_close(enc(x)[0], want, rtol=0, atol=0)
    llm = registry.build("llm", "pretrained", path=str(folders.qwen))
    assert torch.equal(llm.model.model.embed_tokens.weight, qwen.model.embed_tokens.weight)
    kit_vae = registry.build("vae", "pretrained", path=str(folders.vae))
    assert torch.equal(kit_vae.vae.decoder.conv_out.weight, vae.decoder.conv_out.weight)

    cfg_path = tmp_path / "qwen" / "config.json"
    bad = json.loads(cfg_path.read_text())
    bad.pop("layer_types", None)
    cfg_path.write_text(json.dumps({**bad, "num_hidden_layers": 3}))  # a layer the weights lack
    with pytest.raises(ValueError, match="missing.*layers.2"):
        components.convert_components(qwen=tmp_path / "qwen", out=tmp_path / "out2")


def test_a_misshapen_bfl_attention_weight_names_the_tensor_and_both_shapes():
    name = "model.vae_model.encoder.mid.attn_1.q.weight"
    state = {name: torch.zeros(8, 8, 3, 3)}
    with pytest.raises(ValueError, match=r"encoder\.mid\.attn_1\.q\.weight.*\(8, 8, 3, 3\).*\(8, 8, 1, 1\)"):
        released.released_to_kit(state, strict=False)


def test_the_two_channel_orders_are_inverse_permutations():
    from cheers_pl.io.released_names import kit_order, released_order

    n = 4 * 6
    assert torch.equal(kit_order(n)[released_order(n)], torch.arange(n))
    assert kit_order(n)[1] == 6  # kit channel c*4 + q = 1 (c 0, q 1) reads released q*D + c = 6
