"""Shared test helpers."""

import torch
from torch import nn


def randomize_zero_inits(module: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Give every all-zero parameter (AdaLN-Zero, final layers, the HFI gate) small random values,
    so that tests of the sampler and the head see non-trivial velocities."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def chat_template_ids(tokenizer, messages, add_generation_prompt=False):
    """The real tokenizer's own chat template, tokenized: the reference the processor must equal."""
    return tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
