"""Adaptive rank: compress an adapter set by truncated SVD, per layer and stage.

Each adapter's update is the matrix ``ΔW_k = s·B_k·A_k`` (Co × Ci·kh·kw; for a transposed convolution the same
product with A read as r × Ci·kh·kw). Its SVD ``U Σ Vᵀ`` truncated to r' singular values is the closest rank-r'
update in the Frobenius norm, and it is again an adapter: ``B'_k = U_{r'} Σ_{r'}^{1/2}``,
``A'_k = Σ_{r'}^{1/2} V_{r'}ᵀ`` with scale 1. Two ways to choose r' for every layer and stage:

- ``energy``: the smallest r' ≥ 1 whose singular values keep that fraction of ``‖ΔW_k‖²_F`` (Σσ_i²);
- ``budget``: a total number of LoRA parameters, spent greedily across all layers and stages: every adapter starts
  at rank 1, then the next singular value that removes the most squared error per parameter it costs
  (σ²/(Co + Ci·kh·kw)) is added, until the next one does not fit.

Ranks never exceed the source's (a product of rank r has at most r non-zero singular values). Step sizes and
per-stage base parameters are copied unchanged; the result is an adapter file for the same base, with its per-stage
ranks in the config (``ModelConfig.ranks``), which loading, the reference layer, ``FusedLoRunConv`` and the fused
kernel all accept.
"""
from __future__ import annotations

import dataclasses
import heapq
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorun_fast.models import ModelConfig, build_backbone
from lorun_fast.reference import find_convolutions
from lorun_fast.reference.lora_conv import check_ranks

__all__ = ["AdapterSpectrum", "spectra", "file_spectra", "choose_ranks", "compress_tensors", "compress_file",
           "lora_parameters"]

_PREFIX = "denoisers.0."


@dataclass
class AdapterSpectrum:
    """One adapter (layer, stage): its update's singular values and factors, and what a rank costs."""

    layer: str
    stage: int
    transposed: bool
    a_shape: tuple[int, ...]      # the source A's shape (its rank axis is 0, or 1 when transposed)
    out_channels: int
    u: torch.Tensor               # Co × r, float64
    sigma: torch.Tensor           # r, descending
    vh: torch.Tensor              # r × Ci·kh·kw

    @property
    def cost_per_rank(self) -> int:
        """Parameters one rank adds: a column of B (Co) and a row of A (Ci·kh·kw)."""
        return self.out_channels + self.vh.shape[1]

    def rank_for_energy(self, energy: float) -> int:
        power = self.sigma.square()
        total = float(power.sum())
        if total == 0.0:
            return 1
        kept = torch.cumsum(power, 0) / total
        # the smallest r whose kept fraction reaches energy (a tiny slack for rounding in the cumulative sum)
        return max(1, min(len(power), int((kept < energy - 1e-12).sum()) + 1))

    def energy_kept(self, rank: int) -> float:
        power = self.sigma.square()
        total = float(power.sum())
        return 1.0 if total == 0.0 else float(power[:rank].sum()) / total


def _layer_kinds(config: ModelConfig) -> dict[str, nn.Module]:
    """The adapted convolutions of the config's backbone by name (a skeleton: shapes and kinds, no weights)."""
    backbone = build_backbone(config.backbone, **config.backbone_kwargs)
    return {name: backbone.get_submodule(name) for name in find_convolutions(backbone, config.targets)}


def spectra(tensors: dict[str, torch.Tensor], config: ModelConfig) -> list[AdapterSpectrum]:
    """The SVD of every adapter's ``s·B_k·A_k`` in an adapter set (``tensors`` by parameter name, ``config`` its
    ModelConfig), in float64."""
    if config.strategy != "lorun":
        raise ValueError(f"adapters: expected a 'lorun' adapter set, got strategy {config.strategy!r}")

    def tensor(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ValueError(f"adapters: no tensor {name!r}, which the config's adapted layers need")
        return tensors[name]

    result = []
    for name, conv in _layer_kinds(config).items():
        transposed = isinstance(conv, nn.ConvTranspose2d)
        ranks = [tensor(f"{_PREFIX}{name}.lora_A.{k}.weight").shape[1 if transposed else 0]
                 for k in range(config.num_stages)]
        try:
            check_ranks(ranks, conv, config.num_stages)
        except ValueError as err:
            raise ValueError(f"adapters: layer {name!r}: {err}") from err
        # the layer's scale: alpha over its largest rank (alpha defaults to that rank, s = 1)
        scaling = (max(ranks) if config.alpha is None else config.alpha) / max(ranks)
        for k in range(config.num_stages):
            a = tensor(f"{_PREFIX}{name}.lora_A.{k}.weight").double()
            b = tensor(f"{_PREFIX}{name}.lora_B.{k}.weight").double()
            rank = ranks[k]
            if b.shape[1] != rank:
                raise ValueError(f"adapters: layer {name!r} stage {k}: lora_B has rank {b.shape[1]}, lora_A {rank}")
            a_rows = a.transpose(0, 1).reshape(rank, -1) if transposed else a.reshape(rank, -1)
            delta = scaling * (b.reshape(b.shape[0], rank) @ a_rows)
            u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
            result.append(AdapterSpectrum(name, k, transposed, tuple(a.shape), b.shape[0], u[:, :rank],
                                          sigma[:rank], vh[:rank]))
    return result


def lora_parameters(items: list[AdapterSpectrum], ranks: dict[tuple[str, int], int] | None = None) -> int:
    """LoRA parameters (A and B) of the adapters at ``ranks`` (default: their own)."""
    return sum((len(s.sigma) if ranks is None else ranks[(s.layer, s.stage)]) * s.cost_per_rank for s in items)


def file_spectra(path) -> tuple[dict[str, str], dict[str, torch.Tensor], ModelConfig, list[AdapterSpectrum]]:
    """Metadata, tensors, config and :func:`spectra` of an adapter file."""
    from lorun_fast.checkpoints import KIND_KEY, _config_from, read_header

    metadata, tensors = read_header(path)
    if metadata.get(KIND_KEY) != "adapters":
        raise ValueError(f"adapters: {path} is a {metadata.get(KIND_KEY, 'model')!r} file, not an adapter set")
    config = _config_from(path, metadata)
    return metadata, tensors, config, spectra(tensors, config)


def choose_ranks(items: list[AdapterSpectrum], *, energy: float | None = None,
                 budget: int | None = None) -> dict[tuple[str, int], int]:
    """A rank per (layer, stage): by ``energy`` kept per adapter, or by a global parameter ``budget``."""
    if (energy is None) == (budget is None):
        raise ValueError("choose_ranks: give exactly one of energy and budget")
    if energy is not None:
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
            raise ValueError(f"energy: expected a fraction in (0, 1], got {energy!r}")
        return {(s.layer, s.stage): s.rank_for_energy(float(energy)) for s in items}
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget: expected a positive number of parameters, got {budget!r}")
    ranks = {(s.layer, s.stage): 1 for s in items}
    floor = lora_parameters(items, ranks)
    if budget < floor:
        raise ValueError(f"budget: {budget:,} parameters is below the {floor:,} that rank 1 in every adapter needs "
                         f"({len(items)} adapters)")
    spent = floor
    # a max-heap of (σ²/cost) for each adapter's next singular value
    heap = [(-float(s.sigma[1]) ** 2 / s.cost_per_rank, i) for i, s in enumerate(items) if len(s.sigma) > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        s = items[i]
        key = (s.layer, s.stage)
        if spent + s.cost_per_rank > budget:
            continue  # a cheaper adapter's next value may still fit
        ranks[key] += 1
        spent += s.cost_per_rank
        if ranks[key] < len(s.sigma):
            heapq.heappush(heap, (-float(s.sigma[ranks[key]]) ** 2 / s.cost_per_rank, i))
    return ranks


def compress_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig, ranks: dict[tuple[str, int], int],
                     items: list[AdapterSpectrum] | None = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The adapter set truncated to ``ranks``, and its config (per-stage ranks, scale 1)."""
    items = spectra(tensors, config) if items is None else items
    out = dict(tensors)
    layer_ranks: dict[str, list[int]] = {}
    for s in items:
        rank = ranks[(s.layer, s.stage)]
        root = s.sigma[:rank].sqrt()
        b = (s.u[:, :rank] * root).reshape(s.out_channels, rank, 1, 1)
        a_rows = root[:, None] * s.vh[:rank]
        if s.transposed:  # A is (Ci, r, kh, kw)
            ci, _, kh, kw = s.a_shape
            a = a_rows.reshape(rank, ci, kh, kw).transpose(0, 1)
        else:
            _, ci, kh, kw = s.a_shape
            a = a_rows.reshape(rank, ci, kh, kw)
        dtype = tensors[f"{_PREFIX}{s.layer}.lora_A.{s.stage}.weight"].dtype
        out[f"{_PREFIX}{s.layer}.lora_A.{s.stage}.weight"] = a.to(dtype).contiguous()
        out[f"{_PREFIX}{s.layer}.lora_B.{s.stage}.weight"] = b.to(dtype).contiguous()
        layer_ranks.setdefault(s.layer, [0] * config.num_stages)[s.stage] = rank
    new_config = dataclasses.replace(config, ranks=layer_ranks, alpha=None)
    return out, new_config


def compress_file(adapters, out, *, energy: float | None = None, budget: int | None = None) -> dict:
    """Read an adapter file, compress it, write ``out`` (atomically; never over an existing file) and return a
    summary: parameters before and after, per-layer ranks, the smallest energy any adapter keeps."""
    from lorun_fast.checkpoints import CONFIG_KEY, _write

    adapters, out = Path(adapters), Path(out)
    metadata, tensors, config, items = file_spectra(adapters)
    if out.exists() or out.is_symlink():
        raise ValueError(f"out: {out} already exists; compress never overwrites a file, name a new one")
    source = {(s.layer, s.stage): len(s.sigma) for s in items}
    ranks = choose_ranks(items, energy=energy, budget=budget)
    new_tensors, new_config = compress_tensors(tensors, config, ranks, items)
    new_metadata = dict(metadata)
    new_metadata[CONFIG_KEY] = json.dumps(new_config.to_dict())
    _write(new_tensors, out, new_metadata)
    return {
        "lora_parameters_before": lora_parameters(items),
        "lora_parameters_after": lora_parameters(items, ranks),
        "adapter_parameters_before": sum(t.numel() for t in tensors.values()),
        "adapter_parameters_after": sum(t.numel() for t in new_tensors.values()),
        "ranks": new_config.ranks,
        "source_ranks": {layer: [source[(layer, k)] for k in range(config.num_stages)]
                         for layer in new_config.ranks},
        "min_energy_kept": min((s.energy_kept(ranks[(s.layer, s.stage)]) for s in items), default=1.0),
        "frobenius_error": math.sqrt(sum(float(s.sigma[ranks[(s.layer, s.stage)]:].square().sum()) for s in items)),
    }
