"""OpenAI request and response models (pydantic only)."""
