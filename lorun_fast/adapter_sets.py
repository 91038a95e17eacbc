"""One frozen base serving several adapter sets in one batch: each sample names its set (and so its operator).

A LoRun adapter set is small (per-stage LoRA factors, step sizes, per-stage thresholds) beside the base it was trained
on, so one base can carry many: one per CS ratio, per task, per user. :class:`AdapterSets` runs a batch whose samples
use different sets, as punica and S-LoRA serve LLM adapters, for DUN stages and convolutions:

    sets = AdapterSets.load("run/base.safetensors", {"cs10": "a10.safetensors", "cs25": "a25.safetensors"})
    x = sets([y0, y1, y2], adapters=["cs25", "cs10", "cs25"], size=(256, 256))

- ``reference`` (the ground truth): a loop over the sets present, each set's own DUN on its samples.
- ``forward``: one pass per stage over the whole batch. The samples are ordered by set; the gradient step runs with
  each sample's own Φ and ρ_k (block CS on the kernel path: one ``gd_step_cs_indexed`` launch with a per-sample Φ
  index; otherwise each set's step on its samples); then one denoiser pass whose LoRA layers get a per-image
  adapter index (set g, stage k → virtual stage g·K + k of a layer holding every set's adapters): the fused kernel
  serves the batch in one launch with a per-sample weight index, and the merged fallback (CPU) convolves each set's
  images with that set's merged weight. Sets with per-stage base parameters (e.g. ISTA-Net+'s θ_k) run the
  denoiser set by set instead, since those parameters are not per sample.

The base is held once: the sets' own DUNs (what ``reference`` runs) use the combined denoiser's base tensors. The
combined layers hold copies of the sets' adapters and step sizes: ``forward`` is for serving (its gradients reach
those copies, not the sets' own models).

Measurements come as a list (one tensor per sample, as its set's operator makes them for a batch of one; sizes may
differ between sets, e.g. CS at different ratios) or as one batch when they share a shape. All samples share one
image size.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from lorun_fast.lora_conv import FusedLoRunConv
from lorun_fast.models import StageOffset, base_state, is_adapter_parameter
from lorun_fast.operators import fast_operator, has_fast_sibling
from lorun_fast.reference import DUN, lora_layers

__all__ = ["AdapterSets", "load_adapter_sets", "read_manifest"]


def _check_models(models: Mapping[str, DUN]) -> list[str]:
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models: expected a non-empty mapping of adapter-set name → lorun DUN")
    names = list(models)
    for name, model in models.items():
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"models: set names must be non-empty strings without '.', got {name!r}")
        if not isinstance(model, DUN) or model.strategy != "lorun":
            raise ValueError(f"models[{name!r}]: expected a 'lorun' DUN, got "
                             f"{getattr(model, 'strategy', type(model).__name__)!r}")
    first = models[names[0]]
    base = base_state(first)
    for name in names[1:]:
        model = models[name]
        if model.num_stages != first.num_stages or model.lora_names != first.lora_names \
                or type_before_parametrizations(model.denoisers[0]) \
                is not type_before_parametrizations(first.denoisers[0]):
            raise ValueError(f"models[{name!r}]: adapters of another architecture than {names[0]!r} "
                             f"({model.num_stages} stages on {len(model.lora_names)} layers, against "
                             f"{first.num_stages} on {len(first.lora_names)})")
        other = base_state(model)
        if other.keys() != base.keys() or not all(torch.equal(other[k].to(base[k].device), base[k])
                                                     for k in base):
            raise ValueError(f"models[{name!r}]: adapters of another base than {names[0]!r}; all sets of a batch "
                             f"must share one base")
    return names


class AdapterSets(nn.Module):
    """Several adapter sets of one base, for batches whose samples each name their set (see the module doc).

    ``models`` maps set names to ``lorun`` DUNs built on the same base (:func:`load_adapter_sets` builds them from
    files). ``backend`` is the combined layers' (``FusedLoRunConv``) and the gradient steps' (as in ``to_fast``).
    """

    def __init__(self, models: Mapping[str, DUN], backend: str = "auto", input_precision: str = "tf32"):
        super().__init__()
        self.names = _check_models(models)
        self.sets = nn.ModuleDict(dict(models))
        first = models[self.names[0]]
        self.num_stages = first.num_stages
        step_backend = backend if backend in ("auto", "triton") else "reference"
        self.operators = nn.ModuleList([
            fast_operator(m.operator, backend=step_backend, input_precision=input_precision)
            if has_fast_sibling(m.operator) else m.operator for m in models.values()])
        self.rho = nn.Parameter(torch.stack([m.rho.detach() for m in models.values()]).clone())
        self.denoiser = self._combine([models[n] for n in self.names], backend, input_precision)
        self._share_base([models[n] for n in self.names])
        self._layers = [m for m in self.denoiser.modules() if isinstance(m, FusedLoRunConv)]
        self._offsets = [m for m in self.denoiser.modules() if isinstance(m, StageOffset)]
        self._measurement_shapes: dict = {}

    @classmethod
    def load(cls, base, adapters: Mapping[str, str | Path], operators: Mapping | None = None,
             backend: str = "auto", input_precision: str = "tf32") -> "AdapterSets":
        """From a base file and adapter files by set name (operators from each file's task, unless given)."""
        return cls(load_adapter_sets(base, adapters, operators), backend=backend, input_precision=input_precision)

    def _combine(self, models: list[DUN], backend: str, input_precision: str) -> nn.Module:
        """The base denoiser once, each LoRA layer holding every set's adapters as virtual stages g·K + k (scales
        folded into B, so one scale 1 serves all), each per-stage offset every set's deltas likewise."""
        k_stages = self.num_stages
        denoiser = copy.deepcopy(models[0].denoisers[0])
        names = models[0].lora_names
        per_set = [dict(zip(m.lora_names, lora_layers(m.denoisers[0]))) for m in models]
        for name in names:
            source = per_set[0][name]
            ranks = [r for layers in per_set for r in layers[name].ranks]
            # as to_fast: "triton" forces the kernel where it applies; the 2×2 down/up layers stay merged
            layer = FusedLoRunConv.from_conv(copy.deepcopy(source.base_layer), len(models) * k_stages, rank=ranks,
                                             backend="auto" if backend == "triton" else backend,
                                             input_precision=input_precision)
            if backend == "triton":
                layer.backend = "triton" if layer.triton_supported else "merged"
            with torch.no_grad():
                for g, layers in enumerate(per_set):
                    for k in range(k_stages):
                        v = str(g * k_stages + k)
                        layer.lora_A[v].weight.copy_(layers[name].lora_A[str(k)].weight)
                        layer.lora_B[v].weight.copy_(layers[name].scaling * layers[name].lora_B[str(k)].weight)
            parent_name, _, child = name.rpartition(".")
            setattr(denoiser.get_submodule(parent_name) if parent_name else denoiser, child, layer)
        offsets = [[m for m in model.denoisers[0].modules() if isinstance(m, StageOffset)] for model in models]
        for i, offset in enumerate(m for m in denoiser.modules() if isinstance(m, StageOffset)):
            offset.delta = nn.Parameter(torch.cat([found[i].delta.detach() for found in offsets]).clone())
        return denoiser

    def _share_base(self, models: list[DUN]) -> None:
        """Make every set's own DUN use the combined denoiser's base tensors (they are equal, checked above), so
        that the base is held once however many sets there are; the adapters stay each set's."""
        combined = dict(self.denoiser.named_parameters())
        for model in models:
            denoiser = model.denoisers[0]
            for name, param in list(denoiser.named_parameters()):
                if is_adapter_parameter(f"denoisers.0.{name}") or name not in combined \
                        or combined[name].shape != param.shape:
                    continue
                owner_name, _, attr = name.rpartition(".")
                owner = denoiser.get_submodule(owner_name) if owner_name else denoiser
                owner._parameters[attr] = combined[name]  # no registration: the same tensor, not a new one

    # -- inputs ------------------------------------------------------------------------------------------------
    def _prepare(self, y, adapters, size):
        if isinstance(adapters, str) or not isinstance(adapters, Sequence):
            raise TypeError(f"adapters: expected a sequence of set names (one per sample), got "
                            f"{type(adapters).__name__}")
        unknown = sorted({a for a in adapters if a not in self.names}, key=str)
        if unknown:
            raise ValueError(f"adapters: unknown adapter set(s) {unknown}; expected names from {self.names}")
        if isinstance(y, torch.Tensor):
            samples = list(y.split(1)) if y.dim() > 0 else [y]
        elif isinstance(y, (list, tuple)):
            samples = list(y)
        else:
            raise TypeError(f"y: expected a tensor batch or a list of per-sample tensors, got {type(y).__name__}")
        if len(samples) != len(adapters):
            raise ValueError(f"adapters: {len(adapters)} names for {len(samples)} samples; expected one per sample")
        if not samples:
            raise ValueError("y: expected at least one sample")
        like = self.rho
        for i, sample in enumerate(samples):
            if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
                raise TypeError(f"y[{i}]: expected a floating-point tensor, got "
                                f"{getattr(sample, 'dtype', type(sample).__name__)}")
            if sample.device != like.device or (sample.dtype != like.dtype and not torch.is_autocast_enabled()):
                raise ValueError(f"y[{i}]: {sample.dtype} on {sample.device}, but the sets are {like.dtype} on "
                                 f"{like.device}")
            if sample.dim() == 0 or sample.shape[0] != 1:
                raise ValueError(f"y[{i}]: expected one sample's measurement with a leading batch of 1, got shape "
                                 f"{tuple(sample.shape)}")
        set_of = [self.names.index(a) for a in adapters]
        if size is None:
            sizes = {tuple(self.operators[g].image_size(sample)) for g, sample in zip(set_of, samples)}
            if len(sizes) != 1:
                raise ValueError(f"size: the samples come from images of different sizes {sorted(sizes)}; a batch "
                                 f"needs one (give size, or batch them apart)")
            size = sizes.pop()
        for g in sorted(set(set_of)):
            key = (g, tuple(size), like.dtype, like.device)
            if key not in self._measurement_shapes:  # the shape A gives a 1-image batch of this size
                probe = torch.zeros((1, self._channels(), *size), dtype=like.dtype, device=like.device)
                with torch.no_grad():
                    self._measurement_shapes[key] = tuple(self.operators[g].A(probe).shape)
            expected = self._measurement_shapes[key]
            for i, sample in enumerate(samples):
                if set_of[i] == g and tuple(sample.shape) != expected:
                    raise ValueError(f"y[{i}]: shape {tuple(sample.shape)}, but set {self.names[g]!r} measures a "
                                     f"{size[0]}×{size[1]} image as {expected}")
        return samples, set_of, tuple(size)

    def _channels(self) -> int:
        model = self.sets[self.names[0]]
        return getattr(model.denoisers[0], "in_channels", 1)

    # -- the two paths -------------------------------------------------------------------------------------------
    def reference(self, y, adapters: Sequence[str], size: tuple[int, int] | None = None) -> torch.Tensor:
        """The ground truth: each set's own DUN on its samples, results back in the batch's order."""
        samples, set_of, size = self._prepare(y, adapters, size)
        out = [None] * len(samples)
        for g in sorted(set(set_of)):
            picked = [i for i, s in enumerate(set_of) if s == g]
            x = self.sets[self.names[g]](torch.cat([samples[i] for i in picked]), size)
            for row, i in enumerate(picked):
                out[i] = x[row:row + 1]
        return torch.cat(out)

    def forward(self, y, adapters: Sequence[str], size: tuple[int, int] | None = None) -> torch.Tensor:
        """The batch in one pass per stage (see the module doc); equal to :meth:`reference`."""
        samples, set_of, size = self._prepare(y, adapters, size)
        order = sorted(range(len(samples)), key=lambda i: set_of[i])
        spans, start = [], 0
        for g in sorted(set(set_of)):
            count = sum(1 for s in set_of if s == g)
            spans.append((g, start, start + count))
            start += count
        ys = [torch.cat([samples[i] for i in order[a:b]]) for _, a, b in spans]
        x = torch.cat([self.operators[g].init(y_g, size) for (g, _, _), y_g in zip(spans, ys)])
        k_stages = self.num_stages
        sets_sorted = torch.tensor([set_of[i] for i in order], device=x.device)
        first_stage = sets_sorted * k_stages
        indexed_step = self._indexed_cs_step(x, spans, ys)
        for k in range(k_stages):
            if indexed_step is not None:
                z = indexed_step(x, self.rho[sets_sorted, k].to(x.dtype))
            else:
                z = torch.cat([self.operators[g].gd_step(x[a:b], y_g, self.rho[g, k].to(x.dtype))
                               for (g, a, b), y_g in zip(spans, ys)])
            if self._offsets:  # per-stage base parameters are one per stage, not per sample: set by set
                x = torch.cat([self._denoise(z[a:b], g * k_stages + k) for g, a, b in spans])
            else:
                x = self._denoise(z, first_stage + k)
        inverse = torch.empty(len(order), dtype=torch.long, device=x.device)
        inverse[torch.tensor(order, device=x.device)] = torch.arange(len(order), device=x.device)
        return x.index_select(0, inverse)

    def _indexed_cs_step(self, x, spans, ys):
        """The fused block-CS step for the whole batch (a per-sample Φ and ρ; ``gd_step_cs_indexed``) when every set
        present is a fast block-CS operator whose kernels would run these inputs; None otherwise (each set's own
        step on its samples)."""
        from lorun_fast.operators import FastBlockCS

        ops = [self.operators[g] for g, _, _ in spans]
        if len(ops) < 2 or not all(isinstance(op, FastBlockCS) for op in ops) \
                or len({(op.block_size, op.algorithm, op.input_precision) for op in ops}) != 1 \
                or not all(op._use_kernels(x, y_g, self.rho[g, 0].to(x.dtype), op.phi)
                           for op, (g, _, _), y_g in zip(ops, spans, ys)):
            return None
        from lorun_fast.kernels.gd_step_cs import gd_step_cs_indexed

        m_max = max(y_g.shape[-1] for y_g in ys)
        y = torch.cat([torch.nn.functional.pad(y_g, (0, m_max - y_g.shape[-1])) for y_g in ys])
        phis = [op.phi for op in ops]
        index = torch.cat([torch.full((b - a,), i, dtype=torch.long, device=x.device)
                           for i, (_, a, b) in enumerate(spans)])
        first = ops[0]

        def step(x, rho):
            return gd_step_cs_indexed(x, y, phis, index, rho, algorithm=first.algorithm,
                                      input_precision=first.input_precision, block_size=first.block_size)
        return step

    def _denoise(self, z: torch.Tensor, stage) -> torch.Tensor:
        for layer in self._layers:
            layer.__dict__["active_stage"] = stage
        for offset in self._offsets:
            offset.__dict__["active_stage"] = stage
        return self.denoiser(z)

    def extra_repr(self) -> str:
        return f"sets={self.names}, num_stages={self.num_stages}"


def load_adapter_sets(base, adapters: Mapping[str, str | Path], operators: Mapping | None = None) -> dict[str, DUN]:
    """``lorun`` DUNs by set name: the base file plus each adapter file, each with the operator its file's task
    records (or ``operators[name]``)."""
    from lorun_fast.checkpoints import load_adapters, load_dun, task_of
    from lorun_fast.tasks import operator_from_record

    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError("adapters: expected a non-empty mapping of set name → adapter file")
    operators = dict(operators or {})
    models = {}
    for name, path in adapters.items():
        operator = operators.get(name)
        if operator is None:
            task = task_of(path)
            if task is None:
                raise ValueError(f"adapters[{name!r}]: {path} records no task; give its operator")
            operator = operator_from_record(task)
        models[name] = load_adapters(load_dun(base, operator), path)
    return models


def read_manifest(path) -> tuple[dict[str, Path], dict[str, str]]:
    """A mixed-batch manifest (JSON): ``{"adapters": {set: file}, "images": {image file name: set}}``, paths
    relative to the manifest's folder. Returns (adapter files by set, set by image name), checked."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest: {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"manifest: {path} is not valid JSON ({err})") from err
    if not isinstance(data, dict) or set(data) != {"adapters", "images"}:
        raise ValueError(f"manifest: {path} must hold exactly the keys 'adapters' and 'images', got "
                         f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    adapters, images = data["adapters"], data["images"]
    if not isinstance(adapters, dict) or not adapters or not all(isinstance(v, str) for v in adapters.values()):
        raise ValueError(f"manifest: {path}: 'adapters' must map set names to adapter files")
    if not isinstance(images, dict) or not all(isinstance(v, str) for v in images.values()):
        raise ValueError(f"manifest: {path}: 'images' must map image file names to set names")
    unknown = sorted({s for s in images.values() if s not in adapters})
    if unknown:
        raise ValueError(f"manifest: {path}: images name unknown set(s) {unknown}; the sets are {sorted(adapters)}")
    files = {name: (path.parent / file) for name, file in adapters.items()}
    for name, file in files.items():
        if not file.is_file():
            raise FileNotFoundError(f"manifest: {path}: set {name!r}: {file} does not exist")
    return files, dict(images)
