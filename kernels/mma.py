"""The one ``tl.dot`` wrapper every kernel multiplies with (the LoRA convolution and the gradient steps)."""
import triton
import triton.language as tl


@triton.jit
def _mma(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` in fp32, the dot in ``INPUT_PRECISION`` ("ieee", "tf32", "tf32x3"; 16-bit operands ignore it).

    ``UPCAST``: the interpreter multiplies bfloat16 operands as their raw uint16 bits; upcasting first is exact (a
    product of two bf16 values fits in fp32), so it is the same math as a bf16 MMA with fp32 accumulation.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
