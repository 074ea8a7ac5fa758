// Kernel 1 of 4: the power-of-two scale of every row (token, or "max" prompt row) and the
// scaled copy that the GEMMs read, in one pass (bf16/fp32; fp16 is never scaled).
//
//   scale[r]     = pow2_scale(largest finite |x[r, :]|)       (spec.cuh; 1 for an all-zero row)
//   scaled[r, :] = x[r, :] * scale[r], rounded to x's dtype    (exact: a power of two)
//
// so that no product of the Gram or of the "max" dots overflows fp32, whatever the tokens'
// magnitude. One warp per row: D values read twice (the second read hits L1/L2), D written.
// This replaces a chain of ~14 small ATen launches (abs, nan_to_num, amax, frexp, clamp,
// shifts, casts, multiply) whose launch latency dominated the op at LLaVA sizes.
#pragma once

#include <cmath>
#include <cstdint>

#include "prompt_stats.cuh"
#include "spec.cuh"

namespace zspa {

// Rows [x * warps, (x + 1) * warps) of `rows`, one warp each; blockDim.x a multiple of 32.
template <typename scalar_t>
__device__ void scale_rows_block(const scalar_t* __restrict__ x,  // (rows, D)
                                 scalar_t* __restrict__ scaled,   // (rows, D)
                                 float* __restrict__ scale,       // (rows,)
                                 int64_t rows, int D) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;  // whole warps leave together: the shuffles below see full warps
  const scalar_t* src = x + r * D;
  float amax = 0.0f;
  for (int d = lane; d < D; d += 32) {
    const float v = fabsf(static_cast<float>(src[d]));
    if (isfinite(v)) amax = fmaxf(amax, v);  // NaN and inf count as 0, like nan_to_num
  }
  const float s = pow2_scale(warp_max(amax));
  if (lane == 0) scale[r] = s;
  scalar_t* dst = scaled + r * D;
  for (int d = lane; d < D; d += 32) dst[d] = static_cast<scalar_t>(static_cast<float>(src[d]) * s);
}

template <typename scalar_t>
__global__ void scale_rows_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ scaled,
                                  float* __restrict__ scale, int64_t rows, int D) {
  scale_rows_block(x, scaled, scale, rows, D);
}

}  // namespace zspa
