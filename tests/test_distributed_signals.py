"""A hung collective ends the run (issue 14, item 11): by the process group's timeout, with a line
naming the likely cause, or at SIGTERM even while the main thread is stuck in C. CPU, gloo."""

from __future__ import annotations

import multiprocessing
import time

import torch
import torch.multiprocessing as mp

from cheers_pl.distributed import SIGTERM_EXIT_CODE, RunGuard, explain_collective_error
from tests import ddp_worker
from tests.test_distributed import free_port


def test_a_skipped_collective_ends_by_the_timeout_naming_the_cause(tmp_path):
    mp.spawn(ddp_worker.skipped_collective_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "skipped0.pt", weights_only=True)
    assert result["seconds"] < 15  # the 3 s timeout, not for ever
    assert "timed out" in result["error"].lower()
    (note,) = result["notes"]
    assert note.startswith("cheers: rank 0: a collective timed out after collective_timeout_s=3")
    assert "different task" in note and "skipped" in note


def test_sigterm_ends_a_process_stuck_in_a_collective():
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=ddp_worker.sigterm_in_collective_worker, args=(r, port, 2.0)) for r in range(2)
    ]
    start = time.monotonic()
    for p in procs:
        p.start()
    try:
        procs[0].join(timeout=60)
        assert procs[0].exitcode == SIGTERM_EXIT_CODE, procs[0].exitcode
        assert time.monotonic() - start < 45
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()


def test_explain_names_collective_errors_only():
    err = RuntimeError(
        "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation"
    )
    assert "timed out after collective_timeout_s=3" in explain_collective_error(err, 3.0)
    assert explain_collective_error(ValueError("bad size")) is None
    assert explain_collective_error(RuntimeError("CUDA out of memory")) is None


def test_run_guard_refuses_bad_values():
    for kwargs in ({"collective_timeout_s": 0}, {"sigterm_grace_s": -1}):
        try:
            RunGuard(**kwargs)
        except ValueError as err:
            assert next(iter(kwargs)) in str(err)
        else:
            raise AssertionError(kwargs)


def test_sigterm_stops_a_two_rank_cheers_fit_with_a_last_checkpoint(tmp_path):
    """A real ``cheers fit`` (stage I, tiny, 2 CPU ranks, DDP) sent SIGTERM after its first step: it
    stops at the next batch, saves ``last.ckpt`` and exits with 143. (Lightning's own handler
    broadcast from inside the signal handler, which met a DDP all-reduce and aborted rank 1.)"""
    from tests.faults.cases_distributed import sigterm_fit

    rc, step, log = sigterm_fit(tmp_path, devices=2)
    assert rc == SIGTERM_EXIT_CODE, log[-2000:]
    assert step is not None and step >= 1, log[-2000:]
    assert "SIGTERM: saved" in log
