"""DeepSpeed ZeRO-2 / ZeRO-3 (``CheersDeepSpeedStrategy``) on CPU: 2 gloo processes, the tiny model.

Lightning's own ``DeepSpeedStrategy`` refuses a CPU accelerator ("The DeepSpeed strategy is only
supported on CUDA GPUs but `CPUAccelerator` is used."); the kit's subclass runs there, which is
what makes this test possible. Skipped when deepspeed is not installed.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from tests import ddp_worker
from tests.test_distributed import free_port


def test_zero2_and_zero3_train_as_ddp_two_cpu_processes(tmp_path):
    """ZeRO-2 and ZeRO-3 (every parameter partitioned, gradient checkpointing on) reach DDP's losses
    on the same seed and half-batches, step for step: the same gradients, clipping and AdamW update."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed==0.19.8)")
    mp.spawn(ddp_worker.deepspeed_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        result = torch.load(tmp_path / f"deepspeed{r}.pt", weights_only=True)
        ddp = result["ddp"]["losses"]
        assert len(ddp) == 2 and ddp[1] < ddp[0]  # the first step's update lowers the second's loss
        optimizers = {"zero2": "DeepSpeedZeroOptimizer", "zero3": "DeepSpeedZeroOptimizer_Stage3"}
        for name, optimizer in optimizers.items():
            run = result[name]
            assert run["engine"] == "DeepSpeedEngine" and run["optimizer"] == optimizer
            assert run["stage"] == int(name[-1]) and run["global_step"] == 2
            torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ddp), rtol=1e-5, atol=1e-5)
        zero2, zero3 = result["zero2"], result["zero3"]
        assert zero2["numel"] == zero2["full_numel"]  # ZeRO-2: parameters replicated
        assert zero3["numel"] == 0  # ZeRO-3: between steps each rank holds only its partition
        assert zero3["full_numel"] / 2 <= zero3["shard_numel"] < zero3["full_numel"] / 2 + 1000
