"""Stream a chat answer token by token through the official OpenAI SDK.

Run `make serve` first, then: python examples/openai_chat_stream.py
"""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("LORASERVE_BASE_URL", "http://127.0.0.1:8080/v1"), api_key="unused")

stream = client.chat.completions.create(
    model="",
    messages=[{"role": "user", "content": "What is the capital of Germany?"}],
    max_tokens=32,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        print(f"\n{chunk.usage}")
