"""Data-parallel equivalence, gradient checkpointing and the sharded strategy, on CPU (gloo).

DDP equivalence: two processes each train on one half of a global batch; one process trains on
the whole. ``CheersModel.forward`` draws t and z0 per call from its generator, so the halves
get their own generators (seeded by step and rank) in both setups, and the single process's
loss is the mean of the two half-batch losses, each with its half's generator. That is exactly
what DDP computes: each rank back-propagates its half's loss and the gradients are averaged
over the ranks. (A single forward over all 6 samples would differ twice over: other noise
draws, and token / image weights pooled over the whole batch instead of per half.)
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from cheers_pl.components.dit import DiTBlock
from tests import ddp_worker
from tests.helpers import randomize_zero_inits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initial_state(path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = ddp_worker.tiny_module().model
    randomize_zero_inits(model)  # AdaLN-Zero and the HFI gate: every trainable parameter gets a gradient
    state = model.state_dict()
    torch.save(state, path)
    return state


def test_two_ddp_processes_match_one_process(tmp_path):
    state_path = tmp_path / "init.pt"
    initial_state(state_path)
    mp.spawn(
        ddp_worker.ddp_worker,
        args=(2, free_port(), str(state_path), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    model = ddp_worker.tiny_module(str(state_path)).model
    halves = ddp_worker.half_batches(model)
    gens = [ddp_worker.generators(r, ddp_worker.STEPS) for r in range(2)]
    per_half = []

    def forward_loss(step: int) -> torch.Tensor:
        losses = [model(halves[r], generator=gens[r][step]).loss for r in range(2)]
        per_half.append([float(x.detach()) for x in losses])
        return torch.stack(losses).mean()

    losses, state = ddp_worker.train(model, forward_loss, ddp_worker.STEPS)

    for r in range(2):  # each rank's own loss is the single process's loss of its half
        torch.testing.assert_close(
            torch.tensor(ranks[r]["losses"]), torch.tensor([h[r] for h in per_half]), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(ranks[r]["global_losses"], torch.tensor(losses), rtol=1e-5, atol=1e-5)
    assert losses[-1] < losses[0]  # it trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    start = torch.load(state_path, weights_only=True)
    assert all(not torch.equal(start[n], state[n]) for n in trainable)  # every trainable weight moved
    # A key bias shifts every logit of a query equally, so softmax ignores it: its exact gradient is 0
    # and it gets float noise only, which Adam scales to a full step of either sign.
    noise_only = {n for n in state if n.endswith("k_proj.bias")}
    for r in range(2):
        assert ranks[r]["state"].keys() == state.keys()
        for name, value in state.items():
            if name not in noise_only:
                torch.testing.assert_close(ranks[r]["state"][name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_gradient_checkpointing_same_loss_and_gradients(tmp_path):
    state_path = tmp_path / "init.pt"
    initial_state(state_path)
    plain = ddp_worker.tiny_module(str(state_path))
    ckpt = ddp_worker.tiny_module(str(state_path), gradient_checkpointing=True)
    assert ckpt.hparams["gradient_checkpointing"] is True and plain.hparams["gradient_checkpointing"] is False
    m = ckpt.model
    assert m.llm.model.model.gradient_checkpointing
    assert m.semantic_encoder.vit.encoder.gradient_checkpointing
    blocks = [b for b in m.cfm_head.modules() if isinstance(b, DiTBlock)]
    assert blocks and all("forward" in vars(b) for b in blocks)
    assert ckpt.model.state_dict().keys() == plain.model.state_dict().keys()  # names unchanged

    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return original(fn, *args, **kwargs)

    batch = ddp_worker.half_batches(plain.model)[0]
    results = []
    for module in (plain, ckpt):
        module.model.train()
        with pytest.MonkeyPatch.context() as mp_:
            mp_.setattr(torch.utils.checkpoint, "checkpoint", counting)
            out = module.model(batch, generator=torch.Generator().manual_seed(7))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads))
    assert len(calls) == len(blocks)  # the DiT blocks ran checkpointed (the plain model: none)
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=name)

    with torch.no_grad():  # eval / no-grad runs the blocks plainly
        ckpt.model.eval()
        ckpt.model(batch, generator=torch.Generator().manual_seed(7))


def test_fsdp_strategy_settings_of_paper_yaml():
    import yaml

    from cheers_pl.distributed import WRAP_UNITS, CheersFSDPStrategy

    with open("experiments/stage1_alignment.yaml") as f:
        cfg = yaml.safe_load(f)["trainer"]["strategy"]
    assert cfg["class_path"] == "cheers_pl.distributed.CheersFSDPStrategy"
    strategy = CheersFSDPStrategy(**cfg["init_args"])
    assert {Qwen2DecoderLayer, SiglipEncoderLayer, DiTBlock} <= WRAP_UNITS
    policy = strategy.kwargs["auto_wrap_policy"]
    for unit in (Qwen2DecoderLayer, SiglipEncoderLayer, DiTBlock):
        assert unit in policy._module_classes
    assert strategy._activation_checkpointing_kwargs, "activation checkpointing is not set"
    assert strategy.kwargs["use_orig_params"] is True


def test_fsdp_strategy_tiny_fit_two_cpu_processes(tmp_path):
    """``CheersFSDPStrategy`` (activation checkpointing on, gradient clipping 1.0) fits 2 steps of
    the tiny model in two gloo processes: every decoder layer, SigLIP layer and DiT block is an
    FSDP unit and checkpointed. (Gradient clipping by norm needs the strategy's FSDP-aware clip.)"""
    mp.spawn(ddp_worker.lightning_worker, args=(2, free_port(), str(tmp_path), "fsdp"), nprocs=2, join=True)
    model = ddp_worker.tiny_module().model
    n_units = sum(isinstance(m, (Qwen2DecoderLayer, SiglipEncoderLayer, DiTBlock)) for m in model.modules())
    for r in range(2):
        result = torch.load(tmp_path / f"lightning{r}.pt", weights_only=True)
        assert result["global_step"] == 2
        assert torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))
        assert result["units"]["CheckpointWrapper"] == n_units
        # + the root, + FSDP's own units for the VAE's BatchNorm layers (kept out of mixed precision)
        assert result["units"]["FullyShardedDataParallel"] >= n_units + 1
