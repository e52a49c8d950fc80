"""Real-size diffusers architectures as data: the public configs of SD1.5, SDXL, SD3-medium, Flux.1-dev.

Only architecture facts (layer counts, widths, heads, channels) are written here, copied from
the checkpoints' public ``config.json`` / ``model_index.json``; no weights are involved. Each
:class:`Arch` lists its pipeline class and its weighted components; :func:`build_component`
instantiates one component (on whatever device/context the caller set up: use
``accelerate.init_empty_weights()`` for the real sizes, which need no memory).

``PUBLISHED_PARAMS`` are the parameter counts the public checkpoints are known to hold; the
benchmark checks its instantiations against them, so a mistyped config is caught.

``tiny_twin`` gives the same component classes with every width/depth shrunk, for checks that
need a real ``save_pretrained`` / ``from_pretrained`` round trip (tests, CPU dry runs).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

# ---- component configs -------------------------------------------------------------------------
SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}

SDXL_UNET: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}

SD3_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
}

FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}

_VAE_COMMON: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32,
}
SD_VAE: dict[str, Any] = {**_VAE_COMMON, "latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215}
SDXL_VAE: dict[str, Any] = {**_VAE_COMMON, "latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025}
SD3_VAE: dict[str, Any] = {**_VAE_COMMON, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305,
                           "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False}
FLUX_VAE: dict[str, Any] = {**_VAE_COMMON, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611,
                            "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}

CLIP_L: dict[str, Any] = {  # openai/clip-vit-large-patch14 text tower
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
CLIP_G: dict[str, Any] = {  # laion OpenCLIP ViT-bigG/14 text tower (SDXL/SD3 text_encoder_2)
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "projection_dim": 1280,
    "num_hidden_layers": 32, "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
    "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
T5_XXL: dict[str, Any] = {  # google/t5-v1_1-xxl, encoder only (SD3 text_encoder_3, Flux text_encoder_2)
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6, "is_encoder_decoder": False, "use_cache": False, "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class Component:
    name: str  # folder / model_index key
    library: str  # "diffusers" or "transformers"
    cls: str  # class name, as in model_index.json
    config: dict[str, Any]
    stored_dtype: str  # dtype of the public checkpoint's safetensors (file sizes only)


@dataclass(frozen=True)
class Arch:
    key: str
    title: str
    pipeline_class: str
    family: str  # router.registry.Family value
    components: tuple[Component, ...]
    # model_index entries with no weights (tokenizers, scheduler): name -> [library, class]
    extras: tuple[tuple[str, str, str], ...]


ARCHS: dict[str, Arch] = {
    "sd15": Arch(
        "sd15", "SD1.5", "StableDiffusionPipeline", "sd1",
        (
            Component("unet", "diffusers", "UNet2DConditionModel", SD15_UNET, "float32"),
            Component("text_encoder", "transformers", "CLIPTextModel", CLIP_L, "float32"),
            Component("vae", "diffusers", "AutoencoderKL", SD_VAE, "float32"),
        ),
        (("tokenizer", "transformers", "CLIPTokenizer"), ("scheduler", "diffusers", "PNDMScheduler")),
    ),
    "sdxl": Arch(
        "sdxl", "SDXL", "StableDiffusionXLPipeline", "sdxl",
        (
            Component("unet", "diffusers", "UNet2DConditionModel", SDXL_UNET, "float32"),
            Component("text_encoder", "transformers", "CLIPTextModel", CLIP_L, "float32"),
            Component("text_encoder_2", "transformers", "CLIPTextModelWithProjection", CLIP_G, "float32"),
            Component("vae", "diffusers", "AutoencoderKL", SDXL_VAE, "float32"),
        ),
        (("tokenizer", "transformers", "CLIPTokenizer"), ("tokenizer_2", "transformers", "CLIPTokenizer"),
         ("scheduler", "diffusers", "EulerDiscreteScheduler")),
    ),
    "sd3": Arch(
        "sd3", "SD3-medium", "StableDiffusion3Pipeline", "sd3",
        (
            Component("transformer", "diffusers", "SD3Transformer2DModel", SD3_MEDIUM_TRANSFORMER, "float16"),
            Component("text_encoder", "transformers", "CLIPTextModelWithProjection", CLIP_L, "float16"),
            Component("text_encoder_2", "transformers", "CLIPTextModelWithProjection", CLIP_G, "float16"),
            Component("text_encoder_3", "transformers", "T5EncoderModel", T5_XXL, "float16"),
            Component("vae", "diffusers", "AutoencoderKL", SD3_VAE, "float16"),
        ),
        (("tokenizer", "transformers", "CLIPTokenizer"), ("tokenizer_2", "transformers", "CLIPTokenizer"),
         ("tokenizer_3", "transformers", "T5TokenizerFast"),
         ("scheduler", "diffusers", "FlowMatchEulerDiscreteScheduler")),
    ),
    "flux": Arch(
        "flux", "Flux.1-dev", "FluxPipeline", "flux",
        (
            Component("transformer", "diffusers", "FluxTransformer2DModel", FLUX_DEV_TRANSFORMER, "bfloat16"),
            Component("text_encoder", "transformers", "CLIPTextModel", CLIP_L, "float32"),
            Component("text_encoder_2", "transformers", "T5EncoderModel", T5_XXL, "bfloat16"),
            Component("vae", "diffusers", "AutoencoderKL", FLUX_VAE, "float32"),
        ),
        (("tokenizer", "transformers", "CLIPTokenizer"), ("tokenizer_2", "transformers", "T5TokenizerFast"),
         ("scheduler", "diffusers", "FlowMatchEulerDiscreteScheduler")),
    ),
}

# Parameter counts of the public checkpoints (widely quoted; a check on the configs above).
PUBLISHED_PARAMS: dict[tuple[str, str], int] = {
    ("sd15", "unet"): 859_520_964,
    ("sdxl", "unet"): 2_567_463_684,
    ("sd15", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840,
    ("sd15", "vae"): 83_653_863,
    ("flux", "transformer"): 11_901_408_320,
    ("flux", "text_encoder_2"): 4_762_310_656,
}


def build_component(comp: Component) -> Any:
    """Instantiate ``comp`` in the current context (e.g. under ``init_empty_weights()``)."""
    if comp.library == "diffusers":
        import diffusers

        return getattr(diffusers, comp.cls)(**comp.config)
    import transformers

    if comp.cls.startswith("CLIP"):
        cfg = transformers.CLIPTextConfig(**comp.config)
    elif comp.cls == "T5EncoderModel":
        cfg = transformers.T5Config(**comp.config)
    else:  # pragma: no cover - only the classes above are used
        raise ValueError(f"no config class for {comp.cls}")
    return getattr(transformers, comp.cls)(cfg)


# ---- tiny twins ----------------------------------------------------------------------------------
_TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "UNet2DConditionModel": {"block_out_channels": None, "norm_num_groups": 8, "sample_size": 8},
    "SD3Transformer2DModel": {"num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
                              "joint_attention_dim": 32, "caption_projection_dim": 16,
                              "pooled_projection_dim": 32, "pos_embed_max_size": 16, "sample_size": 8},
    "FluxTransformer2DModel": {"num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
                               "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
                               "axes_dims_rope": [4, 6, 6]},
    "AutoencoderKL": {"block_out_channels": [8, 16, 16, 16], "norm_num_groups": 8, "layers_per_block": 1,
                      "sample_size": 32},
    "CLIPTextModel": {"vocab_size": 1000, "hidden_size": 16, "intermediate_size": 32, "projection_dim": 16,
                      "num_hidden_layers": 2, "num_attention_heads": 2},
    "T5EncoderModel": {"vocab_size": 1000, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_heads": 4},
}


def tiny_twin(comp: Component, arch: Arch) -> Component:
    """The same component class with every width/depth shrunk (a few hundred KB of weights).

    Cross-references between components (the denoiser's cross-attention / joint-attention /
    pooled widths follow the tiny text encoders) are kept consistent so a tiny pipeline runs.
    """
    cfg = copy.deepcopy(comp.config)
    cls = "CLIPTextModel" if comp.cls.startswith("CLIP") else comp.cls
    cfg.update({k: v for k, v in _TINY_OVERRIDES[cls].items() if v is not None})
    if comp.cls == "UNet2DConditionModel":
        n = len(cfg["block_out_channels"])
        cfg["block_out_channels"] = [16, 32, 32, 32][:n]
        cfg["cross_attention_dim"] = 16 if arch.key == "sd15" else 32  # CLIP-L (16) [+ CLIP-G (16)]
        if isinstance(cfg.get("attention_head_dim"), list):
            cfg["attention_head_dim"] = [2] * n
        else:
            cfg["attention_head_dim"] = 2
        if isinstance(cfg.get("transformer_layers_per_block"), list):
            cfg["transformer_layers_per_block"] = [1] * n
        if cfg.get("addition_embed_type") == "text_time":
            cfg["addition_time_embed_dim"] = 8
            cfg["projection_class_embeddings_input_dim"] = 16 + 6 * 8  # pooled CLIP-G + 6 time ids
    return Component(comp.name, comp.library, comp.cls, cfg, comp.stored_dtype)
