"""lorun_fast: fused Triton kernels, a pure-PyTorch reference and honest benchmarks for LoRA-unfolding networks.

The reference lives in :mod:`lorun_fast.reference`, the Triton kernels in :mod:`lorun_fast.kernels`.
"""
from lorun_fast.fused_conv import FusedLoRunConv
from lorun_fast.models import ModelConfig, build_dun, to_fast, to_reference

__version__ = "0.1.0"
__all__ = ["FusedLoRunConv", "ModelConfig", "build_dun", "to_fast", "to_reference", "__version__"]
