"""Request and response models shared by HTTP and the Python DeploymentHandle.

Field names follow diffusers' pipeline parameters. Limits here are the service-wide hard
caps; each checkpoint's own limits (registry) are checked by :func:`resolve_request`.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from router.registry import NAME_PATTERN, SIZE_MULTIPLE, CheckpointSpec

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**63 - 1
MAX_IMAGES_PER_REQUEST = 16


class GenerateRequest(BaseModel):
    """``POST /v1/generate`` body and ``handle.generate.remote(...)`` argument."""

    # strict: "64" is not a width and true is not a seed; a mistyped field is refused, not coerced.
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False, strict=True)

    # The registry's name shape: a path ("../x", "/etc"), URL, hub id ("org/model"), NUL or
    # non-ASCII look-alike can never match, so it is refused before any registry lookup.
    checkpoint: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN,
                            description="A registry name (see GET /v1/checkpoints).")
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    width: int | None = Field(default=None, ge=8, le=8192, multiple_of=8, description="Pixels; default per checkpoint.")
    height: int | None = Field(default=None, ge=8, le=8192, multiple_of=8, description="Pixels; default per checkpoint.")
    num_inference_steps: int | None = Field(default=None, ge=1, le=1000)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=50.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Same seed, same image, on any replica.")
    num_images: int = Field(default=1, ge=1, le=MAX_IMAGES_PER_REQUEST)

    @field_validator("guidance_scale")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _no_nul(cls, v: str | None) -> str | None:
        if v is not None and "\x00" in v:
            raise ValueError("must not contain NUL characters")
        return v


class ResolvedRequest(BaseModel):
    """A request with every default filled in and checked against its checkpoint's limits."""

    model_config = ConfigDict(frozen=True)

    checkpoint: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    num_images: int


def validated(request: "GenerateRequest | dict") -> "GenerateRequest":
    """``request`` checked against every field rule, whatever it is: a dict, or a
    GenerateRequest, which is re-validated from its fields, since pydantic skips validation
    on ``model_copy(update=...)`` and attribute assignment (``num_images=0`` or a NaN
    guidance would get past every rule). Raises pydantic's ValidationError."""
    if isinstance(request, GenerateRequest):
        request = request.model_dump(warnings=False)
    return GenerateRequest.model_validate(request)


def field_of(err: dict) -> str:
    """The dotted field a pydantic error is about (``body`` for the whole body)."""
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    return ".".join(loc) or "body"


def problems_message(errors: list[dict]) -> str:
    """pydantic errors as one message naming each field and its rule, never echoing the
    input (pydantic's ``msg`` does not): what a 422 ``invalid_request`` says."""
    return "; ".join(f"{field_of(e)}: {e.get('msg', 'invalid')}" for e in errors[:10])


class RequestLimitError(ValueError):
    """A field exceeds the checkpoint's registry limits; ``field`` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def resolve_request(req: GenerateRequest, spec: CheckpointSpec, *, default_seed: int) -> ResolvedRequest:
    """Fill defaults from the checkpoint and enforce its limits (RequestLimitError names the field)."""
    width = req.width or spec.width
    height = req.height or spec.height
    steps = req.num_inference_steps or spec.steps
    for field, value, cap in (
        ("width", width, spec.max_width), ("height", height, spec.max_height),
        ("num_inference_steps", steps, spec.max_steps), ("num_images", req.num_images, spec.max_batch),
    ):
        if value > cap:
            raise RequestLimitError(field, f"{value} exceeds the limit {cap} for checkpoint {spec.name!r}")
    return ResolvedRequest(
        checkpoint=spec.name, prompt=req.prompt, negative_prompt=req.negative_prompt, width=width, height=height,
        num_inference_steps=steps, guidance_scale=req.guidance_scale,
        seed=default_seed if req.seed is None else req.seed, num_images=req.num_images,
    )


def check_image_size(resolved: ResolvedRequest, family: str) -> None:
    """Raise RequestLimitError naming ``width`` or ``height`` when ``family``'s pipeline
    cannot take that size as asked (``family``: a registry Family value)."""
    multiple = SIZE_MULTIPLE.get(family, 8)
    for field, value in (("width", resolved.width), ("height", resolved.height)):
        if value % multiple:
            raise RequestLimitError(field, f"{value} is not a multiple of {multiple}, which {family} "
                                           f"checkpoints need (checkpoint {resolved.checkpoint!r})")


class Timings(BaseModel):
    queue: float = Field(description="ms from the router sending to the replica starting")
    load: float = Field(description="ms spent loading or reloading the pipeline (0 on a hit)")
    inference: float
    total: float = Field(description="ms from the router receiving the request to the answer")


ServedFrom = Literal["device", "host", "disk"]


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="base64-encoded PNG images")
    checkpoint: str
    replica: str
    served_from: ServedFrom
    timings_ms: Timings
    estimate_bytes: int
    seed: int


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class AdminRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    checkpoint: str | None = Field(default=None, max_length=64, pattern=NAME_PATTERN,
                                   description="One checkpoint, or all when omitted.")


class CheckpointInfo(BaseModel):
    name: str
    dtype: str
    quantization: str
    family: str
    weights_bytes: int
    workspace_bytes: int
    total_bytes: int
    default_width: int
    default_height: int
    max_width: int
    max_height: int
    max_steps: int
    max_batch: int
