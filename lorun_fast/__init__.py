"""lorun_fast: fused Triton kernels, a pure-PyTorch reference and honest benchmarks for LoRA-unfolding networks.

The reference lives in :mod:`lorun_fast.reference`, the Triton kernels in :mod:`lorun_fast.kernels`.
"""
from lorun_fast.models import ModelConfig, build_dun

__version__ = "0.1.0"
__all__ = ["ModelConfig", "build_dun", "__version__"]
