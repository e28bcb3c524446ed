"""loraserve against `vllm serve --enable-lora` (and the offline engine) on the same vLLM engine: issue 11's harness.

``python -m benchmarks.compare [--quick]`` (or ``make bench`` / ``make bench-quick``); see benchmarks/README.md.
"""
