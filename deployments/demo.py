"""Embedded demo checkpoints: four tiny, deterministic Stable Diffusion pipelines.

They are real diffusers folders (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``; safetensors weights), built from configs with fixed seeds, so
the whole load / measure / offload / free path can be exercised on any laptop without a
model hub. Their weights are random: the images they generate are noise.

Sizes (float32, all components) are roughly 2, 8, 30 and 100 MB, about 4x apart, so that a
byte budget visibly fits several small ones or one large one.

Caveat: the bytes are identical across builds only for the same torch / diffusers /
transformers versions (configs record the library version, and init code may change). The
cache folder name carries a format version (``demo-v1``) and each build writes a marker with
its spec, so a changed spec is rebuilt, but a library upgrade alone is not.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO_DIR_ENV = "MEMROUTER_DEMO_DIR"
# Written last by build_demo_checkpoint: its presence (with the expected content) is what
# marks a folder as a complete build.
MARKER_NAME = ".memrouter-demo-complete"
FORMAT_VERSION = 1

# Latent size the UNet advertises: the 64x64 default image over the VAE's 8x downscale.
_DEFAULT_IMAGE_PX = 64
_VAE_BLOCKS = 4  # four VAE blocks -> scale factor 2**3 = 8, as in Stable Diffusion
# Model init draws from torch's global RNG: two threads seeding it at once would interleave
# their draws and break determinism, so seeded construction is serialized.
_SEEDED_INIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class DemoSpec:
    """One demo checkpoint: its name, the seed, and the config knobs that set its size.

    ``text_hidden_size`` is also the UNet's cross-attention width. Channel counts must be
    divisible by the matching ``*_norm_num_groups``.
    """

    name: str
    seed: int
    unet_block_out_channels: tuple[int, ...]
    unet_layers_per_block: int
    unet_attention_head_dim: int
    unet_norm_num_groups: int
    vae_block_out_channels: tuple[int, int, int, int]
    vae_norm_num_groups: int
    text_hidden_size: int
    text_layers: int
    text_intermediate_size: int
    text_attention_heads: int


DEMO_CHECKPOINTS: tuple[DemoSpec, ...] = (
    DemoSpec("demo-xs", seed=1001, unet_block_out_channels=(16, 32), unet_layers_per_block=1,
             unet_attention_head_dim=4, unet_norm_num_groups=8, vae_block_out_channels=(8, 16, 32, 32),
             vae_norm_num_groups=8, text_hidden_size=32, text_layers=2, text_intermediate_size=64,
             text_attention_heads=2),
    DemoSpec("demo-s", seed=1002, unet_block_out_channels=(32, 64), unet_layers_per_block=1,
             unet_attention_head_dim=8, unet_norm_num_groups=8, vae_block_out_channels=(16, 32, 64, 64),
             vae_norm_num_groups=8, text_hidden_size=64, text_layers=2, text_intermediate_size=256,
             text_attention_heads=4),
    DemoSpec("demo-m", seed=1003, unet_block_out_channels=(32, 64, 128), unet_layers_per_block=1,
             unet_attention_head_dim=8, unet_norm_num_groups=16, vae_block_out_channels=(32, 64, 128, 128),
             vae_norm_num_groups=16, text_hidden_size=128, text_layers=3, text_intermediate_size=256,
             text_attention_heads=4),
    DemoSpec("demo-l", seed=1004, unet_block_out_channels=(64, 128, 256), unet_layers_per_block=1,
             unet_attention_head_dim=8, unet_norm_num_groups=32, vae_block_out_channels=(32, 64, 128, 256),
             vae_norm_num_groups=16, text_hidden_size=256, text_layers=4, text_intermediate_size=512,
             text_attention_heads=4),
)

# Registry limits for the demo entries: small enough that CPU requests finish in seconds.
_REGISTRY_FIELDS: dict[str, Any] = {
    "dtype": "float32", "family": "tiny", "max_width": 256, "max_height": 256, "max_batch": 4,
    "max_steps": 10, "default_width": _DEFAULT_IMAGE_PX, "default_height": _DEFAULT_IMAGE_PX, "default_steps": 2,
}


def default_demo_dir() -> Path:
    """``$MEMROUTER_DEMO_DIR`` if set, else ``~/.cache/memrouter/demo-v1``."""
    env = os.environ.get(DEMO_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "memrouter" / f"demo-v{FORMAT_VERSION}"


# ---- tokenizer -------------------------------------------------------------------------------
def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 / CLIP convention).

    Printable Latin-1 bytes map to themselves; the rest (controls, space, ...) map to code
    points from 256 upward, in byte order, so every byte has a visible, unique symbol.
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in keep:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def tokenizer_vocab() -> dict[str, int]:
    """A byte-level vocab with no merges: every byte, every byte ending a word, two specials.

    Any text tokenizes (one token per UTF-8 byte), which is all a demo needs; the two special
    tokens come last, as in CLIP's own vocab.
    """
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def _write_tokenizer_sources(folder: Path, vocab: dict[str, int]) -> None:
    # vocab.json + merges.txt are what CLIP's slow tokenizer (transformers 4) loads from;
    # transformers 5 reads tokenizer.json, which save_pretrained already wrote.
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=None), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


# ---- build -----------------------------------------------------------------------------------
def _marker_text(spec: DemoSpec) -> str:
    return json.dumps({"format_version": FORMAT_VERSION, "spec": dataclasses.asdict(spec)}, sort_keys=True) + "\n"


def _is_complete(folder: Path, spec: DemoSpec) -> bool:
    try:
        return (folder / MARKER_NAME).read_text(encoding="utf-8") == _marker_text(spec)
    except OSError:
        return False


def _make_pipeline(spec: DemoSpec) -> Any:
    # Imported here so that importing this module (e.g. by the CLI or config) stays cheap.
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = tokenizer_vocab()
    n_blocks = len(spec.unet_block_out_channels)
    # fork_rng: seeding for determinism must not reset the caller's global RNG stream.
    with _SEEDED_INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        unet = UNet2DConditionModel(
            sample_size=_DEFAULT_IMAGE_PX // 2 ** (_VAE_BLOCKS - 1),
            in_channels=4,
            out_channels=4,
            block_out_channels=spec.unet_block_out_channels,
            layers_per_block=spec.unet_layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * (n_blocks - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_blocks - 1),
            cross_attention_dim=spec.text_hidden_size,
            attention_head_dim=spec.unet_attention_head_dim,
            norm_num_groups=spec.unet_norm_num_groups,
        )
        torch.manual_seed(spec.seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=spec.vae_block_out_channels,
            down_block_types=("DownEncoderBlock2D",) * _VAE_BLOCKS,
            up_block_types=("UpDecoderBlock2D",) * _VAE_BLOCKS,
            layers_per_block=1,
            norm_num_groups=spec.vae_norm_num_groups,
            sample_size=_DEFAULT_IMAGE_PX,
        )
        torch.manual_seed(spec.seed + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=spec.text_hidden_size,
                intermediate_size=spec.text_intermediate_size,
                num_hidden_layers=spec.text_layers,
                num_attention_heads=spec.text_attention_heads,
                max_position_embeddings=77,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
            )
        )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    )
    # A caller may have changed torch's default dtype; the demo weights are float32 by definition.
    # Cast only then: diffusers warns about any .to(dtype) on its models.
    for module in (unet, vae, text_encoder):
        if any(p.dtype != torch.float32 for p in module.parameters()):
            module.to(torch.float32)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_demo_checkpoint(spec: DemoSpec, dest: Path) -> Path:
    """Build ``spec`` as a diffusers folder at ``dest`` (absent or empty) and return ``dest``.

    Deterministic: two builds with the same library versions are byte-identical. The marker
    file is written last, so a crash mid-build leaves a folder that is not taken as complete.
    Not atomic by itself; :func:`ensure_demo_checkpoints` builds into a temp folder and
    renames it into place.
    """
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"build_demo_checkpoint({spec.name!r}): destination is not empty: {dest}")
    pipe = _make_pipeline(spec)
    pipe.save_pretrained(dest, safe_serialization=True)
    _write_tokenizer_sources(dest / "tokenizer", tokenizer_vocab())
    (dest / MARKER_NAME).write_text(_marker_text(spec), encoding="utf-8")
    return dest


def _discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _install(built: Path, target: Path, spec: DemoSpec) -> None:
    """Rename ``built`` to ``target``; if another process got there first, keep theirs."""
    if target.exists() and not _is_complete(target, spec):
        # A stale or foreign folder (older spec, or left by hand): move it aside first, under a
        # unique name so that two processes doing this at once do not collide.
        trash = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(target, trash)
        except FileNotFoundError:
            pass  # someone else moved it already
        else:
            _discard(trash)
    try:
        os.rename(built, target)
    except OSError:
        # Lost the race: target now exists (non-empty dirs cannot be renamed over). Theirs is
        # as good as ours, since builds are deterministic.
        _discard(built)
        if not _is_complete(target, spec):
            raise


def ensure_demo_checkpoints(root: Path | None = None) -> dict[str, Path]:
    """Build any missing demo checkpoint under ``root`` (default :func:`default_demo_dir`).

    Returns name -> folder for all of :data:`DEMO_CHECKPOINTS`. Idempotent, and safe when
    several processes call it at once: each builds into a temp folder beside the target and
    renames it into place; a loser of the rename discards its copy. A build killed midway can
    leave a ``.<name>.partial-*`` folder behind; it is never read and may be deleted.
    """
    root = Path(root) if root is not None else default_demo_dir()
    return {spec.name: ensure_checkpoint(spec, root) for spec in DEMO_CHECKPOINTS}


def ensure_checkpoint(spec: DemoSpec, root: Path) -> Path:
    """``root / spec.name``, built first when missing or stale, as
    :func:`ensure_demo_checkpoints` builds each (safe when processes race; bench/trace.py's
    larger checkpoint is built this way too)."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / spec.name
    if not _is_complete(target, spec):
        # Same filesystem as the target, so that the rename is atomic.
        built = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=root))
        os.chmod(built, 0o755)  # mkdtemp's 0700 would survive the rename
        try:
            build_demo_checkpoint(spec, built)
        except BaseException:
            _discard(built)
            raise
        _install(built, target, spec)
    return target


def demo_registry_entries(root: Path | None = None) -> list[dict[str, Any]]:
    """Registry entries (dicts) for the demo checkpoints under ``root``.

    Does not build anything: call :func:`ensure_demo_checkpoints` first.
    """
    root = Path(root) if root is not None else default_demo_dir()
    return [{"name": spec.name, "path": str(root / spec.name), **_REGISTRY_FIELDS} for spec in DEMO_CHECKPOINTS]
