"""Small patch discriminator for the stage-1 adversarial loss."""

from __future__ import annotations

from torch import Tensor, nn

from qualiteacher.archs.vqae import group_norm


class PatchDiscriminator(nn.Module):
    """Strided conv stack -> (B, 1, h, w) real/fake logits per patch (GroupNorm, LeakyReLU)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers):
            out = channels * min(2**i, 8)
            mods += [nn.Conv2d(ch, out, 4, stride=2, padding=1), group_norm(out), nn.LeakyReLU(0.2)]
            ch = out
        mods += [nn.Conv2d(ch, ch, 3, padding=1), group_norm(ch), nn.LeakyReLU(0.2), nn.Conv2d(ch, 1, 3, padding=1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
