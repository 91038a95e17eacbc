"""Build DUNs from a plain configuration, count their parameters, and name their parts.

A :class:`ModelConfig` is everything needed to rebuild a DUN except its operator's data (Φ, mask, kernel),
which comes from the task's files; it travels with every checkpoint as JSON.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn

from lorun_fast.reference import DUN, ISTANetPlusPhase, Operator, ResUNet

__all__ = ["BACKBONES", "ModelConfig", "build_backbone", "build_dun"]

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
