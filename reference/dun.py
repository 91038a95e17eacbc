"""The deep unfolding network (DUN) with its three parameter strategies.

Stage k (k = 0 .. K−1) of every strategy computes

    z_k = x_{k−1} − rho_k · Aᵀ(A x_{k−1} − y)        (the operator's gd_step)
    x_k = D_k(z_k)

and the strategies differ only in D_k:

- ``block``:  K independent denoisers (the full-parameter Block-K baseline);
- ``shared``: one denoiser used at every stage (weight-tied);
- ``lorun``:  one base denoiser, usually frozen, whose chosen convolutions carry one LoRA adapter per stage.

The step sizes rho_k are per stage in every strategy.
"""
from __future__ import annotations

import copy
import warnings
from fnmatch import fnmatchcase
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .lora_conv import LoRAConv2d, check_stage, max_rank
from .operators import Operator

__all__ = ["STRATEGIES", "DUN", "apply_lora", "lora_layers", "find_convolutions", "RankClampWarning"]

STRATEGIES = ("block", "shared", "lorun")


class RankClampWarning(UserWarning):
    """A requested LoRA rank was above what some layer's update can have and was lowered to it there."""


def find_convolutions(module: nn.Module, targets: Sequence[str] = ("*",)) -> list[str]:
    """Names of the Conv2d / ConvTranspose2d layers of ``module`` matching any glob in ``targets``."""
    if isinstance(targets, str):
        targets = (targets,)
    return [name for name, layer in module.named_modules()
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and name
            and any(fnmatchcase(name, pattern) for pattern in targets)]


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child, new)


def apply_lora(module: nn.Module, num_stages: int, targets: Sequence[str] = ("*",), rank: int | None = None,
               gamma: float = 10.0, alpha: float | None = None, layer_cls=LoRAConv2d,
               ranks: Mapping[str, Sequence[int]] | None = None) -> list[str]:
    """Replace the matching convolutions of ``module`` in place by ``layer_cls(conv, num_stages, ...)``.

    A ``rank`` above what a layer's update can have (``min(out, in·kh·kw)``, e.g. 1 for a 1-channel 3×3 tail) is
    clamped to it for that layer, with a :class:`RankClampWarning` naming the layers. ``ranks`` gives chosen layers
    (by name) one rank per stage instead (what ``lorun-fast compress`` writes); it must name only matching layers.
    Returns the replaced names; raises if no layer matches, so a mistyped pattern never goes unnoticed.
    """
    names = find_convolutions(module, targets)
    if not names:
        raise ValueError(f"targets: no Conv2d/ConvTranspose2d of {type(module).__name__} matches {list(targets)}")
    ranks = dict(ranks or {})
    unknown = sorted(set(ranks) - set(names))
    if unknown:
        raise ValueError(f"ranks: {unknown} are not adapted layers of {type(module).__name__}; expected some of "
                         f"{names}")
    clamped = []
    for name in names:
        conv = module.get_submodule(name)
        if name in ranks:
            try:
                _replace(module, name, layer_cls(conv, num_stages, rank=list(ranks[name]), gamma=gamma, alpha=alpha))
            except ValueError as err:
                raise ValueError(f"ranks[{name!r}]: {err}") from err
            continue
        limit = max_rank(conv)
        layer_rank = rank
        if rank is not None and not isinstance(rank, bool) and isinstance(rank, int) and rank > limit:
            layer_rank = limit
            clamped.append(f"{name} ({conv.in_channels}→{conv.out_channels} {'×'.join(map(str, conv.kernel_size))}: "
                           f"rank {limit})")
        _replace(module, name, layer_cls(conv, num_stages, rank=layer_rank, gamma=gamma, alpha=alpha))
    if clamped:
        shown = ", ".join(clamped[:6]) + (f" and {len(clamped) - 6} more" if len(clamped) > 6 else "")
        warnings.warn(f"rank {rank} is above what {len(clamped)} layer(s) can use (min(out, in·kh·kw)), clamped: "
                      f"{shown}",
                      RankClampWarning, stacklevel=2)
    return names


def lora_layers(module: nn.Module) -> list[nn.Module]:
    """The per-stage adapter layers of ``module`` (anything with ``lora_A``, ``lora_B`` and ``active_stage``)."""
    return [m for m in module.modules() if hasattr(m, "lora_A") and hasattr(m, "active_stage")]


def _reset(module: nn.Module) -> nn.Module:
    for sub in module.modules():
        if sub is not module and hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
    return module


class DUN(nn.Module):
    """A K-stage deep unfolding network over ``operator`` with one of the strategies in ``STRATEGIES``.

    ``denoiser`` is one module (``block`` copies it K times and re-initialises each copy; ``shared`` and
    ``lorun`` use it once) or, for ``block``, a sequence of K modules used as given. ``lorun`` replaces the
    convolutions matching ``targets`` with :class:`LoRAConv2d` (rank or the γ rule; ``ranks``: per-stage ranks of
    chosen layers, see :func:`apply_lora`) and, with ``freeze_base``,
    freezes every parameter of the denoiser outside the adapters. ``step_init`` defaults to the operator's
    ``default_step()``.
    """

    def __init__(self, operator: Operator, denoiser: nn.Module | Sequence[nn.Module], num_stages: int,
                 strategy: str = "lorun", *, rank: int | None = None, gamma: float = 10.0,
                 alpha: float | None = None, targets: Sequence[str] = ("*",), freeze_base: bool = True,
                 step_init: float | None = None, ranks: Mapping[str, Sequence[int]] | None = None):
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages: expected a positive int, got {num_stages!r}")
        self.operator = operator
        self.strategy = strategy
        self.num_stages = num_stages
        self.targets = tuple([targets] if isinstance(targets, str) else targets)
        if isinstance(denoiser, nn.Module):
            if strategy == "block":
                denoisers = [denoiser] + [_reset(copy.deepcopy(denoiser)) for _ in range(num_stages - 1)]
            else:
                denoisers = [denoiser]
        else:
            denoisers = list(denoiser)
            if strategy != "block" or len(denoisers) != num_stages:
                raise ValueError(f"denoiser: a sequence needs strategy 'block' and {num_stages} modules, got "
                                 f"strategy {strategy!r} and {len(denoisers)}")
        self.denoisers = nn.ModuleList(denoisers)
        self.lora_names: list[str] = []
        if strategy == "lorun":
            self.lora_names = apply_lora(self.denoisers[0], num_stages, self.targets, rank, gamma, alpha,
                                         ranks=ranks)
            if freeze_base:
                self.freeze_base()
        self.collect_adapters()
        # Per-stage activation checkpointing: keep only each stage's input for backward, recompute the rest.
        self.checkpoint_stages = False
        step = operator.default_step() if step_init is None else float(step_init)
        self.rho = nn.Parameter(torch.full((num_stages,), step))

    @classmethod
    def lorun_from(cls, shared: "DUN", *, rank: int | None = None, gamma: float = 10.0, alpha: float | None = None,
                   targets: Sequence[str] | None = None, freeze_base: bool = True,
                   ranks: Mapping[str, Sequence[int]] | None = None) -> "DUN":
        """Phase 2 of LoRun: a ``lorun`` DUN whose base is a copy of a trained ``shared`` DUN's denoiser and
        whose step sizes start at the shared ones. With B = 0 it computes exactly what ``shared`` computes."""
        if shared.strategy != "shared":
            raise ValueError(f"shared: expected a DUN with strategy 'shared', got {shared.strategy!r}")
        model = cls(copy.deepcopy(shared.operator), copy.deepcopy(shared.denoisers[0]), shared.num_stages, "lorun",
                    rank=rank, gamma=gamma, alpha=alpha, targets=targets or shared.targets, freeze_base=freeze_base,
                    ranks=ranks)
        # a copy of shared.rho keeps its dtype: copying into the float32 default rounds a float64 step size
        model.rho = nn.Parameter(shared.rho.detach().clone())
        return model.to(shared.rho.device)

    def collect_adapters(self) -> None:
        """Find the per-stage adapter layers again (after layers were swapped, e.g. for their fast siblings)."""
        self._lora = lora_layers(self.denoisers[0]) if self.strategy == "lorun" else []

    def freeze_base(self) -> None:
        """Freeze everything of the denoiser except the adapters (the step sizes stay trainable)."""
        for name, p in self.denoisers[0].named_parameters():
            if ".lora_A." not in f".{name}" and ".lora_B." not in f".{name}":
                p.requires_grad_(False)

    def denoiser(self, stage: int) -> nn.Module:
        """The PMM of ``stage``, with its adapters selected for ``lorun``."""
        stage = check_stage(stage, self.num_stages)
        if self.strategy == "block":
            return self.denoisers[stage]
        for layer in self._lora:
            # A plain attribute, written past nn.Module.__setattr__ (about 1 µs per layer and stage, a visible share
            # of a small DUN's inference on a CPU).
            layer.__dict__["active_stage"] = stage
        return self.denoisers[0]

    def stage(self, x: torch.Tensor, y: torch.Tensor, stage: int) -> torch.Tensor:
        """One DUN stage: gradient step, then the stage's denoiser."""
        z = self.operator.gd_step(x, y, self.rho[stage].to(x.dtype))
        return self.denoiser(stage)(z)

    def forward(self, y: torch.Tensor, size: tuple[int, int] | None = None,
                return_all: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Reconstruct from measurements ``y``; ``size`` is the image's (H, W) (default: the operator's)."""
        self._check_inputs(y, size)
        x = self.operator.init(y, size)
        outputs = []
        for k in range(self.num_stages):
            if self.checkpoint_stages and torch.is_grad_enabled():
                x = checkpoint(self.stage, x, y, k, use_reentrant=False)
            else:
                x = self.stage(x, y, k)
            outputs.append(x)
        return outputs if return_all else x

    def _check_inputs(self, y, size) -> None:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y: expected a torch.Tensor, got {type(y).__name__}")
        if not y.is_floating_point():
            raise TypeError(f"y: expected a floating-point measurement, got {y.dtype}")
        if y.dtype != self.rho.dtype and not torch.is_autocast_enabled():
            raise TypeError(f"y: dtype {y.dtype} does not match the model's parameters ({self.rho.dtype}); convert "
                            f"one of them (y.to({self.rho.dtype}) or model.to({y.dtype}))")
        if y.device != self.rho.device:
            raise ValueError(f"y: on {y.device}, but the model is on {self.rho.device}")
        if size is not None:
            if (not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
                raise ValueError(f"size: expected (H, W), two positive ints, got {size!r}")

    def parameter_counts(self) -> dict:
        """Total and trainable parameters, the part shared by all stages, and what each stage adds alone."""
        per_stage = [1] * self.num_stages  # rho_k
        shared = 0
        for name, p in self.denoisers.named_parameters():
            index, _, rest = name.partition(".")
            if self.strategy == "block":
                per_stage[int(index)] += p.numel()
            elif self.strategy == "lorun" and (".lora_A." in f".{rest}" or ".lora_B." in f".{rest}"):
                stage = int(rest.split(".lora_")[1].split(".")[1])
                per_stage[stage] += p.numel()
            else:
                shared += p.numel()
        return {
            "total": sum(p.numel() for p in self.parameters()),
            "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "shared": shared,
            "per_stage": per_stage,
        }

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, num_stages={self.num_stages}"
