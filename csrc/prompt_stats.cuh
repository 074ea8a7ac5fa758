// Kernel 1 of 3: prompt norms, and the pooled prompt for relevance "mean".
//
// Cosines are formed as (dot product) / (norm_a * norm_b) of vectors scaled by powers of
// two (spec.cuh: exact, and no square overflows), with norm = max(||s x||, 1e-6 * s): a
// division of the dot product, so exact ties stay exact. Per batch row b (one CTA each):
//   "mean": pooled[b] = s * (the mean of the valid prompt rows, fp32; the paper's rule:
//           pool, then cosine), s its pow2_scale, and norm[b, 0] = max(||pooled||, 1e-6 s);
//   "max":  norm[b, t] = max(||p_t||, 1e-6 * scale[b, t]) for every prompt row, which the
//           launcher has scaled (scale null: unscaled fp16 rows, which cannot overflow).
// norm = 0 marks a prompt that acts as a zero vector (SPEC conventions): a pooled
// vector with a non-finite value, or no valid row ("mean"); a non-finite row ("max").
// Masked-out rows never contribute, whatever they hold. "Non-finite" is read off the
// fp32 sum of squares of the scaled values, which is NaN or inf exactly when an element is.
//
// Cost: one read of the B*T*D prompt ("mean": plus one of the B*D pooled vector).
#pragma once

#include <cmath>
#include <cstdint>

#include "pdl.cuh"
#include "spec.cuh"

namespace zspa {

// max(||s x||, 1e-6 s) from ||s x||^2 (s: the vector's power-of-two scale), or 0 when x
// holds a non-finite value.
__device__ __forceinline__ float clamped_norm(float sumsq, float scale) {
  return isfinite(sumsq) ? fmaxf(sqrtf(sumsq), kNormEps * scale) : 0.0f;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Block-wide sum and max; `scratch` is reused, hence the barrier before it is written.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  x = warp_sum(x);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  return warp_sum(lane < warps ? scratch[lane] : 0.0f);
}

__device__ __forceinline__ float block_max(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  x = warp_max(x);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  return warp_max(lane < warps ? scratch[lane] : 0.0f);
}

// The body of the CTA of batch row blockIdx.x; `scratch` is 32 floats of shared memory.
// blockDim.x: a multiple of 32, at most 1024.
template <typename scalar_t>
__device__ void prompt_stats_row(const scalar_t* __restrict__ prompt,  // (B, T, D)
                                 const bool* __restrict__ mask,        // (B, T) or null
                                 float* __restrict__ pooled,           // (B, D), "mean" only
                                 float* __restrict__ norm,             // (B, T)
                                 const float* __restrict__ scale,      // (B, T) or null, "max" only
                                 int T, int D, bool max_relevance, float* scratch) {
  const int b = blockIdx.x;
  const scalar_t* p = prompt + static_cast<int64_t>(b) * T * D;
  const bool* valid = mask ? mask + static_cast<int64_t>(b) * T : nullptr;
  float* out_norm = norm + static_cast<int64_t>(b) * T;

  if (max_relevance) {
    // One warp per prompt row.
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int t = warp; t < T; t += warps) {
      float sumsq = 0.0f;
      for (int d = lane; d < D; d += 32) {
        const float x = static_cast<float>(p[static_cast<int64_t>(t) * D + d]);
        sumsq += x * x;
      }
      sumsq = warp_sum(sumsq);
      if (lane == 0) out_norm[t] = clamped_norm(sumsq, scale ? scale[static_cast<int64_t>(b) * T + t] : 1.0f);
    }
    return;
  }

  int count = 0;
  for (int t = 0; t < T; ++t) count += (!valid || valid[t]) ? 1 : 0;
  float* q = pooled + static_cast<int64_t>(b) * D;
  float amax = 0.0f;  // largest finite |mean|
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int t = 0; t < T; ++t)
      if (!valid || valid[t]) acc += static_cast<float>(p[static_cast<int64_t>(t) * D + d]);
    const float mean = acc / static_cast<float>(count > 0 ? count : 1);
    q[d] = mean;
    amax = fmaxf(amax, finite_abs(mean));
  }
  const float s = pow2_scale(block_max(amax, scratch));
  float sumsq = 0.0f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {  // each thread rescales its own elements
    const float scaled = q[d] * s;
    q[d] = scaled;
    sumsq += scaled * scaled;
  }
  sumsq = block_sum(sumsq, scratch);
  if (threadIdx.x == 0) out_norm[0] = count > 0 ? clamped_norm(sumsq, s) : 0.0f;
}

template <typename scalar_t>
__global__ void __launch_bounds__(1024) prompt_stats_kernel(const scalar_t* __restrict__ prompt,
                                                            const bool* __restrict__ mask, float* __restrict__ pooled,
                                                            float* __restrict__ norm, const float* __restrict__ scale,
                                                            int T, int D, bool max_relevance) {
  __shared__ float scratch[32];
  allow_next_kernel();  // the token pass may start reading the tokens now (pdl.cuh)
  prompt_stats_row(prompt, mask, pooled, norm, scale, T, D, max_relevance, scratch);
}

}  // namespace zspa
