"""The names the command line offers as choices, in a module that imports nothing (the CLI builds its parser, and
answers ``--help`` and Ctrl-C, before torch has loaded).

The modules that use these names import them from here; the two owned by torch modules, ``STRATEGIES``
(``lorun_fast.reference.dun``) and the backbone names (``lorun_fast.models.BACKBONES``), are held equal to these by
the tests.
"""
__all__ = ["STRATEGIES", "BACKBONE_NAMES", "DEGRADATIONS", "SR_SCALES", "PRECISIONS", "TRAIN_BACKENDS"]

#: The DUN strategies: independent stages, one weight-tied denoiser, or a frozen shared base with per-stage adapters.
STRATEGIES = ("block", "shared", "lorun")
#: The denoiser backbones of a DUN stage (``lorun_fast.models.BACKBONES`` maps them to their classes).
BACKBONE_NAMES = ("resunet", "ista_net_plus")
#: How the SR task makes a low-resolution image: MATLAB's bicubic downscaling, or Gaussian blur + decimation.
DEGRADATIONS = ("bicubic", "gaussian")
#: The SR scales (those of MATLAB's bicubic kernel in ``lorun_fast.reference.bicubic``).
SR_SCALES = (2, 3, 4)
#: Training precisions: float32, or bfloat16 autocast of the forward pass.
PRECISIONS = ("float32", "bfloat16")
#: The LoRA layers' backends in training.
TRAIN_BACKENDS = ("auto", "reference", "merged", "triton")
