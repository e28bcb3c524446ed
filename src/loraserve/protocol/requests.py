"""OpenAI request bodies. Unknown fields are accepted and ignored (the app logs
each new one once), as OpenAI clients send new ones before servers know them.

Ranges are OpenAI's; vLLM's extras (top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, skip_special_tokens) are accepted as vLLM's server does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from loraserve.adapters.merge import MergeSpec
from loraserve.engine import SamplingOptions, StructuredOutput
from loraserve.errors import InvalidRequest

NonEmptyTokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
# OpenAI: -2**63 .. 2**63-1; vLLM hands the seed to torch, which wants a signed 64-bit value.
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


def _invalid(param: str, message: str) -> PydanticCustomError:
    """A cross-field error that still names its parameter (the error handler reads ctx.param)."""
    return PydanticCustomError("invalid_combination", message, {"param": param})


class _Lenient(BaseModel):
    # Unknown fields pass; known ones are typed as strictly as OpenAI types them: "16" is not an
    # integer, 1 is not a boolean, 3.0 is not an integer (an integer is still a fine number).
    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_absent(cls, data: Any) -> Any:
        # OpenAI treats `"n": null` like no `n`; LangChain and LiteLLM send such nulls.
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


def _lone_surrogate_at(value: Any, path: str) -> str | None:
    """The OpenAI-style path of the first string holding a lone UTF-16 surrogate, if any.

    JSON's "\\ud800" parses to a string that is not valid Unicode: it cannot be encoded, so a
    tokenizer, a template worker or a log line would fail on it later as a 500.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _lone_surrogate_at(key, path) or _lone_surrogate_at(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            if found := _lone_surrogate_at(item, f"{path}[{index}]"):
                return found
    return None


class StreamOptions(_Lenient):
    include_usage: bool = False


class TextContentPart(_Lenient):
    type: Literal["text"]
    text: str


class FunctionCall(_Lenient):
    name: str
    arguments: str = ""


class ToolCall(_Lenient):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDefinition(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_needed(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise _invalid("response_format.json_schema", "`json_schema` is required when type is 'json_schema'")
        return self


class MergedAdapters(_Lenient):
    """Several adapters of the base merged into one for this request (LoRAX's field names and defaults)."""

    ids: list[str] = Field(min_length=1)
    weights: list[float] | None = None
    merge_strategy: Literal["linear", "ties", "dare_linear", "dare_ties"] | None = None
    density: float | None = None
    majority_sign_method: Literal["total", "frequency"] | None = None

    def to_spec(self) -> MergeSpec:
        return MergeSpec.from_lorax(
            self.ids, self.weights, self.merge_strategy, self.density, self.majority_sign_method
        )


class _SamplingFields(_Lenient):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: Seed | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    # vLLM's extras.
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # LoRAX's fields: where the adapter named in `model` comes from, and a Hub token for private ones.
    adapter_source: Literal["hub", "local", "s3"] = "hub"
    api_token: str | None = Field(None, repr=False)
    # LoRAX's merged adapters, from the OpenAI routes too (with `model` naming the base).
    merged_adapters: MergedAdapters | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if (param := _lone_surrogate_at(data, "")) is not None:
            raise _invalid(
                param or "body",
                f"`{param}` holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is not "
                "valid Unicode text.",
            )
        return data

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop sequences")
        return value

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _sampling_options(
        self,
        *,
        max_tokens: int,
        vocab_size: int,
        n: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        structured: StructuredOutput | None = None,
    ) -> SamplingOptions:
        """The options both OpenAI bodies share; each body says how many samples and logprobs it wants."""
        if self.min_tokens > max_tokens:
            raise InvalidRequest(
                f"`min_tokens` ({self.min_tokens}) is above max_tokens ({max_tokens}).", param="min_tokens"
            )
        return SamplingOptions(
            max_tokens=max_tokens,
            n=n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            stop=self.stop_list(),
            seed=self.seed,
            logit_bias=logit_bias_pairs(self.logit_bias, vocab_size),
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            structured=structured,
        )


def logit_bias_pairs(bias: dict[str, float] | None, vocab: int) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as (token id, bias) pairs; a key that is not a token id of this model is a 400."""
    if not bias:
        return ()
    pairs = []
    for key, value in bias.items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab:
            raise InvalidRequest(
                f"logit_bias key {key!r} is not a token id of this model (0..{vocab - 1}).", param="logit_bias"
            )
        pairs.append((int(key), float(value)))
    return tuple(pairs)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _text_parts_only(cls, data: Any) -> Any:
        # Before field validation, so an image part is named as such, not as a failed union branch.
        messages = data.get("messages") if isinstance(data, dict) else None
        for i, message in enumerate(messages if isinstance(messages, list) else ()):
            content = message.get("content") if isinstance(message, dict) else None
            for j, part in enumerate(content if isinstance(content, list) else ()):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" and isinstance(kind, str):
                    raise _invalid(
                        f"messages[{i}].content[{j}]",
                        f"Content parts of type '{kind}' are not supported: this server serves text models; "
                        'send text parts (`{"type": "text", "text": ...}`) or a string.',
                    )
        return data

    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise _invalid("top_logprobs", "`top_logprobs` needs `logprobs: true`")
        names = [tool.function.name for tool in self.tools or ()]
        if len(names) != len(set(names)):
            raise _invalid("tools", "each tool needs a unique function name")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise _invalid(
                "tool_choice", f"tool_choice names `{self.tool_choice.function.name}`, which is not in `tools`"
            )
        if self.tool_choice == "required" and not names:
            raise _invalid("tool_choice", "tool_choice 'required' needs `tools`")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def token_limit_param(self) -> str:
        """The parameter that set ``token_limit()``, for errors that ask the user to change it."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def to_sampling_options(
        self, *, max_tokens: int, vocab_size: int, structured: StructuredOutput | None
    ) -> SamplingOptions:
        top = self.top_logprobs or 0
        return self._sampling_options(
            max_tokens=max_tokens,
            vocab_size=vocab_size,
            n=self.n,
            logprobs=top if self.logprobs else None,
            structured=structured,
        )


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | NonEmptyTokenIds | list[NonEmptyTokenIds]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None
    response_format: Any = None  # refused: JSON mode is chat-only

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise _invalid("best_of", "`best_of` must be at least `n`")
        if self.best_of is not None and self.best_of > 1 and self.stream:
            raise _invalid("best_of", "`best_of` cannot be used with `stream`")
        return self

    def samples(self) -> int:
        return self.best_of or self.n

    def to_sampling_options(
        self, *, max_tokens: int, vocab_size: int, structured: StructuredOutput | None
    ) -> SamplingOptions:
        ranking = self.samples() > self.n  # best_of: samples are ranked by their cumulative logprob
        logprobs = self.logprobs if self.logprobs is not None else (0 if ranking else None)
        return self._sampling_options(
            max_tokens=max_tokens,
            vocab_size=vocab_size,
            n=self.samples(),
            logprobs=logprobs,
            prompt_logprobs=self.logprobs if self.echo and self.logprobs is not None else None,
            structured=structured,
        )


# -- vLLM's adapter administration API ------------------------------------------


class LoadLoraAdapterRequest(_Lenient):
    """``POST /v1/load_lora_adapter``, as vLLM's server takes it."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False
    is_3d_lora_weight: bool = False


class UnloadLoraAdapterRequest(_Lenient):
    """``POST /v1/unload_lora_adapter``, as vLLM's server takes it (``lora_int_id`` is accepted and unused)."""

    lora_name: str
    lora_int_id: int | None = None
