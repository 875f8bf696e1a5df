"""Backbone families behind one interface; ``build`` by name, ``from_pretrained`` by path.

A family is one module registering itself with ``@register_backbone``, imported here (see docs/backbones.md).
"""

from prosg.backbones import mamba_formats, native  # noqa: F401  (register checkpoint formats)
from prosg.backbones.base import Backbone, BackboneOutput
from prosg.backbones.gpt import GPT
from prosg.backbones.lstm import LSTM
from prosg.backbones.mamba import Mamba
from prosg.backbones.registry import BACKBONES, FORMATS, build, detect_format, from_pretrained
from prosg.backbones.rwkv4 import RWKV4
from prosg.backbones.rwkv7 import RWKV7

__all__ = [
    "Backbone", "BackboneOutput", "BACKBONES", "FORMATS", "build", "detect_format", "from_pretrained",
    "GPT", "LSTM", "Mamba", "RWKV4", "RWKV7",
]
