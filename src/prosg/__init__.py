"""ProSG: prompt synthetic gradients against prompt forgetting in recurrent language models."""

__version__ = "0.1.0"
