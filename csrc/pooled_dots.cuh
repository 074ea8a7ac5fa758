// Kernel 3 of 4 (relevance "mean" only): dots[b, i] = v_i . pooled_b in fp32.
//
// The pooled prompt is an fp32 vector (prompt_stats.cuh), so this is a mixed-precision
// mat-vec rather than a cuBLAS GEMM: one warp per token reads the token's D values
// once, next to an L1/L2-resident pooled vector. Traffic: the B*N*D tokens once, the
// same bytes the Gram GEMM reads, so it stays a small share of the op.
#pragma once

#include <cstdint>

#include "prompt_stats.cuh"

namespace zspa {

// Block (x, y) covers tokens [x * warps, (x + 1) * warps) of batch row y; blockDim.x a
// multiple of 32.
template <typename scalar_t>
__device__ void pooled_dots_block(const scalar_t* __restrict__ visual,  // (B, N, D)
                                  const float* __restrict__ pooled,     // (B, D)
                                  float* __restrict__ dots,             // (B, N)
                                  int N, int D) {
  const int lane = threadIdx.x & 31;
  const int i = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int64_t b = blockIdx.y;
  if (i >= N) return;  // whole warps leave together: the shuffles below see full warps
  const scalar_t* v = visual + (b * N + i) * D;
  const float* q = pooled + b * D;
  float acc = 0.0f;
  for (int d = lane; d < D; d += 32) acc += static_cast<float>(v[d]) * q[d];
  acc = warp_sum(acc);
  if (lane == 0) dots[b * N + i] = acc;
}

template <typename scalar_t>
__global__ void pooled_dots_kernel(const scalar_t* __restrict__ visual, const float* __restrict__ pooled,
                                   float* __restrict__ dots, int N, int D) {
  pooled_dots_block(visual, pooled, dots, N, D);
}

}  // namespace zspa
