"""Ask an adapter instead of the base model: name it in `model`.

Run `make serve` first, then: LORASERVE_ADAPTER=org/my-lora python examples/openai_adapter.py
The adapter is fetched from the Hugging Face Hub on first use (HF_ENDPOINT and HF_TOKEN apply on the server).
For an adapter in a folder under --adapter-dir, also set LORASERVE_ADAPTER_SOURCE=local.
"""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("LORASERVE_BASE_URL", "http://127.0.0.1:8080/v1"), api_key="unused")
adapter = os.environ.get("LORASERVE_ADAPTER", "org/my-lora")

for model in ("", adapter):  # the base model, then the adapter
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of Germany?"}],
        max_tokens=32,
        temperature=0,
        extra_body={"adapter_source": os.environ.get("LORASERVE_ADAPTER_SOURCE", "hub")},
    )
    print(f"{model or 'base'}: {response.choices[0].message.content}")
