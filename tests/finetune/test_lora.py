"""LoRA without a fit: the config checks, what trains and gets gradients, merged = unmerged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cheers_pl.cli import main
from cheers_pl.finetune.lora import (
    LoraSpec,
    adapter_parameter_names,
    apply_lora,
    base_digest,
    count_parameters,
    is_lora,
    merge_lora,
)
from cheers_pl.smoke import mixed_batch
from cheers_pl.spec import CheersSpec
from cheers_pl.stages import AlignmentStage, SFTStage
from tests.helpers import randomize_zero_inits, tiny_random_model

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
EVERYWHERE = LoraSpec(
    rank=4, alpha=8, dropout=0.0, head_targets=["q_proj", "v_proj", "down_proj"], projector=True
)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, r"lora\.rank=0 must be an integer >= 1"),
        ({"alpha": -1}, r"lora\.alpha=-1 must be a number > 0"),
        ({"dropout": 1.0}, r"lora\.dropout=1\.0 must be in \[0, 1\)"),
        ({"llm_targets": ["qproj"]}, r"lora\.llm_targets: unknown \['qproj'\]; valid choices are \['q_proj'"),
        ({"head_targets": "q_proj"}, r"lora\.head_targets='q_proj' must be a list; valid choices"),
        ({"llm_targets": []}, r"lora adapts nothing"),
    ],
)
def test_a_bad_lora_value_is_refused_naming_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraSpec(**kwargs)


def test_a_bad_lora_block_is_refused_before_any_weight():
    with pytest.raises(ValueError, match=r"lora: unknown key\(s\) \['rnak'\]; valid keys are \['rank'"):
        SFTStage(spec=CheersSpec.tiny(), lora={"rnak": 4})
    with pytest.raises(ValueError, match=r"freeze=\['llm'\] with lora"):
        SFTStage(spec=CheersSpec.tiny(), lora={"rank": 4}, freeze=["llm"])


def test_the_cli_names_a_wrong_lora_key_and_the_valid_ones(capsys):
    configs = [EXPERIMENTS / "stage4_sft.yaml", EXPERIMENTS / "tiny.yaml", EXPERIMENTS / "finetune/lora.yaml"]
    args = ["fit", *(a for c in configs for a in ("-c", str(c)))]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--model.init_args.lora.rnak", "4", "--print_config"])
    assert exit_.value.code != 0
    err = capsys.readouterr().err
    assert "rnak" in err and "'rank'" in err
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--print_config"])  # the overlay itself parses against the code
    assert exit_.value.code == 0
    assert "llm_targets" in capsys.readouterr().out


@pytest.mark.parametrize("stage", [SFTStage, AlignmentStage])
def test_only_the_adapters_train_and_get_gradients(stage):
    module = stage(spec=CheersSpec.tiny(), lora=EVERYWHERE)
    module.configure_model()
    model = module.model
    adapters = adapter_parameter_names(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapters and adapters
    assert all(".lora_A." in n or ".lora_B." in n for n in adapters)
    where = {n.split(".")[0] for n in adapters}
    assert where == {"llm", "cfm_head", "projector"}
    assert any(".self_attn." in n for n in adapters) and any(".mlp." in n for n in adapters)
    assert not any(n.startswith("semantic_encoder.") for n in adapters)  # SigLIP's own q_proj: untouched
    randomize_zero_inits(model)  # a "trained" base (the head's zero layers pass no gradient) and B != 0
    model.train()
    model(mixed_batch(model)).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == adapters
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in adapters)
    n_train, n_total = count_parameters(model)
    assert 0 < n_train < 0.05 * n_total


def test_merged_and_unmerged_give_the_same_outputs():
    model = tiny_random_model()
    plain = set(model.state_dict())
    digest = base_digest(model)
    apply_lora(model, EVERYWHERE)
    assert base_digest(model) == digest  # the base's hash ignores the adapters and peft's names
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:  # B starts at zero: give the adapters something to merge
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    batch = mixed_batch(model)
    before = model(batch, generator=torch.Generator().manual_seed(0), return_logits=True)
    merge_lora(model)
    assert not is_lora(model) and set(model.state_dict()) == plain
    after = model(batch, generator=torch.Generator().manual_seed(0), return_logits=True)
    for field in ("loss", "loss_text", "loss_fm", "logits", "v"):
        torch.testing.assert_close(getattr(after, field), getattr(before, field), rtol=0, atol=1e-5)
    assert base_digest(model) != digest  # merged: another model
