"""Suite-wide settings."""

import torch

# Tiny models on a 2-core machine: one intra-op thread. With two, every small op pays for an
# OpenMP hand-off, and whenever the other core is busy (a DataLoader worker, another process)
# a 64-wide linear layer was measured at 14 ms instead of 80 us.
torch.set_num_threads(1)
