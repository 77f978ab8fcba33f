"""What callers hand the engine (Request, SamplingParams) and what they get back (Result, Metrics)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

_ROLES = ("system", "user", "assistant")
_CONTENT_TYPES = ("text", "image")


class RequestError(ValueError):
    """A request is malformed (empty messages, unknown role or content type, bad sampling value)."""


#: the seeds torch.Generator.manual_seed takes, [-2**63, 2**64); one outside is a caller mistake.
_SEED_RANGE = range(-(1 << 63), 1 << 64)


def _int_field(name: str, value: Any, what: str = "an int") -> int:
    # bool is an int subclass: max_new_tokens=True would silently mean 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise RequestError(f"{name} must be {what}, got {type(value).__name__} {value!r:.40}")
    return int(value)


def _real_field(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RequestError(f"{name} must be a number, got {type(value).__name__} {value!r:.40}")
    value = float(value)
    if not math.isfinite(value):
        raise RequestError(f"{name} must be finite, got {value!r}")
    return value


def _check_sampling_field(name: str, value: Any) -> Any:
    """The validated (and normalised: numpy scalars become int/float) value of one SamplingParams field."""
    if name == "max_new_tokens":
        value = _int_field(name, value, "an int >= 1")
        if value < 1:
            raise RequestError(f"max_new_tokens must be an int >= 1, got {value}")
    elif name == "temperature":
        value = _real_field(name, value)
        if value < 0:
            raise RequestError(f"temperature must be >= 0, got {value!r}")
    elif name == "top_p":
        value = _real_field(name, value)
        if not 0.0 < value <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {value!r}")
    elif name == "seed":
        if value is not None:
            value = _int_field(name, value)
            if value not in _SEED_RANGE:
                raise RequestError(f"seed must be in [-2**63, 2**64), got {value}")
    elif name == "stop_on_eos":
        if not isinstance(value, bool):
            raise RequestError(f"stop_on_eos must be a bool, got {type(value).__name__} {value!r:.40}")
    return value


@dataclass
class SamplingParams:
    """Decoding settings. Greedy by default.

    Every field is checked when set (on construction and on any later assignment): a wrong type, NaN,
    infinity or a value out of range raises :class:`RequestError` naming the field and the value.

    Attributes:
        max_new_tokens: tokens to generate at most (default 32, an int >= 1; a bool is refused).
        temperature: 0 means greedy (default 0.0); > 0 samples from softmax(logits / temperature). Finite.
        top_p: nucleus mass kept when sampling, in (0, 1] (default 1.0).
        seed: seed of this request's sampler, an int in [-2**63, 2**64) as torch takes; None draws from
            torch's global generator.
        stop_on_eos: stop at the model's end-of-sequence tokens (default True).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_on_eos: bool = True

    def __setattr__(self, name: str, value: Any) -> None:
        # Checked per field on every assignment (the dataclass __init__ assigns each field), so a value
        # changed after construction cannot reach the sampler unchecked.
        super().__setattr__(name, _check_sampling_field(name, value))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "SamplingParams":
        """From a plain dict (a request given as JSON); an unknown name is an error naming the valid ones."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise RequestError(f"unknown sampling parameter(s) {', '.join(map(repr, unknown))}; valid: {', '.join(names)}")
        return cls(**values)


@dataclass
class Request:
    """One chat to continue.

    Attributes:
        messages: the transformers/Qwen chat format: ``[{"role": "user", "content": [{"type": "image",
            "image": <path | bytes | PIL.Image>}, {"type": "text", "text": "..."}]}]``; ``content`` may
            also be a plain string. An image item may carry ``resized_height``/``resized_width``.
        sampling: decoding settings (greedy by default).
        session_id: a chat session; its KV (prompt and answer) is kept between turns.
        request_id: echoed in the result; defaults to the request's index in the call.
        return_logits: also return each step's logits in ``Result.logits`` (for accuracy checks).
    """

    messages: list[dict[str, Any]]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    session_id: str | None = None
    request_id: str | None = None
    return_logits: bool = False

    def __post_init__(self) -> None:
        if self.sampling is None:
            self.sampling = SamplingParams()
        elif isinstance(self.sampling, Mapping):
            self.sampling = SamplingParams.from_mapping(self.sampling)
        elif not isinstance(self.sampling, SamplingParams):
            raise RequestError(f"sampling must be a SamplingParams or a dict of its fields, got {type(self.sampling).__name__}")


def validate_messages(messages: Any) -> None:
    """Raise :class:`RequestError` naming the first thing wrong with ``messages``."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RequestError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in _ROLES:
            raise RequestError(f"messages[{i}].role {m['role']!r} is not one of {', '.join(_ROLES)}")
        content = m["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not content:
            raise RequestError(f"messages[{i}].content must be a string or a non-empty list of items")
        for j, item in enumerate(content):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind not in _CONTENT_TYPES:
                raise RequestError(f"messages[{i}].content[{j}] type {kind!r} is not one of {', '.join(_CONTENT_TYPES)}")
            if kind == "text" and not isinstance(item.get("text"), str):
                raise RequestError(f"messages[{i}].content[{j}] text item needs a 'text' string")
            if kind == "image" and item.get("image") is None:
                raise RequestError(f"messages[{i}].content[{j}] image item needs an 'image' (path, bytes or PIL.Image)")
    if messages[-1]["role"] == "assistant":
        raise RequestError("the last message is the assistant's; the engine continues from a user or system turn")


@dataclass
class Metrics:
    """Per-request measurements.

    Attributes:
        ttft_s: seconds from the start of this request to its first generated token.
        prompt_tokens: tokens in the prompt.
        cached_tokens: prompt tokens whose KV was loaded instead of computed.
        cached_tiers: tokens loaded per tier name (``{"device": 256, "host": 512}``).
        vision_cache_hits: images whose features came from the store (encoder skipped).
        images_encoded: images run through the vision encoder.
        vision_encode_s: seconds spent in the vision encoder for this request.
        decode_tokens_per_s: generated tokens after the first, per second of decode.
        stored_chunks: new KV chunks written to the store by this request.
    """

    ttft_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cached_tiers: dict[str, int] = field(default_factory=dict)
    vision_cache_hits: int = 0
    images_encoded: int = 0
    vision_encode_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    stored_chunks: int = 0


@dataclass
class Result:
    """The outcome of one request. ``error`` is set (and text empty) when the request failed."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    error: str | None = None
    logits: Any = None  # (steps, vocab) tensor when the request asked for it

    @property
    def ok(self) -> bool:
        return self.error is None
