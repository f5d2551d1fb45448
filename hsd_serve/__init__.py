"""hsd_serve: lossless speculative decoding between models that do not share a vocabulary."""

__version__ = "0.1.0"
