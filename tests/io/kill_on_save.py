"""Child process of the kill-during-save test: a real ``cheers fit`` that SIGKILLs itself
halfway through writing its KILL_ON-th checkpoint file (argv: KILL_ON, then the fit arguments).

``torch.save`` (in this child only; ``CheersCheckpointIO`` calls it with the open file) is
wrapped: from the KILL_ON-th call on, the checkpoint is serialised, half of its bytes are
written to the open file and flushed to disk, and the process kills itself.
"""

from __future__ import annotations

import io
import os
import signal
import sys

import torch

from cheers_pl.io import checkpoint_io

real_save = torch.save
saves = 0


def save_then_die(obj, f, *args, **kwargs):
    global saves
    saves += 1
    if saves < KILL_ON:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    KILL_ON = int(sys.argv[1])
    checkpoint_io.torch.save = save_then_die
    from cheers_pl.cli import main

    sys.exit(main(sys.argv[2:]))
