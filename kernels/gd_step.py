"""The fused gradient-descent steps ``z = x − ρ·Aᵀ(A x − y)`` (the GDM of every DUN stage), one place to import them.

Each operator has its own module (docs/design.md, §3):

* ``gd_step_cs``: block compressive sensing (``gd_step_cs``), two exact algorithms (two GEMMs through Φ, or one GEMM
  with the Gram matrix ΦᵀΦ);
* ``gd_step_cassi``: coded-aperture spectral imaging (``gd_step_cassi``), one launch;
* ``gd_step_sr``: super-resolution with a Gaussian blur and decimation (``gd_step_sr``), two launches;
* ``gd_step_bicubic``: super-resolution with MATLAB's bicubic downscaling (``gd_step_bicubic``), two launches;
* ``gd_step_common``: what they share (configs, launch functions, checks, the NaN-poisoning test switch).

This module re-exports the first three operators' public names. ``POISON_OUTPUTS`` read or set here is
``gd_step_common.POISON_OUTPUTS``, the one switch every launcher reads.
"""
import sys
import types

from lorun_fast.kernels import gd_step_common as _common
from lorun_fast.kernels.gd_step_cassi import GDStepCASSIFunction, cassi_backward, cassi_forward, gd_step_cassi
from lorun_fast.kernels.gd_step_common import SUPPORTED_DTYPES
from lorun_fast.kernels.gd_step_cs import (ALGORITHMS, INPUT_PRECISIONS, GDStepCSFunction, clear_cache, cs_backward,
                                           cs_forward, gd_step_cs, resolve_cs_algorithm)
from lorun_fast.kernels.gd_step_sr import GDStepSRFunction, gd_step_sr, sr_backward, sr_forward

__all__ = [
    "gd_step_cs",
    "gd_step_cassi",
    "gd_step_sr",
    "GDStepCSFunction",
    "GDStepCASSIFunction",
    "GDStepSRFunction",
    "cs_forward",
    "cs_backward",
    "cassi_forward",
    "cassi_backward",
    "sr_forward",
    "sr_backward",
    "resolve_cs_algorithm",
    "clear_cache",
    "ALGORITHMS",
    "INPUT_PRECISIONS",
    "SUPPORTED_DTYPES",
]


class _Module(types.ModuleType):
    @property
    def POISON_OUTPUTS(self):  # noqa: N802 (the module attribute's name)
        """``gd_step_common.POISON_OUTPUTS``: reading or setting it here reaches every launcher."""
        return _common.POISON_OUTPUTS

    @POISON_OUTPUTS.setter
    def POISON_OUTPUTS(self, value):  # noqa: N802
        _common.POISON_OUTPUTS = value


sys.modules[__name__].__class__ = _Module
