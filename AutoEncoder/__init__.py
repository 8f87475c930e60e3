"""Patch-volume autoencoder: patch-wise encoding, a VQ or KL (Gaussian) bottleneck, volume-wise decoding, its
losses and training module. Public names are re-exported here (``from AutoEncoder import PatchVolumeAutoencoder``)."""

from AutoEncoder.adversarial import adaptive_weight, build_discriminator, hinge_d_loss, hinge_g_loss
from AutoEncoder.checkpoint import LoadedAutoencoder, load_autoencoder
from AutoEncoder.decoder import Decoder
from AutoEncoder.encoder import Encoder
from AutoEncoder.gaussian_bottleneck import GaussianBottleneck, GaussianOutput
from AutoEncoder.patch_volume_autoencoder import AutoencoderOutput, PatchVolumeAutoencoder
from AutoEncoder.medicalnet import MedicalNetFeatures, load_medicalnet
from AutoEncoder.patch_volume_module import PatchVolumeModule
from AutoEncoder.patching import merge_patches, sliding_decode, split_patches
from AutoEncoder.perceptual_loss import PerceptualLoss
from AutoEncoder.vector_quantizer import QuantizerOutput, VectorQuantizer

__all__ = [
    "AutoencoderOutput",
    "GaussianBottleneck",
    "GaussianOutput",
    "LoadedAutoencoder",
    "MedicalNetFeatures",
    "PatchVolumeModule",
    "PerceptualLoss",
    "adaptive_weight",
    "build_discriminator",
    "hinge_d_loss",
    "hinge_g_loss",
    "load_autoencoder",
    "load_medicalnet",
    "Decoder",
    "Encoder",
    "PatchVolumeAutoencoder",
    "QuantizerOutput",
    "VectorQuantizer",
    "merge_patches",
    "sliding_decode",
    "split_patches",
]
