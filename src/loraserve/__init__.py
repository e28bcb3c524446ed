"""loraserve: one base model and any number of LoRA adapters behind an OpenAI-compatible API."""

__version__ = "0.1.0"
