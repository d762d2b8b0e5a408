"""PyTorch side of the toolkit: models, checkpoint loading, latent format, eager reference."""
