"""LightningModules, one per training stage."""
