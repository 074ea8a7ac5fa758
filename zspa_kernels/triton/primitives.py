"""Small ``@triton.jit`` helpers shared by the kernels.

Keys: ``(score, index)`` packed into one 64-bit integer. A float's bits, remapped so
that signed-integer order equals float order, fill the high 32 bits; the index (< 2**31)
fills the low 32. One integer min/max reduction then
returns the best score and, among equal scores, the lower index - in any
reduction order, so the result cannot depend on thread scheduling or tiling.
"""
import triton
import triton.language as tl

@triton.jit
def orderable(x):
    """fp32 -> int32 with the same order (no NaN here). -0.0 and +0.0 map to one value,
    so that a zero score ties with a zero score as it does in float comparison."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def min_key(score, index):
    """Key whose minimum is the lowest score, ties to the lower index."""
    return (orderable(score).to(tl.int64) << 32) | index.to(tl.int64)


@triton.jit
def max_key(score, index):
    """Key whose maximum is the highest score, ties to the lower index."""
    return (orderable(score).to(tl.int64) << 32) | (0x7FFFFFFF - index).to(tl.int64)


@triton.jit
def key_index(key):
    """The index packed into a :func:`min_key`."""
    return (key & 0x7FFFFFFF).to(tl.int32)


@triton.jit
def nonfinite(x):
    return (x != x) | (tl.abs(x) == float("inf"))


@triton.jit
def dot_operand(x, UPCAST: tl.constexpr):
    """``x`` as a ``tl.dot`` operand. ``UPCAST`` (bf16 under TRITON_INTERPRET only): the
    interpreter multiplies bf16 operands as their raw uint16 bits; fp32 operands give the
    same exact products and fp32 sums that the tensor cores compute from bf16."""
    if UPCAST:
        x = x.to(tl.float32)
    return x
