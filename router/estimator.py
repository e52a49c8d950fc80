"""Memory estimates before load: weights from safetensors headers, workspace from a table.

Header-only: a safetensors file starts with an 8-byte little-endian header length and a JSON
header giving every tensor's dtype, shape and data offsets. We read exactly those bytes and
never the data section, so a checkpoint's estimate costs a few KB of I/O. A file shorter than
its header declares (a copy or download cut short) is refused here, by its size alone: else
a replica would evict for it before its load failed.

Caveats, stated in every :class:`MemoryEstimate`'s ``assumptions``:
- Floating-point tensors are counted at the target dtype; integer/bool tensors keep their size.
- bitsandbytes quantization applies to the denoiser's 2-D ``*.weight`` tensors (Linear
  layers); int8 = 1 byte/param + one fp32 scale per output row, nf4 = 0.5 byte/param + one
  fp32 absmax per 64-element block. Modules bitsandbytes skips are counted as quantized, so
  the quantized figure is a slight under-estimate until a GPU run calibrates it.
- Workspace (activations, VAE decode, attention) comes from :data:`WORKSPACE_TABLE`, per
  family; rows not yet measured on a GPU are marked ``measured=False`` and set high.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from router.layout import LayoutError, pipeline_weight_files
from router.registry import DENOISER_COMPONENTS, CheckpointSpec, Dtype, Family, Quantization

MIB = 1024**2
GIB = 1024**3
# safetensors refuses headers above 100 MB; so do we, before allocating.
MAX_HEADER_BYTES = 100 * 1000 * 1000

DTYPE_BYTES: Mapping[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "F8_E8M0": 1, "C64": 8,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
# Counted at the compute dtype (torch's is_floating_point: what Module.to(dtype) converts).
# Complex tensors keep their size.
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
                          "F8_E8M0"})
TARGET_DTYPE_BYTES: Mapping[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4}
NF4_BLOCK = 64


def _clip_position_ids(config: Mapping) -> int:
    return 8 * int(config.get("max_position_embeddings", 77))  # int64 arange


# Buffers a module creates at construction and never saves (persistent=False), by the
# component's class in model_index.json; sized from its config.json (not tensor data).
NON_PERSISTENT_BUFFERS = {
    "CLIPTextModel": _clip_position_ids,
    "CLIPTextModelWithProjection": _clip_position_ids,
}


# Modules transformers keeps in float32 when a model is loaded at float16 (its class's
# ``_keep_in_fp32_modules``), by the component's class in model_index.json; matched as a
# dotted part of the tensor name. T5's ``wo`` projections overflow in fp16. At bf16 they
# load at bf16. Without this, T5-XXL at fp16 is 1.875 GiB (17%) short (bench/results/
# estimator_accuracy.md).
KEEP_FP32_AT_FP16: Mapping[str, tuple[str, ...]] = {
    cls: ("wo",) for cls in ("T5EncoderModel", "T5Model", "T5ForConditionalGeneration",
                             "UMT5EncoderModel", "UMT5Model", "MT5EncoderModel")
}


class EstimateError(ValueError):
    """The checkpoint's files cannot be estimated (corrupt header, missing files)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ComponentEstimate:
    name: str
    tensors: int
    params: int
    bytes: int
    quantized: bool = False


@dataclass(frozen=True)
class WorkspaceRow:
    """Workspace bytes at a 2-byte dtype: ``base_bytes + per_megapixel_bytes * MP * batch``."""

    base_bytes: int
    per_megapixel_bytes: int
    measured: bool = False


# Conservative defaults (not GPU-measured yet): set above the published peak figures of
# SDPA attention at these resolutions; bench/estimator refills rows from measurements.
WORKSPACE_TABLE: Mapping[Family, WorkspaceRow] = {
    Family.SD1: WorkspaceRow(768 * MIB, 3 * GIB),
    Family.SD2: WorkspaceRow(768 * MIB, 3 * GIB),
    Family.SDXL: WorkspaceRow(1 * GIB, 4 * GIB),
    Family.SD3: WorkspaceRow(1 * GIB, 5 * GIB),
    Family.FLUX: WorkspaceRow(3 * GIB // 2, 6 * GIB),
    Family.TINY: WorkspaceRow(8 * MIB, 1 * GIB),
    Family.UNKNOWN: WorkspaceRow(2 * GIB, 8 * GIB),
}


@dataclass(frozen=True)
class MemoryEstimate:
    """A frozen snapshot of what one checkpoint needs at one dtype and request shape."""

    checkpoint: str
    dtype: str
    quantization: str
    family: str
    components: tuple[ComponentEstimate, ...]
    weights_bytes: int
    workspace_bytes: int
    width: int
    height: int
    batch: int
    assumptions: tuple[str, ...] = field(default=())

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.workspace_bytes

    def component_bytes(self) -> dict[str, int]:
        return {c.name: c.bytes for c in self.components}

    def to_dict(self) -> dict:
        return {
            "checkpoint": self.checkpoint,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "family": self.family,
            "weights_bytes": self.weights_bytes,
            "workspace_bytes": self.workspace_bytes,
            "total_bytes": self.total_bytes,
            "components": self.component_bytes(),
            "shape": {"width": self.width, "height": self.height, "batch": self.batch},
            "assumptions": list(self.assumptions),
        }


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """Tensor names, dtypes and shapes from a safetensors header; reads no tensor data.
    Raises EstimateError for a corrupt header and for a file shorter than the header's data
    offsets declare (truncated)."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise EstimateError(f"{path.name}: file shorter than the 8-byte safetensors header length")
            (n,) = struct.unpack("<Q", prefix)
            if n == 0 or n > MAX_HEADER_BYTES:
                raise EstimateError(f"{path.name}: header length {n} is out of range (corrupt safetensors file)")
            raw = f.read(n)
            file_bytes = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise EstimateError(f"{path.name}: cannot read ({exc.strerror})") from None
    if len(raw) != n:
        raise EstimateError(f"{path.name}: header truncated ({len(raw)} of {n} bytes)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EstimateError(f"{path.name}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise EstimateError(f"{path.name}: header is not a JSON object")
    tensors = []
    data_end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise EstimateError(f"{path.name}: tensor {name!r}: entry is not an object")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise EstimateError(f"{path.name}: tensor {name!r}: unsupported dtype {dtype!r}")
        # bool is an int in Python, not a dimension in JSON.
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise EstimateError(f"{path.name}: tensor {name!r}: invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise EstimateError(f"{path.name}: tensor {name!r}: invalid data_offsets {offsets!r}")
        data_end = max(data_end, offsets[1])
        tensors.append(TensorInfo(name, dtype, tuple(shape)))
    declared = 8 + n + data_end
    if file_bytes < declared:
        raise EstimateError(f"{path.name}: truncated: its header declares {declared} bytes, the file has "
                            f"{file_bytes} (a copy or download cut short?)")
    return tensors


def read_model_index(path: Path) -> dict:
    try:
        data = json.loads((path / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EstimateError(f"model_index.json unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise EstimateError("model_index.json is not a JSON object")
    return data


def infer_family(model_index: Mapping, denoiser_params: int) -> Family:
    """Family from the pipeline class name; tiny when the denoiser (``unet``/``transformer``)
    has < 100M params; unknown (the conservative row) when the pipeline has no component by
    those names (Stable Cascade's ``decoder``, Kandinsky's ``prior``): 0 params there says
    nothing about its size."""
    if denoiser_params == 0:
        return Family.UNKNOWN
    if denoiser_params < 100_000_000:
        return Family.TINY
    cls = str(model_index.get("_class_name", ""))
    if "Flux" in cls:
        return Family.FLUX
    if "StableDiffusion3" in cls:
        return Family.SD3
    if "XL" in cls:
        return Family.SDXL
    if cls.startswith("StableDiffusion"):
        # SD2 UNets are ~865M params, SD1 ~860M: tell them apart by text encoder instead.
        te = model_index.get("text_encoder") or [None, ""]
        return Family.SD2 if "OpenCLIP" in str(te[1]) else Family.SD1
    return Family.UNKNOWN


def _component_bytes(tensors: list[TensorInfo], target_bytes: int, quantization: Quantization,
                     keep_fp32: tuple[str, ...] = ()) -> int:
    total = 0
    for t in tensors:
        n = t.numel
        if quantization is not Quantization.NONE and t.dtype in FLOAT_DTYPES and len(t.shape) == 2 and t.name.endswith(".weight"):
            rows = t.shape[0]
            if quantization is Quantization.INT8:
                total += n + rows * 4
            else:
                total += (n + 1) // 2 + math.ceil(n / NF4_BLOCK) * 4
        elif t.dtype in FLOAT_DTYPES:
            fp32 = bool(keep_fp32) and any(part in keep_fp32 for part in t.name.split("."))
            total += n * (4 if fp32 else target_bytes)
        else:
            total += n * DTYPE_BYTES[t.dtype]
    return total


def _unsaved_buffer_bytes(folder: Path, index_entry: list) -> int:
    sizer = NON_PERSISTENT_BUFFERS.get(str(index_entry[1]) if len(index_entry) > 1 else "")
    if sizer is None:
        return 0
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = {}
    return sizer(config if isinstance(config, dict) else {})


def resolve_dtype(spec: CheckpointSpec, default_dtype: str) -> str:
    """The compute dtype: the spec's, or the profile's default when the spec says auto."""
    return default_dtype if spec.dtype is Dtype.AUTO else spec.dtype.value


@dataclass(frozen=True)
class _WeightsKey:
    path: str
    signature: tuple
    dtype: str
    quantization: str
    family: str  # the spec's (auto or an override): part of the cached result


class Estimator:
    """Estimates weights (cached per checkpoint files/dtype/quantization) and workspace.

    The cache key includes each safetensors file's size and mtime, so a replaced checkpoint
    is re-read. Not thread-safe for concurrent first reads of the same key (both compute the
    same value; harmless).
    """

    def __init__(self, workspace_table: Mapping[Family, WorkspaceRow] = WORKSPACE_TABLE):
        missing = set(Family) - {Family.AUTO} - set(workspace_table)
        if missing:
            raise ValueError(f"workspace_table: missing rows for {sorted(m.value for m in missing)}")
        self._table = dict(workspace_table)
        self._weights: dict[_WeightsKey, tuple[tuple[ComponentEstimate, ...], Family]] = {}

    def _layout(self, spec: CheckpointSpec) -> tuple[dict, dict[str, tuple[Path, ...]]]:
        """model_index.json and, per weighted component, the files from_pretrained loads
        (router/layout.py)."""
        index = read_model_index(spec.path)
        try:
            comps = pipeline_weight_files(spec.path, index, spec.variant)
        except LayoutError as exc:
            raise EstimateError(f"checkpoint {spec.name!r}: {exc}") from None
        return index, comps

    @staticmethod
    def _signature(spec: CheckpointSpec, comps: Mapping[str, tuple[Path, ...]]) -> tuple:
        sig = []
        for files in comps.values():
            for p in files:
                try:
                    st = os.stat(p)
                except OSError as exc:  # a dangling link (a cache blob deleted), a file removed since
                    raise EstimateError(f"checkpoint {spec.name!r}: {p.relative_to(spec.path)}: cannot read "
                                        f"({exc.strerror})") from None
                sig.append((str(p.relative_to(spec.path)), st.st_size, st.st_mtime_ns))
        return tuple(sig)

    def weights(self, spec: CheckpointSpec, dtype: str) -> tuple[tuple[ComponentEstimate, ...], Family]:
        """Per-component weight bytes at ``dtype`` and the resolved family."""
        if dtype not in TARGET_DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(TARGET_DTYPE_BYTES)}, got {dtype!r}")
        index, comps = self._layout(spec)
        key = _WeightsKey(str(spec.path), self._signature(spec, comps), dtype, spec.quantization.value, spec.family.value)
        cached = self._weights.get(key)
        if cached is not None:
            return cached
        estimates = []
        denoiser_params = 0
        for name, files in comps.items():
            tensors: list[TensorInfo] = []
            for p in files:
                try:
                    tensors.extend(read_safetensors_header(p))
                except EstimateError as exc:
                    raise EstimateError(f"checkpoint {spec.name!r}: {name}/{exc}") from None
            quantized = name in DENOISER_COMPONENTS and spec.quantization is not Quantization.NONE
            params = sum(t.numel for t in tensors)
            if name in DENOISER_COMPONENTS:
                denoiser_params += params
            q = spec.quantization if quantized else Quantization.NONE
            cls = str(index[name][1]) if len(index[name]) > 1 else ""
            keep_fp32 = KEEP_FP32_AT_FP16.get(cls, ()) if dtype == "float16" else ()
            nbytes = (_component_bytes(tensors, TARGET_DTYPE_BYTES[dtype], q, keep_fp32)
                      + _unsaved_buffer_bytes(spec.path / name, index[name]))
            estimates.append(ComponentEstimate(name, len(tensors), params, nbytes, quantized))
        family = spec.family if spec.family is not Family.AUTO else infer_family(index, denoiser_params)
        result = (tuple(estimates), family)
        self._weights[key] = result
        return result

    def workspace_bytes(self, family: Family, *, dtype: str, width: int, height: int, batch: int) -> int:
        """Workspace for one request shape; scales with pixels x batch and dtype size."""
        if width <= 0 or height <= 0 or batch <= 0:
            raise ValueError(f"request shape must be positive, got width={width} height={height} batch={batch}")
        row = self._table[family]
        megapixels = width * height / 1_000_000
        at_half = row.base_bytes + row.per_megapixel_bytes * megapixels * batch
        return int(math.ceil(at_half * TARGET_DTYPE_BYTES[dtype] / 2))

    def estimate(self, spec: CheckpointSpec, *, dtype: str, width: int, height: int, batch: int = 1) -> MemoryEstimate:
        """The full estimate for ``spec`` served at ``dtype`` for one request shape."""
        components, family = self.weights(spec, dtype)
        row = self._table[family]
        assumptions = [
            "weights from safetensors headers; float tensors at the compute dtype, integer tensors as stored",
            "at float16, modules transformers keeps in float32 (T5's 'wo') counted at 4 bytes",
            f"workspace from the {family.value} row ({'measured' if row.measured else 'conservative default, not GPU-measured'})",
        ]
        if spec.quantization is not Quantization.NONE:
            assumptions.append(
                f"bitsandbytes {spec.quantization.value} on the denoiser's 2-D Linear weights; skipped modules counted as quantized"
            )
        return MemoryEstimate(
            checkpoint=spec.name,
            dtype=dtype,
            quantization=spec.quantization.value,
            family=family.value,
            components=components,
            weights_bytes=sum(c.bytes for c in components),
            workspace_bytes=self.workspace_bytes(family, dtype=dtype, width=width, height=height, batch=batch),
            width=width,
            height=height,
            batch=batch,
            assumptions=tuple(assumptions),
        )
