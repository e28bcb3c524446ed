"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter with vLLM's request and response shapes."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from loraserve.errors import UnsupportedParameter
from loraserve.protocol.requests import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from loraserve.services import Services, get_services

router = APIRouter(prefix="/v1")


@router.post("/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(body: LoadLoraAdapterRequest, services: Services = Depends(get_services)) -> str:
    """Fetch, check, load and pin an adapter under ``lora_name``; 400 if the name is taken (unless load_inplace)."""
    if body.is_3d_lora_weight:
        raise UnsupportedParameter("3D LoRA weights are not supported by this server.", param="is_3d_lora_weight")
    await services.catalog.named_adapters().load(body.lora_name, body.lora_path, body.load_inplace)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, services: Services = Depends(get_services)) -> str:
    """The name stops answering now; the LoRA leaves the engine once its running requests finish."""
    await services.catalog.named_adapters().unload(body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
