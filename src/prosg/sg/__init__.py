"""The ProSG head: prompt states -> synthetic gradient -> low-rank weight delta -> injection."""

from prosg.sg.compress import COMPRESSIONS, compress
from prosg.sg.head import SGHead

__all__ = ["SGHead", "compress", "COMPRESSIONS"]
