"""Loss functions (pure functions on tensors, plus the optional frozen perceptual network)."""
