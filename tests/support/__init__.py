"""Test-support code: a fake Hugging Face Hub and real LoRA adapters."""
