"""evictor: statefully stop low-priority LXC containers under memory pressure."""

__version__ = "0.1.0"
