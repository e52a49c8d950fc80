"""Registry, hardware profiles and the header-only estimator on synthetic safetensors folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from router import profiles
from router.estimator import WORKSPACE_TABLE, EstimateError, Estimator, read_safetensors_header
from router.registry import CheckpointSpec, Family, Registry, RegistryError, UnknownCheckpointError

GIB = 1024**3


def make_folder(root: Path, name: str = "ckpt", cls: str = "StableDiffusionPipeline") -> Path:
    """A pipeline folder: unet (Linear 10x100 + bias, conv, int64 buffer) and a text encoder."""
    path = root / name
    (path / "unet").mkdir(parents=True)
    (path / "text_encoder").mkdir()
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": cls, "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
    }))
    save_file({
        "proj.weight": torch.zeros(10, 100),  # 2-D Linear: quantizable
        "proj.bias": torch.zeros(10),
        "conv.weight": torch.zeros(4, 4, 3, 3),  # 4-D: never quantized
        "steps": torch.zeros(5, dtype=torch.int64),
    }, str(path / "unet" / "diffusion_pytorch_model.safetensors"))
    save_file({"emb.weight": torch.zeros(20, 8, dtype=torch.float16)}, str(path / "text_encoder" / "model.safetensors"))
    return path


def spec(path: Path, **kw) -> CheckpointSpec:
    return CheckpointSpec(name=kw.pop("name", "ckpt"), path=path, **kw)


# ---- estimator -------------------------------------------------------------------------------
UNET_FLOATS = 10 * 100 + 10 + 4 * 4 * 3 * 3  # 1154 params
UNET_INTS_BYTES = 5 * 8
TE_FLOATS = 160
TE_BUFFER = 8 * 77  # CLIP's unsaved int64 position_ids (no config.json: 77 positions)


@pytest.mark.parametrize("dtype, nbytes", [("float16", 2), ("bfloat16", 2), ("float32", 4)])
def test_weights_converted_to_target_dtype_integers_keep_size(tmp_path, dtype, nbytes):
    est = Estimator().estimate(spec(make_folder(tmp_path)), dtype=dtype, width=64, height=64)
    assert est.component_bytes() == {"unet": UNET_FLOATS * nbytes + UNET_INTS_BYTES, "text_encoder": TE_FLOATS * nbytes + TE_BUFFER}
    assert est.weights_bytes == (UNET_FLOATS + TE_FLOATS) * nbytes + UNET_INTS_BYTES + TE_BUFFER
    assert est.total_bytes == est.weights_bytes + est.workspace_bytes


def test_int8_and_nf4_apply_to_denoiser_linear_weights_only(tmp_path):
    path = make_folder(tmp_path)
    e = Estimator()
    int8 = e.estimate(spec(path, quantization="int8"), dtype="float16", width=64, height=64)
    # Linear 10x100: 1000 bytes + 10 fp32 row scales; bias and conv stay fp16; int64 as stored.
    assert int8.component_bytes()["unet"] == 1000 + 40 + (10 + 144) * 2 + UNET_INTS_BYTES
    nf4 = e.estimate(spec(path, quantization="nf4"), dtype="float16", width=64, height=64)
    assert nf4.component_bytes()["unet"] == 500 + math.ceil(1000 / 64) * 4 + (10 + 144) * 2 + UNET_INTS_BYTES
    assert int8.component_bytes()["text_encoder"] == TE_FLOATS * 2 + TE_BUFFER  # not the denoiser
    assert any("bitsandbytes int8" in a for a in int8.assumptions)


def test_truncated_data_section_estimates_the_same(tmp_path):
    path = make_folder(tmp_path)
    before = Estimator().estimate(spec(path), dtype="float16", width=64, height=64)
    f = path / "unet" / "diffusion_pytorch_model.safetensors"
    (n,) = __import__("struct").unpack("<Q", f.read_bytes()[:8])
    f.write_bytes(f.read_bytes()[: 8 + n + 3])  # header intact, data section cut to 3 bytes
    after = Estimator().estimate(spec(path), dtype="float16", width=64, height=64)
    assert after.weights_bytes == before.weights_bytes


@pytest.mark.parametrize("payload, match", [
    (b"\x01\x02", "shorter than"),
    ((10**12).to_bytes(8, "little"), "out of range"),
    ((50).to_bytes(8, "little") + b"{not json", "truncated"),
    ((9).to_bytes(8, "little") + b"{not json", "not valid JSON"),
    ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
    ((37).to_bytes(8, "little") + b'{"t": {"dtype": "X9", "shape": [1]}} ', "unsupported dtype"),
    ((38).to_bytes(8, "little") + b'{"t": {"dtype": "F32", "shape": [-1]}}', "invalid shape"),
    ((41).to_bytes(8, "little") + b'{"t": {"dtype": ["F32"], "shape": [1]}}  ', "unsupported dtype"),
    ((42).to_bytes(8, "little") + b'{"t": {"dtype": "F32", "shape": [true]}}  ', "invalid shape"),
])
def test_corrupt_headers_are_typed_errors(tmp_path, payload, match):
    f = tmp_path / "x.safetensors"
    f.write_bytes(payload)
    with pytest.raises(EstimateError, match=match):
        read_safetensors_header(f)


def test_corrupt_header_error_names_checkpoint_and_component(tmp_path):
    path = make_folder(tmp_path)
    (path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage!garbage")
    with pytest.raises(EstimateError, match=r"checkpoint 'ckpt': unet/"):
        Estimator().estimate(spec(path), dtype="float16", width=64, height=64)


def test_estimate_cache_rereads_replaced_files(tmp_path):
    path = make_folder(tmp_path)
    e = Estimator()
    first = e.estimate(spec(path), dtype="float32", width=64, height=64).weights_bytes
    save_file({"w": torch.zeros(1000)}, str(path / "text_encoder" / "model.safetensors"))
    assert e.estimate(spec(path), dtype="float32", width=64, height=64).weights_bytes == first - TE_FLOATS * 4 + 4000


def test_unsaved_buffers_sized_from_component_config(tmp_path):
    path = make_folder(tmp_path)
    (path / "text_encoder" / "config.json").write_text('{"max_position_embeddings": 10}')
    est = Estimator().estimate(spec(path), dtype="float16", width=64, height=64)
    assert est.component_bytes()["text_encoder"] == TE_FLOATS * 2 + 80


def test_variant_files_are_ignored_when_a_plain_file_exists(tmp_path):
    path = make_folder(tmp_path)
    save_file({"w": torch.zeros(10**4)}, str(path / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    est = Estimator().estimate(spec(path), dtype="float16", width=64, height=64)
    assert est.component_bytes()["unet"] == UNET_FLOATS * 2 + UNET_INTS_BYTES


def test_workspace_scales_with_pixels_batch_and_dtype():
    e = Estimator()
    row = WORKSPACE_TABLE[Family.SDXL]
    one = e.workspace_bytes(Family.SDXL, dtype="float16", width=1000, height=1000, batch=1)
    assert one == row.base_bytes + row.per_megapixel_bytes
    assert e.workspace_bytes(Family.SDXL, dtype="float16", width=1000, height=1000, batch=2) == row.base_bytes + 2 * row.per_megapixel_bytes
    assert e.workspace_bytes(Family.SDXL, dtype="float32", width=1000, height=1000, batch=1) == 2 * one
    with pytest.raises(ValueError, match="width=0"):
        e.workspace_bytes(Family.SDXL, dtype="float16", width=0, height=8, batch=1)


def test_family_inferred_or_taken_from_spec(tmp_path):
    path = make_folder(tmp_path)
    assert Estimator().estimate(spec(path), dtype="float16", width=64, height=64).family == "tiny"
    assert Estimator().estimate(spec(path, family="sdxl"), dtype="float16", width=64, height=64).family == "sdxl"


def test_estimator_misuse_names_the_parameter(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        Estimator().weights(spec(make_folder(tmp_path)), "int4")
    with pytest.raises(ValueError, match="workspace_table"):
        Estimator({Family.SD1: WORKSPACE_TABLE[Family.SD1]})


# ---- registry --------------------------------------------------------------------------------
def test_registry_from_yaml_resolves_relative_paths(tmp_path):
    make_folder(tmp_path, "one")
    (tmp_path / "reg.yaml").write_text("checkpoints:\n  - name: one\n    path: one\n    dtype: float16\n")
    reg = Registry.from_yaml(tmp_path / "reg.yaml")
    assert reg.names() == ["one"] and reg.get("one").path == (tmp_path / "one").resolve()


@pytest.mark.parametrize("entry, match", [
    ({"name": "../etc", "path": "x"}, r"checkpoint '\.\./etc': name"),
    ({"name": "Upper", "path": "x"}, "name"),
    ({"name": "a" * 65, "path": "x"}, "name"),
    ({"name": "ok", "path": "x", "dtype": "int3"}, r"checkpoint 'ok': dtype"),
    ({"name": "ok", "path": "x", "quantization": "fp4"}, "quantization"),
    ({"name": "ok", "path": "x", "max_width": 100}, "max_width"),
    ({"name": "ok", "path": "x", "colour": "red"}, "colour"),
    ({"name": "ok"}, "path"),
])
def test_registry_errors_name_entry_and_field(entry, match):
    with pytest.raises(RegistryError, match=match):
        Registry.from_entries([entry], check_files=False)


def test_registry_refuses_pickle_only_folders(tmp_path):
    path = make_folder(tmp_path)
    for f in (path / "unet").glob("*.safetensors"):
        f.unlink()
    (path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(RegistryError, match=r"checkpoint 'ckpt'.*only pickle weights.*execute code"):
        Registry([spec(path)])


@pytest.mark.parametrize("setup, match", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "no model_index.json"),
    (lambda p: (p.mkdir(), (p / "model_index.json").write_text("{oops")), "not valid JSON"),
    (lambda p: (p.mkdir(), (p / "model_index.json").write_text("{}")), "no safetensors"),
])
def test_registry_refuses_bad_folders(tmp_path, setup, match):
    path = tmp_path / "bad"
    setup(path)
    with pytest.raises(RegistryError, match=match):
        Registry([spec(path, name="bad")])


def test_unknown_name_is_a_typed_error_never_a_path(tmp_path):
    reg = Registry([spec(make_folder(tmp_path))])
    for name in ("missing", str(tmp_path / "ckpt"), "../ckpt", "org/model"):
        with pytest.raises(UnknownCheckpointError, match="unknown checkpoint"):
            reg.get(name)


def test_duplicate_names_refused(tmp_path):
    path = make_folder(tmp_path)
    with pytest.raises(RegistryError, match="registered twice"):
        Registry([spec(path), spec(path)])


# ---- profiles --------------------------------------------------------------------------------
@pytest.mark.parametrize("device, total_gib, expected", [
    ("Tesla T4", 15, "T4-16GB"),
    ("NVIDIA A10G", 22, "A10G-24GB"),
    ("NVIDIA L4", 22, "L4-24GB"),
    ("NVIDIA A100-SXM4-40GB", 39.5, "A100-40GB"),
    ("NVIDIA A100-SXM4-80GB", 79, "A100-80GB"),
    ("NVIDIA H100 80GB HBM3", 79, "H100-80GB"),
    ("NVIDIA H200", 139.5, "H200-141GB"),
])
def test_detect_known_gpus(device, total_gib, expected):
    assert profiles.detect(device, int(total_gib * GIB)).name == expected


def test_detect_unknown_gpu_uses_measured_total_and_fp16():
    p = profiles.detect("Some Future GPU", 48 * GIB)
    assert p.name == "gpu-generic" and p.total_bytes == 48 * GIB and p.default_dtype == "float16"
    assert 0 < p.device_budget_bytes < p.total_bytes


def test_detect_mig_slice_caps_total():
    p = profiles.detect("NVIDIA H100 80GB HBM3 MIG 3g.40gb", 40 * GIB)
    assert p.name == "H100-80GB" and p.total_bytes == 40 * GIB


def test_t4_defaults_to_fp16_others_bf16():
    assert profiles.PROFILES["T4-16GB"].default_dtype == "float16"
    assert profiles.PROFILES["H100-80GB"].default_dtype == "bfloat16"


def test_resolve_cpu_budget_and_overrides():
    p = profiles.resolve("auto", cuda_device=None, available_ram_bytes=16 * GIB)
    assert p.name == "cpu" and p.device_budget_bytes == 4 * GIB and p.host_budget_bytes == 0
    p = profiles.resolve("cpu", cuda_device=None, available_ram_bytes=16 * GIB, cpu_budget_bytes=123_000_000,
                         overrides={"idle_release_s": 5.0})
    assert p.device_budget_bytes == 123_000_000 and p.idle_release_s == 5.0
    assert profiles.resolve("auto", cuda_device=("NVIDIA L4", 22 * GIB), available_ram_bytes=GIB).name == "L4-24GB"


@pytest.mark.parametrize("call, match", [
    (lambda: profiles.resolve("B200", cuda_device=None, available_ram_bytes=GIB), "unknown name 'B200'"),
    (lambda: profiles.PROFILES["L4-24GB"].with_overrides({"vram": 1}), "unknown field"),
    (lambda: profiles.PROFILES["L4-24GB"].with_overrides({"reserve_bytes": 10**12}), "reserve_bytes"),
    (lambda: profiles.cpu_profile(available_ram_bytes=GIB, fraction=2), "fraction"),
    (lambda: profiles.detect("x", 0), "total_bytes"),
])
def test_profile_misuse_names_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_family_override_is_not_served_from_another_entrys_cached_estimate(tmp_path):
    path = make_folder(tmp_path)
    est = Estimator()
    auto = est.estimate(spec(path, name="a"), dtype="float16", width=512, height=512)
    flux = est.estimate(spec(path, name="b", family=Family.FLUX), dtype="float16", width=512, height=512)
    fresh = Estimator().estimate(spec(path, name="b", family=Family.FLUX), dtype="float16", width=512, height=512)
    assert auto.family != "flux"
    assert (flux.family, flux.workspace_bytes) == ("flux", fresh.workspace_bytes) != (auto.family, auto.workspace_bytes)


def test_an_empty_component_entry_in_model_index_is_skipped_not_a_crash(tmp_path):
    path = make_folder(tmp_path)
    index = json.loads((path / "model_index.json").read_text())
    index["feature_extractor"] = []
    (path / "model_index.json").write_text(json.dumps(index))
    Registry([spec(path)])  # accepted
    assert Estimator().estimate(spec(path), dtype="float16", width=64, height=64).weights_bytes > 0


@pytest.mark.parametrize("field, limit", [("default_width", "max_width"), ("default_height", "max_height"),
                                          ("default_steps", "max_steps")])
def test_a_default_above_its_own_limit_is_refused_at_registration(tmp_path, field, limit):
    from pydantic import ValidationError

    value = 1000 if field == "default_steps" else 1024
    cap = 100 if field == "default_steps" else 512
    with pytest.raises(ValidationError, match=f"{field} {value} exceeds {limit} {cap}"):
        spec(tmp_path, **{field: value, limit: cap})
    spec(tmp_path, **{field: cap, limit: cap})  # equal is fine


@pytest.mark.parametrize("family, width, height, bad", [
    ("sd3", 520, 512, "width"), ("sd3", 512, 520, "height"), ("flux", 1000, 1024, "width"),
    ("sd3", 512, 1024, None), ("sd1", 520, 520, None), ("sdxl", 1000, 1000, None),
])
def test_image_sizes_are_checked_against_the_familys_multiple(family, width, height, bad):
    from router.api import ResolvedRequest, RequestLimitError, check_image_size

    r = ResolvedRequest(checkpoint="c", prompt="p", negative_prompt=None, width=width, height=height,
                        num_inference_steps=1, guidance_scale=7.5, seed=0, num_images=1)
    if bad is None:
        check_image_size(r, family)
    else:
        with pytest.raises(RequestLimitError, match="multiple of 16") as info:
            check_image_size(r, family)
        assert info.value.field == bad
