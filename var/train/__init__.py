"""Training: data, objectives and the torchrun trainer."""
