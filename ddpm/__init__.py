"""Latent diffusion: embeddings, DiT blocks, BiFlowNet, X-ray encoder, diffusion process, training module."""

from dataset.lazy import lazy_exports

from ddpm.biflownet import BiFlowNet
from ddpm.biflownet_module import BiFlowNetModule, NonFiniteLossError, count_parameters
from ddpm.diffusion import Diffusion, guided
from ddpm.dit_block import CrossAttention, DiTBlock, FinalLayer
from ddpm.embeddings import LabelEmbedder, ResolutionEmbedder, TimestepEmbedder, sincos_pos_embed_2d, sincos_pos_embed_3d
from ddpm.loading import LoadedBiFlowNet, load_biflownet
from ddpm.projection import back_project, cone_beam_grids, footprint_mask, parallel_projection_grids
from ddpm.xray_conditioner import XrayConditioner, XrayConditioning
from ddpm.xray_encoder import XrayEncoder

# ddpm.lora imports peft (and through it transformers, seconds of start-up), so its names load on first use.
__getattr__ = lazy_exports(__name__, {name: "ddpm.lora" for name in (
    "LoraSettings", "apply_lora", "load_adapter", "save_adapter", "check_adapter_fits", "read_adapter_meta",
    "weights_fingerprint")})


__all__ = [
    "BiFlowNet",
    "BiFlowNetModule",
    "CrossAttention",
    "DiTBlock",
    "Diffusion",
    "FinalLayer",
    "LabelEmbedder",
    "LoadedBiFlowNet",
    "LoraSettings",
    "NonFiniteLossError",
    "ResolutionEmbedder",
    "TimestepEmbedder",
    "XrayConditioner",
    "XrayConditioning",
    "XrayEncoder",
    "apply_lora",
    "back_project",
    "check_adapter_fits",
    "cone_beam_grids",
    "count_parameters",
    "footprint_mask",
    "guided",
    "load_adapter",
    "load_biflownet",
    "parallel_projection_grids",
    "read_adapter_meta",
    "save_adapter",
    "sincos_pos_embed_2d",
    "sincos_pos_embed_3d",
    "weights_fingerprint",
]
