"""Checkpoint conversion: the released Cheers weights, the FLUX.2 VAE's BFL naming, component releases."""
