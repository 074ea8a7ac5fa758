// Kernel 1 of 4: the power-of-two scale of every row (token, or "max" prompt row) and the
// scaled copy that the GEMMs read, in one pass (bf16/fp32; fp16 is never scaled).
//
//   scale[r]     = pow2_scale(largest finite |x[r, :]|)       (spec.cuh; 1 for an all-zero row)
//   scaled[r, :] = x[r, :] * scale[r], rounded to x's dtype    (exact: a power of two)
//
// so that no product of the Gram or of the "max" dots overflows fp32, whatever the tokens'
// magnitude. One CTA per row: D values read twice (the second read hits L1), D written.
// This replaces a chain of ~14 small ATen launches (abs, nan_to_num, amax, frexp, clamp,
// shifts, casts, multiply) whose launch latency dominated the op at LLaVA sizes.
#pragma once

#include <cmath>
#include <cstdint>

#include "prompt_stats.cuh"
#include "spec.cuh"

namespace zspa {

// The CTA of row blockIdx.x; blockDim.x a multiple of 32, at most 1024; `scratch`: 32 floats of
// shared memory. A CTA per row, not a warp: with a few hundred rows a warp per row leaves an SM
// a handful of warps, each walking D/32 dependent-latency loads; a CTA takes D/blockDim.x.
template <typename scalar_t>
__device__ void scale_row(const scalar_t* __restrict__ x,  // (rows, D)
                          scalar_t* __restrict__ scaled,   // (rows, D)
                          float* __restrict__ scale,       // (rows,)
                          int D, float* scratch) {
  const int64_t r = blockIdx.x;
  const scalar_t* src = x + r * D;
  float amax = 0.0f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    const float v = fabsf(static_cast<float>(src[d]));
    if (isfinite(v)) amax = fmaxf(amax, v);  // NaN and inf count as 0, like nan_to_num
  }
  const float s = pow2_scale(block_max(amax, scratch));
  if (threadIdx.x == 0) scale[r] = s;
  scalar_t* dst = scaled + r * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x)  // the row again: from L1, this CTA just read it
    dst[d] = static_cast<scalar_t>(static_cast<float>(src[d]) * s);
}

template <typename scalar_t>
__global__ void scale_rows_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ scaled,
                                  float* __restrict__ scale, int D) {
  __shared__ float scratch[32];
  scale_row(x, scaled, scale, D, scratch);
}

}  // namespace zspa
