// Kernel 2 of 3: one pass over each row (a token, or a "max" prompt row), which yields
//
//   scale[r]     = pow2_scale(largest finite |x[r, :]|)       (spec.cuh; 1 for an all-zero row)
//   scaled[r, :] = x[r, :] * scale[r], rounded to x's dtype    (exact: a power of two)
//   dots[r]      = scaled[r, :] . pooled[b]  in fp32           (relevance "mean", tokens only)
//
// The scale keeps every product of the Gram and of the "max" dots in fp32's range, whatever
// the tokens' magnitude (bf16/fp32 only: fp16 is never scaled, its squares cannot overflow;
// `scaled` and `scale` are then null and the dots are of the tokens as given). `pooled`
// (prompt_stats.cuh, already scaled) is the same vector for every row of a batch row b, an
// L1/L2-resident read. One CTA per row: D values read twice (the second read hits L1), D written,
// one fp32 written. The dots were a kernel of their own until the H200 profile (2026-11-30)
// showed that second pass over the tokens costing as much as this one (126 us against 178 us
// at LLaVA-1.5 B=32): same thread-to-feature map and block sum, so the same fp32 values.
#pragma once

#include <cmath>
#include <cstdint>

#include "prompt_stats.cuh"
#include "spec.cuh"

namespace zspa {

// The CTA of row blockIdx.x of a (rows, D) matrix whose batch rows hold `rows_per_batch` rows
// each; blockDim.x a multiple of 32, at most 1024; `scratch`: 32 floats of shared memory. A CTA
// per row, not a warp: with a few hundred rows a warp per row leaves an SM a handful of warps,
// each walking D/32 dependent-latency loads; a CTA takes D/blockDim.x.
template <typename scalar_t>
__device__ void scale_row(const scalar_t* __restrict__ x,  // (rows, D)
                          scalar_t* __restrict__ scaled,   // (rows, D), or null: no scaling
                          float* __restrict__ scale,       // (rows,), null with `scaled`
                          const float* __restrict__ pooled,  // (rows / rows_per_batch, D), or null: no dots
                          float* __restrict__ dots,        // (rows,), null with `pooled`
                          int64_t rows_per_batch, int D, float* scratch) {
  const int64_t r = blockIdx.x;
  const scalar_t* src = x + r * D;
  float s = 1.0f;
  if (scaled) {
    float amax = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
      const float v = fabsf(static_cast<float>(src[d]));
      if (isfinite(v)) amax = fmaxf(amax, v);  // NaN and inf count as 0, like nan_to_num
    }
    s = pow2_scale(block_max(amax, scratch));
    if (threadIdx.x == 0) scale[r] = s;
  }
  scalar_t* dst = scaled ? scaled + r * D : nullptr;
  const float* q = pooled ? pooled + (r / rows_per_batch) * D : nullptr;
  float acc = 0.0f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {  // the row again: from L1, this CTA just read it
    const scalar_t y = dst ? static_cast<scalar_t>(static_cast<float>(src[d]) * s) : src[d];
    if (dst) dst[d] = y;
    if (q) acc += static_cast<float>(y) * q[d];
  }
  if (q) {
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) dots[r] = acc;
  }
}

template <typename scalar_t>
__global__ void scale_rows_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ scaled,
                                  float* __restrict__ scale, const float* __restrict__ pooled,
                                  float* __restrict__ dots, int64_t rows_per_batch, int D) {
  __shared__ float scratch[32];
  scale_row(x, scaled, scale, pooled, dots, rows_per_batch, D, scratch);
}

}  // namespace zspa
