"""LoRAX's native request bodies (``POST /generate``, ``/generate_stream``, ``/``, ``/tokenize``), as its
router and ``lorax-client`` write them. Unknown fields are ignored; nulls mean absent."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from loraserve.engine import SamplingOptions, StructuredOutput
from loraserve.errors import InvalidRequest, UnsupportedParameter
from loraserve.protocol.requests import (
    MergedAdapters,
    Seed,
    _invalid,
    _Lenient,
    _lone_surrogate_at,
    logit_bias_pairs,
)

MAX_STOP = 16


class LoraxResponseFormat(_Lenient):
    type: Literal["json_object"]
    schema_: dict[str, Any] | None = Field(None, alias="schema")


class LoraxParameters(_Lenient):
    adapter_id: str | None = None
    adapter_source: Literal["hub", "local", "s3", "pbase"] | None = None
    merged_adapters: MergedAdapters | None = None
    api_token: str | None = Field(None, repr=False)
    do_sample: bool = False
    max_new_tokens: int | None = Field(None, ge=1)
    ignore_eos_token: bool = False
    best_of: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    return_full_text: bool | None = None
    seed: Seed | None = Field(None, ge=0)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP)
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    truncate: int | None = Field(None, ge=1)
    typical_p: float | None = Field(None, gt=0, le=1)
    watermark: bool = False
    response_format: LoraxResponseFormat | None = None
    decoder_input_details: bool = False
    return_k_alternatives: int | None = Field(None, ge=1, le=20)
    details: bool = False
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> LoraxParameters:
        if self.adapter_id and self.merged_adapters is not None:
            raise _invalid("merged_adapters", "you must specify at most one of `adapter_id` or `merged_adapters`")
        return self

    def sampling(self) -> bool:
        """TGI's rule, which LoRAX keeps: greedy unless asked to sample or a sampling knob is set."""
        warpers = (
            (self.temperature is not None and self.temperature != 1.0)
            or self.top_k is not None
            or (self.top_p is not None and self.top_p < 1.0)
        )
        return self.do_sample or warpers

    def samples(self) -> int:
        return self.best_of or 1

    def source(self) -> Literal["hub", "local", "s3"]:
        source = self.adapter_source
        return "hub" if source is None or source == "pbase" else source  # pbase: refused by check_supported

    def check_supported(self) -> None:
        """What this server cannot honour is a clear 400, never silently ignored."""
        if self.watermark:
            raise UnsupportedParameter("`watermark` is not supported by this server.", param="watermark")
        if self.typical_p is not None and self.typical_p < 1.0:
            raise UnsupportedParameter(
                "`typical_p` (typical decoding) is not supported by this server's engine.", param="typical_p"
            )
        if self.adapter_source == "pbase":
            raise UnsupportedParameter(
                "adapter_source 'pbase' (Predibase) is not supported; use hub, local or s3.", param="adapter_source"
            )
        if self.best_of is not None and self.best_of > 1 and not self.sampling():
            raise InvalidRequest("you must use sampling when `best_of` is > 1", param="best_of")

    def logprobs_wanted(self, stream: bool) -> int | None:
        """Token logprobs the answer needs: each streamed token carries one, and `details` lists them."""
        if self.return_k_alternatives:
            return self.return_k_alternatives
        return 0 if (stream or self.details or self.samples() > 1) else None

    def structured(self) -> StructuredOutput | None:
        if self.response_format is None:
            return None
        if self.response_format.schema_ is None:
            return StructuredOutput("json_object")
        from loraserve.structured import check_schema

        return StructuredOutput("json", check_schema(self.response_format.schema_, "response_format.schema"))

    def to_sampling_options(
        self, *, max_tokens: int, vocab_size: int, structured: StructuredOutput | None, stream: bool = False
    ) -> SamplingOptions:
        sampling = self.sampling()
        return SamplingOptions(
            max_tokens=max_tokens,
            n=self.samples(),
            temperature=(1.0 if self.temperature is None else self.temperature) if sampling else 0.0,
            top_p=1.0 if self.top_p is None or not sampling else self.top_p,
            top_k=0 if self.top_k is None or not sampling else self.top_k,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            stop=tuple(s for s in self.stop if s),
            seed=self.seed if sampling else None,
            logit_bias=logit_bias_pairs(self.logit_bias, vocab_size),
            ignore_eos=self.ignore_eos_token,
            logprobs=self.logprobs_wanted(stream),
            prompt_logprobs=0 if self.decoder_input_details else None,
            structured=structured,
        )


class LoraxGenerateRequest(_Lenient):
    """``/generate`` and ``/generate_stream`` take inputs and parameters; ``POST /`` also ``stream``."""

    inputs: str = Field(min_length=1)
    parameters: LoraxParameters = Field(default_factory=lambda: LoraxParameters.model_validate({}))
    stream: bool = False

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if (param := _lone_surrogate_at(data, "")) is not None:
            raise _invalid(param or "body", f"`{param}` holds a lone UTF-16 surrogate, which is not valid Unicode.")
        return data


class TokenizeRequest(_Lenient):
    inputs: str
    add_special_tokens: bool = True
