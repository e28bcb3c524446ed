"""The long-lived objects a request needs, built once by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from loraserve.config import Settings
from loraserve.engine import Engine
from loraserve.generation import Generator
from loraserve.metrics import ServerMetrics
from loraserve.models import ModelCatalog


@dataclass
class Services:
    settings: Settings
    engine: Engine
    catalog: ModelCatalog
    generator: Generator
    metrics: ServerMetrics


async def get_services(request: Request) -> Services:
    # async: FastAPI would run a plain function in a worker thread, a thread hop on every request.
    services: Services = request.app.state.services
    return services
