// Kernel 1 of 3: prompt norms, and the pooled prompt for relevance "mean".
//
// Cosines are formed as (dot product) / (norm_a * norm_b) of vectors scaled by powers of
// two (spec.cuh: exact, and no square overflows), with norm = max(||s x||, 1e-6 * s): a
// division of the dot product, so exact ties stay exact. Per batch row b (one CTA each):
//   "mean": pooled[b] = s * (the mean of the valid prompt rows, fp32, overflow-safe as
//           spec.cuh's pooled_feature; the paper's rule: pool, then cosine), s its pow2_scale,
//           and norm[b, 0] = max(||pooled||, 1e-6 s);
//   "max":  norm[b, t] = max(||p_t||, 1e-6 * scale[b, t]) for every prompt row, which the
//           launcher has scaled (scale null: unscaled fp16 rows, which cannot overflow).
// norm = 0 marks a prompt that acts as a zero vector (SPEC conventions): a pooled
// vector with a non-finite value, or no valid row ("mean"); a non-finite row ("max").
// Masked-out rows never contribute, whatever they hold. "Non-finite" is read off the
// fp32 sum of squares of the scaled values, which is NaN or inf exactly when an element is.
//
// Cost: one read of the B*T*D prompt ("mean": plus one of the B*D pooled vector; its pooling
// is pool_mean's ceil(T / 8) round trips).
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

constexpr int kPoolRows = 8;  // "mean": prompt rows a thread loads before it adds any of them

// The mean of the valid prompt rows (B, T, D) of this CTA's batch row into q (D floats), each
// feature summed in row order, a masked row as +0.0 (never its value, which may be NaN). A
// thread takes kVec consecutive features (one 16-byte load a row where rows are aligned) and
// kPoolRows rows at a time, indices clamped into the prompt and masks applied as bits, so that
// every load of a batch is issued before the first add: ceil(T / kPoolRows) dependent L2 round
// trips at D <= 1024 * kVec. The loop it replaces (one feature and one row at a time, each value
// load behind its mask byte's) took two round trips for every 4 rows, and again for each of a
// thread's 4 features at D = 4096: ~64 at T = 32. Returns the largest finite |mean| of this
// thread's features; `count` gets the number of valid rows (in every thread with a feature).
template <int kVec, bool kMasked, typename scalar_t>
__device__ float pool_mean(const scalar_t* __restrict__ p, const bool* __restrict__ valid, float* __restrict__ q,
                           int T, int D, int* count) {
  using P = Pack<scalar_t, kVec>;
  const int shift = pool_shift(T);
  const float down = ldexpf(1.0f, -shift), up = ldexpf(1.0f, shift);
  float amax = 0.0f;
  for (int i = threadIdx.x; i < D / kVec; i += blockDim.x) {
    float acc[kVec] = {}, acc_down[kVec] = {};  // the sums of the values, and of the values times 2^-shift
    int rows = 0;
    for (int t0 = 0; t0 < T; t0 += kPoolRows) {
      P x[kPoolRows];
      int keep[kPoolRows];  // all ones for a valid row, else 0
#pragma unroll
      for (int j = 0; j < kPoolRows; ++j) {
        const int t = min(t0 + j, T - 1);
        keep[j] = -(static_cast<int>(t0 + j < T) & (kMasked ? static_cast<int>(valid[t]) : 1));
        x[j] = reinterpret_cast<const P*>(p + static_cast<int64_t>(t) * D)[i];
      }
#pragma unroll
      for (int j = 0; j < kPoolRows; ++j) {
        rows -= keep[j];
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float v = static_cast<float>(x[j].v[e]);
          acc[e] += __int_as_float(__float_as_int(v) & keep[j]);
          acc_down[e] += __int_as_float(__float_as_int(v * down) & keep[j]);  // exact product, no fma
        }
      }
    }
    *count = rows;
    const float divisor = static_cast<float>(rows > 0 ? rows : 1);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float mean = pooled_feature(acc[e] / divisor, acc_down[e] / divisor, up);
      q[i * kVec + e] = mean;
      amax = fmaxf(amax, finite_abs(mean));
    }
  }
  return amax;
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

  float* q = pooled + static_cast<int64_t>(b) * D;
  constexpr int kVec = 16 / sizeof(scalar_t);
  int count = 0;
  const bool packed = D % kVec == 0 && reinterpret_cast<uintptr_t>(p) % 16 == 0;  // the same for the CTA
  float amax;  // largest finite |mean| of this thread's features
  if (packed)
    amax = valid ? pool_mean<kVec, true>(p, valid, q, T, D, &count) : pool_mean<kVec, false>(p, valid, q, T, D, &count);
  else
    amax = valid ? pool_mean<1, true>(p, valid, q, T, D, &count) : pool_mean<1, false>(p, valid, q, T, D, &count);
  const float s = pow2_scale(block_max(amax, scratch));
  float sumsq = 0.0f;
  // Other threads wrote some of these means (pool_mean's packs): block_max's barriers order them.
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
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
