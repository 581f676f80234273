"""sscq-dist: distributed self-supervised consistent quantization for image retrieval."""

__version__ = "0.1.0"
