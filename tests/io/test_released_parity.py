"""Golden test: a released checkpoint, converted, computes the authors' function.

``fixtures/released_parity/`` holds outputs of the authors' released code (AI9Stars/Cheers at
da1cb77, fp32 on CPU) for a tiny random-weight model saved in the released layout in bf16; its
README lists every case, tensor and tolerance. The shards and tensor files are stored xz-compressed
(14 MB instead of 65 MB) and unpacked here. Everything goes through the path a user takes:
``cheers convert`` (the CLI function), ``load_any``, the forward with given t and noise,
``generate`` and ``edit`` with given noise, ``velocity`` and ``answer``. Cases the release computes
without its dummy image ("dummy-image patch on") load the same weights with ``dummy_image: none``
in the converted folder's spec.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cheers_pl import inference
from cheers_pl.cli import main as cheers
from cheers_pl.io import released
from cheers_pl.io.export import load_any
from cheers_pl.io.released_batch import expand_released_batch
from cheers_pl.io.safetensors_folder import read_safetensors_folder

FIXTURE = Path(__file__).parent / "fixtures" / "released_parity"
CASES = json.loads((FIXTURE / "cases.json").read_text())["cases"]
MEASURED: dict[str, float] = {}  # expected tensor -> max abs diff (printed with -s)


def _unpack(src: Path, dst: Path) -> Path:
    """A copy of ``src`` with every ``*.xz`` decompressed."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_dir():
            _unpack(item, dst / item.name)
        elif item.suffix == ".xz":
            (dst / item.stem).write_bytes(lzma.decompress(item.read_bytes()))
        else:
            shutil.copy(item, dst / item.name)
    return dst


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> Path:
    return _unpack(FIXTURE, tmp_path_factory.mktemp("released_parity"))


@pytest.fixture(scope="module")
def converted(fixture, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted")
    assert cheers(["convert", str(fixture / "checkpoint"), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def no_dummy(converted, tmp_path_factory) -> Path:
    """The converted folder with ``dummy_image: none`` in its spec (the fixture's patched release)."""
    out = tmp_path_factory.mktemp("converted_nodummy")
    for item in converted.iterdir():
        os.link(item, out / item.name)
    spec = json.loads((converted / released.KIT_SPEC).read_text())
    (out / released.KIT_SPEC).unlink()
    (out / released.KIT_SPEC).write_text(json.dumps({**spec, "dummy_image": "none"}))
    return out


@pytest.fixture(scope="module")
def models(converted, no_dummy):
    return {True: load_any(converted).float(), False: load_any(no_dummy).float()}


@pytest.fixture(scope="module")
def tensors(fixture):
    return load_file(str(fixture / "inputs.safetensors")), load_file(str(fixture / "expected.safetensors"))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _t2i_prompts(model, case, inputs, key: str) -> list[str]:
    prompts = case["prompts"]
    ids = torch.stack([model.processor.generation_prompt(p) for p in prompts])
    assert torch.equal(ids, inputs[key]), "the kit's prompt ids differ from the fixture's"
    return prompts


def outputs(model, case: dict, inputs: dict) -> dict[str, torch.Tensor]:
    """The kit's value of each tensor the case expects, through the public API."""
    kind, p, tag = case["kind"], model.processor, "dummy" if case.get("dummy") else "nodummy"
    if kind == "understanding_logits":
        batch = expand_released_batch(inputs["a_input_ids"], p, inputs["a_attention_mask"])
        logits = model({**batch, "images": inputs["a_pixels"]}, return_logits=True).logits[0]
        subset = logits[:, inputs["a_logit_subset_ids"]]
        return {"a_logits_last8": logits[-8:], "a_logits_subset": subset, "a_argmax": logits.argmax(-1)}
    if kind == "understanding_greedy":
        expanded = expand_released_batch(inputs["a_input_ids"], p)["input_ids"][0]
        assert torch.equal(p.answer_prompt(case["question"]), expanded)
        answer = model.answer(inputs["a_pixels"], [case["question"]], max_new_tokens=16, return_ids=True)
        return {"a_greedy_ids": answer.ids[0]}
    if kind == "velocity":
        prompt = case["prompt"]
        assert torch.equal(p.generation_prompt(prompt), inputs["b_input_ids"][0])
        n = inputs["b_t"].shape[0]
        dummy = inputs["b_dummy_pixels"].expand(n, -1, -1, -1) if case["dummy"] else None
        v = model.velocity(
            [prompt] * n, inputs["b_zt"].expand(n, -1, -1, -1), inputs["b_t"], dummy_images=dummy
        )
        return {f"b_v_{tag}": v}
    if kind == "train_loss":
        name, rows = case["name"][:2], case["rows"]
        mask = inputs["c_attention_mask"][rows]
        cut = int(mask.sum(1).max())
        batch = expand_released_batch(
            inputs["c_input_ids"][rows, :cut], p, mask[:, :cut], inputs["c_labels"][rows, :cut]
        )
        batch.update(images=inputs["c_pixels"], t=inputs["c_t"], z0=inputs["c_z0"])
        if case["dummy"]:
            batch["dummy_z0"] = inputs["c_z0_dummy"]
        with torch.no_grad():
            out = model(batch)
        gen = torch.nn.functional.mse_loss(out.v[1], out.target[1])
        return {
            f"{name}_loss": out.loss,
            f"{name}_loss_text": out.loss_text,
            f"{name}_loss_fm": out.loss_fm,
            f"{name}_loss_fm_gen": gen,
            f"{name}_v": out.v,
            f"{name}_target": out.target,
        }
    if kind == "t2i":
        d = case["name"][:2]
        prompts = _t2i_prompts(model, case, inputs, f"{d}_input_ids")
        dummy = inputs[f"{d}_dummy_pixels"] if case["dummy"] else None
        sampling = dict(cfg_scale=case["cfg_scale"], steps=case["steps"], shift=case["shift"])
        result = model.generate(prompts, **sampling, noise=inputs[f"{d}_z"], dummy_images=dummy)
        return {f"{d}_latent_{tag}": result.latents, f"{d}_image_{tag}": result.images}
    if kind == "edit":
        rows = inference.edit_rows(model, [case["instruction"]], cfg=False)["input_ids"][0]
        expanded = expand_released_batch(inputs["e_input_ids"], p)["input_ids"][0]
        assert torch.equal(rows[: expanded.shape[0]], expanded)
        result = inference.edit(
            model,
            inputs["e_pixels"],
            [case["instruction"]],
            steps=case["steps"],
            cfg_scale=case["cfg_scale"],
            shift=case["shift"],
            noise=inputs["e_z"],
            return_latents=True,
        )
        return {"e_latent": result.latents, "e_image": result.images}
    raise AssertionError(f"unknown case kind {kind!r}")


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case_matches_the_released_code(case, models, tensors):
    inputs, expected = tensors
    model = models[bool(case.get("dummy", True))]
    got = outputs(model, case, inputs)
    assert sorted(got) == sorted(case["expected"])
    for name, tol in case["tolerance"].items():
        want, have = expected[name], got[name].detach()
        assert have.shape == want.shape, f"{name}: shape {tuple(have.shape)} vs {tuple(want.shape)}"
        if tol == 0:
            assert torch.equal(have.to(want.dtype), want), f"{name}: not exactly equal"
            MEASURED[name] = 0.0
            continue
        diff = (have.float() - want.float()).abs().max().item()
        MEASURED[name] = diff
        print(f"{case['name']}: {name} max abs diff {diff:.3g} (tolerance {tol:g})")
        assert diff <= tol, f"{name}: max abs diff {diff:.3g} > tolerance {tol:g}"


def test_converted_folder_goes_back_to_the_released_layout_bit_for_bit(fixture, converted, tmp_path):
    back = tmp_path / "back"
    assert cheers(["convert", "--to-released", str(converted), "--out", str(back)]) == 0
    src = fixture / "checkpoint"
    original, again = read_safetensors_folder(src), read_safetensors_folder(back)
    assert sorted(again) == sorted(original)
    for name, tensor in original.items():
        assert again[name].dtype == tensor.dtype and again[name].shape == tensor.shape, name
        assert torch.equal(_bits(again[name]), _bits(tensor)), name
    index = json.loads((src / released.INDEX_FILE).read_text())
    assert json.loads((back / released.INDEX_FILE).read_text())["weight_map"] == index["weight_map"]
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    for file in sorted(set(index["weight_map"].values())):
        assert (back / file).read_bytes() == (src / file).read_bytes(), f"{file} differs byte for byte"


def test_the_released_config_alone_sets_every_size(converted):
    spec = json.loads((converted / released.KIT_SPEC).read_text())
    head, vae = spec["cfm_head"]["overrides"], spec["vae"]["overrides"]
    assert (head["heads_a"], head["kv_heads_a"], head["heads_b"], head["kv_heads_b"]) == (4, 2, 4, 2)
    assert vae["block_out_channels"] == [32] * 4 and vae["decoder_block_out_channels"] == [128] * 4
    assert vae["layers_per_block"] == 1 and spec["compat"] == "released"
