"""The unfused LoRA convolution with one adapter per DUN stage: peft's formulation, the ground truth.

Stage ``k`` computes ``base(x) + s·lora_B[k](lora_A[k](x))`` with ``s = alpha / rank``. Because a convolution
is linear in its weight this equals one convolution with ``W + s·B_k·A_k`` (``merged_weight``); the fused
kernels in ``lorun_fast.kernels`` rely on exactly that identity and are tested against this module.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["lora_rank", "LoRAConv2d", "check_stage", "check_alpha", "check_rank", "check_ranks", "max_rank"]


def lora_rank(in_channels: int, out_channels: int, gamma: float = 10.0) -> int:
    """The paper's rank rule ``r = ceil(min(in, out)·γ/100)``, computed in exact arithmetic (so 30·10/100 is 3)."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 100:
        raise ValueError(f"gamma: expected a percentage in (0, 100], got {gamma!r}")
    return max(1, math.ceil(Fraction(min(in_channels, out_channels)) * Fraction(str(gamma)) / 100))


def check_alpha(alpha) -> float | None:
    """``alpha`` (None: the rank) as a float after checking it is finite and > 0: α = 0 would make every adapter
    inert (scaling 0) while it still trains, and a negative α only flips the sign of B."""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha: expected a finite number > 0, got {alpha!r}")
    return float(alpha)


def max_rank(layer: nn.Module) -> int:
    """The largest rank a LoRA update of ``layer`` can have: ``B·A`` is a (Co × Ci·kh·kw) matrix for a convolution
    (and the transposed shape for a transposed one), so its rank is at most ``min(Co, Ci·kh·kw)``; a larger rank
    adds parameters that cannot change the update. For 1×1 kernels this is ``min(in, out)``."""
    kh, kw = layer.kernel_size
    return min(layer.out_channels, layer.in_channels * kh * kw)


def check_rank(rank, layer: nn.Module) -> int:
    """``rank`` after checking it is a positive int no larger than :func:`max_rank` of ``layer``."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected a positive int, got {rank!r}")
    limit = max_rank(layer)
    if rank > limit:
        kh, kw = layer.kernel_size
        raise ValueError(f"rank: {rank} is above {limit}, the most a LoRA update of this {layer.in_channels}→"
                         f"{layer.out_channels} {kh}×{kw} layer can have (min(out, in·kh·kw)); it would not be "
                         f"low-rank")
    return rank


def check_ranks(rank, layer: nn.Module, num_stages: int) -> tuple[int, ...]:
    """One rank per stage: ``rank`` repeated when it is an int, else the sequence after checking its length and
    each rank (:func:`check_rank`)."""
    if isinstance(rank, (list, tuple)):
        if len(rank) != num_stages:
            raise ValueError(f"rank: expected one rank per stage ({num_stages}), got {len(rank)}: {list(rank)}")
        return tuple(check_rank(r, layer) for r in rank)
    return (check_rank(rank, layer),) * num_stages


def check_stage(stage, num_stages: int) -> int:
    """Return ``stage`` as an int after checking it indexes one of ``num_stages`` stages."""
    if isinstance(stage, torch.Tensor) and stage.numel() == 1 and not stage.is_floating_point():
        stage = int(stage)
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise TypeError(f"stage: expected an int in [0, {num_stages}), got {type(stage).__name__} {stage!r}")
    if not 0 <= stage < num_stages:
        raise IndexError(f"stage: expected an int in [0, {num_stages}), got {stage}")
    return stage


class LoRAConv2d(nn.Module):
    """A frozen-or-trainable base convolution plus ``num_stages`` low-rank adapters (peft names and init).

    ``base_layer`` is an ``nn.Conv2d`` or ``nn.ConvTranspose2d``. Adapter ``k`` is ``lora_A[str(k)]`` (the base's
    kernel, stride and padding, to ``rank`` channels, kaiming-uniform with a=√5) followed by ``lora_B[str(k)]``
    (a 1×1 convolution back to the output channels, zero), so every stage starts exactly at the base.

    The rank is ``rank`` when given, else the paper's rule with ``gamma``; ``rank`` may also be a sequence of one
    rank per stage (what ``lorun-fast compress`` writes), and then ``rank`` the attribute is the largest of them.
    ``alpha`` defaults to the rank (s = 1); one scale s = alpha / rank serves every stage.
    ``forward(x, stage)`` runs one stage; with ``stage=None`` it runs ``active_stage`` (set by the DUN).
    """

    def __init__(self, base_layer: nn.Module, num_stages: int, rank: int | Sequence[int] | None = None,
                 gamma: float = 10.0, alpha: float | None = None):
        super().__init__()
        if not isinstance(base_layer, (nn.Conv2d, nn.ConvTranspose2d)):
            raise TypeError(f"base_layer: expected nn.Conv2d or nn.ConvTranspose2d, got {type(base_layer).__name__}")
        if base_layer.groups != 1:
            raise ValueError(f"base_layer: LoRA needs groups=1, got groups={base_layer.groups}")
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages: expected a positive int, got {num_stages!r}")
        cin, cout = base_layer.in_channels, base_layer.out_channels
        ranks = check_ranks(lora_rank(cin, cout, gamma) if rank is None else rank, base_layer, num_stages)
        alpha = check_alpha(alpha)
        self.base_layer = base_layer
        self.num_stages = num_stages
        self.ranks = ranks
        self.rank = max(ranks)
        self.alpha = float(self.rank if alpha is None else alpha)
        self.scaling = self.alpha / self.rank
        self.transposed = isinstance(base_layer, nn.ConvTranspose2d)
        self.active_stage = 0

        def make_a(rank: int) -> nn.Module:
            if self.transposed:
                return nn.ConvTranspose2d(cin, rank, base_layer.kernel_size, base_layer.stride, base_layer.padding,
                                          base_layer.output_padding, bias=False, dilation=base_layer.dilation)
            return nn.Conv2d(cin, rank, base_layer.kernel_size, base_layer.stride, base_layer.padding,
                             base_layer.dilation, bias=False, padding_mode=base_layer.padding_mode)

        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.ModuleDict({str(k): make_a(ranks[k]).to(**factory) for k in range(num_stages)})
        self.lora_B = nn.ModuleDict({str(k): nn.Conv2d(ranks[k], cout, 1, bias=False).to(**factory)
                                     for k in range(num_stages)})
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        for k in range(self.num_stages):
            nn.init.kaiming_uniform_(self.lora_A[str(k)].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[str(k)].weight)

    @property
    def in_channels(self) -> int:
        return self.base_layer.in_channels

    @property
    def out_channels(self) -> int:
        return self.base_layer.out_channels

    def freeze_base(self) -> None:
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    def delta_weight(self, stage: int) -> torch.Tensor:
        """``s·B_k·A_k`` in the base weight's shape (``A_k`` flattened to rank × Ci·kh·kw)."""
        stage = check_stage(stage, self.num_stages)
        a = self.lora_A[str(stage)].weight
        b = self.lora_B[str(stage)].weight[:, :, 0, 0]
        if self.transposed:  # weights are (Ci, Co, kh, kw); A is (Ci, r, kh, kw)
            return self.scaling * torch.einsum("ijhw,oj->iohw", a, b)
        return self.scaling * (b @ a.flatten(1)).view_as(self.base_layer.weight)

    def merged_weight(self, stage: int) -> torch.Tensor:
        return self.base_layer.weight + self.delta_weight(stage)

    def forward(self, x: torch.Tensor, stage: int | None = None) -> torch.Tensor:
        stage = check_stage(self.active_stage if stage is None else stage, self.num_stages)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        update = self.lora_B[str(stage)](self.lora_A[str(stage)](x))
        return self.base_layer(x) + self.scaling * update

    @property
    def uniform_rank(self) -> bool:
        return len(set(self.ranks)) == 1

    def extra_repr(self) -> str:
        ranks = f"rank={self.rank}" if self.uniform_rank else f"ranks={list(self.ranks)}"
        return f"num_stages={self.num_stages}, {ranks}, alpha={self.alpha:g}"


def merged_conv(layer: LoRAConv2d, x: torch.Tensor, stage: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """One convolution with the merged weight (``layer.merged_weight(stage)``, or ``weight`` when a caller already
    holds it): the identity the fused kernels implement."""
    base = layer.base_layer
    weight = layer.merged_weight(stage) if weight is None else weight
    if layer.transposed:
        return F.conv_transpose2d(x, weight, base.bias, base.stride, base.padding, base.output_padding, 1,
                                  base.dilation)
    # nn.Conv2d's own path, so that padding_mode ('reflect', 'circular', ...) is honoured as in forward
    return base._conv_forward(x, weight, base.bias)
