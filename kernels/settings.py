"""Environment switches and constants shared by the Triton kernels and their callers (imports no triton).

- ``TRITON_INTERPRET=1``: run the kernels in Triton's interpreter on CPU tensors. Triton reads it when a kernel
  is decorated, so it must be set before ``lorun_fast.kernels.lora_conv`` / ``.gd_step`` are imported.
- ``LORUN_FAST_TUNE=0``: autotune over two configs per kernel (one at 8 warps) instead of the full lists, so that a
  GPU test run compiles in seconds; benchmarks keep the default (full lists).
- ``LORUN_FAST_CONV_KERNEL=v1|v2``: which design of the fused LoRA convolution runs (``lorun_fast.kernels.lora_conv``;
  default v2). Read at every call, so one process can time both; :func:`use_conv_kernel` overrides it in a block.
"""
import contextlib
import os

INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")

# An H100 / H200 (sm_90): what the config pruners assume when they cannot ask the device (CPU tensors under the
# interpreter, or a report compiling for a card that is not there). 227 KB is sm_90's opt-in maximum per block.
DEFAULT_CAPABILITY = (9, 0)
DEFAULT_MAX_SHARED_MEMORY = 232_448


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def full_tuning() -> bool:
    return os.environ.get("LORUN_FAST_TUNE", "1").strip() != "0"


def device_limits(device) -> tuple:
    """``((major, minor), opt-in shared memory per block in bytes)`` of a CUDA device, or the sm_90 defaults."""
    if getattr(device, "type", None) == "cuda":
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(device)
            smem = getattr(props, "shared_memory_per_block_optin", 0) or DEFAULT_MAX_SHARED_MEMORY
            return (props.major, props.minor), int(smem)
    return DEFAULT_CAPABILITY, DEFAULT_MAX_SHARED_MEMORY


def check_runnable(t, kernel_module: str) -> None:
    """Triton launches need CUDA tensors, or CPU tensors under the interpreter."""
    if not t.is_cuda and not interpreting():
        raise RuntimeError(f"{kernel_module}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before "
                           "importing it to run them on CPU)")


def dot_precision(dtype, input_precision: str) -> str:
    """The ``tl.dot`` precision for operands of ``dtype``: the requested one for float32; 16-bit operands get
    tl.dot's default ("tf32", a no-op for them), which also avoids a recompile per requested precision."""
    import torch

    return input_precision if dtype == torch.float32 else "tf32"


#: The designs of the fused LoRA convolution: v1 merges W + s·B·A tile by tile inside every program and reduces
#: dW one tap per program; v2 merges once per launch and reduces all taps of dW in one program, with the ReLU mask
#: applied inside the backward kernels (``lorun_fast.kernels.lora_conv``).
CONV_KERNELS = ("v1", "v2")
_CONV_KERNEL_OVERRIDE = None


def conv_kernel() -> str:
    """The LoRA convolution design in use: :func:`use_conv_kernel`'s, else ``LORUN_FAST_CONV_KERNEL``, else v2."""
    value = _CONV_KERNEL_OVERRIDE or os.environ.get("LORUN_FAST_CONV_KERNEL", "").strip().lower() or "v2"
    if value not in CONV_KERNELS:
        raise ValueError(f"LORUN_FAST_CONV_KERNEL: expected one of {CONV_KERNELS}, got {value!r}")
    return value


@contextlib.contextmanager
def use_conv_kernel(version: str):
    """Run the LoRA convolution of ``version`` ("v1" or "v2") inside the block (benchmarks time both this way)."""
    global _CONV_KERNEL_OVERRIDE
    if version not in CONV_KERNELS:
        raise ValueError(f"version: expected one of {CONV_KERNELS}, got {version!r}")
    previous, _CONV_KERNEL_OVERRIDE = _CONV_KERNEL_OVERRIDE, version
    try:
        yield
    finally:
        _CONV_KERNEL_OVERRIDE = previous


def check_sample_index(index, x, what: str) -> None:
    """dtype, shape and device of a per-sample index into ``what`` (e.g. "adapters"), one entry per sample of ``x``;
    its values are checked by :func:`check_index_range` in the op's body."""
    import torch

    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index: expected a torch.Tensor of numbers into {what}, got {type(index).__name__}")
    if index.dtype != torch.int64:
        raise TypeError(f"index: expected dtype torch.int64, got {index.dtype}")
    nb = x.shape[0]
    if index.dim() != 1 or index.shape[0] != nb:
        raise ValueError(f"index: expected a 1-D tensor of length {nb} (one of {what} per sample of x, whose shape is "
                         f"{tuple(x.shape)}), got shape {tuple(index.shape)}")
    if index.device != x.device:
        raise ValueError(f"index: on device {index.device}, but x is on {x.device}; all tensors must share a device")


def check_index_range(index, count: int, what: str) -> None:
    """Every value of ``index`` in [0, count): an out-of-range value would make a kernel read outside its stacked
    operands. One host sync (min and max); called in the op's body, which runs eagerly also under torch.compile."""
    import torch

    if index.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(index))
    if lo < 0 or hi >= count:
        raise ValueError(f"index: values must lie in [0, {count}) for {count} {what}, got values from {lo} to {hi}")

