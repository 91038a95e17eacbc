"""Pure-PyTorch reference of LoRun: the ground truth every fast path is tested against.

Installed as ``lorun_fast.reference``; readable, unfused and float64-capable.
"""
from .backbones import ISTANetPlusPhase, ResBlock, ResUNet
from .bicubic import BicubicSR, imresize, imresize_matrix
from .dun import DUN, STRATEGIES, RankClampWarning, apply_lora, find_convolutions, lora_layers
from .lora_conv import LoRAConv2d, check_stage, lora_rank, merged_conv
from .operators import CASSI, BlockCS, Operator, SuperResolution, gaussian_kernel, load_mat_array

__all__ = ["BicubicSR", "BlockCS", "CASSI", "DUN", "ISTANetPlusPhase", "LoRAConv2d", "Operator", "RankClampWarning", "ResBlock", "ResUNet",
           "STRATEGIES", "SuperResolution", "apply_lora", "check_stage", "find_convolutions", "gaussian_kernel",
           "imresize", "imresize_matrix", "load_mat_array", "lora_layers", "lora_rank", "merged_conv"]
