"""wallbreak: run large language models on the hardware you already have."""

__version__ = "0.1.0"
