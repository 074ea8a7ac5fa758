// Kernel 3 of 4 (relevance "mean" only): dots[b, i] = v_i . pooled_b in fp32.
//
// The pooled prompt is an fp32 vector (prompt_stats.cuh), so this is a mixed-precision
// mat-vec rather than a cuBLAS GEMM: one CTA per token reads the token's D values
// once, next to an L1/L2-resident pooled vector. Traffic: the B*N*D tokens once, the
// same bytes the Gram GEMM reads, so it stays a small share of the op.
#pragma once

#include <cstdint>

#include "prompt_stats.cuh"

namespace zspa {

// Block (i, b): token i of batch row b; blockDim.x a multiple of 32, at most 1024; `scratch`:
// 32 floats of shared memory. A CTA per token, not a warp: at LLaVA sizes (576 tokens) a warp
// per token leaves each SM a handful of warps walking D/32 dependent-latency loads each.
template <typename scalar_t>
__device__ void pooled_dots_block(const scalar_t* __restrict__ visual,  // (B, N, D)
                                  const float* __restrict__ pooled,     // (B, D)
                                  float* __restrict__ dots,             // (B, N)
                                  int N, int D, float* scratch) {
  const int64_t i = blockIdx.x, b = blockIdx.y;
  const scalar_t* v = visual + (b * N + i) * D;
  const float* q = pooled + b * D;
  float acc = 0.0f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) acc += static_cast<float>(v[d]) * q[d];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) dots[b * N + i] = acc;
}

template <typename scalar_t>
__global__ void pooled_dots_kernel(const scalar_t* __restrict__ visual, const float* __restrict__ pooled,
                                   float* __restrict__ dots, int N, int D) {
  __shared__ float scratch[32];
  pooled_dots_block(visual, pooled, dots, N, D, scratch);
}

}  // namespace zspa
