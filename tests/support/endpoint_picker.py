"""What the Gateway API Inference Extension's endpoint picker (EPP) reads from a model server.

The EPP scrapes each pod of an InferencePool at ``/metrics`` on the pool's target port and
routes by these metrics. Its defaults are vLLM's names, which loraserve exports as vLLM does:
the EPP's flags and defaults are in kubernetes-sigs/gateway-api-inference-extension,
cmd/epp/runner/options.go (``NewOptions``), and the protocol is
docs/proposals/003-model-server-protocol/README.md there.
"""

EPP_METRICS: tuple[str, ...] = (
    # --total-queued-requests-metric (protocol: TotalQueuedRequests, a gauge)
    "vllm:num_requests_waiting",
    # --total-running-requests-metric (protocol: TotalRunningRequests, a gauge)
    "vllm:num_requests_running",
    # --kv-cache-usage-percentage-metric (protocol: KVCacheUtilization, a gauge from 0 to 1)
    "vllm:kv_cache_usage_perc",
    # --lora-info-metric (protocol: LoRA adapter serving): labels running_lora_adapters,
    # waiting_lora_adapters, max_lora; the value is a timestamp, the EPP takes the latest.
    # The lora-affinity-scorer matches the request's `model` against these adapter names.
    "vllm:lora_requests_info",
    # --cache-info-metric (protocol: optional BlockSize / NumGPUBlocks, labels block_size and
    # num_gpu_blocks), read by the prefix-cache scorer; without it the plugin's config is used.
    "vllm:cache_config_info",
)

# The labels of vllm:lora_requests_info that the EPP parses (same sources).
LORA_INFO_LABELS: tuple[str, ...] = ("running_lora_adapters", "waiting_lora_adapters", "max_lora")
