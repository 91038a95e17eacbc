"""Build DUNs from a plain configuration, count their parameters, and name their parts.

A :class:`ModelConfig` is everything needed to rebuild a DUN except its operator's data (Φ, mask, kernel),
which comes from the task's files; it travels with every checkpoint as JSON.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from lorun_fast.lora_conv import FusedLoRunConv, check_merged_caches, clear_merged_checks
from lorun_fast.operators import fast_operator, has_fast_sibling, reference_operator
from lorun_fast.reference import DUN, ISTANetPlusPhase, LoRAConv2d, Operator, ResBlock, ResUNet

__all__ = ["BACKBONES", "ModelConfig", "build_backbone", "build_dun", "FusedResBlock", "to_fast", "to_reference",
           "StageOffset", "StagedDUN", "make_per_stage", "lorun_from", "base_of", "shared_from_block",
           "is_adapter_parameter", "adapter_state", "base_state"]

BACKBONES = {"resunet": ResUNet, "ista_net_plus": ISTANetPlusPhase}


def dataclass_from_dict(cls, data: dict, label: str):
    """``cls(**data)`` after checking that ``data`` names only fields of the dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{label}: unknown fields {unknown}; expected some of {sorted(names)}")
    return cls(**data)


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
    #: ``lorun`` only: names of parameters of the base denoiser (e.g. ISTA-Net+'s ``soft_thr``) that become per
    #: stage, as ``base value + delta_k`` with trainable ``delta_k`` starting at zero (see :func:`make_per_stage`)
    per_stage: tuple[str, ...] = ()
    #: ``lorun`` only: one rank per stage for chosen layers (name → K ranks), overriding ``rank``/``gamma`` there;
    #: written by ``lorun-fast compress``
    ranks: dict = field(default_factory=dict)

    def __post_init__(self):
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        self.per_stage = (self.per_stage,) if isinstance(self.per_stage, str) else tuple(self.per_stage)
        if self.per_stage and self.strategy != "lorun":
            raise ValueError(f"per_stage: only the 'lorun' strategy has per-stage base parameters, got strategy "
                             f"{self.strategy!r} with per_stage {list(self.per_stage)}")
        if not isinstance(self.ranks, dict):
            raise ValueError(f"ranks: expected a dict of layer name → per-stage ranks, got {type(self.ranks).__name__}")
        if self.ranks and self.strategy != "lorun":
            raise ValueError(f"ranks: only the 'lorun' strategy has adapters, got strategy {self.strategy!r}")
        for name, stage_ranks in self.ranks.items():
            if (not isinstance(stage_ranks, (list, tuple)) or len(stage_ranks) != self.num_stages
                    or not all(type(r) is int and r >= 1 for r in stage_ranks)):
                raise ValueError(f"ranks[{name!r}]: expected {self.num_stages} positive ints (one per stage), got "
                                 f"{stage_ranks!r}")
        self.ranks = {name: list(stage_ranks) for name, stage_ranks in self.ranks.items()}

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["targets"] = list(self.targets)
        data["per_stage"] = list(self.per_stage)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return dataclass_from_dict(cls, data, "model config")


def build_backbone(name: str, **kwargs) -> nn.Module:
    if name not in BACKBONES:
        raise ValueError(f"backbone: expected one of {sorted(BACKBONES)}, got {name!r}")
    return BACKBONES[name](**kwargs)


class StageOffset(nn.Module):
    """A parametrization making one base parameter per stage: at stage k it is ``original + delta[k]``.

    ``delta`` (K × the parameter's shape) starts at zero, so every stage starts exactly at the base value, as the
    LoRA adapters do; the original stays part of the (frozen) base.
    """

    def __init__(self, num_stages: int, like: torch.Tensor):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros((num_stages, *like.shape), dtype=like.dtype, device=like.device))
        self.active_stage = 0

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original + self.delta[self.active_stage].to(original.dtype)


class StagedDUN(DUN):
    """The reference :class:`DUN` plus per-stage base parameters (:class:`StageOffset`) for ``lorun``.

    Without offsets it computes exactly what ``DUN`` computes; :func:`build_dun` always builds this class.
    """

    def collect_adapters(self) -> None:
        super().collect_adapters()
        self._offsets = ([m for m in self.denoisers[0].modules() if isinstance(m, StageOffset)]
                         if self.strategy == "lorun" else [])
        self._fused_layers = [m for m in self._lora if isinstance(m, FusedLoRunConv)]

    def forward(self, y: torch.Tensor, size: tuple[int, int] | None = None,
                return_all: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """:meth:`DUN.forward`. Without gradients, the fused layers' cached merged weights are checked once for the
        whole forward instead of at every layer call (``check_merged_caches``); the checks end with the forward."""
        layers = getattr(self, "_fused_layers", ())  # absent from a model pickled before it existed
        if not layers or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return super().forward(y, size, return_all)
        checked = check_merged_caches(layers)
        try:
            return super().forward(y, size, return_all)
        finally:
            clear_merged_checks(checked)

    def freeze_base(self) -> None:
        super().freeze_base()
        for module in getattr(self, "_offsets", []):
            module.delta.requires_grad_(True)

    def denoiser(self, stage: int) -> nn.Module:
        module = super().denoiser(stage)  # checks the stage
        for offset in self._offsets:
            offset.__dict__["active_stage"] = int(stage)  # past nn.Module.__setattr__, as DUN.denoiser does
        return module

    def parameter_counts(self) -> dict:
        counts = super().parameter_counts()
        for name, p in self.denoisers[0].named_parameters():
            if _is_offset(name):
                counts["shared"] -= p.numel()
                for k in range(self.num_stages):
                    counts["per_stage"][k] += p[k].numel()
        return counts


def _is_offset(name: str) -> bool:
    return ".parametrizations." in f".{name}" and name.endswith(".delta")


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name of a ``lorun`` DUN belongs to the adapter set (LoRA A/B, ``rho``, per-stage
    offsets) rather than to the shared base."""
    return name == "rho" or ".lora_A." in f".{name}" or ".lora_B." in f".{name}" or _is_offset(name)


def make_per_stage(model: DUN, names) -> list[str]:
    """Turn the named parameters of ``model``'s base denoiser into per-stage ones (``base + delta_k``).

    Names are relative to the denoiser (``"soft_thr"``, ``"head.bias"``); errors list the valid names.
    """
    if model.strategy != "lorun":
        raise ValueError(f"per_stage: needs a 'lorun' DUN, got strategy {model.strategy!r}")
    denoiser = model.denoisers[0]
    done = []
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        valid = sorted(n for n, _ in denoiser.named_parameters() if not is_adapter_parameter(n)
                       and ".parametrizations." not in f".{n}")
        try:
            owner = denoiser.get_submodule(owner_name) if owner_name else denoiser
        except AttributeError:
            owner = None
        if owner is None or attr not in owner._parameters or isinstance(owner, LoRAConv2d) \
                or ".lora_" in f".{owner_name}.":
            raise ValueError(f"per_stage: {name!r} is not a base parameter of the {type(denoiser).__name__} "
                             f"denoiser; expected one of {valid}")
        base = getattr(owner, attr)
        parametrize.register_parametrization(owner, attr, StageOffset(model.num_stages, base.detach()))
        owner.parametrizations[attr].original.requires_grad_(base.requires_grad)
        done.append(name)
    model.collect_adapters()
    return done


def build_dun(operator: Operator, config: ModelConfig, freeze_base: bool = True) -> DUN:
    """A fresh DUN for ``config`` over ``operator``; ``model.config`` keeps the configuration."""
    model = StagedDUN(operator, build_backbone(config.backbone, **config.backbone_kwargs), config.num_stages,
                      config.strategy, rank=config.rank, gamma=config.gamma, alpha=config.alpha,
                      targets=config.targets, freeze_base=freeze_base, ranks=config.ranks)
    if config.per_stage:
        make_per_stage(model, config.per_stage)
    model.config = config
    return model


def lorun_from(shared: DUN, *, rank: int | None = None, gamma: float = 10.0, alpha: float | None = None,
               targets=None, per_stage=(), freeze_base: bool = True, ranks: dict | None = None) -> StagedDUN:
    """Phase 2 of LoRun: a ``lorun`` DUN on a copy of the ``shared`` DUN's denoiser (frozen with
    ``freeze_base``), its step sizes starting at the shared ones, ``per_stage`` base parameters made per stage,
    ``ranks`` per-stage ranks of chosen layers. At the start (B = 0, offsets 0) it computes exactly what ``shared``
    computes. Adapter A matrices are drawn from torch's global generator: seed it for a reproducible start."""
    model = StagedDUN.lorun_from(shared, rank=rank, gamma=gamma, alpha=alpha, targets=targets,
                                 freeze_base=freeze_base, ranks=ranks)
    base_config = getattr(shared, "config", None)
    backbone, kwargs = _backbone_of(shared.denoisers[0], base_config)
    model.config = ModelConfig(strategy="lorun", num_stages=shared.num_stages, backbone=backbone,
                               backbone_kwargs=kwargs, rank=rank, gamma=gamma, alpha=alpha,
                               targets=tuple(model.targets), per_stage=tuple(per_stage), ranks=dict(ranks or {}))
    if per_stage:
        make_per_stage(model, per_stage)
    return model


def _backbone_of(denoiser: nn.Module, config: ModelConfig | None) -> tuple[str, dict]:
    if config is not None:
        return config.backbone, dict(config.backbone_kwargs)
    for name, cls in BACKBONES.items():
        if type(denoiser) is cls:
            return name, {}
    raise ValueError(f"shared: cannot tell the backbone of a {type(denoiser).__name__} without a ModelConfig")


def _base_name(name: str) -> str | None:
    """A lorun denoiser's parameter name as the plain denoiser names it (None for adapter parameters)."""
    if is_adapter_parameter(name):
        return None
    name = name.replace(".base_layer.", ".")
    return re.sub(r"(^|\.)parametrizations\.(\w+)\.original$", r"\1\2", name)


def _strip_adapters(model: DUN) -> nn.Module:
    """A fresh plain denoiser holding the base weights of a lorun DUN (no adapters, offsets at zero)."""
    backbone, kwargs = _backbone_of(model.denoisers[0], getattr(model, "config", None))
    plain = build_backbone(backbone, **kwargs).to(model.rho.device, model.rho.dtype)
    state = {}
    for name, p in model.denoisers[0].named_parameters():
        base = _base_name(name)
        if base is not None:
            state[base] = p.detach()
    plain.load_state_dict(state, strict=True)
    return plain


def base_of(model: DUN) -> StagedDUN:
    """The shared base of a ``lorun`` DUN as a complete ``shared`` DUN (denoiser without adapters or offsets,
    the lorun model's step sizes); a ``shared`` DUN is returned as a copy."""
    config = getattr(model, "config", None)
    if model.strategy == "shared":
        return copy.deepcopy(model)
    if model.strategy != "lorun":
        raise ValueError(f"model: a {model.strategy!r} DUN has no shared base; use shared_from_block")
    backbone, kwargs = _backbone_of(model.denoisers[0], config)
    shared = StagedDUN(copy.deepcopy(model.operator), _strip_adapters(model), model.num_stages,
                       "shared", targets=model.targets)
    shared.rho = nn.Parameter(model.rho.detach().clone())
    for p in shared.parameters():
        p.requires_grad_(True)
    shared.config = ModelConfig(strategy="shared", num_stages=model.num_stages, backbone=backbone,
                                backbone_kwargs=kwargs, targets=tuple(model.targets))
    return shared


def shared_from_block(block: DUN, phase: int, num_stages: int | None = None) -> StagedDUN:
    """A ``shared`` DUN whose one denoiser is stage ``phase`` of a ``block`` DUN (e.g. one phase of the published
    ISTA-Net+), every step size starting at that stage's."""
    if block.strategy != "block":
        raise ValueError(f"block: expected a 'block' DUN, got strategy {block.strategy!r}")
    if isinstance(phase, bool) or not isinstance(phase, int) or not 0 <= phase < block.num_stages:
        raise ValueError(f"phase: expected an int in [0, {block.num_stages}), got {phase!r}")
    num_stages = block.num_stages if num_stages is None else num_stages
    backbone, kwargs = _backbone_of(block.denoisers[phase], getattr(block, "config", None))
    shared = StagedDUN(copy.deepcopy(block.operator), copy.deepcopy(block.denoisers[phase]), num_stages, "shared",
                       step_init=0.0)
    with torch.no_grad():
        shared.rho.fill_(float(block.rho[phase]))
    shared.config = ModelConfig(strategy="shared", num_stages=num_stages, backbone=backbone, backbone_kwargs=kwargs)
    return shared


def adapter_state(model: DUN) -> dict[str, torch.Tensor]:
    """The adapter set of a ``lorun`` DUN by parameter name: LoRA A/B of every stage, ``rho``, per-stage offsets."""
    if model.strategy != "lorun":
        raise ValueError(f"model: only a 'lorun' DUN has adapters, got strategy {model.strategy!r}")
    return {name: p.detach() for name, p in model.named_parameters() if is_adapter_parameter(name)}


def base_state(model: DUN) -> dict[str, torch.Tensor]:
    """The base denoiser's parameters under the names a ``shared`` DUN gives them (no rho)."""
    return {name: p.detach() for name, p in base_of(model).named_parameters() if name != "rho"}


class FusedResBlock(ResBlock):
    """A residual block whose two convolutions run as one fused call each: ReLU in the first one's epilogue, the
    skip connection in the second one's (when both are :class:`FusedLoRunConv`; plain otherwise)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv1, conv2 = self._modules["conv1"], self._modules["conv2"]  # past nn.Module's slow attribute lookup
        if isinstance(conv1, FusedLoRunConv) and isinstance(conv2, FusedLoRunConv):
            return conv2(conv1(x, relu=True), residual=x)
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


def _check_dun(model) -> None:
    if not isinstance(model, DUN):
        raise TypeError(f"model: expected a DUN (lorun_fast.reference.DUN, e.g. from build_dun), got "
                        f"{type(model).__name__}; for a single convolution use FusedLoRunConv.from_conv")


def to_fast(model: DUN, backend: str = "auto", input_precision: str = "tf32") -> DUN:
    """A copy of a reference ``lorun`` DUN built on :class:`FusedLoRunConv` (same parameters and names, so the
    same state dict), with fused residual blocks and the operator's fused gradient step.

    ``backend`` is the convolutions' (see ``FusedLoRunConv``; ``triton`` forces the kernel on the layers it covers
    and leaves the others merged); the gradient step follows it: fused kernels for
    ``auto`` (on CUDA) and ``triton``, the reference step for ``merged`` and ``reference``. With
    ``backend="reference"`` the copy computes exactly what the input does.
    """
    _check_dun(model)
    fast = copy.deepcopy(model)
    step_backend = backend if backend in ("auto", "triton") else "reference"
    if has_fast_sibling(fast.operator):
        fast.operator = fast_operator(fast.operator, backend=step_backend, input_precision=input_precision)

    def convert(module):
        if type(module) is LoRAConv2d:
            # "triton" forces the kernel where it applies; the 2×2 down/up layers it does not cover stay merged.
            layer = FusedLoRunConv.from_lora(module, backend="auto" if backend == "triton" else backend,
                                             input_precision=input_precision)
            if backend == "triton":
                layer.backend = "triton" if layer.triton_supported else "merged"
            return layer
        if type(module) is ResBlock:
            return _with_class(module, FusedResBlock)
        return None

    _swap_modules(fast, convert)
    fast.collect_adapters()
    return fast


def to_reference(model: DUN) -> DUN:
    """The inverse of :func:`to_fast`: a copy built on the reference LoRA layers, residual blocks and operator."""
    _check_dun(model)
    reference = copy.deepcopy(model)
    if has_fast_sibling(reference.operator):
        reference.operator = reference_operator(reference.operator)

    def convert(module):
        if isinstance(module, FusedLoRunConv):
            return module.to_reference()
        if type(module) is FusedResBlock:
            return _with_class(module, ResBlock)
        return None

    _swap_modules(reference, convert)
    reference.collect_adapters()
    return reference
