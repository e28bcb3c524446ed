"""Chat with the base model through the official OpenAI SDK.

Run `make serve` first, then: python examples/openai_chat.py
"""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("LORASERVE_BASE_URL", "http://127.0.0.1:8080/v1"), api_key="unused")

response = client.chat.completions.create(
    model="",  # "" or the base model's name means the base model; "org/adapter" picks an adapter
    messages=[{"role": "user", "content": "What is the capital of Germany?"}],
    max_tokens=32,
    temperature=0,
)
print(response.choices[0].message.content)
print(response.usage)
