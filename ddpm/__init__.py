"""Latent diffusion: embeddings, DiT blocks, BiFlowNet, X-ray encoder, diffusion process, training module."""

from ddpm.biflownet import BiFlowNet
from ddpm.biflownet_module import BiFlowNetModule, NonFiniteLossError, count_parameters
from ddpm.diffusion import Diffusion, guided
from ddpm.dit_block import CrossAttention, DiTBlock, FinalLayer
from ddpm.embeddings import LabelEmbedder, ResolutionEmbedder, TimestepEmbedder, sincos_pos_embed_2d, sincos_pos_embed_3d
from ddpm.loading import LoadedBiFlowNet, load_biflownet
from ddpm.projection import back_project, cone_beam_grids, footprint_mask, parallel_projection_grids
from ddpm.xray_encoder import XrayEncoder

__all__ = [
    "BiFlowNet",
    "BiFlowNetModule",
    "CrossAttention",
    "DiTBlock",
    "Diffusion",
    "FinalLayer",
    "LabelEmbedder",
    "LoadedBiFlowNet",
    "NonFiniteLossError",
    "ResolutionEmbedder",
    "TimestepEmbedder",
    "XrayEncoder",
    "back_project",
    "cone_beam_grids",
    "count_parameters",
    "footprint_mask",
    "guided",
    "load_biflownet",
    "parallel_projection_grids",
    "sincos_pos_embed_2d",
    "sincos_pos_embed_3d",
]
