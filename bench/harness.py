"""Shared measurement helpers for every benchmark in ``bench/``.

``bench/`` is not a package: scripts run as ``python bench/x.py``, which puts ``bench/`` on ``sys.path``, and they
``import harness``. Everything here works on a CPU (host clock, exact saved-tensor byte counts) and on a CUDA GPU
(CUDA events through ``triton.testing.do_bench``, the caching allocator's peak, NVML), with no change to the caller.

Public functions:

- ``machine_info(device)``: what a number was measured on (date, commit, versions, GPU, driver, TF32 settings, ...).
- ``tf32_settings()`` / ``tf32_mode(enabled)``: read / temporarily set the TF32 flags of cuDNN and cuBLAS.
- ``time_fn(fn, device, ...)``: ``{p50_ms, p20_ms, p80_ms, n}`` of one callable.
- ``interleaved(fns, rounds, device=...)``: several callables timed round-robin, so that drift hits all alike.
- ``peak_memory(fn, device)``: the memory one call needs (see its docstring for what the number means per device).
- ``saved_activation_bytes(fn, *args)``: bytes autograd saves for backward during ``fn(*args)``.
- ``hbm_bandwidth(device)``: measured device-to-device copy bandwidth and the datasheet figure.
- ``peak_flops(device, dtype)``: datasheet dense FLOP/s of the GPU at a precision.
- ``gpu_spec(name)``: the datasheet table entry for a GPU name (or None).

- ``measure_providers(rows, fns, device, ...)`` / ``fill_roofline``: time a set of providers of one shape and pass and
  fill their rows' timing and roofline columns; ``rel_err(out, ref)``: the relative error a row records.

The single-kernel benchmarks' rows, numerics gate, tables, report folders and command line are ``driver.py``'s.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping

import torch


REPO = Path(__file__).resolve().parents[1]

__all__ = ["REPO", "git_commit", "machine_info", "tf32_settings", "tf32_mode", "quantiles", "summarize", "time_fn",
           "interleaved", "saved_activation_bytes", "peak_memory", "gpu_spec", "hbm_bandwidth", "peak_flops",
           "precision_key", "rel_err", "fill_roofline", "measure_providers"]


# --------------------------------------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------------------------------------

def git_commit() -> str:
    """Short commit of the repository ("unknown" outside git or without git); "+dirty" when the tree has changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        if commit:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _as_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _nvml_handle(device: torch.device):
    """(pynvml module, handle) for a CUDA device, or None when NVML is not usable (never raises)."""
    try:
        import pynvml  # the nvidia-ml-py package
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - missing package, missing driver library, no permission, ...
        return None
    try:
        uuid = str(getattr(torch.cuda.get_device_properties(device), "uuid", "") or "")
        if uuid:
            return pynvml, pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else
                                                          "GPU-" + uuid)
    except Exception:  # noqa: BLE001
        pass
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return None  # CUDA's index need not be NVML's: better no reading than another GPU's
    try:
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    except Exception:  # noqa: BLE001
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_info(device: torch.device) -> dict:
    """Read-only NVML facts (driver, clocks, power limit); empty values where NVML does not answer."""
    info: dict = {"driver": None}
    found = _nvml_handle(device)
    if found is None:
        info["nvml"] = "unavailable"
        return info
    pynvml, handle = found

    def read(key, call):
        try:
            info[key] = call()
        except Exception:  # noqa: BLE001
            info[key] = None

    read("driver", lambda: _text(pynvml.nvmlSystemGetDriverVersion()))
    read("sm_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
    read("sm_clock_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM))
    read("mem_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM))
    read("power_limit_w", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000)
    read("temperature_c", lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
    read("nvml_used_bytes", lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used))
    return info


def tf32_settings() -> dict:
    """The TF32 flags in force: ``tf32_matmul`` (``torch.backends.cuda.matmul.allow_tf32``), ``tf32_cudnn``
    (``torch.backends.cudnn.allow_tf32``), ``float32_matmul_precision`` and, on torch ≥ 2.9, the per-backend
    ``fp32_precision`` strings. torch ≥ 2.9 raises when a legacy flag is read after the new API set it; such a
    value is recorded as the error text instead."""
    getters = {"tf32_matmul": lambda: torch.backends.cuda.matmul.allow_tf32,
               "tf32_cudnn": lambda: torch.backends.cudnn.allow_tf32,
               "float32_matmul_precision": torch.get_float32_matmul_precision,
               "fp32_precision_matmul": lambda: str(torch.backends.cuda.matmul.fp32_precision),
               "fp32_precision_cudnn_conv": lambda: str(torch.backends.cudnn.conv.fp32_precision)}
    out = {}
    for key, getter in getters.items():
        try:
            out[key] = getter()
        except AttributeError:
            continue  # torch < 2.9: no per-backend API
        except RuntimeError as exc:
            out[key] = f"unreadable: {str(exc).splitlines()[0][:120]}"
    return out


@contextlib.contextmanager
def tf32_mode(enabled: bool = True):
    """Set TF32 for cuDNN convolutions and cuBLAS matmuls inside the block, restore the previous flags after.

    Uses the legacy flags (``torch.backends.cudnn.allow_tf32``, ``torch.backends.cuda.matmul.allow_tf32``); if the
    process already used torch ≥ 2.9's ``fp32_precision`` API (mixing the two raises), uses that API instead.
    """
    try:
        saved = ("legacy", torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = enabled
        torch.backends.cuda.matmul.allow_tf32 = enabled
    except RuntimeError:
        saved = ("new", torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
        value = "tf32" if enabled else "ieee"
        torch.backends.cudnn.conv.fp32_precision = value
        torch.backends.cuda.matmul.fp32_precision = value
    try:
        yield
    finally:
        if saved[0] == "legacy":
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[1], saved[2]
        else:
            torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved[1], saved[2]


def machine_info(device) -> dict:
    """Everything a benchmark number depends on, as a JSON-able dict.

    Always: date (UTC, ISO), git commit (short, "unknown" outside git), python, torch, triton (None when not
    installed), device, CPU and intra-op threads. On CUDA also: GPU name, compute capability, SM count, total memory,
    L2 size, CUDA and cuDNN versions, the TF32 settings in force (``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.backends.cudnn.allow_tf32``, ``torch.get_float32_matmul_precision()`` and, on torch ≥ 2.9, the
    ``fp32_precision`` settings), and from NVML (``pynvml``, guarded): driver version, current and maximum SM
    clock, memory clock, power limit, temperature and device-wide used memory; plus the datasheet entry for the GPU.
    """
    device = _as_device(device)
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
            "python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["sm_count"] = props.multi_processor_count
        info["total_memory_bytes"] = props.total_memory
        info["l2_cache_bytes"] = getattr(props, "L2_cache_size", None)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        try:
            info["cuda_driver_api"] = torch._C._cuda_getDriverVersion()  # e.g. 13000 = CUDA 13.0 driver API
        except (AttributeError, RuntimeError):
            pass
        info.update(tf32_settings())
        info.update(_nvml_info(device))
        info["datasheet"] = gpu_spec(props.name)
    return info


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------

def quantiles(values, qs) -> list[float]:
    """Quantiles by linear interpolation between order statistics (numpy's default, triton's ``_quantile``)."""
    data = sorted(float(v) for v in values)
    if not data:
        raise ValueError("quantiles: no values")
    out = []
    for q in qs:
        if not 0 <= q <= 1:
            raise ValueError(f"quantiles: expected q in [0, 1], got {q}")
        pos = (len(data) - 1) * q
        lo = math.floor(pos)
        hi = min(lo + 1, len(data) - 1)
        out.append(data[lo] + (data[hi] - data[lo]) * (pos - lo))
    return out


def summarize(times_ms) -> dict:
    """``{p50_ms, p20_ms, p80_ms, n}`` of a list of per-call times in milliseconds."""
    p50, p20, p80 = quantiles(times_ms, (0.5, 0.2, 0.8))
    return {"p50_ms": p50, "p20_ms": p20, "p80_ms": p80, "n": len(times_ms)}


def _host_times(fn: Callable, warmup_ms: float, rep_ms: float, min_reps: int, max_reps: int,
                sync: Callable = lambda: None) -> list[float]:
    """Per-call host-clock times (ms): warm-up for ``warmup_ms`` (at least one call), then calls until ``rep_ms``
    has passed, with at least ``min_reps`` and at most ``max_reps`` samples."""
    start = time.perf_counter()
    fn()
    sync()
    while (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
        sync()
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or (time.perf_counter() - begin) * 1e3 < rep_ms):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _cuda_times(fn: Callable, warmup_ms: float, rep_ms: float) -> tuple[list[float] | None, dict | None]:
    """CUDA-event times via ``triton.testing.do_bench`` (L2 flushed before every call, warm-up and repeat in ms).

    Asks for every sample (``return_mode="all"``) so that ``n`` is known; a triton without that mode gets
    ``quantiles=[0.5, 0.2, 0.8]`` (then ``n`` is None).
    """
    from triton.testing import do_bench

    try:
        times = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        if isinstance(times, (list, tuple)) and times:
            return [float(t) for t in times], None
    except (AssertionError, TypeError, ValueError):
        pass
    p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return None, {"p50_ms": float(p50), "p20_ms": float(p20), "p80_ms": float(p80), "n": None}


def time_fn(fn: Callable, device, *, warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 5,
            max_reps: int = 100_000) -> dict:
    """Time ``fn()``; returns ``{p50_ms, p20_ms, p80_ms, n}`` (percentiles of per-call times, milliseconds).

    CUDA: ``triton.testing.do_bench`` (CUDA events around each call, the L2 cache flushed before each call, about
    ``warmup_ms`` of warm-up and ``rep_ms`` of timed calls). CPU: the host clock (``time.perf_counter``) around each
    call after ``warmup_ms`` of warm-up (at least one call), for ``rep_ms`` and at least ``min_reps`` calls.
    """
    device = torch.device(device)
    if device.type == "cuda":
        times, summary = _cuda_times(fn, warmup_ms, rep_ms)
        return summary if times is None else summarize(times)
    return summarize(_host_times(fn, warmup_ms, rep_ms, min_reps, max_reps))


def interleaved(fns: Mapping[str, Callable], rounds: int = 5, *, device=None, warmup_ms: float = 25.0,
                rep_ms: float = 100.0, min_reps: int = 5) -> dict[str, dict]:
    """Time several providers alternately: ``rounds`` rounds, each timing every provider once with ``time_fn``
    (the starting provider rotates from round to round), so that clock, thermal or load drift hits all alike.

    Returns ``{name: {p50_ms, p20_ms, p80_ms, n, rounds_p50_ms, round_spread}}`` where ``p50_ms`` is the median of
    the per-round medians (``p20_ms``/``p80_ms`` likewise the medians of the per-round percentiles, so
    p20 ≤ p50 ≤ p80), ``n`` the number of timed calls over all rounds, and ``round_spread`` =
    (max − min) / median of the per-round medians: a difference between providers smaller than that is noise.
    ``device`` defaults to CUDA when available.
    """
    if rounds < 1:
        raise ValueError(f"rounds: expected ≥ 1, got {rounds}")
    if not fns:
        return {}
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    names = list(fns)
    per_round: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            per_round[name].append(time_fn(fns[name], device, warmup_ms=warmup_ms, rep_ms=rep_ms,
                                           min_reps=min_reps))
    out = {}
    for name, results in per_round.items():
        medians = [res["p50_ms"] for res in results]
        p50 = statistics.median(medians)
        ns = [res["n"] for res in results]
        out[name] = {"p50_ms": p50,
                     "p20_ms": statistics.median(res["p20_ms"] for res in results),
                     "p80_ms": statistics.median(res["p80_ms"] for res in results),
                     "n": None if any(n is None for n in ns) else sum(ns),
                     "rounds_p50_ms": medians,
                     "round_spread": (max(medians) - min(medians)) / p50 if p50 > 0 else 0.0}
    return out


# --------------------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------------------

def saved_activation_bytes(fn: Callable, *args, **kwargs) -> int:
    """Bytes autograd keeps for backward during one call ``fn(*args, **kwargs)``: the sizes of the distinct
    storages of every tensor saved by an autograd node (each storage counted once; inputs and parameters that are
    saved count too). 0 when nothing is recorded (no_grad, or no input requires grad)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return sum(seen.values())


def _device_used_bytes(device: torch.device) -> int | None:
    found = _nvml_handle(device)
    if found is not None:
        try:
            return int(found[0].nvmlDeviceGetMemoryInfo(found[1]).used)
        except Exception:  # noqa: BLE001
            pass
    try:
        free, total = torch.cuda.mem_get_info(device)
        return int(total - free)
    except RuntimeError:
        return None


def peak_memory(fn: Callable, device) -> dict:
    """The memory one call of ``fn()`` needs. Returns ``{"bytes", "measure", "device_used_bytes"}``.

    CUDA (``measure="cuda-allocator-peak"``): ``bytes`` = ``torch.cuda.max_memory_allocated`` during the call
    (peak stats reset just before) minus ``torch.cuda.memory_allocated`` just before: the most memory the call's
    own tensors (outputs, intermediates, saved activations, gradients, library workspaces that go through the
    caching allocator) occupied at once *on top of* what already existed (inputs, parameters). Allocator-rounded
    sizes; the caching allocator's reserved-but-free blocks are not counted. ``device_used_bytes`` is NVML's
    device-wide used memory right after the call (every process and context, cached blocks included; falls back to
    ``torch.cuda.mem_get_info``), for comparison only.

    CPU (``measure="cpu-saved-for-backward"``): ``bytes`` = the distinct storages autograd saves for backward
    during the call (``saved_activation_bytes``: exact, inputs and parameters included when saved); this is the
    memory a training step must hold between forward and backward, not the process's peak RSS. None when nothing
    was saved (e.g. a forward under ``torch.no_grad()``), because then the number would not describe the call.
    ``device_used_bytes`` is None.
    """
    device = _as_device(device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return {"bytes": int(peak), "measure": "cuda-allocator-peak", "device_used_bytes": _device_used_bytes(device)}
    saved = saved_activation_bytes(fn)
    return {"bytes": saved if saved > 0 else None, "measure": "cpu-saved-for-backward", "device_used_bytes": None}


# --------------------------------------------------------------------------------------------------------------------
# Ceilings: datasheet figures and a measured copy bandwidth
# --------------------------------------------------------------------------------------------------------------------

# Vendor datasheets, dense (no structured sparsity) tensor-core rates; "fp32" is the non-tensor FMA rate.
_H100_SXM = {"part": "H100 SXM", "hbm_Bps": 3.35e12, "tf32": 494e12, "bf16": 989e12, "fp16": 989e12,
             "fp32": 67e12}
_H100_PCIE = {"part": "H100 PCIe", "hbm_Bps": 2.0e12, "tf32": 378e12, "bf16": 756e12, "fp16": 756e12,
              "fp32": 51e12}
_H200_SXM = dict(_H100_SXM, part="H200 SXM", hbm_Bps=4.8e12)
_A100 = {"tf32": 156e12, "bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}


def gpu_spec(name: str | None) -> dict | None:
    """Datasheet entry for a GPU name as CUDA reports it (``torch.cuda.get_device_name``), or None when unknown.

    Keys: part, hbm_Bps (bytes/s), tf32, bf16, fp16, fp32 (FLOP/s, dense). Known: H100 SXM ('NVIDIA H100 80GB
    HBM3', 'NVIDIA H100'), H100 PCIe, H200 SXM ('NVIDIA H200'), A100 SXM4/PCIe 40 and 80 GB. NVL and GH200 parts
    return None (their figures differ and are not tabulated here).
    """
    if not name:
        return None
    n = name.lower()
    if "nvl" in n or "gh200" in n:
        return None
    if re.search(r"\bh200\b", n):
        return dict(_H200_SXM)
    if re.search(r"\bh100\b", n):
        return dict(_H100_PCIE if "pcie" in n else _H100_SXM)
    if re.search(r"\ba100\b", n):
        if "80gb" in n:
            hbm, part = (1.935e12, "A100 80GB PCIe") if "pcie" in n else (2.039e12, "A100 80GB SXM")
        else:
            hbm, part = 1.555e12, "A100 40GB"
        return dict(_A100, part=part, hbm_Bps=hbm)
    return None


def precision_key(dtype, tf32: bool = True) -> str:
    """'tf32' / 'fp32' / 'bf16' / 'fp16' for a torch dtype or one of those strings ('ieee' means fp32)."""
    if isinstance(dtype, str):
        key = {"float32": "tf32" if tf32 else "fp32", "ieee": "fp32", "tf32x3": "fp32", "bfloat16": "bf16",
               "float16": "fp16"}.get(dtype, dtype)
    else:
        key = {torch.float32: "tf32" if tf32 else "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    if key not in ("tf32", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision: expected float32/bfloat16/float16 or tf32/fp32/bf16/fp16, got {dtype!r}")
    return key


def peak_flops(device, dtype, *, tf32: bool = True) -> float | None:
    """Datasheet dense FLOP/s of the device's GPU at a precision, or None (CPU, or a GPU not in ``gpu_spec``).

    ``dtype``: torch.float32 (tensor-core TF32 when ``tf32``, else the non-tensor fp32 rate), torch.bfloat16,
    torch.float16, or one of 'tf32', 'fp32', 'bf16', 'fp16'. H100 SXM and H200: tf32 494e12, bf16/fp16 989e12,
    fp32 67e12.
    """
    device = _as_device(device)
    if device.type != "cuda":
        return None
    spec = gpu_spec(torch.cuda.get_device_name(device))
    return None if spec is None else spec[precision_key(dtype, tf32)]


@functools.lru_cache(maxsize=None)
def _measured_copy(device: torch.device, nbytes: int) -> tuple[float, float]:
    from triton.testing import do_bench

    numel = nbytes // 4
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_(-1, 1)  # never time on zeros
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, quantiles=[0.5])
    ms = float(ms[0] if isinstance(ms, (list, tuple)) else ms)
    src = dst = None  # free both copies before empty_cache
    torch.cuda.empty_cache()
    return ms, 2 * numel * 4 / (ms * 1e-3)


def hbm_bandwidth(device, nbytes: int = 2 ** 30) -> dict | None:
    """Device-memory bandwidth ceilings: ``{measured_Bps, datasheet_Bps, copy_bytes, copy_ms, gpu}``; None on CPU.

    ``measured_Bps``: a ``nbytes`` (default 1 GiB) float32 device-to-device copy, timed once per device and process
    with ``do_bench`` (median, L2 flushed), counting bytes read plus bytes written (2·nbytes). ``datasheet_Bps`` from
    ``gpu_spec`` (H100 SXM 3.35e12, H100 PCIe 2.0e12, H200 4.8e12, A100 80GB 2.04e12, A100 40GB 1.555e12; None if
    the GPU is unknown).
    """
    device = _as_device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    spec = gpu_spec(name)
    ms, bps = _measured_copy(device, int(nbytes))
    return {"gpu": name, "measured_Bps": bps, "datasheet_Bps": None if spec is None else spec["hbm_Bps"],
            "copy_bytes": 2 * (int(nbytes) // 4) * 4, "copy_ms": ms}


# --------------------------------------------------------------------------------------------------------------------
# Measuring a set of providers (the rows themselves, their tables and reports: driver.py)
# --------------------------------------------------------------------------------------------------------------------

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (``ref`` is the float64 reference); inf for a NaN or infinite result."""
    ref = ref.detach()
    err = float((out.detach().double() - ref).norm() / ref.norm().clamp_min(1e-300))
    return err if math.isfinite(err) else math.inf


def fill_roofline(row: dict, timing: dict, *, hbm: dict | None, spec: dict | None, peak: float | None) -> None:
    """Fill a row's timing columns from ``interleaved``'s result, and its roofline columns from the row's
    bytes_min / flops and the ceilings: gbps, tflops, frac_hbm_measured / frac_hbm_datasheet (``hbm_bandwidth``),
    frac_peak_flops (``peak`` FLOP/s), floor_ms = max(bytes / datasheet bandwidth, FLOPs / peak) and frac_floor."""
    row.update(p50_ms=timing["p50_ms"], p20_ms=timing["p20_ms"], p80_ms=timing["p80_ms"], n=timing["n"],
               round_spread=timing["round_spread"])
    seconds = timing["p50_ms"] * 1e-3
    row["gbps"] = row["bytes_min"] / seconds / 1e9
    row["tflops"] = row["flops"] / seconds / 1e12
    if hbm is not None:
        row["frac_hbm_measured"] = row["bytes_min"] / seconds / hbm["measured_Bps"]
        if hbm["datasheet_Bps"]:
            row["frac_hbm_datasheet"] = row["bytes_min"] / seconds / hbm["datasheet_Bps"]
    if peak:
        row["frac_peak_flops"] = row["flops"] / seconds / peak
    if spec is not None and peak:
        row["floor_ms"] = 1e3 * max(row["bytes_min"] / spec["hbm_Bps"], row["flops"] / peak)
        row["frac_floor"] = row["floor_ms"] / timing["p50_ms"]


def measure_providers(rows: Mapping[str, dict], fns: Mapping[str, Callable], device, *, rounds: int,
                      warmup_ms: float, rep_ms: float, hbm: dict | None, spec: dict | None,
                      peak: float | None) -> None:
    """One pass of one shape: the memory of each ``fns[name]`` (outside any timed region), then the providers timed
    together with ``interleaved``; fills ``rows[name]`` (peak_mem_*, device_used_bytes, then ``fill_roofline``)."""
    for name, fn in fns.items():
        mem = peak_memory(fn, device)
        rows[name].update(peak_mem_bytes=mem["bytes"], peak_mem_measure=mem["measure"],
                          device_used_bytes=mem["device_used_bytes"])
    timings = interleaved(fns, rounds, device=device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    for name, timing in timings.items():
        fill_roofline(rows[name], timing, hbm=hbm, spec=spec, peak=peak)
