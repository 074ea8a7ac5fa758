// Kernel 1 of 2: per-prompt-token weights that turn raw dot products into relevance.
//
// The launcher computes R[b, i, t] = v_i . p_t from the RAW inputs (one GEMM, fp32
// accumulation). This kernel reads the prompt once and writes w[b, t] such that
//   relevance "mean": r_i = inv_norm(v_i) * sum_{t: w_t != 0} R[i, t] * w_t,
//                     w_t = valid_t / (count * max(||pooled||, 1e-6)), pooled the mean of
//                     the valid rows in fp32 (the paper's rule: pool, then cosine);
//   relevance "max":  r_i = inv_norm(v_i) * max_{valid t} (w_t != 0 ? R[i, t] * w_t : 0),
//                     w_t = 1 / max(||p_t||, 1e-6).
// w_t = 0 marks a prompt that acts as a zero vector (SPEC conventions): a non-finite
// valid row poisons the pooled vector ("mean"), a non-finite row has cosine 0 ("max"),
// a row without any valid token has relevance 0. Masked-out rows never contribute,
// whatever they hold. "Non-finite" is read off the fp32 sum of squares, which is NaN
// or inf exactly when an element is (or when ||p||^2 overflows fp32, ~1.8e19 norms).
//
// Cost: one read of the B*T*D prompt; negligible beside the visual tokens.
#pragma once

#include <cmath>
#include <cstdint>

namespace zspa {

constexpr float kNormEps = 1e-6f;  // SPEC §1: v / max(||v||, 1e-6)

__device__ __forceinline__ float inv_norm_from_sumsq(float sumsq) {
  return 1.0f / fmaxf(sqrtf(sumsq), kNormEps);
}

__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < warps ? scratch[lane] : 0.0f;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// One CTA per batch row; blockDim.x a multiple of 32 (at most 1024).
template <typename scalar_t>
__global__ void prompt_weights_kernel(const scalar_t* __restrict__ prompt,  // (B, T, D)
                                      const bool* __restrict__ mask,        // (B, T) or null
                                      float* __restrict__ weight,           // (B, T)
                                      int T, int D, bool max_relevance) {
  __shared__ float scratch[32];
  const int b = blockIdx.x;
  const scalar_t* p = prompt + static_cast<int64_t>(b) * T * D;
  const bool* valid = mask ? mask + static_cast<int64_t>(b) * T : nullptr;
  float* w = weight + static_cast<int64_t>(b) * T;

  if (max_relevance) {
    // One warp per prompt row.
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int t = warp; t < T; t += warps) {
      float sumsq = 0.0f;
      for (int d = lane; d < D; d += 32) {
        const float x = static_cast<float>(p[static_cast<int64_t>(t) * D + d]);
        sumsq += x * x;
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) sumsq += __shfl_xor_sync(0xffffffffu, sumsq, offset);
      if (lane == 0) w[t] = isfinite(sumsq) ? inv_norm_from_sumsq(sumsq) : 0.0f;
    }
    return;
  }

  int count = 0;
  for (int t = 0; t < T; ++t) count += (!valid || valid[t]) ? 1 : 0;
  float sumsq = 0.0f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int t = 0; t < T; ++t)
      if (!valid || valid[t]) acc += static_cast<float>(p[static_cast<int64_t>(t) * D + d]);
    const float pooled = acc / static_cast<float>(count > 0 ? count : 1);
    sumsq += pooled * pooled;
  }
  sumsq = block_sum(sumsq, scratch);
  const float scale = (count > 0 && isfinite(sumsq))
                          ? inv_norm_from_sumsq(sumsq) / static_cast<float>(count) : 0.0f;
  for (int t = threadIdx.x; t < T; t += blockDim.x) w[t] = (!valid || valid[t]) ? scale : 0.0f;
}

}  // namespace zspa
