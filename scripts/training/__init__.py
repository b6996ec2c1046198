"""Training: the autoencoder iteration, the latent-diffusion prepare-batch, losses, checkpoints and handlers."""
