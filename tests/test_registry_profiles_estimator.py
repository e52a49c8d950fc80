"""Registry, hardware profiles and the header-only estimator on synthetic safetensors folders."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import types
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
    (path / "scheduler").mkdir()
    (path / "scheduler" / "scheduler_config.json").write_text("{}")
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


def test_a_truncated_data_section_is_refused_by_size_without_reading_it(tmp_path):
    """Header intact, data cut short: refused before any replica evicts for its load (it
    used to be estimated, then evicted for, then fail to load on every retry)."""
    path = make_folder(tmp_path)
    f = path / "unet" / "diffusion_pytorch_model.safetensors"
    whole = f.read_bytes()
    (n,) = __import__("struct").unpack("<Q", whole[:8])
    f.write_bytes(whole[: 8 + n + 3])  # header intact, data section cut to 3 bytes
    with pytest.raises(EstimateError, match=rf"checkpoint 'ckpt': unet/diffusion_pytorch_model\.safetensors: truncated: "
                                            rf"its header declares {len(whole)} bytes, the file has {8 + n + 3}"):
        Estimator().estimate(spec(path), dtype="float16", width=64, height=64)
    f.write_bytes(whole + b"\0" * 5)  # longer than declared is not refused here (safe_open judges that)
    Estimator().estimate(spec(path), dtype="float16", width=64, height=64)


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
    ((37).to_bytes(8, "little") + b'{"t": {"dtype": "F32", "shape": [1]}}', "invalid data_offsets None"),
    ((61).to_bytes(8, "little") + b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}',
     r"invalid data_offsets \[4, 0\]"),
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


@pytest.mark.parametrize("args, match", [
    ({"profile": "H100"}, "unknown profile 'H100'; use one of"),
    ({"profile_overrides": {"reserv_bytes": 1}}, r"unknown field\(s\) \['reserv_bytes'\]"),
    ({"profile_overrides": {"reserve_bytes": "2.5e9"}},  # YAML reads 2.5e9 as this string
     r"profile override reserve_bytes must be an integer number of bytes .*got '2.5e9' \(str\)"),
    ({"profile_overrides": {"idle_release_s": True}}, "idle_release_s must be a number of seconds"),
    ({"profile_overrides": {"default_dtype": "fp16"}}, "default_dtype must be one of"),
    ({"profile_overrides": {"max_resident_pipelines": 0}}, "max_resident_pipelines must be >= 1"),
    ({"profile_overrides": {"host_budget_bytes": -1}}, "host_budget_bytes must be >= 0"),
    ({"profile_overrides": {"idle_offload_s": 0}}, "idle_offload_s must be > 0 seconds"),
    ({"profile_overrides": {"idle_release_s": float("nan")}}, "idle_release_s must be > 0 seconds"),
])
def test_replica_profile_settings_are_refused_when_the_app_is_built_naming_the_field(args, match):
    from pydantic import ValidationError

    from deployments.config import AppConfig

    with pytest.raises(ValidationError, match=match):
        AppConfig.model_validate({"replica": args})


def test_good_profile_settings_validate_and_apply():
    from deployments.config import AppConfig

    cfg = AppConfig.model_validate({"replica": {"profile": "L4-24GB", "num_gpus": 1, "profile_overrides": {
        "reserve_bytes": 2 * GIB, "idle_release_s": float("inf"), "idle_offload_s": 30}}})
    p = profiles.resolve(cfg.replica.profile, cuda_device=("NVIDIA L4", 22 * GIB), available_ram_bytes=GIB,
                         overrides=cfg.replica.profile_overrides)
    assert (p.reserve_bytes, p.idle_release_s, p.idle_offload_s) == (2 * GIB, float("inf"), 30)


def test_a_table_profile_needs_a_cuda_device_at_least_its_size():
    # Each would have been a budget of memory the device does not have.
    with pytest.raises(ValueError, match="'H100-80GB' is a GPU profile but this replica sees no CUDA device"):
        profiles.resolve("H100-80GB", cuda_device=None, available_ram_bytes=64 * GIB)
    with pytest.raises(ValueError, match=r"'H100-80GB' assumes 79.0 GiB, but the visible CUDA device 'Tesla T4' "
                                         r"has 15.0 GiB"):
        profiles.resolve("H100-80GB", cuda_device=("Tesla T4", 15 * GIB), available_ram_bytes=64 * GIB)
    p = profiles.resolve("H100-80GB", cuda_device=("Tesla T4", 15 * GIB), available_ram_bytes=64 * GIB,
                         overrides={"total_bytes": 15 * GIB})  # said outright: taken
    assert p.total_bytes == 15 * GIB
    # Its own board, reporting under the row's rounded total (a real T4: 15,102 MiB of 15.0 GiB).
    t4 = profiles.resolve("T4-16GB", cuda_device=("Tesla T4", 15102 * 1024**2), available_ram_bytes=64 * GIB)
    assert t4.total_bytes == 15102 * 1024**2 and t4.device_budget_bytes == t4.total_bytes - GIB
    with pytest.raises(ValueError, match="assumes 80.0 GiB"):  # auto too: an override beyond the device
        profiles.resolve("auto", cuda_device=("Tesla T4", 15 * GIB), available_ram_bytes=64 * GIB,
                         overrides={"total_bytes": 80 * GIB})
    from deployments.config import AppConfig
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="'T4-16GB' is a GPU profile but num_gpus is 0"):
        AppConfig.model_validate({"replica": {"profile": "T4-16GB"}})


def test_replicas_sharing_a_gpu_each_budget_their_share_of_it():
    board = profiles.PROFILES["H100-80GB"]
    h100 = ("NVIDIA H100 80GB HBM3", board.total_bytes)
    half = profiles.resolve("auto", cuda_device=h100, available_ram_bytes=GIB, gpu_fraction=0.5)
    assert half.total_bytes == board.total_bytes // 2
    assert half.reserve_bytes == board.reserve_bytes // 2  # the board's reserve, shared (> 1 GiB, > 5%)
    assert 2 * half.device_budget_bytes <= board.device_budget_bytes  # was 2x the board's budget
    assert half.host_budget_bytes == board.host_budget_bytes // 2 and half.max_resident_pipelines == 8
    quarter = profiles.resolve("H100-80GB", cuda_device=h100, available_ram_bytes=GIB, gpu_fraction=0.25,
                               overrides={"reserve_bytes": 8 * GIB})  # overrides describe the board
    assert quarter.total_bytes == board.total_bytes // 4 and quarter.reserve_bytes == 2 * GIB
    calibrated = profiles.resolve("auto", cuda_device=h100, available_ram_bytes=GIB, gpu_fraction=0.5,
                                  overrides={"reserve_bytes": 512 * 1024**2})  # lower than the rule: kept, shared
    assert calibrated.reserve_bytes == 256 * 1024**2
    assert profiles.resolve("cpu", cuda_device=None, available_ram_bytes=8 * GIB, gpu_fraction=0.5).total_bytes \
        == 2 * GIB  # the cpu profile has no board to share
    with pytest.raises(ValueError, match="gpu_fraction must be in"):
        profiles.resolve("auto", cuda_device=h100, available_ram_bytes=GIB, gpu_fraction=0)


def test_inline_registry_entries_are_checked_when_the_app_is_built():
    """Not their files (those may be readable only where the replicas run): a typo fails the
    build, so an in-place update with it is refused while the running app keeps serving."""
    from pydantic import ValidationError

    from deployments.config import AppConfig

    good = {"name": "sdxl", "path": "/models/sdxl", "family": "sdxl"}
    AppConfig.model_validate({"registry": [good]})  # no such folder here: not checked
    for entry, match in [
        (dict(good, quantisation="nf4"), r"checkpoint 'sdxl': quantisation: Extra inputs are not permitted"),
        (dict(good, family="flux", default_width=1000), "not a multiple of 16"),
    ]:
        with pytest.raises(ValidationError, match=match):
            AppConfig.model_validate({"registry": [entry]})
    with pytest.raises(ValidationError, match="'sdxl': name: registered twice"):
        AppConfig.model_validate({"registry": [good, good]})


def test_a_nan_idle_timeout_is_refused_it_would_switch_the_timers_off():
    with pytest.raises(ValueError, match="idle_release_s must be > 0 seconds"):
        profiles.PROFILES["L4-24GB"].with_overrides({"idle_release_s": float("nan")})
    with pytest.raises(ValueError, match="idle timeouts must be > 0 seconds"):  # the profile's own check
        dataclasses.replace(profiles.PROFILES["L4-24GB"], idle_offload_s=float("nan"))
    from deployments.cache import CacheConfig

    with pytest.raises(ValueError, match="idle timeouts must be > 0 s"):
        CacheConfig(device_budget_bytes=1, idle_offload_s=float("nan"))


def test_a_mig_slice_gets_its_own_reserve_and_its_share_of_host_and_resident_cap():
    board = profiles.PROFILES["H100-80GB"]
    p = profiles.detect("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 10 * GIB)
    share = 10 * GIB / board.total_bytes
    assert p.name == "H100-80GB" and p.total_bytes == 10 * GIB
    assert p.reserve_bytes == GIB  # was the board's 3.95 GiB: 40% of the slice
    assert p.host_budget_bytes == int(board.host_budget_bytes * share)
    assert p.max_resident_pipelines == round(board.max_resident_pipelines * share) == 2
    assert profiles.detect("NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40 * GIB).name == "A100-80GB"
    assert profiles.detect("NVIDIA A100-SXM4-40GB", int(39.5 * GIB)).name == "A100-40GB"


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


# ---- which files load (router/layout.py) -----------------------------------------------------
def _unet(path: Path) -> Path:
    return path / "unet" / "diffusion_pytorch_model.safetensors"


def test_a_variant_only_component_is_refused_naming_its_files(tmp_path):
    """from_pretrained without a variant never loads *.fp16.safetensors: such a folder
    would fail at every request's load, so the registry refuses it."""
    path = make_folder(tmp_path)
    _unet(path).rename(path / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(RegistryError, match=r"component 'unet'.*does not load without a variant "
                                            r"\(diffusion_pytorch_model\.fp16\.safetensors\)"):
        Registry([spec(path)])


def test_a_plain_file_beside_a_variant_is_the_one_counted(tmp_path):
    path = make_folder(tmp_path)
    save_file({"big.weight": torch.zeros(1000, 1000)}, str(path / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    Registry([spec(path)])
    est = Estimator().estimate(spec(path), dtype="float16", width=64, height=64)
    assert est.component_bytes()["unet"] == UNET_FLOATS * 2 + UNET_INTS_BYTES


def _shard(path: Path) -> None:
    """unet as two shards and an index (as save_pretrained(max_shard_size=...) writes them)."""
    save_file({"proj.weight": torch.zeros(10, 100), "proj.bias": torch.zeros(10)},
              str(path / "unet" / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    save_file({"conv.weight": torch.zeros(4, 4, 3, 3), "steps": torch.zeros(5, dtype=torch.int64)},
              str(path / "unet" / "diffusion_pytorch_model-00002-of-00002.safetensors"))
    (path / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "proj.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
        "proj.bias": "diffusion_pytorch_model-00001-of-00002.safetensors",
        "conv.weight": "diffusion_pytorch_model-00002-of-00002.safetensors",
        "steps": "diffusion_pytorch_model-00002-of-00002.safetensors"}}))


@pytest.mark.parametrize("leftover", ["consolidated", "stray shard", "none"])
def test_a_sharded_component_counts_the_shards_its_index_names_once(tmp_path, leftover):
    """diffusers loads what the index names; a consolidated file left beside the shards, or a
    shard of an older layout, is not loaded and must not be counted (it was: 2x)."""
    path = make_folder(tmp_path)
    if leftover != "consolidated":
        _unet(path).unlink()
    _shard(path)
    if leftover == "stray shard":
        save_file({"old.weight": torch.zeros(300, 300)},
                  str(path / "unet" / "diffusion_pytorch_model-00003-of-00003.safetensors"))
    Registry([spec(path)])
    est = Estimator().estimate(spec(path), dtype="float16", width=64, height=64)
    assert est.component_bytes()["unet"] == UNET_FLOATS * 2 + UNET_INTS_BYTES


def test_a_transformers_component_prefers_its_single_file_to_an_index(tmp_path):
    path = make_folder(tmp_path)
    save_file({"old.weight": torch.zeros(300, 300)}, str(path / "text_encoder" / "model-00001-of-00001.safetensors"))
    (path / "text_encoder" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"old.weight": "model-00001-of-00001.safetensors"}}))
    est = Estimator().estimate(spec(path), dtype="float16", width=64, height=64)
    assert est.component_bytes()["text_encoder"] == TE_FLOATS * 2 + TE_BUFFER


@pytest.mark.parametrize("index, match", [
    ("{oops", "unreadable shard index"),
    (json.dumps({"weight_map": {}}), "without a weight_map"),
    (json.dumps({"weight_map": {"a": "../../etc/passwd.safetensors"}}), "not a .safetensors file in this folder"),
    (json.dumps({"weight_map": {"a": "gone-00001-of-00001.safetensors"}}), "shard gone-00001-of-00001.safetensors is missing"),
])
def test_a_broken_shard_index_is_refused_naming_it(tmp_path, index, match):
    path = make_folder(tmp_path)
    (path / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(index)
    with pytest.raises(RegistryError, match=r"component 'unet': diffusion_pytorch_model\.safetensors\.index\.json: .*" + match):
        Registry([spec(path)])
    with pytest.raises(EstimateError, match=match):
        Estimator().estimate(spec(path), dtype="float16", width=64, height=64)


@pytest.mark.parametrize("breakage, match", [
    (lambda p: shutil.rmtree(p / "scheduler"), "component 'scheduler' is listed in model_index.json but has no folder"),
    (lambda p: (_unet(p).unlink(), (p / "unet" / "config.json").write_text("{}")),
     "component 'unet' has a config.json but no safetensors weights"),
])
def test_a_component_that_cannot_load_is_refused_at_registration(tmp_path, breakage, match):
    path = make_folder(tmp_path)
    breakage(path)
    with pytest.raises(RegistryError, match=match):
        Registry([spec(path)])


def test_a_dangling_link_is_refused_by_the_registry_and_an_estimate_error_after(tmp_path):
    """A Hugging Face cache folder whose blob was deleted: the link stays, the file is gone."""
    path = make_folder(tmp_path)
    blob = tmp_path / "blob.safetensors"
    _unet(path).rename(blob)
    _unet(path).symlink_to(blob)
    Registry([spec(path)])
    est = Estimator()
    est.estimate(spec(path), dtype="float16", width=64, height=64)
    blob.unlink()  # after registration: the estimate names the file, not a bare FileNotFoundError
    with pytest.raises(EstimateError, match=r"checkpoint 'ckpt': component 'unet': diffusion_pytorch_model\.safetensors: "
                                            r"a link to a missing file \(.*blob\.safetensors\)"):
        est.estimate(spec(path), dtype="float16", width=64, height=64)
    with pytest.raises(RegistryError, match="component 'unet': diffusion_pytorch_model.safetensors: a link to a missing"):
        Registry([spec(path)])


def test_a_file_gone_between_listing_and_reading_is_an_estimate_error(tmp_path, monkeypatch):
    import router.estimator as estimator

    path = make_folder(tmp_path)
    monkeypatch.setattr(estimator, "pipeline_weight_files",
                        lambda p, index, variant=None: {"unet": (p / "unet" / "gone.safetensors",)})
    with pytest.raises(EstimateError, match=r"checkpoint 'ckpt': unet/gone\.safetensors: cannot read \(No such file"):
        Estimator().estimate(spec(path), dtype="float16", width=64, height=64)


def test_a_pipeline_without_unet_or_transformer_gets_the_conservative_row_not_tiny(tmp_path):
    """Stable Cascade's denoiser is 'decoder': 0 unet/transformer params said 'tiny' (a 10x
    smaller workspace) for a 1.5B-param model."""
    path = make_folder(tmp_path)
    index = json.loads((path / "model_index.json").read_text())
    index["decoder"] = index.pop("unet")
    index["_class_name"] = "StableCascadeDecoderPipeline"
    (path / "model_index.json").write_text(json.dumps(index))
    (path / "unet").rename(path / "decoder")
    assert Estimator().estimate(spec(path), dtype="float16", width=64, height=64).family == "unknown"
    assert Estimator().estimate(spec(make_folder(tmp_path, "small")), dtype="float16", width=64, height=64).family == "tiny"


@pytest.mark.parametrize("dtype, nbytes", [("F8_E8M0", 2), ("F8_E4M3FNUZ", 2), ("F8_E5M2FNUZ", 2), ("C64", 8)])
def test_newer_safetensors_dtypes_are_estimated(tmp_path, dtype, nbytes):
    """Floating dtypes count at the compute dtype (float16 here), complex as stored."""
    path = make_folder(tmp_path)
    header = json.dumps({"x": {"dtype": dtype, "shape": [3, 5], "data_offsets": [0, 15 * (8 if dtype == "C64" else 1)]}})
    raw = header.encode()
    (path / "text_encoder" / "model.safetensors").write_bytes(
        len(raw).to_bytes(8, "little") + raw + bytes(15 * (8 if dtype == "C64" else 1)))
    est = Estimator().estimate(spec(path), dtype="float16", width=64, height=64)
    assert est.component_bytes()["text_encoder"] == 15 * nbytes + TE_BUFFER


# ---- default image sizes against the family's multiple ------------------------------------------
def test_an_explicit_familys_default_size_must_be_a_size_it_takes(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="the default width 520 is not a multiple of 16, which flux checkpoints "
                                              "need: set default_width"):
        spec(tmp_path, family="flux", default_width=520)
    with pytest.raises(ValidationError, match="the default height 1000 is not a multiple of 16, which sd3"):
        spec(tmp_path, family="sd3", default_height=1000)
    assert spec(tmp_path, family="sd1", default_width=520).width == 520  # 8 is enough there


@pytest.mark.parametrize("max_side, implicit", [(264, 256), (1024, 512), (8, 8), (16, 16), (504, 496)])
def test_the_implicit_default_side_is_a_multiple_of_16_within_the_limit(tmp_path, max_side, implicit):
    s = spec(tmp_path, max_width=max_side, max_height=max_side)
    assert (s.width, s.height) == (implicit, implicit)
    spec(tmp_path, family="sd3", max_width=264)  # was refused at every request without a width


def _header_only(path: Path, shape: list[int]) -> None:
    """A safetensors file with one F16 tensor whose data is a hole (sparse: no blocks written)."""
    raw = json.dumps({"w": {"dtype": "F16", "shape": shape, "data_offsets": [0, 2 * math.prod(shape)]}}).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + 2 * math.prod(shape))


@pytest.mark.parametrize("sent, status", [({}, 500), ({"width": 520, "height": 512}, 422), ({"width": 512}, 500)])
def test_an_auto_familys_bad_default_is_the_registrys_fault_not_the_clients(tmp_path, sent, status):
    """family: auto is known only once estimated (here flux: a 100M-param transformer)."""
    from router.api import GenerateRequest
    from router.core import RouterCore, ServiceError
    from router.settings import IngressSettings

    path = tmp_path / "flux"
    (path / "transformer").mkdir(parents=True)
    _header_only(path / "transformer" / "diffusion_pytorch_model.safetensors", [10_000, 10_000])
    (path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                       "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    registry = Registry([spec(path, name="f", default_height=520)])
    core = RouterCore(types.SimpleNamespace(app_name="app", deployment_name="ModelReplica"), registry, IngressSettings())
    with pytest.raises(ServiceError) as info:
        core._prepare(GenerateRequest.model_validate({"checkpoint": "f", "prompt": "p"} | sent))
    assert info.value.status == status
    if status == 500:
        assert info.value.code == "checkpoint_misconfigured"
        assert "checkpoint 'f': its default height: 520 is not a multiple of 16" in info.value.message
        assert "set default_height in the registry" in info.value.message
    else:
        assert info.value.code == "invalid_request" and "width: 520 is not a multiple of 16" in info.value.message


def test_with_a_variant_a_components_variant_files_count_and_plain_ones_elsewhere(tmp_path):
    path = make_folder(tmp_path)
    save_file({"big.weight": torch.zeros(100, 100)}, str(path / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    plain = Estimator().estimate(spec(path), dtype="float16", width=64, height=64).component_bytes()
    fp16 = Estimator().estimate(spec(path, variant="fp16"), dtype="float16", width=64, height=64).component_bytes()
    assert plain["unet"] == UNET_FLOATS * 2 + UNET_INTS_BYTES and fp16["unet"] == 100 * 100 * 2
    assert plain["text_encoder"] == fp16["text_encoder"] == TE_FLOATS * 2 + TE_BUFFER  # no variant file: plain
    from router.layout import with_variant

    assert with_variant("model.safetensors.index.json", "fp16") == "model.safetensors.index.fp16.json"
    with pytest.raises(Exception, match="variant"):
        spec(path, variant="../fp16")


def test_with_a_variant_the_folders_of_null_components_count_as_diffusers_reads_them(tmp_path):
    """diffusers looks at every folder model_index.json names, [null, null] ones too."""
    path = make_folder(tmp_path)  # safety_checker: [null, null]
    (path / "safety_checker").mkdir()
    (path / "safety_checker" / "model.fp16.safetensors").write_bytes(b"x")  # left in place
    Registry([spec(path, variant="fp16")])  # a file of the variant exists: diffusers loads it
    (path / "safety_checker" / "LICENSE").write_text("x")
    with pytest.raises(RegistryError, match=r"component 'safety_checker' \(null in model_index.json\): LICENSE: "
                                            r"a file name without a dot"):
        Registry([spec(path, variant="fp16")])
    Registry([spec(path)])  # without a variant nothing of it is read


@pytest.mark.parametrize("setup, match", [
    (lambda p: None, "variant 'fp16' is set, but no component has files of it"),  # diffusers: ValueError
    (lambda p: (p / "unet" / "diffusion_pytorch_model.fp16.bin").write_bytes(b"x"),  # older hub repos
     r"component 'unet' has files of the variant 'fp16' \(diffusion_pytorch_model\.fp16\.bin\), so from_pretrained "
     r"loads it with the variant, and it has no safetensors file or shard index of that variant"),
    (lambda p: (p / "unet" / "LICENSE").write_text("x"), "LICENSE: a file name without a dot"),
    (lambda p: ((p / "unet" / "diffusion_pytorch_model.safetensors.fp16.index.json").write_text("{}"),
                (p / "unet" / "diffusion_pytorch_model-00001-of-00001.fp16.safetensors").write_bytes(b"x")),
     "deprecated sharded-variant layout: re-save"),
])
def test_a_variant_folder_is_accepted_exactly_as_diffusers_would_load_it(tmp_path, setup, match):
    """diffusers gives a component the variant when any of its files' second dot-field
    starts with it, and then does not fall back to plain files; with no such component at
    all it refuses the folder."""
    path = make_folder(tmp_path)
    setup(path)
    if "LICENSE" in match:
        save_file({"w": torch.zeros(2)}, str(path / "text_encoder" / "model.fp16.safetensors"))
    with pytest.raises(RegistryError, match=match):
        Registry([spec(path, variant="fp16")])


# ---- cases found by mutating the policy (each failed one mutant the tests above let live) ----
def test_implicit_steps_stay_within_max_steps(tmp_path):
    # Else every request that leaves steps out is refused (422) for exceeding max_steps.
    assert CheckpointSpec(name="c", path=tmp_path, max_steps=10).steps == 10


def test_an_l40s_is_not_taken_for_an_l4():
    p = profiles.detect("NVIDIA L40S", 48 * GIB)  # a 48 GB board: not the 22 GiB L4 row
    assert p.name != "L4-24GB" and p.total_bytes == 48 * GIB


def test_a_reserve_equal_to_the_total_is_refused():
    base = profiles.PROFILES["L4-24GB"]
    with pytest.raises(ValueError, match="reserve_bytes"):
        dataclasses.replace(base, reserve_bytes=base.total_bytes)  # a budget of 0


def test_a_one_gib_slice_gets_a_usable_profile():
    p = profiles.detect("Tesla T4", 1 * GIB)  # a T4-1Q vGPU: the reserve is capped at half
    assert p.reserve_bytes == GIB // 2 and p.device_budget_bytes == GIB // 2


def test_a_boolean_is_not_a_count():
    with pytest.raises(ValueError, match="max_resident_pipelines"):
        profiles.PROFILES["L4-24GB"].with_overrides({"max_resident_pipelines": True})


def _t5_folder(root: Path) -> Path:
    path = root / "p"
    (path / "text_encoder").mkdir(parents=True)
    (path / "transformer").mkdir()
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "text_encoder": ["transformers", "T5EncoderModel"]}))
    save_file({"w.weight": torch.zeros(10, 10)}, str(path / "transformer" / "diffusion_pytorch_model.safetensors"))
    save_file({"block.0.layer.1.DenseReluDense.wo.weight": torch.zeros(100),
               "block.0.layer.1.DenseReluDense.wi.weight": torch.zeros(100)},
              str(path / "text_encoder" / "model.safetensors"))
    return path


def test_t5_wo_stays_float32_at_float16_only(tmp_path):
    spec = CheckpointSpec(name="c", path=_t5_folder(tmp_path))
    est = Estimator()
    assert est.estimate(spec, dtype="float16", width=64, height=64).component_bytes()["text_encoder"] == 100 * 4 + 100 * 2
    assert est.estimate(spec, dtype="bfloat16", width=64, height=64).component_bytes()["text_encoder"] == 200 * 2


def test_nf4_of_an_odd_sized_tensor_rounds_up(tmp_path):
    path = _t5_folder(tmp_path)
    save_file({"w.weight": torch.zeros(3, 5)}, str(path / "transformer" / "diffusion_pytorch_model.safetensors"))
    est = Estimator().estimate(CheckpointSpec(name="c", path=path, quantization="nf4"), dtype="float16", width=64,
                               height=64)
    assert est.component_bytes()["transformer"] == 8 + 1 * 4  # 15 weights: 8 bytes packed + one absmax


def test_a_component_of_another_library_loads_its_plain_files(tmp_path):
    from router.layout import pipeline_weight_files

    path = _t5_folder(tmp_path)
    (path / "extra").mkdir()
    save_file({"a": torch.zeros(2)}, str(path / "extra" / "weights.safetensors"))
    index = json.loads((path / "model_index.json").read_text()) | {"extra": ["mylib", "Extra"]}
    assert [p.name for p in pipeline_weight_files(path, index)["extra"]] == ["weights.safetensors"]


def test_legacy_variant_shards_count_as_files_of_the_variant(tmp_path):
    from router.layout import files_of_variant

    (tmp_path / "diffusion_pytorch_model.fp16-00001-of-00002.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    assert files_of_variant(tmp_path, "fp16") == ("diffusion_pytorch_model.fp16-00001-of-00002.safetensors",)
