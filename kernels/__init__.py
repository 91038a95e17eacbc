"""Triton kernels of lorun_fast (installed as ``lorun_fast.kernels``).

Import the submodules explicitly; on machines without CUDA set ``TRITON_INTERPRET=1`` before importing them.
"""
