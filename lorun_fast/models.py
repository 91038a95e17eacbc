"""Build DUNs from a plain configuration, count their parameters, and name their parts.

A :class:`ModelConfig` is everything needed to rebuild a DUN except its operator's data (Φ, mask, kernel),
which comes from the task's files; it travels with every checkpoint as JSON.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from lorun_fast.fused_conv import FusedLoRunConv
from lorun_fast.reference import DUN, ISTANetPlusPhase, LoRAConv2d, Operator, ResBlock, ResUNet

__all__ = ["BACKBONES", "ModelConfig", "build_backbone", "build_dun", "FusedResBlock", "to_fast", "to_reference"]

BACKBONES = {"resunet": ResUNet, "ista_net_plus": ISTANetPlusPhase}


@dataclass
class ModelConfig:
    """A DUN's shape: strategy, stages, backbone (name + keyword arguments) and the LoRA settings."""

    strategy: str = "lorun"
    num_stages: int = 9
    backbone: str = "resunet"
    backbone_kwargs: dict = field(default_factory=dict)
    rank: int | None = None
    gamma: float = 10.0
    alpha: float | None = None
    targets: tuple[str, ...] = ("*",)

    def __post_init__(self):
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"model config: unknown fields {unknown}; expected some of {sorted(names)}")
        return cls(**data)


def build_backbone(name: str, **kwargs) -> nn.Module:
    if name not in BACKBONES:
        raise ValueError(f"backbone: expected one of {sorted(BACKBONES)}, got {name!r}")
    return BACKBONES[name](**kwargs)


def build_dun(operator: Operator, config: ModelConfig, freeze_base: bool = True) -> DUN:
    """A fresh DUN for ``config`` over ``operator``; ``model.config`` keeps the configuration."""
    model = DUN(operator, build_backbone(config.backbone, **config.backbone_kwargs), config.num_stages,
                config.strategy, rank=config.rank, gamma=config.gamma, alpha=config.alpha, targets=config.targets,
                freeze_base=freeze_base)
    model.config = config
    return model


class FusedResBlock(ResBlock):
    """A residual block whose two convolutions run as one fused call each: ReLU in the first one's epilogue, the
    skip connection in the second one's (when both are :class:`FusedLoRunConv`; plain otherwise)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.conv1, FusedLoRunConv) and isinstance(self.conv2, FusedLoRunConv):
            return self.conv2(self.conv1(x, relu=True), residual=x)
        return super().forward(x)


def _swap_modules(model: nn.Module, convert) -> None:
    """Replace every submodule ``m`` for which ``convert(m)`` returns a module (parents before children)."""
    for name, module in list(model.named_modules()):
        new = convert(module)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _with_class(module: nn.Module, cls: type) -> nn.Module:
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


def to_fast(model: DUN, backend: str = "auto", input_precision: str = "tf32") -> DUN:
    """A copy of a reference ``lorun`` DUN built on :class:`FusedLoRunConv` (same parameters and names, so the
    same state dict), with fused residual blocks. ``backend="reference"`` computes exactly what the input does."""
    fast = copy.deepcopy(model)

    def convert(module):
        if type(module) is LoRAConv2d:
            return FusedLoRunConv.from_lora(module, backend=backend, input_precision=input_precision)
        if type(module) is ResBlock:
            return _with_class(module, FusedResBlock)
        return None

    _swap_modules(fast, convert)
    fast.collect_adapters()
    return fast


def to_reference(model: DUN) -> DUN:
    """The inverse of :func:`to_fast`: a copy built on the reference LoRA layers and residual blocks."""
    reference = copy.deepcopy(model)

    def convert(module):
        if isinstance(module, FusedLoRunConv):
            return module.to_reference()
        if type(module) is FusedResBlock:
            return _with_class(module, ResBlock)
        return None

    _swap_modules(reference, convert)
    reference.collect_adapters()
    return reference
