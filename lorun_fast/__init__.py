"""lorun_fast: fused Triton kernels, a pure-PyTorch reference and honest benchmarks for LoRA-unfolding networks.

The reference lives in :mod:`lorun_fast.reference`, the Triton kernels in :mod:`lorun_fast.kernels`.
The public names below are imported on first use, so that ``python -m lorun_fast`` starts (and answers Ctrl-C)
before torch is loaded.
"""
import importlib

__version__ = "0.1.0"
__all__ = ["FusedLoRunConv", "ModelConfig", "build_dun", "to_fast", "to_reference", "AdapterSets", "__version__"]

_LAZY = {"FusedLoRunConv": "lorun_fast.lora_conv", "ModelConfig": "lorun_fast.models",
         "build_dun": "lorun_fast.models", "to_fast": "lorun_fast.models", "to_reference": "lorun_fast.models",
         "AdapterSets": "lorun_fast.adapter_sets"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lorun_fast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
