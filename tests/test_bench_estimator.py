"""bench/estimator_accuracy.py's sparse-header writer and load emulation against real saves/loads.

The estimator benchmark writes real-size checkpoints as safetensors headers over a sparse data
section and counts "measured" bytes on meta-device models. Both are only meaningful if they
match what save_pretrained writes and what from_pretrained holds; these tests check that on
tiny twins of every component class used (UNet, VAE, CLIP, CLIP+projection, SD3, Flux, T5).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bench import estimator_accuracy as ea
from bench.arch_configs import ARCHS, build_component, tiny_twin
from router.estimator import Estimator, read_safetensors_header
from router.layout import component_files
from router.registry import CheckpointSpec


def _tiny_components(key: str):
    arch = ARCHS[key]
    # fp32 stored dtype: a real save of a freshly built model writes fp32.
    return arch, [dataclasses.replace(tiny_twin(c, arch), stored_dtype="float32") for c in arch.components]


def _real_folder(root: Path, arch, comps) -> Path:
    root.mkdir(parents=True)
    index = {"_class_name": arch.pipeline_class, "_diffusers_version": "0.42.1"}
    torch.manual_seed(0)
    for c in comps:
        build_component(c).save_pretrained(str(root / c.name))
        index[c.name] = [c.library, c.cls]
    for name, lib, cls in arch.extras:
        index[name] = [lib, cls]
        (root / name).mkdir()
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def _headers(folder: Path, library: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {t.name: (t.dtype, t.shape) for p in component_files(folder, library).files
            for t in read_safetensors_header(p)}


@pytest.mark.parametrize("key", ["sd3", "sdxl", "flux"])
def test_sparse_folder_estimates_exactly_like_a_real_save(tmp_path, key):
    arch, comps = _tiny_components(key)
    real = _real_folder(tmp_path / "real", arch, comps)
    models = {c.name: ea.meta_component(c) for c in comps}
    sparse = ea.write_sparse_pipeline(tmp_path / "sparse", arch, models, comps)
    for c in comps:
        # same tensor names, dtypes and shapes (tied T5 embeddings stored once, CLIP position_ids not stored)
        assert _headers(sparse / c.name, c.library) == _headers(real / c.name, c.library), c.name
    est = Estimator()
    for dtype in ("float16", "bfloat16"):
        for quant in ("none", "int8", "nf4"):
            a = est.estimate(CheckpointSpec(name="real", path=real, quantization=quant), dtype=dtype, width=512, height=512)
            b = est.estimate(CheckpointSpec(name="sparse", path=sparse, quantization=quant), dtype=dtype, width=512, height=512)
            assert a.component_bytes() == b.component_bytes(), (dtype, quant)
            assert a.family == b.family


def test_sparse_file_is_valid_safetensors_and_allocates_no_data(tmp_path):
    arch, comps = _tiny_components("sd15")
    unet = next(c for c in comps if c.name == "unet")
    model = ea.meta_component(unet)
    path = tmp_path / "u.safetensors"
    size = ea.write_sparse_safetensors(path, ea.header_entries(model, "float16"))
    assert path.stat().st_size == size
    with safe_open(str(path), framework="pt") as f:  # validates offsets against the file length
        keys = set(f.keys())
        some = f.get_tensor(sorted(keys)[0])
    assert keys == {n for n, _, _ in ea.header_entries(model, "float16")}
    assert some.dtype == torch.float16 and not some.any()  # holes read as zeros


def test_sharded_sparse_component_is_read_whole(tmp_path):
    arch, comps = _tiny_components("sd15")
    unet = next(c for c in comps if c.name == "unet")
    model = ea.meta_component(unet)
    total = ea.write_sparse_component(tmp_path / "unet", unet, model, max_shard_bytes=200_000)
    files = component_files(tmp_path / "unet", "diffusers").files
    assert len(files) > 1 and all("-of-" in f.name for f in files)
    assert sum(f.stat().st_size for f in files) == total
    assert _headers(tmp_path / "unet", "diffusers").keys() == {n for n, _, _ in ea.header_entries(model, "float32")}


@pytest.mark.parametrize("cls_key", [("flux", "text_encoder_2"), ("sd3", "transformer"), ("sdxl", "text_encoder_2")])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_emulated_loaded_bytes_match_a_real_from_pretrained(tmp_path, cls_key, dtype):
    import diffusers
    import transformers

    arch = ARCHS[cls_key[0]]
    comp = tiny_twin(next(c for c in arch.components if c.name == cls_key[1]), arch)
    torch.manual_seed(0)
    build_component(comp).save_pretrained(str(tmp_path / "m"))
    lib = diffusers if comp.library == "diffusers" else transformers
    real = ea.real_loaded_bytes(getattr(lib, comp.cls), tmp_path / "m", dtype)
    assert ea.loaded_bytes(ea.meta_component(comp), dtype)["bytes"] == real


def test_t5_wo_kept_in_fp32_at_float16_is_counted_by_the_estimator(tmp_path):
    arch = ARCHS["flux"]
    comp = dataclasses.replace(tiny_twin(next(c for c in arch.components if c.cls == "T5EncoderModel"), arch), stored_dtype="bfloat16")
    model = ea.meta_component(comp)
    lb = ea.loaded_bytes(model, "float16")
    wo = sum(p.numel() for n, p in model.named_parameters() if ".wo." in n)
    assert lb["fp32_kept_extra_bytes"] == 2 * wo > 0
    ea.write_sparse_component(tmp_path / "te", comp, model)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "te": ["transformers", "T5EncoderModel"]}))
    spec = CheckpointSpec(name="t", path=tmp_path)
    est16 = Estimator().estimate(spec, dtype="float16", width=64, height=64)
    assert est16.component_bytes()["te"] == lb["bytes"]  # includes the fp32-kept `wo` extra
    lb_bf16 = ea.loaded_bytes(model, "bfloat16")
    assert lb_bf16["fp32_kept_extra_bytes"] == 0
    est_bf16 = Estimator().estimate(spec, dtype="bfloat16", width=64, height=64)
    assert est_bf16.component_bytes()["te"] == lb_bf16["bytes"]
    assert lb["bytes"] - lb_bf16["bytes"] == lb["fp32_kept_extra_bytes"]


def test_workspace_table_rewrite_touches_only_fitted_rows():
    src = (Path(ea.__file__).resolve().parents[1] / "router" / "estimator.py").read_text()
    out = ea.rewrite_workspace_table(src, {"SDXL": {"base_bytes": 123, "per_megapixel_bytes": 456}})
    assert "Family.SDXL: WorkspaceRow(123, 456, measured=True)," in out
    assert out.count("measured=True),") == src.count("measured=True),") + 1
    assert len(out.splitlines()) == len(src.splitlines())
