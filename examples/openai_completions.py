"""Plain text completion (no chat template) through the official OpenAI SDK.

Run `make serve` first, then: python examples/openai_completions.py
"""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("LORASERVE_BASE_URL", "http://127.0.0.1:8080/v1"), api_key="unused")

response = client.completions.create(
    model="",
    prompt="The capital of France is",
    max_tokens=16,
    temperature=0,
    stop=["\n"],
)
print(response.choices[0].text)
print(response.usage)
