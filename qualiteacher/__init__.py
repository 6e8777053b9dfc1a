"""QualiTeacher: quality-conditioned Mean-Teacher training for real-world image restoration."""
__version__ = "0.1.0"
