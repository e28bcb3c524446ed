"""Stream a plain text completion through the official OpenAI SDK.

Run `make serve` first, then: python examples/openai_completions_stream.py
"""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("LORASERVE_BASE_URL", "http://127.0.0.1:8080/v1"), api_key="unused")

for chunk in client.completions.create(
    model="",
    prompt="The capital of France is",
    max_tokens=16,
    temperature=0,
    stream=True,
):
    print(chunk.choices[0].text, end="", flush=True)
print()
