"""``FusedLoRunConv``: a drop-in ``nn.Conv2d`` with one shared base weight and one LoRA adapter per DUN stage.

It is the reference :class:`~lorun_fast.reference.LoRAConv2d` (same parameters, names and init, so state dicts
move between the two unchanged) with three ways to compute a stage:

- ``triton``: the fused Triton kernel (``lorun_fast.kernels.lora_conv``): the merged weight ``W + s·B_k A_k``
  formed once per launch (v2; tile by tile in the kernel with ``LORUN_FAST_CONV_KERNEL=v1``), each x tile read once,
  bias / ReLU / scale / residual in its epilogue, and a backward that saves nothing of rank r. Covers 3×3
  (padding 1) and 1×1 (padding 0) stride-1 convolutions on CUDA;
- ``merged``: merge the weight with torch, then one ``F.conv2d`` (cuDNN on a GPU): the CPU default and the path
  for layers the kernel does not cover (the 2×2 stride-2 down and transposed up convolutions of a ResUNet);
- ``reference``: peft's unfused three-convolution form.

``auto`` picks ``triton`` for CUDA inputs the kernel covers and ``merged`` otherwise.

When no gradient is needed (inference, ``eval``, ``restore``; or a frozen layer), the ``triton`` and ``merged``
backends reuse the stage's merged weight instead of forming it at every forward: it is cached per stage and backend,
keyed on the version counter and storage of ``W``, ``A_k`` and ``B_k`` (an optimizer step, ``load_state_dict`` or
assigning ``.data`` makes a new key) and on the scale, and emptied by ``.to()``, ``.float()`` and the like.
``clear_merged_cache()`` drops it; it is never saved in a state dict. In a DUN forward without gradients,
:func:`check_merged_caches` reads those keys once for the whole forward (see ``StagedDUN.forward``).
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorun_fast.kernels.settings import INPUT_PRECISIONS, interpreting
from lorun_fast.reference import LoRAConv2d, check_stage, merged_conv

__all__ = ["FusedLoRunConv", "BACKENDS", "check_merged_caches", "clear_merged_checks"]

BACKENDS = ("auto", "triton", "merged", "reference")
_STAGE_NAMES = tuple(str(k) for k in range(64))  # the adapters' ModuleDict keys, without a str() per call
_MERGED_KEYS = tuple((k, "merged") for k in range(64))  # the merged backend's cache keys, likewise
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PLAIN_CONVS = (nn.Conv2d, nn.ConvTranspose2d)

#: How many parameters and submodules have been registered in this process (any module, through nn.Module's global
#: registration hooks). The inference fast path re-checks which tensors a layer holds only when this has moved.
_registrations = 0


def _count_registration(module, name, value) -> None:
    global _registrations
    _registrations += 1


nn.modules.module.register_module_parameter_registration_hook(_count_registration)
nn.modules.module.register_module_module_registration_hook(_count_registration)


def _unchanged(entry, scaling) -> bool:
    """Whether the tensors a merged-weight cache entry (``FusedLoRunConv._cached_merge``) was formed from still hold
    the values it saw, at the same scale."""
    w, a, b = entry[0], entry[1], entry[2]
    return (entry[3] == w._version and entry[4] == a._version and entry[5] == b._version
            and entry[6] == w.data_ptr() and entry[7] == a.data_ptr() and entry[8] == b.data_ptr()
            and entry[9] == scaling)


def _merged_keys(num_stages: int) -> tuple:
    if num_stages <= len(_MERGED_KEYS):
        return _MERGED_KEYS[:num_stages]
    return tuple((stage, "merged") for stage in range(num_stages))


def check_merged_caches(layers: Sequence["FusedLoRunConv"]) -> list["FusedLoRunConv"]:
    """Check, once, every stage's cached merged weight in each of ``layers`` and let the layers use the current ones
    without checking again until :func:`clear_merged_checks`; returns the layers that got any.

    For a whole DUN forward without gradients (``StagedDUN.forward``). Between two convolutions every tensor a layer
    reads is a cache miss: reading W, A_k and B_k's versions and storage at every call costs a few percent of a
    small DUN on a CPU. Here each of them is read once per forward (W once for all stages). What could change them
    between this check and their use is code running inside the forward itself (a hook writing into a parameter in
    place), which the caller rules out by clearing the checks as soon as the forward returns. A stage without a
    current entry (first call, changed weights, a registration since) is left to check for itself at its call."""
    registrations = _registrations
    checked = []
    for layer in layers:
        get, scaling = layer._merged_cache.get, layer.scaling
        weights = []
        base = None  # (W, its version, its storage) as the first current entry saw them
        for key in _merged_keys(layer.num_stages):
            hit = get(key)
            if (hit is None or hit[11] != registrations or hit[9] != scaling or hit[4] != hit[1]._version
                    or hit[5] != hit[2]._version or hit[7] != hit[1].data_ptr() or hit[8] != hit[2].data_ptr()):
                weights.append(None)
                continue
            if base is None:
                base = (hit[0], hit[0]._version, hit[0].data_ptr())
            weights.append(hit[10] if hit[0] is base[0] and hit[3] == base[1] and hit[6] == base[2] else None)
        if base is not None:
            layer.__dict__["_checked_weights"] = tuple(weights)
            checked.append(layer)
    return checked


def clear_merged_checks(layers: Sequence["FusedLoRunConv"]) -> None:
    """End what :func:`check_merged_caches` allowed: the layers check their cache entries at every call again."""
    for layer in layers:
        layer.__dict__["_checked_weights"] = None


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _padding_of(conv: nn.Module) -> tuple[int, int]:
    if conv.padding == "same":
        return tuple((k - 1) // 2 for k in _pair(conv.kernel_size))
    if conv.padding == "valid":
        return (0, 0)
    return _pair(conv.padding)


class _IndexRuns:
    """How a per-image stage index splits a batch of ``num_rows`` image-major rows: ``rows`` (the stage of every row),
    ``used`` (the stages present, ascending), ``slots`` (each row's position in ``used``, for the kernel) and
    ``spans`` ((stage, first row, end row) when equal stages are contiguous, else None)."""

    def __init__(self, index: torch.Tensor, num_rows: int):
        self.rows = index.long().repeat_interleave(num_rows // index.numel())
        self.used = torch.unique(self.rows).tolist()
        slot = torch.full((max(self.used, default=0) + 1,), -1, dtype=torch.long, device=index.device)
        slot[self.used] = torch.arange(len(self.used), device=index.device)
        self.slots = slot[self.rows]
        stages = self.rows.tolist()
        changes = [i for i in range(1, len(stages)) if stages[i] != stages[i - 1]]
        bounds = [0, *changes, len(stages)]
        spans = [(stages[a], a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        self.spans = spans if len({u for u, _, _ in spans}) == len(spans) else None


# The last index seen and its runs: every layer of a denoiser pass gets the same index tensor, so its runs (and the
# host syncs that find them) are worked out once per pass, not once per layer.
_last_runs: list = [None]


def _index_runs(index: torch.Tensor, num_rows: int, num_stages: int, check) -> _IndexRuns:
    """The runs of ``index``, after ``check()`` (which validates it for a layer of ``num_stages``) unless the same
    index was just checked for the same row count and stage count."""
    key = (index._version, num_rows, num_stages)
    hit = _last_runs[0]
    if hit is not None and hit[0] is index and hit[1] == key:
        return hit[2]
    check()
    runs = _IndexRuns(index, num_rows)
    _last_runs[0] = (index, key, runs)
    return runs


class FusedLoRunConv(LoRAConv2d):
    """A LoRA convolution with ``num_stages`` adapters, computed by the fused Triton kernel where it can be.

    Constructor: ``nn.Conv2d``'s arguments (``bias`` defaults to False, as DUN denoisers have none) plus
    ``num_stages``, ``rank`` (or the paper's rule with ``gamma``; or one rank per stage), ``alpha`` (default: the
    rank, so s = 1), ``backend`` (one of ``BACKENDS``) and ``input_precision`` for float32 on the Triton path
    (``"ieee"``, ``"tf32"`` or ``"tf32x3"``). Dilation, groups and non-zero padding modes are not supported and
    raise here, not at the first forward.

    ``forward(x, stage=None, *, relu=False, residual=None, out_scale=1.0)`` computes
    ``out_scale·act(conv(x, W + s·B_k A_k) + bias) + residual`` for stage k (``active_stage`` when None).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", device=None, dtype=None, *,
                 num_stages: int, rank: int | Sequence[int] | None = None, gamma: float = 10.0,
                 alpha: float | None = None, backend: str = "auto", input_precision: str = "tf32"):
        if _pair(dilation) != (1, 1):
            raise ValueError(f"dilation: FusedLoRunConv supports dilation 1 only, got {dilation}")
        if groups != 1:
            raise ValueError(f"groups: FusedLoRunConv supports groups=1 only, got {groups}")
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode: FusedLoRunConv supports 'zeros' only, got {padding_mode!r}")
        base = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias, device=device,
                         dtype=dtype)
        self._setup(base, num_stages, rank, gamma, alpha, backend, input_precision)

    def _setup(self, base: nn.Module, num_stages, rank, gamma, alpha, backend, input_precision) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if input_precision not in INPUT_PRECISIONS:
            raise ValueError(f"input_precision: expected one of {INPUT_PRECISIONS}, got {input_precision!r}")
        LoRAConv2d.__init__(self, base, num_stages, rank=rank, gamma=gamma, alpha=alpha)
        if backend == "triton" and not self.triton_supported:
            raise ValueError(f"backend: 'triton' covers 3×3 (padding 1) and 1×1 (padding 0) stride-1 convolutions, "
                             f"not {self._describe()}; use 'merged' or 'auto'")
        self.backend = backend
        self.input_precision = input_precision
        self._merged_cache = {}
        self._checked_weights = None  # per stage, while a DUN forward vouches for them: check_merged_caches
        # nn.Conv2d pads by itself only in 'zeros' mode with numeric padding ('same'/'valid' strings included).
        self._plain_padding = getattr(base, "padding_mode", "zeros") == "zeros"
        # Forwards without gradients on the merged backend (the CPU default under "auto") take forward's short path.
        self._inference_fast_path = backend in ("merged", "auto") and self._plain_padding

    @classmethod
    def from_conv(cls, conv: nn.Module, num_stages: int, *, rank: int | None = None, gamma: float = 10.0,
                  alpha: float | None = None, backend: str = "auto", input_precision: str = "tf32"
                  ) -> "FusedLoRunConv":
        """Wrap an existing ``nn.Conv2d`` or ``nn.ConvTranspose2d`` (kept as ``base_layer``) with fresh adapters."""
        if not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
            raise TypeError(f"conv: expected nn.Conv2d or nn.ConvTranspose2d, got {type(conv).__name__}")
        for name, ok in (("dilation", _pair(conv.dilation) == (1, 1)), ("groups", conv.groups == 1),
                         ("padding_mode", conv.padding_mode == "zeros")):
            if not ok:
                raise ValueError(f"conv: FusedLoRunConv does not support {name}={getattr(conv, name)!r}")
        layer = cls.__new__(cls)
        layer._setup(conv, num_stages, rank, gamma, alpha, backend, input_precision)
        return layer

    @classmethod
    def from_lora(cls, layer: LoRAConv2d, backend: str = "auto", input_precision: str = "tf32") -> "FusedLoRunConv":
        """The fast sibling of a reference layer: a copy with the same parameters and names."""
        fast = cls.from_conv(copy.deepcopy(layer.base_layer), layer.num_stages, rank=list(layer.ranks),
                             alpha=layer.alpha, backend=backend, input_precision=input_precision)
        fast.load_state_dict(layer.state_dict())
        fast.active_stage = layer.active_stage
        return fast

    def to_reference(self) -> LoRAConv2d:
        """The reference sibling: a copy with the same parameters and names."""
        reference = LoRAConv2d(copy.deepcopy(self.base_layer), self.num_stages, rank=list(self.ranks),
                               alpha=self.alpha)
        reference.load_state_dict(self.state_dict())
        reference.active_stage = self.active_stage
        return reference

    # nn.Conv2d look-alike attributes, so code written for a Conv2d keeps working.
    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)
    kernel_size = property(lambda self: self.base_layer.kernel_size)
    stride = property(lambda self: self.base_layer.stride)
    padding = property(lambda self: self.base_layer.padding)

    @property
    def triton_supported(self) -> bool:
        """Whether the fused kernel covers this layer's geometry (whatever the input's device)."""
        base = self.base_layer
        if self.transposed or _pair(base.stride) != (1, 1):
            return False
        kernel = _pair(base.kernel_size)
        padding = base.padding if isinstance(base.padding, str) else _pair(base.padding)
        same = (kernel[0] - 1) // 2
        return kernel in ((1, 1), (3, 3)) and (padding == "same" or padding == (same, same))

    def _describe(self) -> str:
        base = self.base_layer
        kind = "transposed " if self.transposed else ""
        return f"a {kind}{_pair(base.kernel_size)} kernel with stride {base.stride} and padding {base.padding}"

    def resolve_backend(self, x: torch.Tensor) -> str:
        """The backend that will compute a forward on ``x``."""
        if self.backend != "auto":
            return self.backend
        if x.is_cuda and x.dtype in _TRITON_DTYPES and self.triton_supported:
            return "triton"
        return "merged"

    def _check_input(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        # The weight's input-channel axis (0 for a transposed convolution) instead of the in_channels property: this
        # runs for every layer of every stage.
        if x.dim() != 4 or x.shape[1] != weight.shape[0 if self.transposed else 1]:
            raise ValueError(f"x: expected (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        if x.device != weight.device:
            raise ValueError(f"x: on {x.device}, but the layer's weights are on {weight.device}")
        if x.dtype != weight.dtype:
            raise TypeError(f"x: dtype {x.dtype} does not match the layer's weights ({weight.dtype})")
        if min(x.shape[2:]) < 1:
            raise ValueError(f"x: expected an image with pixels (H, W ≥ 1), got shape {tuple(x.shape)}")

    def _output_size(self, x: torch.Tensor) -> tuple[int, int]:
        base = self.base_layer
        geometry = zip(x.shape[-2:], _padding_of(base), _pair(base.kernel_size), _pair(base.stride))
        if self.transposed:
            extra = _pair(base.output_padding)
            return tuple((size - 1) * s - 2 * pad + k + e for (size, pad, k, s), e in zip(geometry, extra))
        return tuple((size + 2 * pad - k) // s + 1 for size, pad, k, s in geometry)

    def _check_epilogue(self, x: torch.Tensor, residual, out_scale) -> None:
        """The same checks for every backend: the merged and reference paths would otherwise broadcast a residual of
        the wrong shape or promote one of another dtype, where the kernel refuses them."""
        if isinstance(out_scale, bool) or not isinstance(out_scale, (int, float)) or not math.isfinite(out_scale):
            raise ValueError(f"out_scale: expected a finite number, got {out_scale!r}")
        if residual is None:
            return
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual: expected a torch.Tensor or None, got {type(residual).__name__}")
        expected = (x.shape[0], self.out_channels, *self._output_size(x))
        if tuple(residual.shape) != expected:
            raise ValueError(f"residual: expected the output's shape {expected}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual: dtype {residual.dtype} does not match x ({x.dtype})")
        if residual.device != x.device:
            raise ValueError(f"residual: on {residual.device}, but x is on {x.device}")

    def clear_merged_cache(self) -> None:
        """Forget the cached merged weights (they are rebuilt on the next forward that can use them)."""
        self._merged_cache.clear()

    def _stage_tensors(self, stage: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(W, A_k, B_k, bias). Read from the registries directly: this runs for every layer of every stage, and
        nn.Module's attribute lookup is a measurable share of a small convolution's time on a CPU."""
        modules = self._modules
        base = modules["base_layer"]
        name = _STAGE_NAMES[stage] if stage < len(_STAGE_NAMES) else str(stage)
        try:
            return (base._parameters["weight"], modules["lora_A"]._modules[name]._parameters["weight"],
                    modules["lora_B"]._modules[name]._parameters["weight"], base._parameters.get("bias"))
        except KeyError:  # weights that are not plain registered parameters (e.g. a parametrization)
            return base.weight, self.lora_A[name].weight, self.lora_B[name].weight, base.bias

    @staticmethod
    def _need_grad(tensors) -> bool:
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

    def cached_merged_weight(self, stage: int, backend: str) -> torch.Tensor:
        """The merged weight ``backend`` convolves with for ``stage`` (``merged``: the reference's
        ``merged_weight``; ``triton``: the kernels' ``merge_weight``, fp32 merge rounded once), from the cache when
        W, A_k and B_k are unchanged since it was formed. Built without autograd: for forwards that need no
        gradient of the weights."""
        stage = check_stage(stage, self.num_stages)
        tensors = self._stage_tensors(stage)[:3]
        return self._cached_merge(stage, backend, tensors)

    def _cached_merge(self, stage: int, backend: str, tensors) -> torch.Tensor:
        w, a, b = tensors
        # An entry holds the tensors themselves (so their ids cannot be reused while it lives), their version counters
        # (in-place updates: optimizer steps, load_state_dict) and storage addresses (``param.data = ...`` keeps the
        # Parameter but not its storage), and the registration count it was checked at (see forward). dtype
        # and device changes go through ``_apply``, which empties the cache.
        hit = self._merged_cache.pop((stage, backend), None)
        if hit is not None and hit[0] is w and hit[1] is a and hit[2] is b and _unchanged(hit, self.scaling):
            weight = hit[10]
        else:
            with torch.no_grad():
                if backend == "triton":
                    from lorun_fast.kernels.lora_conv import merge_weight

                    weight = merge_weight(*tensors, self.scaling)
                else:
                    weight = self.merged_weight(stage)
        # Only registered Parameters are cached: a weight computed at each access (a parametrization) is a new
        # tensor every time, and its inputs are not what an entry could watch.
        if type(w) is nn.Parameter and type(a) is nn.Parameter and type(b) is nn.Parameter:
            self._merged_cache[(stage, backend)] = (w, a, b, w._version, a._version, b._version, w.data_ptr(),
                                                    a.data_ptr(), b.data_ptr(), self.scaling, weight, _registrations)
        return weight

    def __getstate__(self):
        # A copy (deepcopy, pickle) made inside a DUN forward would otherwise keep its unchecked weights.
        state = super().__getstate__()
        return {**state, "_checked_weights": None}

    def _apply(self, fn, recurse=True):
        # .to(), .float(), .cuda(), ...: the parameters get new storage, perhaps at an address a cached entry saw.
        self._merged_cache.clear()
        self._checked_weights = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, stage: int | None = None, *, relu: bool = False,
                residual: torch.Tensor | None = None, out_scale: float = 1.0) -> torch.Tensor:
        """``out_scale·act(conv(x, W + s·B_k A_k) + bias) + residual`` for stage k (``active_stage`` when None).

        Inference on the merged backend (no gradient; the CPU default) runs right here: the cached weight and one
        ``F.conv2d`` (or ``conv_transpose2d``), with as few Python operations as keep every input honest, because in
        a small DUN on a CPU this Python is a visible share of the time; even walking the adapter registries for the
        current tensors costs a few percent. So a cache entry is trusted to hold the registered tensors for as long
        as no parameter or submodule was registered anywhere (``_registrations``: load_state_dict(assign=True), a
        parametrization and a replaced adapter all register), and only their versions and storage are read; after
        any registration :meth:`_cached_merge` checks the registries once. Even those reads cost a few percent of a
        small DUN (every tensor read is a cache miss between two convolutions), so inside a DUN forward the layer
        uses the weights :func:`check_merged_caches` checked for it when the forward began. Anything out of the
        ordinary goes to :meth:`_forward`, which checks everything and raises its messages; torch's own refusals
        (wrong channels, dtype or device) are sent there too."""
        if stage is None:
            stage = self.active_stage
        if (not self._inference_fast_path or torch.is_grad_enabled() or type(stage) is not int
                or type(x) is not torch.Tensor or x.is_cuda or x.dim() != 4 or not x.numel()
                or torch.compiler.is_compiling()
                or (out_scale.__class__ is not float or out_scale != 1.0)
                and (type(out_scale) not in (float, int) or not math.isfinite(out_scale))):
            return self._forward(x, stage, relu, residual, out_scale)
        checked = self._checked_weights
        if checked is not None and 0 <= stage < len(checked) and checked[stage] is not None:
            weight = checked[stage]
        else:
            hit = self._merged_cache.get((stage, "merged"))
            if hit is not None and hit[11] == _registrations and _unchanged(hit, self.scaling):
                weight = hit[10]
            elif 0 <= stage < self.num_stages:
                weight = self._cached_merge(stage, "merged", self._stage_tensors(stage)[:3])
            else:
                return self._forward(x, stage, relu, residual, out_scale)
        base = self._modules["base_layer"]
        # nn.Module's attribute lookup costs 0.4 µs; a parametrized base (another class) computes its bias there.
        bias = base._parameters["bias"] if type(base) in _PLAIN_CONVS else base.bias
        try:
            if self.transposed:
                y = F.conv_transpose2d(x, weight, bias, base.stride, base.padding, base.output_padding, 1,
                                       base.dilation)
            else:
                y = F.conv2d(x, weight, bias, base.stride, base.padding, base.dilation)
        except RuntimeError:
            return self._forward(x, stage, relu, residual, out_scale)
        if residual is not None and (type(residual) is not torch.Tensor or residual.shape != y.shape
                                     or residual.dtype != y.dtype):  # a device mismatch raises in the add
            return self._forward(x, stage, relu, residual, out_scale)
        # The epilogue in place on the convolution's own fresh output, as the kernel's epilogue does: no further
        # activation to allocate and write.
        if relu:
            y.relu_()
        if out_scale != 1.0:
            y.mul_(out_scale)
        return y if residual is None else y.add_(residual)

    def _forward(self, x, stage, relu, residual, out_scale) -> torch.Tensor:
        """Every other forward, with every check and its message."""
        stage = self.active_stage if stage is None else stage
        if isinstance(stage, torch.Tensor) and stage.dim() == 1:
            return self._forward_indexed(x, stage, relu, residual, out_scale)
        stage = check_stage(stage, self.num_stages)
        tensors = self._stage_tensors(stage)
        self._check_input(x, tensors[0])
        self._check_epilogue(x, residual, out_scale)
        backend = self.resolve_backend(x)
        # Under torch.compile the merge is traced into the graph instead (no Python-side cache there).
        cache = (backend != "reference" and not self._need_grad(tensors)
                 and not torch.compiler.is_compiling())
        if backend == "triton":
            if not (x.is_cuda or interpreting()):
                raise RuntimeError("backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on a CPU); "
                                   f"x is on {x.device}")
            base = self.base_layer
            inputs_need_grad = torch.is_grad_enabled() and (x.requires_grad
                                                            or (residual is not None and residual.requires_grad))
            if cache and not inputs_need_grad:
                from lorun_fast.kernels.lora_conv import fused_conv2d

                return fused_conv2d(x, self._cached_merge(stage, "triton", tensors[:3]), base.bias,
                                    padding=_pair(base.kernel_size)[0] // 2, relu=relu, residual=residual,
                                    out_scale=out_scale, input_precision=self.input_precision)
            from lorun_fast.kernels.lora_conv import fused_lora_conv2d

            return fused_lora_conv2d(x, base.weight, self.lora_A[str(stage)].weight, self.lora_B[str(stage)].weight,
                                     self.scaling, base.bias, padding=_pair(base.kernel_size)[0] // 2, relu=relu,
                                     residual=residual, out_scale=out_scale, input_precision=self.input_precision)
        if backend == "merged" and cache and not self.transposed and self._plain_padding:
            # Inference on a plain zero-padded convolution: F.conv2d with the cached weight, as nn.Conv2d would call
            # it (what merged_conv does, one call level and two attribute lookups shorter).
            base = self._modules["base_layer"]
            y = F.conv2d(x, self._cached_merge(stage, "merged", tensors[:3]), tensors[3], base.stride, base.padding,
                         base.dilation, base.groups)
        elif backend == "merged":
            y = merged_conv(self, x, stage, self._cached_merge(stage, "merged", tensors[:3]) if cache else None)
        else:
            y = LoRAConv2d.forward(self, x, stage)
        if relu:
            y = F.relu(y)
        if out_scale != 1.0:
            y = y * out_scale
        return y if residual is None else y + residual

    def _check_index(self, index: torch.Tensor, x: torch.Tensor) -> None:
        if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
            raise TypeError(f"stage: a per-sample stage index must be an integer tensor, got {index.dtype}")
        if index.device != x.device:
            raise ValueError(f"stage: the per-sample index is on {index.device}, x on {x.device}")
        if index.numel() == 0 or x.shape[0] % index.numel():
            raise ValueError(f"stage: one stage per image, and x's rows must be a whole number of rows per image: got "
                             f"{index.numel()} stages for {x.shape[0]} rows")
        if int(index.min()) < 0 or int(index.max()) >= self.num_stages:
            raise IndexError(f"stage: per-sample stages must be in [0, {self.num_stages}), got values from "
                             f"{int(index.min())} to {int(index.max())}")

    def _forward_indexed(self, x, index, relu, residual, out_scale) -> torch.Tensor:
        """A batch whose images use different stages (adapters): ``index`` holds one stage per image and x's rows are
        image-major (``x.shape[0] = len(index)·b``, e.g. an image cut into b blocks). The Triton path serves the
        batch in one launch (a per-sample weight index); the others convolve each stage's rows with its merged
        weight (cached when no gradient is needed): slices of the batch when the index is sorted (what
        ``AdapterSets`` gives), gathered rows otherwise."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        self._check_input(x, self._stage_tensors(0)[0])
        runs = _index_runs(index, x.shape[0], self.num_stages, lambda: self._check_index(index, x))
        self._check_epilogue(x, residual, out_scale)
        if not runs.used:  # an empty batch
            return self._forward(x, int(index[0]), relu, residual, out_scale)
        if self.resolve_backend(x) == "triton" and (x.is_cuda or interpreting()):
            from lorun_fast.kernels.lora_conv import fused_lora_conv2d_indexed

            base = self.base_layer
            return fused_lora_conv2d_indexed(
                x, base.weight, [self.lora_A[str(u)].weight for u in runs.used],
                [self.lora_B[str(u)].weight for u in runs.used], self.scaling, runs.slots, base.bias,
                padding=_pair(base.kernel_size)[0] // 2, relu=relu, residual=residual, out_scale=out_scale,
                input_precision=self.input_precision)
        if runs.spans is not None:
            y = torch.cat([self.forward(x[a:b], u) for u, a, b in runs.spans])  # short path when it can
        else:
            y = None
            for u in runs.used:
                picked = (runs.rows == u).nonzero().squeeze(1)
                part = self._forward(x.index_select(0, picked), u, False, None, 1.0)
                if y is None:
                    y = part.new_zeros((x.shape[0], *part.shape[1:]))
                y = y.index_copy(0, picked, part)
        if relu:
            y = F.relu(y)
        if out_scale != 1.0:
            y = y * out_scale
        return y if residual is None else y + residual

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}, input_precision={self.input_precision!r}"
