"""Small ``@triton.jit`` helpers shared by the kernels.

Keys: ``(score, index)`` packed into one 64-bit integer. A float's bits, remapped so
that signed-integer order equals float order, fill the high 32 bits; the index (< 2**31)
fills the low 32. One integer min/max reduction then
returns the best score and, among equal scores, the lower index - in any
reduction order, so the result cannot depend on thread scheduling or tiling.
"""
import triton
import triton.language as tl

from ..spec import RAW_EXP_MAX, RAW_EXP_MIN, SCALE_EXP_MAX, SCALE_EXP_MIN

EXP_MIN = tl.constexpr(SCALE_EXP_MIN)
EXP_MAX = tl.constexpr(SCALE_EXP_MAX)
# A token scaled by 2**-e is in the raw band (spec) for e in [RAW_EXP_MIN, RAW_EXP_MAX]: its
# scale lies in [2**-RAW_EXP_MAX, 2**-RAW_EXP_MIN].
RAW_SCALE_MIN = tl.constexpr(2.0 ** -RAW_EXP_MAX)
RAW_SCALE_MAX = tl.constexpr(2.0 ** -RAW_EXP_MIN)

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


@triton.jit
def finite_abs(x):
    """``|x|``, and 0 for non-finite values: what a power-of-two scale is taken of."""
    return tl.where(nonfinite(x), 0.0, tl.abs(x))


@triton.jit
def pow2_scale(amax):
    """``2**-e`` with ``amax = m·2**e``, ``m`` in [0.5, 1) (``e`` = 0 for 0, clamped to the spec's
    range): read off the fp32 exponent bits, so multiplying by it is exact (see ``spec``)."""
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126
    e = tl.where(amax == 0.0, 0, tl.minimum(tl.maximum(e, EXP_MIN), EXP_MAX))
    return ((127 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def in_raw_band(scale):
    """Tokens of this :func:`pow2_scale` whose unscaled products are safe (spec's raw band)."""
    return (scale >= RAW_SCALE_MIN) & (scale <= RAW_SCALE_MAX)


@triton.jit
def scaled_operand(x, scale, SCALE: tl.constexpr, UPCAST: tl.constexpr):
    """``x`` times its rows' ``scale`` (exact) in ``x``'s dtype, as a ``tl.dot`` operand.
    Without ``SCALE`` (fp16: its products cannot overflow fp32) the caller scales the result."""
    if SCALE:
        x = (x.to(tl.float32) * scale[:, None]).to(x.dtype)
    return dot_operand(x, UPCAST)
