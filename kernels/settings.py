"""Environment switches and constants shared by the Triton kernels and their callers (imports no triton).

- ``TRITON_INTERPRET=1``: run the kernels in Triton's interpreter on CPU tensors. Triton reads it when a kernel
  is decorated, so it must be set before ``lorun_fast.kernels.lora_conv`` / ``.gd_step`` are imported.
- ``LORUN_FAST_TUNE=0``: autotune over two configs per kernel (one at 8 warps) instead of the full lists, so that a
  GPU test run compiles in seconds; benchmarks keep the default (full lists).
"""
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
