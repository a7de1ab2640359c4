"""Sharded FSDP checkpoints on CPU (2 gloo processes): save, resume, consolidate to one file.

One spawn (``ddp_worker.sharded_checkpoint_worker``) fits the tiny model 2 steps with
``CheersFSDPStrategy(state_dict_type="sharded")`` (ModelCheckpoint writes a folder at step 2), then
a differently initialised module resumes from the folder (``ckpt_path=``) for 2 more steps. The
worker saves each rank's local shards (parameters and AdamW state) after the first fit and at the
start of the resumed one, and the gathered full state; the tests compare them here. (The
first fit also samples an image through ``cheers_pl.distributed.full_params``.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cheers_pl.io.sharded import consolidate, is_sharded_checkpoint, main, read_sharded
from tests import ddp_worker
from tests.test_distributed import free_port


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    mp.spawn(ddp_worker.sharded_checkpoint_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ranks = [torch.load(out / f"sharded{r}.pt", weights_only=True) for r in range(2)]
    return out, ranks


def test_checkpoint_is_a_folder_of_shards(run):
    out, ranks = run
    path = Path(ranks[0]["path"])
    assert path == Path(ranks[1]["path"]) and path.parent == out / "checkpoints"
    assert path.is_dir() and is_sharded_checkpoint(path)
    assert {p.name for p in path.iterdir()} == {".metadata", "meta.pt", "__0_0.distcp", "__1_0.distcp"}


def test_resume_restores_every_shard_and_optimiser_state_exactly(run):
    _, ranks = run
    full = ranks[0]["full"]
    for r, result in enumerate(ranks):
        saved, restored = result["saved"], result["restored"]
        assert saved.keys() == restored.keys() and len(saved) > 0
        for name, tensors in saved.items():
            assert restored[name].keys() == tensors.keys(), (r, name)  # AdamW state present where saved
            for what, value in tensors.items():
                assert torch.equal(restored[name][what], value), (r, name, what)
        # this rank holds real shards with optimiser state (a fresh optimiser has none)
        with_state = [n for n, t in saved.items() if "exp_avg" in t and t["param"].numel() > 0]
        assert len(with_state) > 10, r
        assert all(saved[n]["step"] == 2 for n in with_state)
        # the resumed module started from other weights (seed 1): the restore overwrote them
        fresh = result["fresh"]
        assert sum(not torch.equal(fresh[n], full[n]) for n in fresh) > 0.9 * len(fresh)


def test_sampling_inside_full_params_works_on_every_rank(run):
    """Calling ``model.generate`` in a callback of an FSDP run fails on the flat shards ("'weight'
    must be 2-D"); inside ``full_params`` each rank samples the whole model: the same image."""
    _, ranks = run
    a, b = (result["preview"] for result in ranks)
    assert a is not None and a.shape == (1, 3, 32, 32) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)


def test_resumed_training_continues_from_step_two(run):
    _, ranks = run
    for result in ranks:
        assert result["start_step"] == 2 and result["global_step"] == 4
        assert len(result["losses"]) == 2 and all(torch.isfinite(torch.tensor(result["losses"])))
        final, restored = result["final"], result["restored"]
        moved = [n for n in restored if restored[n]["param"].numel() > 0]
        assert moved and all(not torch.equal(final[n]["param"], restored[n]["param"]) for n in moved)
        assert all(final[n]["step"] == 4 for n in moved if "step" in final[n])


@pytest.fixture(scope="module")
def consolidated(run, tmp_path_factory):
    """The checkpoint folder made one file by ``python -m cheers_pl.io.sharded FOLDER --out FILE``."""
    _, ranks = run
    dst = tmp_path_factory.mktemp("consolidated") / "stage.ckpt"
    assert main([ranks[0]["path"], "--out", str(dst)]) == 0
    return dst


def test_consolidated_file_holds_the_full_state_and_loads_as_a_model(run, consolidated):
    from cheers_pl.io.export import load_any
    from cheers_pl.stages.weights import read_state_dict

    _, ranks = run
    full = ranks[0]["full"]  # gathered on rank 0 after the first fit
    ckpt = torch.load(consolidated, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and isinstance(ckpt["hyper_parameters"]["spec"], dict)
    assert ckpt["state_dict"].keys() == full.keys()
    for name, value in full.items():
        assert torch.equal(ckpt["state_dict"][name], value), name
    (optim,) = ckpt["optimizer_states"]
    trainable = set(ranks[0]["saved"])
    assert set(optim["state"]) == trainable  # the full AdamW state of every trainable parameter
    name = next(iter(trainable))
    assert optim["state"][name]["exp_avg"].shape == full[name].shape

    model = load_any(consolidated)  # the kit's loader: spec from the hyperparameters, every tensor strict
    for name, value in model.state_dict().items():
        assert torch.equal(value, full["model." + name]), name
    weights = read_state_dict(consolidated)  # what init_from reads
    assert weights.keys() == model.state_dict().keys()


def test_consolidate_refusals(run, consolidated, tmp_path):
    _, ranks = run
    with pytest.raises(FileExistsError, match="stage.ckpt exists"):
        consolidate(ranks[0]["path"], consolidated)
    with pytest.raises(ValueError, match="not a sharded checkpoint folder"):
        read_sharded(tmp_path)
    with pytest.raises(FileNotFoundError, match="no sharded checkpoint"):
        read_sharded(tmp_path / "nowhere")


def test_the_kit_reads_a_sharded_folder_directly(run, consolidated):
    """``init_from``, ``load_any`` and ``read_state_dict`` take the folder itself (no consolidate step)."""
    from cheers_pl.io.export import load_any
    from cheers_pl.stages import PretrainStage
    from cheers_pl.stages.weights import read_state_dict

    folder = Path(run[1][0]["path"])
    direct, merged = read_state_dict(folder), read_state_dict(consolidated)
    assert direct.keys() == merged.keys()
    for name, value in merged.items():
        assert torch.equal(direct[name], value), name
    model = load_any(folder)
    assert model.state_dict().keys() == merged.keys()
    module = PretrainStage(spec=model.spec, init_from=str(folder))  # accepted at construction
    assert module.init_from == str(folder)
