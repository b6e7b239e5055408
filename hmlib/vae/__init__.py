"""The VAE stage: every image a Gaussian posterior (mu, logvar); the task's VAE distribution conditions the hypernetwork."""
from hmlib.vae.latents import LatentSet, encode_split, get_latents
from hmlib.vae.model import VAE, beta_schedule, build_vae, kl_per_sample, ssim, vae_loss
from hmlib.vae.train import (VAETrainingError, encode_images, get_all_vaes, get_vae, load_vae, reconstruct_images,
                             select_training_images, train_vae, vae_summary)

__all__ = ["LatentSet", "VAE", "VAETrainingError", "beta_schedule", "build_vae", "encode_images", "encode_split",
           "get_all_vaes", "get_latents", "get_vae", "kl_per_sample", "load_vae", "reconstruct_images", "select_training_images",
           "ssim", "train_vae", "vae_loss", "vae_summary"]
