"""SciStream gateway: memory-to-memory streaming between facilities."""

__version__ = "2.0.0.dev0"
