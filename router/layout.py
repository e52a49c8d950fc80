"""Which weight files a diffusers pipeline folder loads: the registry checks them, the estimator reads them.

``from_pretrained`` without a variant loads, per component, exactly one layout, chosen by
the component's library (``model_index.json``: ``"vae": ["diffusers", "AutoencoderKL"]``):

- diffusers: the shard index ``diffusion_pytorch_model.safetensors.index.json`` when it
  exists (its ``weight_map`` names the shards), else ``diffusion_pytorch_model.safetensors``;
- transformers: ``model.safetensors`` when it exists, else the index ``model.safetensors.index.json``.

Other files in the folder are not loaded: a consolidated file left beside shards, a stray
shard from an older revision, and variant files (``*.fp16.safetensors``), which load only
with ``variant="fp16"`` (a checkpoint's ``variant`` in the registry): then a component
with files of the variant loads the variant's layout, and one without loads its plain ones
(diffusers' own rule, :func:`files_of_variant`). Counting files
that do not load would over-estimate; accepting a folder whose files would not load would
fail at load time. Components of other libraries fall back to every plain (or every
variant) ``*.safetensors`` file.

Pure: reads directory listings and small JSON files, never tensor data; imports nothing of
this project.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# (single file, shard index, whether the index wins when both exist), per library.
_LAYOUTS: dict[str, tuple[str, str, bool]] = {
    "diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json", True),
    "transformers": ("model.safetensors", "model.safetensors.index.json", False),
}


class LayoutError(ValueError):
    """A component's weight files cannot be determined (an unreadable or invalid shard index,
    a shard it names missing). The message names the file."""


@dataclass(frozen=True)
class ComponentFiles:
    """What a component folder holds and which of it loads.

    ``files``: the safetensors files ``from_pretrained`` loads, in order (empty: none it
    would load). ``unused``: other ``*.safetensors`` files in the folder (variants, leftovers),
    by name, for messages."""

    files: tuple[Path, ...]
    unused: tuple[str, ...]
    variant_files: tuple[str, ...] = ()  # names that make from_pretrained load this component with the variant


def is_variant_file(p: Path) -> bool:
    """``model.fp16.safetensors`` is a variant; ``model-00001-of-00002.safetensors`` is a shard."""
    return len(p.name.split(".")) > 2


def _from_index(index: Path) -> tuple[Path, ...]:
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LayoutError(f"{index.name}: unreadable shard index ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise LayoutError(f"{index.name}: shard index without a weight_map of tensor -> file names")
    files = []
    for name in dict.fromkeys(weight_map.values()):  # unique, in first-mention order
        p = index.parent / name
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise LayoutError(f"{index.name}: weight_map names {name!r}, not a .safetensors file in this folder")
        if not _checked(p).is_file():
            raise LayoutError(f"{index.name}: shard {name} is missing")
        files.append(p)
    return tuple(files)


def _checked(p: Path) -> Path:
    if p.is_symlink() and not p.exists():  # a Hugging Face cache link whose blob was deleted
        raise LayoutError(f"{p.name}: a link to a missing file ({p.resolve()})")
    return p


def with_variant(name: str, variant: str) -> str:
    """``name`` as ``from_pretrained(variant=...)`` looks for it (diffusers' and transformers'
    rule: the variant before the last suffix): ``model.safetensors`` -> ``model.fp16.safetensors``,
    ``model.safetensors.index.json`` -> ``model.safetensors.index.fp16.json``."""
    head, _, suffix = name.rpartition(".")
    return f"{head}.{variant}.{suffix}"


def _layout_files(folder: Path, library: str, present: list[Path], variant: str | None) -> tuple[Path, ...]:
    layout = _LAYOUTS.get(library)
    if layout is None:  # another library: every file of the variant, or every plain file
        if variant is None:
            return tuple(p for p in present if not is_variant_file(p))
        return tuple(p for p in present if p.name.endswith(f".{variant}.safetensors"))
    names = layout[:2] if variant is None else tuple(with_variant(n, variant) for n in layout[:2])
    single, index, index_wins = _checked(folder / names[0]), _checked(folder / names[1]), layout[2]
    if index.is_file() and (index_wins or not single.is_file()):
        return _from_index(index)
    if single.is_file():
        return (single,)
    return ()


def files_of_variant(folder: Path, variant: str) -> tuple[str, ...]:
    """Names in ``folder`` by which diffusers loads it with ``variant``: its rule
    (``_identify_model_variants``) is any file whose second dot-separated field starts with
    the variant (``model.fp16.safetensors``, also ``model.fp16.bin``); it then passes the
    variant to the component's loader, which does not fall back to plain files. A name
    without a dot breaks that rule (an IndexError there, unless a file of the variant comes
    first in the directory's order, which a copy of the folder need not keep): refused,
    naming it."""
    out = []
    for name in sorted(os.listdir(folder)):
        parts = name.split(".")
        if len(parts) < 2:
            raise LayoutError(f"{name}: a file name without a dot, on which diffusers' variant detection may fail "
                              "(an IndexError, depending on the directory's order); move it out of the folder")
        if parts[1].startswith(variant):
            out.append(name)
    return tuple(out)


def component_files(folder: Path, library: str, variant: str | None = None) -> ComponentFiles:
    """The safetensors files ``from_pretrained`` loads from component ``folder`` of
    ``library`` (see the module docstring). With a ``variant`` (``"fp16"``): a component
    that has files of the variant (:func:`files_of_variant`) loads the variant's layout and
    nothing else (empty ``files`` when it has none of it); one that has none loads its plain
    files (checked with diffusers 0.42 and transformers 5.23). Raises :class:`LayoutError`
    for a broken shard index or link; a folder with nothing it would load gives empty ``files``."""
    present = sorted(folder.glob("*.safetensors"))
    variant_files = files_of_variant(folder, variant) if variant is not None else ()
    files = _layout_files(folder, library, present, variant if variant_files else None)
    chosen = set(files)
    return ComponentFiles(files, tuple(p.name for p in present if p not in chosen), variant_files)


def pipeline_weight_files(path: Path, model_index: dict, variant: str | None = None) -> dict[str, tuple[Path, ...]]:
    """Per component of ``model_index`` (``model_index.json`` of the pipeline folder ``path``)
    that has weights, the files ``from_pretrained`` loads. Raises :class:`LayoutError`,
    naming the component, for what would fail at load time: a listed component without its
    folder, a model component (its folder has a ``config.json``; tokenizers and schedulers
    have other config names) without the weights it loads (only pickles, only variants, a
    broken link or shard index, none). Components listed as ``[null, null]`` are skipped."""
    out: dict[str, tuple[Path, ...]] = {}
    of_variant = False
    for comp, value in model_index.items():
        if comp.startswith("_") or not isinstance(value, list) or not value:
            continue
        folder = path / comp
        if value[0] is None:
            # Nothing loads from it, but diffusers' variant rule looks at every folder
            # model_index.json names, these too (a safety_checker set to null, its folder left).
            if variant is not None and folder.is_dir():
                try:
                    of_variant = bool(files_of_variant(folder, variant)) or of_variant
                except LayoutError as exc:
                    raise LayoutError(f"component {comp!r} (null in model_index.json): {exc}") from None
            continue
        if not folder.is_dir():
            raise LayoutError(f"component {comp!r} is listed in model_index.json but has no folder {folder}")
        try:
            found = component_files(folder, str(value[0]), variant)
        except LayoutError as exc:
            raise LayoutError(f"component {comp!r}: {exc}") from None
        of_variant = of_variant or bool(found.variant_files)
        if found.files:
            out[comp] = found.files
            continue
        if found.variant_files:
            legacy = folder / f"diffusion_pytorch_model.safetensors.{variant}.index.json"
            hint = (f"; its {legacy.name} is diffusers' deprecated sharded-variant layout: re-save the component "
                    f"with save_pretrained(variant={variant!r})") if legacy.is_file() else ""
            raise LayoutError(
                f"component {comp!r} has files of the variant {variant!r} ({', '.join(found.variant_files[:4])}), "
                f"so from_pretrained loads it with the variant, and it has no safetensors file or shard index "
                f"of that variant{hint}")
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles and not found.unused:
            raise LayoutError(
                f"component {comp!r} has only pickle weights ({', '.join(pickles)}); pickle files can execute "
                "code when loaded, so only safetensors are accepted. Convert them with safetensors first.")
        if found.unused:
            asked = f"the variant {variant!r} or without one" if variant else "without a variant"
            raise LayoutError(
                f"component {comp!r} has safetensors files that from_pretrained does not load {asked} "
                f"({', '.join(found.unused)}); for variant files (*.fp16.safetensors) set the checkpoint's "
                "variant (variant: fp16), or keep the plain files (diffusion_pytorch_model.safetensors, "
                "model.safetensors, or their shard index)")
        if (folder / "config.json").is_file():
            raise LayoutError(f"component {comp!r} has a config.json but no safetensors weights")
    if not out:
        raise LayoutError(f"no safetensors weights found under {path}")
    if variant is not None and not of_variant:  # diffusers refuses such a folder (a ValueError)
        raise LayoutError(f"variant {variant!r} is set, but no component has files of it: remove the variant "
                          "setting for this folder")
    return out
