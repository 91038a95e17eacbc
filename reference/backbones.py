"""Denoiser backbones for the proximal mapping module (PMM): ``ResUNet`` and the ISTA-Net+ phase."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResBlock", "ResUNet", "ISTANetPlusPhase", "to_blocks", "from_blocks"]


class ResBlock(nn.Module):
    """conv3×3 – ReLU – conv3×3 plus the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


def _stack(channels: int, num_blocks: int) -> list[nn.Module]:
    return [ResBlock(channels) for _ in range(num_blocks)]


class ResUNet(nn.Module):
    """The DRUNet/USRNet-style residual U-Net: widths [c, 2c, 4c, 8c], ``num_blocks`` residual blocks per level,
    2×2 stride-2 convolutions down, 2×2 stride-2 transposed convolutions up, additive skips, no bias.

    Any input size works: the input is replicate-padded to a multiple of 8 and the output cropped back.
    With ``residual`` the network predicts a correction added to its input (x = z + net(z)).
    """

    def __init__(self, in_channels: int = 1, out_channels: int | None = None, channels: int = 32,
                 num_blocks: int = 2, residual: bool = True):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        if residual and out_channels != in_channels:
            raise ValueError(f"out_channels: a residual ResUNet needs out_channels == in_channels "
                             f"({in_channels}), got {out_channels}")
        if channels < 1 or num_blocks < 0:
            raise ValueError(f"channels, num_blocks: expected ≥ 1 and ≥ 0, got {channels}, {num_blocks}")
        c = [channels, 2 * channels, 4 * channels, 8 * channels]
        self.in_channels, self.out_channels, self.residual = in_channels, out_channels, residual
        self.head = nn.Conv2d(in_channels, c[0], 3, padding=1, bias=False)
        self.down1 = nn.Sequential(*_stack(c[0], num_blocks), nn.Conv2d(c[0], c[1], 2, stride=2, bias=False))
        self.down2 = nn.Sequential(*_stack(c[1], num_blocks), nn.Conv2d(c[1], c[2], 2, stride=2, bias=False))
        self.down3 = nn.Sequential(*_stack(c[2], num_blocks), nn.Conv2d(c[2], c[3], 2, stride=2, bias=False))
        self.body = nn.Sequential(*_stack(c[3], num_blocks))
        self.up3 = nn.Sequential(nn.ConvTranspose2d(c[3], c[2], 2, stride=2, bias=False), *_stack(c[2], num_blocks))
        self.up2 = nn.Sequential(nn.ConvTranspose2d(c[2], c[1], 2, stride=2, bias=False), *_stack(c[1], num_blocks))
        self.up1 = nn.Sequential(nn.ConvTranspose2d(c[1], c[0], 2, stride=2, bias=False), *_stack(c[0], num_blocks))
        self.tail = nn.Conv2d(c[0], out_channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or min(x.shape[2:]) < 1:
            raise ValueError(f"x: expected (N, {self.in_channels}, H, W) with H, W ≥ 1, got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        pad = (0, -w % 8, 0, -h % 8)
        z = F.pad(x, pad, mode="replicate") if any(pad) else x
        x1 = self.head(z)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        out = self.body(x4)
        out = self.up3(out + x4)
        out = self.up2(out + x3)
        out = self.up1(out + x2)
        out = self.tail(out + x1)[..., :h, :w]
        return x + out if self.residual else out


def to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(N, C, H, W) with H, W multiples of ``block_size`` → (N·Hb·Wb, C, b, b), blocks in row-major order."""
    n, c, h, w = x.shape
    b = block_size
    if h % b or w % b:
        raise ValueError(f"x: image {h}×{w} is not a whole number of {b}×{b} blocks; pad it first")
    x = x.reshape(n, c, h // b, b, w // b, b).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, c, b, b)


def from_blocks(blocks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`to_blocks` for an image of ``size``."""
    _, c, b, _ = blocks.shape
    h, w = size
    x = blocks.reshape(-1, h // b, w // b, c, b, b).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(-1, c, h, w)


class ISTANetPlusPhase(nn.Module):
    """The denoising half of an ISTA-Net+ phase (Zhang & Ghanem, CVPR 2018), applied to each block alone.

    On each ``block_size``² block r (zero padding 1 at the block border):
    ``x_D = conv_D(r)``, ``x_f = conv2_forward(relu(conv1_forward(x_D)))``,
    ``x_s = sign(x_f)·relu(|x_f| − soft_thr)``, ``x_b = conv2_backward(relu(conv1_backward(x_s)))``,
    ``x = r + conv_G(x_b)``. The gradient step that opens the phase (λ_k) is the DUN's ``rho[k]``.
    """

    def __init__(self, channels: int = 32, block_size: int = 33, soft_thr: float = 0.01):
        super().__init__()
        self.block_size = block_size
        self.soft_thr = nn.Parameter(torch.tensor(soft_thr))

        def conv(cin: int, cout: int) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, 3, padding=1, bias=False)

        self.conv_D = conv(1, channels)
        self.conv1_forward = conv(channels, channels)
        self.conv2_forward = conv(channels, channels)
        self.conv1_backward = conv(channels, channels)
        self.conv2_backward = conv(channels, channels)
        self.conv_G = conv(channels, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ISTA-Net+'s initialisation: Xavier-normal convolutions."""
        for module in (self.conv_D, self.conv1_forward, self.conv2_forward, self.conv1_backward,
                       self.conv2_backward, self.conv_G):
            nn.init.xavier_normal_(module.weight)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        if r.dim() != 4 or r.shape[1] != 1:
            raise ValueError(f"r: expected (N, 1, H, W), got {tuple(r.shape)}")
        size = tuple(r.shape[-2:])
        blocks = to_blocks(r, self.block_size)
        x = self.conv2_forward(F.relu(self.conv1_forward(self.conv_D(blocks))))
        x = torch.sign(x) * F.relu(x.abs() - self.soft_thr)
        x = self.conv2_backward(F.relu(self.conv1_backward(x)))
        return from_blocks(blocks + self.conv_G(x), size)
