"""Student architectures: IQPIR (VQ codebook prior + code transformer) and a conditioned U-Net."""

from qualiteacher.archs.output import StudentOutput

__all__ = ["StudentOutput"]
