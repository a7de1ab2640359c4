"""cheers-pl: a PyTorch Lightning experiment kit for CHEERS, a unified multimodal model."""

__version__ = "0.1.0"
