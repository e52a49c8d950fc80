"""The checkpoint registry: the only names a request can load (a whitelist).

A request names a registry entry, never a path: :meth:`Registry.get` of an unknown name
raises :class:`UnknownCheckpointError`; nothing here ever turns request text into a path.

Only safetensors weights are accepted. A diffusers folder whose weights exist only as
pickles (``.bin``, ``.ckpt``, ``.pt``, ``.pth``) is refused at registry load, because
unpickling runs arbitrary code.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from router.layout import LayoutError, pipeline_weight_files

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
# Components whose weights count; tokenizers, schedulers and feature extractors have none.
DENOISER_COMPONENTS = ("unet", "transformer")


class Dtype(str, enum.Enum):
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"
    AUTO = "auto"  # the profile's default dtype


class Quantization(str, enum.Enum):
    NONE = "none"
    INT8 = "int8"  # bitsandbytes LLM.int8 on the denoiser
    NF4 = "nf4"  # bitsandbytes 4-bit NormalFloat on the denoiser


class Family(str, enum.Enum):
    """Architecture family; selects the workspace calibration row."""

    AUTO = "auto"
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    SD3 = "sd3"
    FLUX = "flux"
    TINY = "tiny"
    UNKNOWN = "unknown"


# Pixels a side must be a multiple of, by family, where the pipeline wants more than the API's
# 8: diffusers' SD3 pipeline raises on other sizes (vae scale 8 x patch 2) and Flux's silently
# resizes to a multiple of 16, so either way such a request is refused, naming the field.
SIZE_MULTIPLE: dict[str, int] = {"sd3": 16, "flux": 16}
# The implicit default side (no default_width/height): at most 512 and a multiple of the
# largest SIZE_MULTIPLE, so that it suits whatever family "auto" turns out to be.
_IMPLICIT_MULTIPLE = max(SIZE_MULTIPLE.values())


class RegistryError(ValueError):
    """A registry entry or file is invalid; the message names the entry and the field."""


class UnknownCheckpointError(KeyError):
    """A request named a checkpoint that is not in the registry."""

    def __init__(self, name: str, known: Iterable[str]):
        self.name = name
        self.known = sorted(known)
        super().__init__(name)

    def __str__(self) -> str:
        shown = ", ".join(self.known[:20]) + (" ..." if len(self.known) > 20 else "")
        return f"unknown checkpoint {self.name!r}; registered: {shown or '(none)'}"


class CheckpointSpec(BaseModel):
    """One registered checkpoint: a local diffusers folder and how to serve it."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    name: str = Field(pattern=NAME_PATTERN, description="Slug clients use to name the checkpoint.")
    path: Path = Field(description="Local diffusers folder (model_index.json + component folders).")
    dtype: Dtype = Dtype.AUTO
    quantization: Quantization = Quantization.NONE
    family: Family = Family.AUTO
    variant: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_-]{1,32}$",
        description="Load the variant files (fp16: *.fp16.safetensors) where a component has them, as "
                    "from_pretrained(variant=...) does; components without them load their plain files.")
    max_width: int = Field(default=1024, ge=8, le=8192, multiple_of=8)
    max_height: int = Field(default=1024, ge=8, le=8192, multiple_of=8)
    max_batch: int = Field(default=4, ge=1, le=64)
    max_steps: int = Field(default=100, ge=1, le=1000)
    default_width: int | None = Field(default=None, ge=8, le=8192, multiple_of=8)
    default_height: int | None = Field(default=None, ge=8, le=8192, multiple_of=8)
    default_steps: int | None = Field(default=None, ge=1, le=1000)

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser()

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> "CheckpointSpec":
        # Else every request that leaves the field out gets a 422 blaming the client.
        for default, limit in (("default_width", "max_width"), ("default_height", "max_height"),
                               ("default_steps", "max_steps")):
            value, cap = getattr(self, default), getattr(self, limit)
            if value is not None and value > cap:
                raise ValueError(f"{default} {value} exceeds {limit} {cap}: lower it or raise {limit}")
        multiple = SIZE_MULTIPLE.get(self.family.value, 8)
        for side, default, value in (("width", "default_width", self.width), ("height", "default_height", self.height)):
            if value % multiple:  # an explicit family's need; "auto" is checked per request (router/core.py)
                raise ValueError(f"the default {side} {value} is not a multiple of {multiple}, which {self.family.value} "
                                 f"checkpoints need: set {default} to one")
        return self

    @staticmethod
    def _implicit(max_side: int) -> int:
        return min(512, max(8, max_side - max_side % _IMPLICIT_MULTIPLE))

    @property
    def width(self) -> int:
        """The width a request without one gets: ``default_width``, else at most 512 (a
        multiple of 16, within ``max_width``)."""
        return self.default_width or self._implicit(self.max_width)

    @property
    def height(self) -> int:
        """As :attr:`width`, for the height."""
        return self.default_height or self._implicit(self.max_height)

    @property
    def steps(self) -> int:
        return self.default_steps or min(25, self.max_steps)


def _check_folder(spec: CheckpointSpec) -> None:
    """Refuse folders we cannot load safely, or at all (router/layout.py's
    pipeline_weight_files: pickles only, variants only, a listed component missing): else
    every request for the checkpoint would fail at load time instead of here. Raises
    RegistryError naming the entry."""
    where = f"checkpoint {spec.name!r}: path"
    if not spec.path.is_dir():
        raise RegistryError(f"{where}: folder does not exist or is not a directory: {spec.path}")
    index = spec.path / "model_index.json"
    if not index.is_file():
        raise RegistryError(f"{where}: no model_index.json in {spec.path} (not a diffusers pipeline folder)")
    try:
        components = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{where}: model_index.json is not valid JSON ({exc})") from None
    if not isinstance(components, dict):
        raise RegistryError(f"{where}: model_index.json must be a JSON object")
    try:
        pipeline_weight_files(spec.path, components, spec.variant)
    except LayoutError as exc:
        raise RegistryError(f"{where}: {exc}") from None


class Registry:
    """Name -> CheckpointSpec. Immutable after construction."""

    def __init__(self, specs: Iterable[CheckpointSpec], *, check_files: bool = True):
        self._specs: dict[str, CheckpointSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise RegistryError(f"checkpoint {spec.name!r}: name: registered twice")
            if check_files:
                _check_folder(spec)
            self._specs[spec.name] = spec

    @classmethod
    def from_entries(cls, entries: Any, *, base_dir: Path | None = None, check_files: bool = True) -> "Registry":
        """Build from an inline list of dicts (config) — errors name the entry and field.

        Relative paths are resolved against ``base_dir`` (the config file's folder).
        """
        if isinstance(entries, dict) and "checkpoints" in entries:
            entries = entries["checkpoints"]
        if not isinstance(entries, list):
            raise RegistryError(f"registry: expected a list of checkpoints, got {type(entries).__name__}")
        specs = []
        for i, raw in enumerate(entries):
            label = raw.get("name", f"#{i}") if isinstance(raw, dict) else f"#{i}"
            if not isinstance(raw, dict):
                raise RegistryError(f"checkpoint {label!r}: expected a mapping, got {type(raw).__name__}")
            try:
                spec = CheckpointSpec.model_validate(raw)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or '(entry)'}: {e['msg']}" for e in exc.errors()
                )
                raise RegistryError(f"checkpoint {label!r}: {problems}") from None
            if base_dir is not None and not spec.path.is_absolute():
                spec = spec.model_copy(update={"path": (base_dir / spec.path).resolve()})
            specs.append(spec)
        return cls(specs, check_files=check_files)

    @classmethod
    def from_yaml(cls, path: str | Path, *, check_files: bool = True) -> "Registry":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise RegistryError(f"registry file {path}: cannot read ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise RegistryError(f"registry file {path}: invalid YAML ({exc})") from None
        return cls.from_entries(data, base_dir=path.parent, check_files=check_files)

    def get(self, name: str) -> CheckpointSpec:
        """The spec for ``name``; :class:`UnknownCheckpointError` if it is not registered."""
        spec = self._specs.get(name) if isinstance(name, str) else None
        if spec is None:
            raise UnknownCheckpointError(str(name)[:80], self._specs)
        return spec

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[CheckpointSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def names(self) -> list[str]:
        return list(self._specs)
