"""Component tests for deployments/pipelines.py on real (tiny) pipelines from disk, CPU only."""

from __future__ import annotations

import gc
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch

from deployments import pipelines as P

LINUX = sys.platform.startswith("linux")


@pytest.fixture
def xs_copy(demo_dir, tmp_path) -> Path:
    """A private copy of demo-xs, for tests that damage files."""
    return Path(shutil.copytree(demo_dir["demo-xs"], tmp_path / "ckpt-xs"))


@pytest.fixture
def xs(demo_dir):
    return P.load_pipeline(demo_dir["demo-xs"], dtype="float32")


def state(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in P.module_components(pipe).items()}


def changed_tensors(pipe, before) -> int:
    return sum(
        not torch.equal(v, before[name][k])
        for name, m in P.module_components(pipe).items()
        for k, v in m.state_dict().items()
    )


def zero_tensor_data(path: Path) -> None:
    """Overwrite a safetensors file's tensor bytes with zeros, in place (same inode)."""
    with open(path, "r+b") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + header_len)
        f.write(b"\0" * (path.stat().st_size - 8 - header_len))


def live_models(*types: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) in types)


# ---- dtype and arguments ---------------------------------------------------------------------
def test_torch_dtype():
    assert P.torch_dtype("float16") is torch.float16
    assert P.torch_dtype("bfloat16") is torch.bfloat16
    assert P.torch_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        P.torch_dtype("auto")


def test_load_rejects_bad_arguments(demo_dir):
    with pytest.raises(ValueError, match="dtype"):
        P.load_pipeline(demo_dir["demo-xs"], dtype="fp32")
    with pytest.raises(ValueError, match="quantization"):
        P.load_pipeline(demo_dir["demo-xs"], dtype="float32", quantization="int4")


def test_missing_folder_is_a_load_error_naming_only_the_folder(tmp_path):
    with pytest.raises(P.PipelineLoadError, match="no model_index.json") as info:
        P.load_pipeline(tmp_path / "nowhere", dtype="float32")
    assert info.value.checkpoint == "nowhere"
    assert str(tmp_path) not in str(info.value)


# ---- loading safely --------------------------------------------------------------------------
def test_truncated_safetensors_raises_load_error(xs_copy):
    weights = xs_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(P.PipelineLoadError) as info:
        P.load_pipeline(xs_copy, dtype="float32")
    message = str(info.value)
    assert "'ckpt-xs'" in message
    assert str(xs_copy.parent) not in message, "host path leaked into the error"
    assert info.value.__context__ is None and info.value.__cause__ is None
    assert not info.value.out_of_memory


def test_failed_load_keeps_nothing_alive(xs_copy):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    types = (UNet2DConditionModel, AutoencoderKL, CLIPTextModel)
    before = live_models(*types)
    # The VAE loads after the text encoder and UNet, so those are built, then dropped.
    weights = xs_copy / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(P.PipelineLoadError):
        P.load_pipeline(xs_copy, dtype="float32")
    assert live_models(*types) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="bitsandbytes can load on a GPU")
@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_bitsandbytes_without_gpu_is_a_load_error(demo_dir, quantization):
    with pytest.raises(P.PipelineLoadError, match="demo-xs") as info:
        P.load_pipeline(demo_dir["demo-xs"], dtype="float16", quantization=quantization)
    assert "GPU" in info.value.reason


def test_loads_in_requested_dtype(demo_dir):
    pipe = P.load_pipeline(demo_dir["demo-xs"], dtype="bfloat16")
    for name, module in P.module_components(pipe).items():
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, name


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/maps")
def test_no_tensor_stays_mmap_backed(xs):
    for name, module in P.module_components(xs).items():
        assert P.file_backed_tensors(module) == 0, name


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/maps")
def test_mmap_check_can_fail(demo_dir):
    # Negative control: a plain diffusers load does leave weights mapped from the files.
    from diffusers import DiffusionPipeline

    raw = DiffusionPipeline.from_pretrained(demo_dir["demo-xs"], use_safetensors=True, local_files_only=True)
    assert sum(P.file_backed_tensors(m) for m in P.module_components(raw).values()) > 0


def test_rewriting_files_after_load_changes_nothing(xs_copy):
    pipe = P.load_pipeline(xs_copy, dtype="float32")
    before = state(pipe)
    for weights in xs_copy.rglob("*.safetensors"):
        zero_tensor_data(weights)  # in place: an mmap would see this
    assert changed_tensors(pipe, before) == 0
    for weights in xs_copy.rglob("*.safetensors"):
        weights.unlink()
    assert changed_tensors(pipe, before) == 0


@pytest.mark.skipif(not LINUX, reason="relies on Linux MAP_PRIVATE showing later file writes")
def test_rewrite_check_can_fail(xs_copy):
    # Negative control: the same rewrite does change a plain (mmap-backed) diffusers load.
    from diffusers import DiffusionPipeline

    raw = DiffusionPipeline.from_pretrained(xs_copy, use_safetensors=True, local_files_only=True)
    before = state(raw)
    for weights in xs_copy.rglob("*.safetensors"):
        zero_tensor_data(weights)
    assert changed_tensors(raw, before) > 0


# ---- measuring and moving --------------------------------------------------------------------
def test_measure_bytes_counts_unique_tensors(xs):
    measured = P.measure_bytes(xs)
    assert set(measured) == {"unet", "vae", "text_encoder"}
    for name, module in P.module_components(xs).items():
        unique = {t.data_ptr(): t for t in (*module.parameters(), *module.buffers())}
        assert measured[name] == sum(t.numel() * t.element_size() for t in unique.values()), name
    assert P.measure_bytes(xs, "cpu") == measured
    assert P.measure_bytes(xs, "cuda") == {name: 0 for name in measured}


def test_measure_bytes_counts_tied_weights_once():
    class Pipe:  # only what module_components needs
        def __init__(self, **components):
            self.components = components

    a, b = torch.nn.Linear(10, 10), torch.nn.Linear(10, 10)
    b.weight = a.weight  # tied across components
    tied = torch.nn.Sequential(a, a)  # the same module twice inside one component
    measured = P.measure_bytes(Pipe(first=tied, second=b, tokenizer="not a module"))
    assert measured == {"first": (100 + 10) * 4, "second": 10 * 4}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_measure_bytes_counts_bitsandbytes_quantization_state(kind):
    """The cache books a disk load at its measured bytes: nf4's absmax (a float32 per 64
    weights, 12.5% of the packed weights) was left out, so the books ran under the device."""
    import types

    bnb = pytest.importorskip("bitsandbytes")
    rows = cols = 256
    if kind == "nf4":  # the project's config: no double quantization
        layers = [bnb.nn.Linear4bit(cols, rows, bias=False, quant_type="nf4", compute_dtype=torch.float32,
                                    compress_statistics=False) for _ in range(2)]
    else:
        layers = [bnb.nn.Linear8bitLt(cols, rows, bias=False, has_fp16_weights=False) for _ in range(2)]
    try:
        for m in layers:
            m.weight = m.weight._quantize("cpu")
    except Exception as exc:  # noqa: BLE001 - a bitsandbytes without CPU quantization
        pytest.skip(f"bitsandbytes cannot quantize on CPU here: {exc}")
    model = torch.nn.Sequential(*layers)
    measured = P.measure_bytes(types.SimpleNamespace(components={"transformer": model}))["transformer"]
    weights = 2 * rows * cols // (2 if kind == "nf4" else 1)  # packed 4-bit / int8
    scales = 2 * (rows * cols // 64 * 4 if kind == "nf4" else rows * 4)  # absmax per block / SCB per row
    assert weights + scales <= measured <= weights + scales + 4096  # + the small shared code tables


def test_move_to_cpu_keeps_weights(xs):
    before, measured = state(xs), P.measure_bytes(xs)
    P.move_pipeline(xs, "cpu", pin_host_memory=True)  # pinning is skipped without CUDA
    assert changed_tensors(xs, before) == 0
    assert P.measure_bytes(xs) == measured


class _RecordingModule(torch.nn.Linear):
    """Records where it is sent (moves nothing: a CPU host has one real device); one can
    refuse its first move, as a GPU out of memory would."""

    def __init__(self, log: list[tuple[str, str]], name: str, fail: bool = False):
        super().__init__(2, 2)
        self._log, self._name, self._fail = log, name, fail

    def to(self, device, *args, **kwargs):
        self._log.append((self._name, str(device)))
        if self._fail:
            self._fail = False
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return self


def test_a_failed_move_puts_what_moved_back():
    log: list[tuple[str, str]] = []

    class Pipe:
        components = {"text_encoder": _RecordingModule(log, "text_encoder"), "tokenizer": object(),
                      "unet": _RecordingModule(log, "unet", fail=True), "vae": _RecordingModule(log, "vae")}

    with pytest.raises(torch.OutOfMemoryError):
        P.move_pipeline(Pipe(), "cuda")
    # The failing component too (a module can fail part way through its tensors); the
    # later one was never sent.
    assert log == [("text_encoder", "cuda"), ("unet", "cuda"), ("unet", "cpu"), ("text_encoder", "cpu")]


def test_run_refuses_a_pipeline_on_another_device(xs):
    with pytest.raises(RuntimeError, match="expected cuda"):
        P.run_pipeline(xs, prompt="x", width=64, height=64, num_inference_steps=1, guidance_scale=1.0,
                       seed=0, num_images=1, device="cuda")


def test_run_returns_one_image_per_request(xs):
    images = P.run_pipeline(xs, prompt="a cat", negative_prompt="a dog", width=64, height=64,
                            num_inference_steps=2, guidance_scale=3.0, seed=3, num_images=2)
    assert [im.size for im in images] == [(64, 64), (64, 64)]


# ---- freeing ---------------------------------------------------------------------------------
def test_free_leaves_no_live_modules(demo_dir):
    tracker = P.LeakTracker()
    pipe = P.load_pipeline(demo_dir["demo-xs"], dtype="float32")
    n_modules = sum(len(list(m.modules())) for m in P.module_components(pipe).values())
    P.free_pipeline(pipe, tracker)
    assert tracker.tracked() == n_modules
    assert P.module_components(pipe) == {}
    del pipe
    assert tracker.leaked() == 0
    assert tracker.tracked() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status; glibc's heap")
def test_freeing_a_pipeline_gives_its_ram_back_to_the_os(demo_dir):
    """A cpu replica's report says 0 used after a release; its process held the RAM (glibc
    keeps freed heap memory: 87 of 109 MB still resident after a free of demo-l). In a fresh
    interpreter: this one's heap holds whatever earlier tests left in it."""
    import subprocess

    code = (
        "import ctypes, sys\n"
        "from deployments import pipelines as P\n"
        "def anon():\n"
        "    with open('/proc/self/status') as f:\n"
        "        return next(int(l.split()[1]) * 1024 for l in f if l.startswith('RssAnon:'))\n"
        f"path = {str(demo_dir['demo-l'])!r}\n"
        "P.free_pipeline(P.load_pipeline(path, dtype='float32'), None)  # imports, first-use caches\n"
        "ctypes.CDLL('libc.so.6').malloc_trim(0)  # the baseline without heap memory kept for reuse\n"
        "before = anon()\n"
        "pipe = P.load_pipeline(path, dtype='float32')\n"
        "loaded = anon() - before\n"
        "P.free_pipeline(pipe, None)\n"
        "del pipe\n"
        "print(loaded, anon() - before)\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded, kept = (int(x) for x in out.stdout.split()[-2:])
    assert loaded > 50_000_000
    assert kept < 0.5 * loaded, (loaded, kept)  # without the trim: 87 of 104 MB; with it 5 to 35 MB seen


def test_leak_tracker_sees_a_kept_reference(demo_dir):
    tracker = P.LeakTracker()
    pipe = P.load_pipeline(demo_dir["demo-xs"], dtype="float32")
    kept = pipe.unet  # a leak: someone still holds the UNet
    n_unet = len(list(kept.modules()))
    P.free_pipeline(pipe, tracker)
    del pipe
    assert tracker.leaked() == n_unet
    del kept
    assert tracker.leaked() == 0


def test_free_removes_accelerate_hooks(demo_dir):
    from accelerate.hooks import ModelHook, add_hook_to_module

    tracker = P.LeakTracker()
    pipe = P.load_pipeline(demo_dir["demo-xs"], dtype="float32")
    unet = pipe.unet
    add_hook_to_module(unet, ModelHook())
    P.free_pipeline(pipe, tracker)
    assert not hasattr(unet, "_hf_hook")
    del pipe, unet
    assert tracker.leaked() == 0


# ---- errors and CUDA facts -------------------------------------------------------------------
def test_is_out_of_memory():
    assert P.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert P.is_out_of_memory(MemoryError())
    assert P.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert P.is_out_of_memory(P.PipelineLoadError("x", "OutOfMemoryError: ...", out_of_memory=True))
    assert not P.is_out_of_memory(P.PipelineLoadError("x", "truncated"))
    assert not P.is_out_of_memory(ValueError("out of memory"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answers")
def test_cuda_facts_without_cuda():
    assert P.cuda_device_info() is None
    assert P.cuda_memory_bytes() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_facts_with_cuda():
    name, total = P.cuda_device_info()
    assert name and total > 0
    mem = P.cuda_memory_bytes()
    assert set(mem) == {"free", "total", "reserved", "allocated"} and mem["total"] == total


# ---- warm-up ---------------------------------------------------------------------------------
def test_warm_up_imports_the_named_classes_in_a_fresh_process(demo_dir):
    # A fresh interpreter: this one has imported them already. The CLIP text model's module
    # is imported by transformers only on first use of the class.
    import subprocess

    code = (
        "import sys\n"
        "from deployments import pipelines\n"
        "mod = 'transformers.models.clip.modeling_clip'\n"
        "before = mod in sys.modules\n"
        f"w = pipelines.warm_up([{str(demo_dir['demo-s'])!r}])\n"
        "print(before, mod in sys.modules, len(w.classes), len(w.failures))\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["False", "True", "6", "0"]


def test_warm_up_records_what_it_cannot_import(demo_dir, tmp_path):
    import json

    bogus = Path(shutil.copytree(demo_dir["demo-xs"], tmp_path / "bogus"))
    index = json.loads((bogus / "model_index.json").read_text())
    index["unet"] = ["diffusers", "NoSuchUNet"]
    (bogus / "model_index.json").write_text(json.dumps(index))
    w = P.warm_up([demo_dir["demo-xs"], demo_dir["demo-s"], bogus, tmp_path / "missing"])
    assert w.classes == ("diffusers.AutoencoderKL", "diffusers.EulerDiscreteScheduler",
                         "diffusers.StableDiffusionPipeline", "diffusers.UNet2DConditionModel",
                         "transformers.CLIPTextModel", "transformers.CLIPTokenizer")
    assert len(w.failures) == 2
    assert w.failures[0].startswith("missing: model_index.json: EstimateError: model_index.json unreadable")
    assert w.failures[1].startswith("bogus: diffusers.NoSuchUNet: AttributeError")
    assert not any(str(tmp_path) in f for f in w.failures)  # reports are shown to clients
    assert w.as_dict()["classes"] == 6 and w.as_dict()["failures"] == list(w.failures)


def test_a_variant_only_checkpoint_registers_estimates_and_loads_with_its_variant(demo_dir, tmp_path):
    """save_pretrained(variant="fp16") writes only *.fp16.safetensors: refused without a
    variant (from_pretrained would not find the files), served with variant: fp16, and the
    estimate reads the files the load reads."""
    from router.estimator import Estimator
    from router.registry import CheckpointSpec, Registry, RegistryError

    xs = P.load_pipeline(demo_dir["demo-xs"], dtype="float32")
    folder = tmp_path / "xs-fp16-variant"
    xs.save_pretrained(folder, variant="fp16", safe_serialization=True)
    # A component that has only plain files loads them under the variant too (both libraries).
    for f in (folder / "text_encoder").glob("*.fp16.safetensors"):
        f.rename(f.with_name("model.safetensors"))
    assert list((folder / "unet").glob("*.safetensors"))[0].name == "diffusion_pytorch_model.fp16.safetensors"
    with pytest.raises(RegistryError, match="component 'unet'.*set the checkpoint's variant"):
        Registry([CheckpointSpec(name="xs", path=folder)])
    spec = CheckpointSpec(name="xs", path=folder, variant="fp16")
    Registry([spec])
    est = Estimator().estimate(spec, dtype="float32", width=64, height=64)
    pipe = P.load_pipeline(folder, dtype="float32", variant="fp16")
    measured = P.measure_bytes(pipe)
    assert {k: v for k, v in est.component_bytes().items()} == {k: measured[k] for k in est.component_bytes()}
    with pytest.raises(P.PipelineLoadError, match="no file named diffusion_pytorch_model.safetensors"):
        P.load_pipeline(folder, dtype="float32")
    # The reverse: a plain folder with the variant set is refused, as diffusers refuses it.
    with pytest.raises(RegistryError, match="variant 'fp16' is set, but no component has files of it"):
        Registry([CheckpointSpec(name="plain", path=demo_dir["demo-xs"], variant="fp16")])
    with pytest.raises(P.PipelineLoadError, match="variant=fp16"):
        P.load_pipeline(demo_dir["demo-xs"], dtype="float32", variant="fp16")


def test_folder_signature_sees_any_change_and_survives_a_link_loop(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    (tmp_path / "model_index.json").write_text("{}")
    first = P.folder_signature(tmp_path)
    assert [name for name, _, _ in first] == ["model_index.json", "unet/config.json"]
    (tmp_path / "unet" / "loop").symlink_to(tmp_path)  # a link to a parent: walked once, not forever
    assert P.folder_signature(tmp_path) == first
    (tmp_path / "unet" / "config.json").write_text('{"a": 1}')
    assert P.folder_signature(tmp_path) != first
