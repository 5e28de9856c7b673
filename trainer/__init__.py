"""Train ResNet variants, evaluate them on a held-out split, and archive them as .mar files."""

__version__ = "0.1.0"
