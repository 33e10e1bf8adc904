"""llava: local chat with images, through llama.cpp."""

__version__ = "0.1.0"
