"""slimlm: make language models small and fast, and measure honestly what it cost."""

__version__ = "0.1.0"
