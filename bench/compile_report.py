"""Compile every Triton kernel of ``kernels/`` for sm_90 and sm_80 on a machine without a GPU, and report what ptxas
made of each autotune config: registers, spill bytes, shared memory against the card's opt-in limit, and which MMA
instructions the dots became.

    python bench/compile_report.py                       # full grid, sm_90 and sm_80 → bench/out/compile/
    python bench/compile_report.py --quick               # the representative subset (the CI test runs this)
    python bench/compile_report.py --targets 90 --jobs 2 --out DIR

Why this works without a GPU: ``triton.compile`` takes an explicit ``GPUTarget`` and runs the whole pipeline down to
a cubin with the ptxas that ships inside the triton wheel; only loading the cubin needs a driver. The launch
arguments are not guessed: every case calls the real launchers of ``lorun_fast.kernels`` (on ``meta`` tensors, so
nothing is allocated) with each ``@triton.autotune`` kernel swapped for a recorder, then applies that kernel's own
autotuner pruning (``prune_configs_by``) to the recorded arguments and compiles each kept config through the
JIT's own argument binder, so signatures, ``tt.divisibility`` / ``== 1`` specialisations and constexprs are exactly
those of a launch on a GPU.

Per compiled (case, config, target) the JSON row holds: registers (ptxas ``Used N registers``), spill stores / loads
and stack frame (ptxas ``-v``), shared memory (Triton's allocation, ``metadata.shared``) and whether it exceeds the
target's opt-in per-block limit, the MMA kind (``wgmma`` if any ``wgmma.mma_async``, else ``mma.sync``, else none:
FMA) with instruction counts and shapes, the launch grid (CTAs) and resident CTAs per SM from registers and shared
memory, and ok / the first line of the error. Results come from Triton's cache (``~/.triton/cache``, keyed by the
triton version among others) when present; the ptxas log of each cubin is kept next to it in the same cache entry.

Must run with ``TRITON_INTERPRET`` unset: the interpreter replaces ``@triton.jit`` functions by Python ones that
cannot be compiled. The script clears the variable for itself and its workers before importing the kernels, and
forces the full tuning lists (``LORUN_FAST_TUNE=1``), which are what a benchmark autotunes over.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "out" / "compile"

# Opt-in maximum dynamic shared memory per block (CUDA C Programming Guide, "Technical Specifications per Compute
# Capability"): 227 KB on 9.0, 163 KB on 8.0, 99 KB on 8.6 / 8.9. Shared memory per SM (for occupancy) is 1 KB more
# per resident block than a block can use, so 228 / 164 / 100 KB.
SMEM_LIMIT = {90: 232_448, 80: 166_912, 86: 101_376, 89: 101_376}
SMEM_PER_SM = {90: 233_472, 80: 167_936, 86: 102_400, 89: 102_400}
REGS_PER_SM = 65_536
MAX_WARPS_PER_SM = {90: 64, 80: 64, 86: 48, 89: 48}
MAX_CTAS_PER_SM = {90: 32, 80: 32, 86: 16, 89: 24}
SMS = {90: 132, 80: 108, 86: 84, 89: 128}   # H100 SXM, A100, RTX 3090 / A6000-class, L40-class

CONV_CHANNELS = (16, 32, 64)
CONV_HW = 256
CONV_BATCHES = (1, 8)
CONV_PRECISIONS = ("tf32", "ieee", "bf16")
CS_RATIOS = (0.01, 0.04, 0.10, 0.25, 0.30, 0.40, 0.50)
CS_BLOCK = 33
CS_HW = 256
CS_BATCHES = (1, 16)
CS_INDEXED_MS = (109, 272, 436)     # 10%, 25%, 40% of 1089 in one batch
GD_PRECISIONS = ("tf32", "bf16")
CASSI_BANDS, CASSI_STEP, CASSI_HW = 28, 2, 256
SR_SCALES, SR_KSIZE, SR_CHANNELS, SR_HW = (2, 4), 7, 3, 256
GD_BATCHES = (1, 16)

DEFAULT_PRECISIONS = ("tf32", "bf16")   # what the layers and benchmarks use unless told otherwise


def cs_measurements(ratio: float, n: int = CS_BLOCK * CS_BLOCK) -> int:
    """m = round-half-up(ratio·n), as the CS literature's sampling matrices are sized (25% of 1089 → 272)."""
    return int(math.floor(ratio * n + 0.5))


# --------------------------------------------------------------------------------------------------------------------
# Cases: each one calls the real launchers; the recorders capture the kernel launches they make
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One launcher call. ``family`` picks the generator, ``params`` its arguments (plain values: picklable)."""
    family: str
    name: str
    params: tuple
    precision: str        # tf32 / ieee / bf16: the dot precision the case runs at
    bench_shape: bool     # a shape the benchmarks time (the spill gate of the CI test applies to these)


def _conv_case_name(c, k, nb, prec, variant):
    return f"C{c} {k}x{k} {CONV_HW}² N{nb} {prec} {variant}"


def conv_cases(channels=CONV_CHANNELS, ksizes=(3, 1), batches=CONV_BATCHES, precisions=CONV_PRECISIONS,
               variants=("fwd", "fwd-epilogue", "bwd", "bwd-relu", "fwd-v1", "bwd-v1", "fwd-indexed",
                         "bwd-indexed")):
    out = []
    for c in channels:
        for k in ksizes:
            for nb in batches:
                for prec in precisions:
                    for v in variants:
                        out.append(Case("conv", _conv_case_name(c, k, nb, prec, v), (c, k, nb, prec, v), prec, True))
    return out


def cs_cases(ratios=CS_RATIOS, precisions=GD_PRECISIONS, algorithms=("two_gemm", "one_gemm"), passes=("fwd", "bwd"),
             batches=CS_BATCHES):
    out = []
    for r in ratios:
        m = cs_measurements(r)
        for prec in precisions:
            for alg in algorithms:
                for p in passes:
                    for nb in batches:
                        name = f"{alg} m{m} ({r:.0%}) {CS_HW}² N{nb} {prec} {p}"
                        out.append(Case("cs", name, (m, prec, alg, p, nb), prec, True))
    return out


def cs_indexed_cases(measurements=CS_INDEXED_MS, precisions=GD_PRECISIONS, algorithms=("two_gemm", "one_gemm"),
                     passes=("fwd", "bwd"), batches=(16,)):
    """The CS step with a Φ per sample (``gd_step_cs_indexed``): the same three kernels with INDEXED set, over a
    batch that mixes the given m's (one Φ per ratio; batch 16: the training batches that mix ratios)."""
    out = []
    ms = "/".join(str(m) for m in measurements)
    for prec in precisions:
        for alg in algorithms:
            for p in passes:
                for nb in batches:
                    name = f"indexed {alg} m{ms} {CS_HW}² N{nb} {prec} {p}"
                    out.append(Case("cs_indexed", name, (measurements, prec, alg, p, nb), prec, True))
    return out


def cassi_cases(precisions=("fp32", "bf16"), passes=("fwd", "bwd"), batches=GD_BATCHES):
    return [Case("cassi", f"{CASSI_HW}²×{CASSI_BANDS} N{nb} {prec} {p}", (prec, p, nb), prec, True)
            for prec in precisions for p in passes for nb in batches]


def sr_cases(scales=SR_SCALES, precisions=("fp32", "bf16"), passes=("fwd", "bwd"), batches=GD_BATCHES):
    return [Case("sr", f"×{s} C{SR_CHANNELS} {SR_KSIZE}x{SR_KSIZE} {SR_HW}² N{nb} {prec} {p}", (s, prec, p, nb), prec,
                 True)
            for s in scales for prec in precisions for p in passes for nb in batches]


def bicubic_cases(scales=(2, 3, 4), precisions=("fp32", "bf16"), passes=("fwd", "bwd"), batches=GD_BATCHES):
    return [Case("bicubic", f"×{s} C{SR_CHANNELS} bicubic {SR_HW - SR_HW % s}² N{nb} {prec} {p}", (s, prec, p, nb),
                 prec, True)
            for s in scales for prec in precisions for p in passes for nb in batches]


def full_cases():
    return conv_cases() + cs_cases() + cs_indexed_cases() + cassi_cases() + sr_cases() + bicubic_cases()


def quick_cases():
    """A representative subset: every kernel, both dot precisions that layers use by default, the precision-sensitive
    ieee path of the conv, the CS sizes where register and shared-memory pressure peak (m = 272, 436, 545), and the
    CS step with a Φ per sample (both algorithms forward, the two-GEMM backward)."""
    return (conv_cases(channels=(32,), ksizes=(3,), batches=(8,), precisions=("tf32", "bf16"),
                       variants=("fwd", "bwd-relu", "fwd-v1", "bwd-v1", "fwd-indexed", "bwd-indexed"))
            + conv_cases(channels=(32,), ksizes=(3,), batches=(8,), precisions=("ieee",), variants=("fwd", "fwd-v1"))
            + cs_cases(ratios=(0.25,), algorithms=("two_gemm",), batches=(16,))
            + cs_cases(ratios=(0.25,), precisions=("bf16",), algorithms=("two_gemm",), passes=("bwd",), batches=(1,))
            + cs_cases(ratios=(0.40,), precisions=("bf16",), algorithms=("two_gemm",), passes=("fwd",), batches=(16,))
            + cs_cases(ratios=(0.50,), precisions=("tf32",), algorithms=("one_gemm",), passes=("fwd",),
                       batches=(16,))
            + cs_indexed_cases(precisions=("tf32",), algorithms=("two_gemm", "one_gemm"), passes=("fwd",))
            + cs_indexed_cases(precisions=("bf16",), algorithms=("two_gemm",), passes=("bwd",))
            + cassi_cases(precisions=("fp32",), passes=("fwd",), batches=(16,))
            + sr_cases(scales=(2,), precisions=("fp32",), passes=("fwd", "bwd"), batches=(16,))
            + bicubic_cases(scales=(4,), precisions=("fp32",), passes=("fwd", "bwd"), batches=(16,)))


# ---- generators (run inside a worker, after the kernels are imported compiled-mode) ----

def _dtype(prec):
    import torch
    return torch.bfloat16 if prec == "bf16" else torch.float32


def _fp32_precision(prec):
    return prec if prec in ("ieee", "tf32", "tf32x3") else "tf32"


def _gen_conv(c, k, nb, prec, variant):
    import torch
    from lorun_fast.kernels import lora_conv as lc
    dt = _dtype(prec)
    meta = dict(device="meta", dtype=dt)
    rank = max(1, math.ceil(c * 10 / 100))
    x = torch.empty(nb, c, CONV_HW, CONV_HW, **meta).to(memory_format=torch.channels_last)
    w = torch.empty(c, c, k, k, **meta)
    a = torch.empty(rank, c, k, k, **meta)
    b = torch.empty(c, rank, **meta)
    bias = torch.empty(c, **meta)
    p = _fp32_precision(prec)
    version = "v1" if variant.endswith("-v1") else "v2"
    variant = variant.removesuffix("-v1")
    from lorun_fast.kernels.settings import use_conv_kernel
    with use_conv_kernel(version):
        if variant == "fwd":
            lc.lora_conv2d_forward(x, w, a, b, 1.0, bias, None, False, 1.0, p, write_mask=False)
        elif variant == "fwd-epilogue":
            # The residual block's second conv: bias, ReLU, out_scale, residual, and the saved ReLU mask.
            lc.lora_conv2d_forward(x, w, a, b, 1.0, bias, torch.empty_like(x), True, 0.5, p, write_mask=True)
        elif variant == "fwd-indexed":
            # A per-sample adapter index (HAS_WIDX): three adapters of different ranks stacked, with the epilogue.
            adapters = [(torch.empty(r, c, k, k, **meta), torch.empty(c, r, 1, 1, **meta)) for r in (rank, 1, 2)]
            index = torch.empty(nb, device="meta", dtype=torch.int64)
            lc.lora_conv2d_indexed_forward(x, w, [a for a, _ in adapters], [b for _, b in adapters], 1.0, index, bias,
                                           torch.empty_like(x), True, 0.5, p, write_mask=True)
        elif variant == "bwd-indexed":
            # Its dx pass: the indexed kernel reading out_scale·G·[y > 0]. (dW runs the kernel of "bwd-relu" on the
            # samples of each adapter, which needs the index's values: not available on meta tensors.)
            adapters = [(torch.empty(r, c, k, k, **meta), torch.empty(c, r, 1, 1, **meta)) for r in (rank, 1, 2)]
            index = torch.empty(nb, device="meta", dtype=torch.int64)
            g = torch.empty_like(x)
            lc.lora_conv2d_indexed_backward(g, x, w, [a for a, _ in adapters], [b for _, b in adapters], index,
                                            torch.empty_like(x), 1.0, True, True, 0.5, p, need_x=True, need_w=False,
                                            need_a=False, need_b=False, need_bias=False)
        elif variant == "bwd-relu":
            # The residual block's first conv in training: ReLU mask from the saved output, dbias with dW (v2
            # forms out_scale·G·[y > 0] inside the dx and dW kernels).
            g = torch.empty_like(x)
            lc.lora_conv2d_backward(g, x, w, a, b, torch.empty_like(x), 1.0, True, True, 0.5, p,
                                    need_x=True, need_w=True, need_a=True, need_b=True, need_bias=True)
        else:
            g = torch.empty_like(x)
            lc.lora_conv2d_backward(g, x, w, a, b, None, 1.0, False, False, 1.0, p,
                                    need_x=True, need_w=False, need_a=True, need_b=True, need_bias=False)


def _gen_cs(m, prec, alg, pas, nb):
    import torch
    from lorun_fast.kernels import gd_step_cs as gd
    dt = _dtype(prec)
    n = CS_BLOCK * CS_BLOCK
    hb = -(-CS_HW // CS_BLOCK)
    x = torch.empty(nb, 1, CS_HW, CS_HW, device="meta", dtype=dt)
    y = torch.empty(nb, 1, hb, hb, m, device="meta", dtype=dt)
    phi = torch.empty(m, n, device="meta", dtype=torch.float32)
    rho = torch.empty((), device="meta", dtype=dt)
    gd.clear_cache()
    p = _fp32_precision(prec)
    if pas == "fwd":
        gd.cs_forward(x, y, phi, rho, CS_BLOCK, alg, p, save_residual=False)
    else:
        r = torch.empty(nb, 1, hb, hb, m, device="meta", dtype=torch.float32)
        gd.cs_backward(x, phi, rho, r, CS_BLOCK, alg, p, True, True, True)


def _gen_cs_indexed(ms, prec, alg, pas, nb):
    import torch
    from lorun_fast.kernels import gd_step_cs as gd
    dt = _dtype(prec)
    n = CS_BLOCK * CS_BLOCK
    hb = -(-CS_HW // CS_BLOCK)
    x = torch.empty(nb, 1, CS_HW, CS_HW, device="meta", dtype=dt)
    y = torch.empty(nb, 1, hb, hb, max(ms), device="meta", dtype=dt)
    phis = [torch.empty(m, n, device="meta", dtype=torch.float32) for m in ms]
    index = torch.empty(nb, device="meta", dtype=torch.int64)
    rho = torch.empty(nb, device="meta", dtype=dt)   # a step per sample
    gd.clear_cache()
    p = _fp32_precision(prec)
    if pas == "fwd":
        gd.cs_indexed_forward(x, y, phis, index, rho, CS_BLOCK, alg, p, save_residual=False)
    else:
        r = torch.empty(nb, 1, hb, hb, max(ms), device="meta", dtype=torch.float32)
        gd.cs_indexed_backward(x, phis, index, rho, r, CS_BLOCK, alg, p, True, True, True)


def _gen_cassi(prec, pas, nb):
    import torch
    from lorun_fast.kernels import gd_step_cassi as gd
    dt = _dtype(prec)
    x = torch.empty(nb, CASSI_BANDS, CASSI_HW, CASSI_HW, device="meta", dtype=dt)
    wy = CASSI_HW + CASSI_STEP * (CASSI_BANDS - 1)
    y = torch.empty(nb, CASSI_HW, wy, device="meta", dtype=dt)
    mask = torch.empty(CASSI_HW, CASSI_HW, device="meta", dtype=torch.float32)
    rho = torch.empty((), device="meta", dtype=dt)
    if pas == "fwd":
        gd.cassi_forward(x, y, mask, rho, CASSI_STEP)
    else:
        r = torch.empty(nb, CASSI_HW, wy, device="meta", dtype=torch.float32)
        gd.cassi_backward(x, mask, rho, r, CASSI_STEP, True, True, True)


def _gen_sr(s, prec, pas, nb):
    import torch
    from lorun_fast.kernels import gd_step_sr as gd
    dt = _dtype(prec)
    x = torch.empty(nb, SR_CHANNELS, SR_HW, SR_HW, device="meta", dtype=dt)
    y = torch.empty(nb, SR_CHANNELS, SR_HW // s, SR_HW // s, device="meta", dtype=dt)
    kern = torch.empty(SR_KSIZE, SR_KSIZE, device="meta", dtype=torch.float32)
    rho = torch.empty((), device="meta", dtype=dt)
    if pas == "fwd":
        gd.sr_forward(x, y, kern, rho, s)
    else:
        r = torch.empty(nb, SR_CHANNELS, SR_HW // s, SR_HW // s, device="meta", dtype=torch.float32)
        gd.sr_backward(x, kern, rho, r, s, True, True, True)


def _gen_bicubic(s, prec, pas, nb):
    import torch
    from lorun_fast.kernels import gd_step_bicubic as gb
    dt = _dtype(prec)
    hw = SR_HW - SR_HW % s
    x = torch.empty(nb, SR_CHANNELS, hw, hw, device="meta", dtype=dt)
    y = torch.empty(nb, SR_CHANNELS, hw // s, hw // s, device="meta", dtype=dt)
    rho = torch.empty((), device="meta", dtype=dt)
    if pas == "fwd":
        gb.bicubic_forward(x, y, rho, s)
    else:
        r = torch.empty(nb, SR_CHANNELS, hw // s, hw // s, device="meta", dtype=torch.float32)
        gb.bicubic_backward(x, rho, r, s, True, True, True)


GENERATORS: dict[str, Callable] = {"conv": _gen_conv, "cs": _gen_cs, "cs_indexed": _gen_cs_indexed,
                                   "cassi": _gen_cassi, "sr": _gen_sr, "bicubic": _gen_bicubic}
KERNEL_MODULES = ("lorun_fast.kernels.lora_conv", "lorun_fast.kernels.gd_step_cs", "lorun_fast.kernels.gd_step_cassi",
                  "lorun_fast.kernels.gd_step_sr", "lorun_fast.kernels.gd_step_bicubic")


# --------------------------------------------------------------------------------------------------------------------
# Worker side: recorders, pruning, compiling
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class Launch:
    kernel: str           # module-level name of the kernel
    tuner: object         # the Autotuner (or the JITFunction itself when a kernel is not autotuned)
    grid: object
    args: tuple
    kwargs: dict


@dataclass
class _Worker:
    launches: list = field(default_factory=list)
    kernels: dict = field(default_factory=dict)      # name → Autotuner / JITFunction
    binders: dict = field(default_factory=dict)


_W: _Worker | None = None


def _clean_env():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["LORUN_FAST_TUNE"] = "1"
    # Triton 3.9 warns on every compile while the default is unset; 1 is the default it keeps.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _jit_of(obj):
    """The JITFunction under autotune / heuristics wrappers, or None."""
    from triton.runtime.jit import JITFunction
    seen = 0
    while obj is not None and not isinstance(obj, JITFunction) and seen < 8:
        obj = getattr(obj, "fn", None)
        seen += 1
    return obj if isinstance(obj, JITFunction) else None


def kernel_objects():
    """Every launchable ``@triton.jit`` kernel of the kernel modules: (module, name) → object. Kernels are named
    ``*_kernel``; device helpers (``@triton.jit`` functions called from kernels, e.g. ``_mma`` or the conv
    ``_epilogue``, which takes pointers too) are left out: they are compiled as part of every kernel that calls them,
    and wrapping one in a recorder would put a non-copyable object into its callers' globals."""
    import importlib
    out = {}
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(mod_name)
        for name, obj in vars(mod).items():
            jit = _jit_of(obj)
            if jit is None or jit.__module__ != mod.__name__:
                continue
            if not name.endswith("_kernel") or not any(a.endswith("_ptr") for a in jit.arg_names):
                continue
            out[(mod, name)] = obj
    return out


def _init_worker():
    global _W
    _clean_env()
    import triton  # noqa: F401
    from triton.runtime.jit import JITFunction

    w = _Worker()
    for (mod, name), obj in kernel_objects().items():
        jit = _jit_of(obj)
        if not isinstance(jit, JITFunction) or type(jit).__name__ == "InterpretedFunction":
            raise RuntimeError(f"{mod.__name__}.{name} is not a compiled-mode JITFunction: was TRITON_INTERPRET set "
                               "when triton or the kernels were first imported in this process?")
        w.kernels[name] = obj
        setattr(mod, name, _Recorder(name, obj, w))
        if hasattr(mod, "_check_runnable"):
            setattr(mod, "_check_runnable", lambda t: None)
    _W = w


class _Recorder:
    def __init__(self, name, tuner, worker):
        self.name, self.tuner, self.worker = name, tuner, worker

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.worker.launches.append(Launch(self.name, self.tuner, grid, args, dict(kwargs)))
        return launch


def _kept_configs(launch: Launch):
    """The configs the autotuner would benchmark for this launch, after its early pruning."""
    from triton.runtime.autotuner import Autotuner
    t = launch.tuner
    if not isinstance(t, Autotuner):
        return [None]
    t.nargs = dict(zip(t.arg_names, launch.args))
    try:
        return list(t.prune_configs(dict(launch.kwargs)))
    finally:
        t.nargs = None


def _binder(jit, target):
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    key = (id(jit), target.arch)
    hit = _W.binders.get(key)
    if hit is None:
        backend = make_backend(target)
        hit = (backend, create_function_from_signature(jit.signature, jit.params, backend))
        _W.binders[key] = hit
    return hit


def _compile(jit, args, kwargs, target):
    """``JITFunction.run`` up to its compile call, for an explicit target (the argument binding, specialisation
    and option parsing of the installed triton, never a reimplementation)."""
    import dataclasses

    import triton
    from triton import knobs
    from triton.compiler import ASTSource
    backend, binder = _binder(jit, target)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
    option_fields = {f.name for f in dataclasses.fields(backend.parse_options({}))}
    for opt, owner in (("instrumentation_mode", knobs.compilation),
                       ("fpsan_homomorphic_casts", knobs.compilation)):
        if opt in option_fields and hasattr(owner, opt):
            kwargs[opt] = getattr(owner, opt)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, spec, options)
    src = ASTSource(jit, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


_PTXAS_FILE = "lorun_fast_ptxas.json"
_RE_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")


def _parse_ptxas(log: str):
    out = {}
    if m := _RE_REGS.search(log):
        out["regs"] = int(m.group(1))
    if m := _RE_FRAME.search(log):
        out["stack"], out["spill_stores"], out["spill_loads"] = map(int, m.groups())
    m = _RE_SMEM.search(log)
    out["static_smem"] = int(m.group(1)) if m else 0
    return out if "regs" in out else None


def _cache_dir(ck):
    for name, path in ck.metadata_group.items():
        if name.endswith(".json"):
            return Path(path).parent
    return None


def _compile_with_ptxas_info(jit, args, kwargs, target):
    """(compiled kernel, parsed ptxas -v figures, cached?). ptxas prints its -v log only when it runs, so the parsed
    figures are kept in the Triton cache entry; a cache entry without them is compiled again once."""
    from triton import knobs
    knobs.nvidia.dump_ptxas_log = True
    for attempt in range(2):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ck = _compile(jit, args, kwargs, target)
        info = _parse_ptxas(buf.getvalue())
        cdir = _cache_dir(ck)
        side = cdir / _PTXAS_FILE if cdir else None
        if info is not None:
            if side is not None:
                with contextlib.suppress(OSError):
                    tmp = side.with_suffix(f".tmp{os.getpid()}")
                    tmp.write_text(json.dumps(info))
                    tmp.replace(side)
            return ck, info, attempt > 0
        if side is not None and side.is_file():
            return ck, json.loads(side.read_text()), True
        knobs.compilation.always_compile = True
        try:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                ck = _compile(jit, args, kwargs, target)
            info = _parse_ptxas(buf.getvalue())
        finally:
            knobs.compilation.always_compile = False
        if info is not None and side is not None:
            with contextlib.suppress(OSError):
                side.write_text(json.dumps(info))
        return ck, info or {}, False
    raise AssertionError("unreachable")


def _plain_ptxas(ptx: str, arch: int):
    """ptxas -v on the kernel's PTX with no options but the target: tells a spill that register pressure forces
    (it stays) from one that an allocator option of the installed triton causes (triton 3.9 passes
    ``--regAllocOptLevel=2`` to ptxas 13, which then spills a few bytes at 70–130 registers)."""
    import subprocess
    import tempfile

    from triton.backends.nvidia import compiler as nv
    try:
        ptxas = nv.get_ptxas(arch).path
        gpu = nv.sm_arch_from_capability(arch)
    except Exception:  # noqa: BLE001 — an older triton without these helpers: no second opinion
        return None
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(d) / "k.o")],
                              capture_output=True, text=True)
    return _parse_ptxas(proc.stderr) if proc.returncode == 0 else None


_RE_MMA = re.compile(r"^\s*(?:@%p\d+\s+)?(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", re.M)


def mma_summary(ptx: str):
    counts = {"wgmma": 0, "mma.sync": 0}
    shapes = {}
    for m in _RE_MMA.finditer(ptx):
        ins = m.group(1)
        kind = "wgmma" if ins.startswith("wgmma") else "mma.sync"
        counts[kind] += 1
        short = ins.replace(".sync.aligned", "").replace("mma_async", "mma")
        shapes[short] = shapes.get(short, 0) + 1
    kind = "wgmma" if counts["wgmma"] else ("mma.sync" if counts["mma.sync"] else "none")
    return kind, counts, shapes


def _occupancy(arch, regs, warps, shared):
    """Resident CTAs per SM from registers (allocated per warp in units of 256) and from shared memory."""
    threads = 32 * warps
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = REGS_PER_SM // (per_warp * warps) if regs else None
    by_smem = SMEM_PER_SM[arch] // (shared + 1024) if shared or True else None
    by_warps = MAX_WARPS_PER_SM[arch] // warps
    limits = [v for v in (by_regs, by_smem, by_warps, MAX_CTAS_PER_SM[arch]) if v is not None]
    return {"ctas_per_sm": min(limits), "ctas_per_sm_regs": by_regs, "ctas_per_sm_smem": by_smem,
            "threads": threads}


def _cs_update_smem_model(nargs, kwargs, cfg, arch):
    from lorun_fast.kernels import gd_step_cs as gd
    return gd._cs_update_smem(cfg, kwargs["KSPLIT"], nargs["phi_ptr"].element_size(), kwargs["WRITE_Z"],
                              (arch // 10, arch % 10))


# Kernels whose pruner models shared memory: the model's figure goes next to the compiled one in every row, and the
# test holds it to the compiler's.
SMEM_MODELS = {"_cs_update_kernel": _cs_update_smem_model}


def _grid_size(grid, nargs, kwargs, cfg_kwargs):
    meta = {**nargs, **kwargs, **cfg_kwargs}
    g = grid(meta) if callable(grid) else grid
    g = tuple(g) + (1,) * (3 - len(g))
    return g, g[0] * g[1] * g[2]


def _config_label(cfg):
    if cfg is None:
        return "—"
    kw = " ".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in cfg.kwargs.items())
    return f"{kw} w{cfg.num_warps} s{cfg.num_stages}"


def run_case(case: Case, arch: int, dry: bool = False):
    """Compile every kept config of every launch the case makes for ``sm_<arch>``; one row each (``dry``: list the
    kept configs without compiling)."""
    import triton
    from triton.backends.compiler import GPUTarget
    if _W is None:
        _init_worker()
    _W.launches.clear()
    # Pruners that size tiles to the device ask it for its limits; answer for the target being compiled for.
    import importlib
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(mod_name)
        if hasattr(mod, "device_limits"):
            mod.device_limits = lambda device, a=arch: ((a // 10, a % 10), SMEM_LIMIT[a])
    GENERATORS[case.family](*case.params)
    launches = list(_W.launches)
    _W.launches.clear()
    target = GPUTarget("cuda", arch, 32)
    rows = []
    for li, launch in enumerate(launches):
        jit = _jit_of(launch.tuner)
        nargs = dict(zip(jit.arg_names, launch.args))
        for cfg in _kept_configs(launch):
            kw = dict(launch.kwargs)
            if cfg is not None:
                kw.update(cfg.all_kwargs())
            cfg_kwargs = dict(cfg.kwargs) if cfg is not None else {}
            grid, ctas = _grid_size(launch.grid, nargs, launch.kwargs, cfg_kwargs)
            constexpr_flags = {k: v for k, v in launch.kwargs.items() if isinstance(v, (bool, int, str))}
            row = {"target": f"sm_{arch}", "arch": arch, "triton": triton.__version__, "family": case.family,
                   "case": case.name, "precision": case.precision, "bench_shape": case.bench_shape,
                   "default_precision": case.precision in DEFAULT_PRECISIONS or case.precision == "fp32",
                   "kernel": launch.kernel, "launch": li, "config": _config_label(cfg), "config_kwargs": cfg_kwargs,
                   "num_warps": kw.get("num_warps", 4), "num_stages": kw.get("num_stages", 3),
                   "constexprs": constexpr_flags, "grid": list(grid), "ctas": ctas,
                   "smem_limit": SMEM_LIMIT[arch]}
            model = SMEM_MODELS.get(launch.kernel)
            row["smem_model"] = model(nargs, launch.kwargs, cfg, arch) if model and cfg is not None else None
            if dry:
                rows.append(row)
                continue
            t0 = time.perf_counter()
            try:
                ck, info, cached = _compile_with_ptxas_info(jit, launch.args, kw, target)
                kind, counts, shapes = mma_summary(ck.asm.get("ptx", ""))
                shared = int(ck.metadata.shared) + int(info.get("static_smem", 0))
                row.update(ok=True, error=None, regs=info.get("regs"), spill_stores=info.get("spill_stores"),
                           spill_loads=info.get("spill_loads"), stack=info.get("stack"), shared=shared,
                           smem_over=shared > SMEM_LIMIT[arch], mma=kind, wgmma=counts["wgmma"],
                           mma_sync=counts["mma.sync"], mma_shapes=shapes, cached=cached)
                row.update(_occupancy(arch, info.get("regs") or 0, row["num_warps"], shared))
                if info.get("spill_stores"):
                    plain = _plain_ptxas(ck.asm["ptx"], arch)
                    row["spill_stores_plain"] = plain.get("spill_stores") if plain else None
                else:
                    row["spill_stores_plain"] = 0
            except Exception as e:  # noqa: BLE001 — a failing config is a result, not a crash
                first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
                row.update(ok=False, error=f"{type(e).__name__}: {first}"[:300], regs=None, spill_stores=None,
                           spill_stores_plain=None,
                           spill_loads=None, stack=None, shared=None, smem_over=None, mma=None, wgmma=None,
                           mma_sync=None, mma_shapes={}, cached=False)
            row["compile_s"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
    return rows


def _task(args):
    case, arch, dry = args
    return run_case(case, arch, dry)


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------

def _fmt_int(v):
    return "—" if v is None else f"{v:,}"


def _spill_str(r):
    if not r["ok"]:
        return "—"
    return "0" if not r["spill_stores"] and not r["spill_loads"] else f"{r['spill_stores']}/{r['spill_loads']}"


def summarize(rows):
    """Per (target, kernel, precision): configs compiled, errors, registers, spills, shared memory, MMA kinds."""
    groups = {}
    for r in rows:
        groups.setdefault((r["target"], r["kernel"], r["precision"]), []).append(r)
    out = []
    for (tgt, kernel, prec), rs in sorted(groups.items()):
        ok = [r for r in rs if r["ok"]]
        spilling = [r for r in ok if (r["spill_stores"] or 0) > 0]
        # Spills that plain ptxas keeps (or that could not be checked): register pressure, not an allocator option.
        pressure = [r for r in spilling if r.get("spill_stores_plain") is None or r["spill_stores_plain"] > 0]
        over = [r for r in ok if r["smem_over"]]
        kinds = sorted({r["mma"] for r in ok})
        out.append({
            "target": tgt, "kernel": kernel, "precision": prec, "compiles": len(rs), "errors": len(rs) - len(ok),
            "regs_max": max((r["regs"] or 0 for r in ok), default=None),
            "spilling": len(spilling), "spill_max": max((r["spill_stores"] for r in spilling), default=0),
            "spilling_pressure": len(pressure),
            "smem_max": max((r["shared"] for r in ok), default=None), "smem_over": len(over),
            "mma": "/".join(kinds) or "—",
        })
    return out


def problems(rows):
    return [r for r in rows if not r["ok"] or r["smem_over"] or (r["spill_stores"] or 0) > 0]


def markdown(rows, meta):
    lines = [f"# Compile report: triton {meta['triton']}, {', '.join(meta['targets'])}", "",
             f"Generated by `bench/compile_report.py{' --quick' if meta['quick'] else ''}` on a machine without a GPU "
             "(ptxas " + ", ".join(f"{t} {v}" for t, v in meta["ptxas"].items()) + f"). {meta['n_rows']} compiles of "
             f"{meta['n_cases']} cases in {meta['elapsed_s']:.0f} s ({sum(1 for r in rows if r.get('cached'))} of them "
             "from Triton's cache). Shared-memory limits (opt-in, per block): "
             + ", ".join(f"sm_{a} {SMEM_LIMIT[a]:,} B" for a in meta["archs"]) + ".", "",
             "Spills are ptxas's spill stores / loads in bytes per thread; shared memory is Triton's allocation in "
             "bytes; MMA is the tensor-core instruction the dots became (none: FMA).", "",
             "## Per kernel and precision", "",
             "| target | kernel | precision | compiles | errors | max regs | configs spilling (under plain ptxas) "
             "| worst spill (B) | max smem (B) | over limit | MMA |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for s in summarize(rows):
        lines.append(f"| {s['target']} | {s['kernel']} | {s['precision']} | {s['compiles']} | {s['errors']} | "
                     f"{_fmt_int(s['regs_max'])} | {s['spilling']} ({s['spilling_pressure']}) | "
                     f"{_fmt_int(s['spill_max'])} | "
                     f"{_fmt_int(s['smem_max'])} | {s['smem_over']} | {s['mma']} |")
    probs = problems(rows)
    lines += ["", f"## Spills, over-limit shared memory and errors ({len(probs)})", ""]
    if probs:
        lines += ["Spill st/ld is what the installed triton's ptxas call produced; \"plain\" is ptxas -v on the same "
                  "PTX with no options but the target: a spill that is gone there comes from an allocator option of "
                  "the triton release, not from register pressure.", "",
                  "| target | kernel | case | config | regs | spill st/ld (B) | plain ptxas spill (B) | smem (B) "
                  "| error |",
                  "| --- | --- | --- | --- | ---: | --- | ---: | ---: | --- |"]
        for r in sorted(probs, key=lambda r: (r["target"], r["kernel"], r["case"], r["config"])):
            smem = "—" if r["shared"] is None else f"{r['shared']:,}{' **over**' if r['smem_over'] else ''}"
            lines.append(f"| {r['target']} | {r['kernel']} | {r['case']} | {r['config']} | {_fmt_int(r['regs'])} | "
                         f"{_spill_str(r)} | {_fmt_int(r.get('spill_stores_plain'))} | {smem} | {r['error'] or ''} |")
    else:
        lines.append("None.")
    # The per-case detail of the benchmark shapes at the default precisions, on the first target: what the tuner
    # chooses among.
    first = meta["targets"][0]
    lines += ["", f"## Kept configs per case ({first}, default precisions)", "",
              "| kernel | case | configs | regs | spills | smem max (B) | MMA | CTAs |",
              "| --- | --- | ---: | --- | --- | ---: | --- | --- |"]
    by_case = {}
    for r in rows:
        if r["target"] == first and r["default_precision"]:
            by_case.setdefault((r["kernel"], r["case"]), []).append(r)
    for (kernel, case), rs in sorted(by_case.items()):
        ok = [r for r in rs if r["ok"]]
        regs = sorted({r["regs"] for r in ok})
        reg_s = f"{regs[0]}–{regs[-1]}" if len(regs) > 1 else (str(regs[0]) if regs else "—")
        spills = sum(1 for r in ok if (r["spill_stores"] or 0) > 0)
        kinds = "/".join(sorted({r["mma"] for r in ok})) or "—"
        ctas = sorted({r["ctas"] for r in rs})
        cta_s = f"{ctas[0]:,}–{ctas[-1]:,}" if len(ctas) > 1 else f"{ctas[0]:,}"
        lines.append(f"| {kernel} | {case} | {len(rs)}{'' if len(ok) == len(rs) else f' ({len(rs) - len(ok)} err)'} "
                     f"| {reg_s} | {spills or 0} spilling | {_fmt_int(max((r['shared'] for r in ok), default=None))} "
                     f"| {kinds} | {cta_s} |")
    return "\n".join(lines) + "\n"


def _ptxas_version(arch: int):
    """The release of the ptxas the installed triton uses for ``sm_<arch>`` (triton 3.9 ships two)."""
    import subprocess

    from triton import knobs
    try:
        try:
            from triton.backends.nvidia.compiler import get_ptxas
            path = get_ptxas(arch).path
        except ImportError:
            path = knobs.nvidia.ptxas.path
        out = subprocess.check_output([path, "--version"], text=True)
        m = re.search(r"release ([\d.]+)", out)
        return m.group(1) if m else out.strip().splitlines()[-1]
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__})"


def backend_available():
    """None if sm_90 compilation can work here, else the reason it cannot."""
    _clean_env()
    try:
        import triton
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"triton does not import: {e}"
    if "nvidia" not in backends:
        return f"triton {triton.__version__} has no CUDA backend"
    try:
        from triton import knobs
        tool = knobs.nvidia.ptxas_blackwell if hasattr(knobs.nvidia, "ptxas_blackwell") else knobs.nvidia.ptxas
        if not tool.path or not os.access(tool.path, os.X_OK):
            return "ptxas is missing from the triton install"
    except Exception as e:  # noqa: BLE001
        return f"ptxas not found: {e}"
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the representative subset (sm_90 only unless --targets)")
    ap.add_argument("--targets", default=None, help="comma-separated compute capabilities (default 90,80; quick: 90)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="worker processes (each compile is single-threaded)")
    ap.add_argument("--family", default=None,
                    help="only these case families (conv,cs,cs_indexed,cassi,sr,bicubic)")
    ap.add_argument("--match", default=None, help="only cases whose name contains this text")
    ap.add_argument("--list", action="store_true", help="list the cases and their kept configs; compile nothing")
    args = ap.parse_args(argv)

    _clean_env()
    why = backend_available()
    if why:
        print(f"compile report unavailable: {why}", file=sys.stderr)
        return 2
    import triton
    kernels = sorted(name for (_, name) in kernel_objects())
    archs = [int(a) for a in (args.targets or ("90" if args.quick else "90,80")).split(",")]
    for a in archs:
        if a not in SMEM_LIMIT:
            ap.error(f"--targets: no limits known for sm_{a}; known: {sorted(SMEM_LIMIT)}")
    cases = quick_cases() if args.quick else full_cases()
    if args.family:
        cases = [c for c in cases if c.family in args.family.split(",")]
    if args.match:
        cases = [c for c in cases if args.match in c.name]
    tasks = [(c, a, args.list) for a in archs for c in cases]
    if args.list:
        total = 0
        for c, a, _ in tasks:
            rs = run_case(c, a, dry=True)
            total += len(rs)
            per = {}
            for r in rs:
                per[r["kernel"]] = per.get(r["kernel"], 0) + 1
            print(f"sm_{a} {c.family} {c.name}: " + ", ".join(f"{k} ×{n}" for k, n in per.items()))
        print(f"{len(tasks)} cases, {total} compiles")
        return 0
    t0 = time.perf_counter()
    rows = []
    done = 0
    if args.jobs <= 1:
        it = map(_task, tasks)
        pool = None
    else:
        import multiprocessing as mp
        pool = ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn"))
        it = pool.map(_task, tasks, chunksize=1)
    try:
        for (case, arch, _), case_rows in zip(tasks, it):
            rows.extend(case_rows)
            done += 1
            bad = sum(1 for r in case_rows if not r["ok"] or r["smem_over"] or (r["spill_stores"] or 0) > 0)
            print(f"[{done}/{len(tasks)} {time.perf_counter() - t0:6.0f}s] sm_{arch} {case.family} {case.name}: "
                  f"{len(case_rows)} compiles{f', {bad} flagged' if bad else ''}", flush=True)
    finally:
        if pool is not None:
            pool.shutdown()
    elapsed = time.perf_counter() - t0
    meta = {"triton": triton.__version__, "ptxas": {f"sm_{a}": _ptxas_version(a) for a in archs}, "kernels": kernels,
            "targets": [f"sm_{a}" for a in archs],
            "archs": archs, "quick": args.quick, "n_cases": len(cases), "n_rows": len(rows), "elapsed_s": elapsed,
            "python": platform.python_version(), "smem_limits": {f"sm_{a}": SMEM_LIMIT[a] for a in archs},
            "sms": {f"sm_{a}": SMS[a] for a in archs}}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"compile_report_triton-{triton.__version__}{'_quick' if args.quick else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "summary": summarize(rows), "rows": rows},
                                                      indent=1, default=str))
    (args.out / f"{stem}.md").write_text(markdown(rows, meta))
    n_bad = len(problems(rows))
    print(f"{len(rows)} compiles in {elapsed:.0f} s, {n_bad} flagged; wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
