"""GET /health, GET /metrics, GET /v1/models, GET /v1/adapters, GET /info."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST

from loraserve import __version__
from loraserve.engine import EngineDead
from loraserve.errors import EngineUnavailable
from loraserve.protocol.lorax import MAX_STOP
from loraserve.protocol.responses import ModelList
from loraserve.services import Services, get_services

router = APIRouter()


@router.get("/health")
async def health(services: Services = Depends(get_services)) -> dict[str, str]:
    """200 only when the engine answers a round trip in time; 503 otherwise."""
    try:
        await asyncio.wait_for(services.engine.check_health(), services.settings.health_timeout)
    except (EngineDead, TimeoutError) as exc:
        raise EngineUnavailable("The inference engine does not answer.") from exc
    return {"status": "ok"}


@router.get("/metrics", response_class=Response)
async def metrics(services: Services = Depends(get_services)) -> Response:
    """Prometheus text: vLLM's engine series (vllm:*) and loraserve's own (loraserve_*)."""
    return Response(services.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=ModelList)
async def list_models(services: Services = Depends(get_services)) -> ModelList:
    return ModelList(data=services.catalog.cards())


@router.get("/v1/adapters")
async def list_adapters(services: Services = Depends(get_services)) -> dict[str, Any]:
    """Adapters in the disk cache: source, pinned root, size, requests in flight, cold-load timings."""
    return services.catalog.adapter_status()


@router.get("/info")
async def info(services: Services = Depends(get_services)) -> dict[str, Any]:
    """loraserve's own fields, and LoRAX's (its /info), so tools written for LoRAX find what they read."""
    base = services.catalog.base
    engine = services.engine
    settings = services.settings
    return {
        "version": __version__,
        "model_id": base.served_name,
        "model_source": base.source,
        "max_model_len": engine.max_model_len,
        "running_requests": engine.num_running_requests(),
        # LoRAX's fields
        "model_sha": None,
        "model_dtype": engine.dtype,
        "model_device_type": engine.device_type,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": settings.max_concurrent_requests or 0,  # 0: no limit of loraserve's own
        "max_best_of": settings.max_n,
        "max_stop_sequences": MAX_STOP,
        "max_input_length": engine.max_model_len - 1,
        "max_total_tokens": engine.max_model_len,
        "docker_label": None,
        "sha": None,
        "request_logger_url": None,
    }
