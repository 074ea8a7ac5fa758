// Kernel 2 of 3: one pass over rows of features, in two launches of the launcher:
//
// The token pass (token_pass_kernel), a CTA a token, after the Gram GEMMs of its rows:
//   scale[r] = raw_scale(largest finite |x[r, :]|)   (gram_repair.cuh: 1 in the raw band)
//   dots[r]  = (scale[r] x[r, :]) . pooled[b]  in fp32   (relevance "mean")
//   and, for a token outside the raw band, its Gram row and column and its "max" dots
//   rewritten from its scaled values (gram_repair.cuh). No copy of the tokens is written: the
//   GEMMs read them as given.
// The prompt rows' pass of relevance "max" (scale_rows_kernel), before anything else:
//   scale[r] = pow2_scale(largest finite |x[r, :]|)   (spec.cuh; 1 for an all-zero row)
//   scaled[r, :] = x[r, :] * scale[r], rounded to x's dtype   (exact: a power of two)
// bf16/fp32 only: fp16 is never scaled, its squares cannot overflow (`scale` null).
// `pooled` (prompt_stats.cuh, already scaled) is the same vector for every row of a batch row b,
// an L1/L2-resident read. One CTA per row: D values read twice (the second read hits L1), one
// fp32 or two written; 16 bytes an access where the row allows it. The dots were a kernel of
// their own until the H200 profile (2026-11-30) showed that second pass over the tokens costing
// as much as this one (126 us against 178 us at LLaVA-1.5 B=32), and the token pass wrote a
// scaled copy of every token until the raw band made it unnecessary (151 MB at that size).
// Every row of a call takes the same path (packed or not: the same D and alignment), so
// duplicated tokens get identical dots.
#pragma once

#include <cmath>
#include <cstdint>

#include "gram_repair.cuh"
#include "pdl.cuh"
#include "prompt_stats.cuh"
#include "spec.cuh"

namespace zspa {

// The body below, kVec values a thread at a time (the caller checked the 16-byte alignment).
// Returns the row's scale (1 without `scale_out`).
template <int kVec, typename scalar_t>
__device__ float scale_row_packed(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst,
                                  float* __restrict__ scale_out, const float* __restrict__ q,
                                  float* __restrict__ dot_out, int D, bool band, float* scratch) {
  using P = Pack<scalar_t, kVec>;
  const P* in = reinterpret_cast<const P*>(src);
  const int packs = D / kVec;
  float s = 1.0f;
  if (scale_out) {
    float amax = 0.0f;
    for (int i = threadIdx.x; i < packs; i += blockDim.x) {
      const P pack = in[i];
#pragma unroll
      for (int e = 0; e < kVec; ++e) amax = fmaxf(amax, finite_abs(static_cast<float>(pack.v[e])));
    }
    const float row_amax = block_max(amax, scratch);
    s = band ? raw_scale(row_amax) : pow2_scale(row_amax);
    if (threadIdx.x == 0) *scale_out = s;
  }
  wait_for_previous_kernel();  // `q` is prompt_stats' output, the repair rewrites the GEMMs' (pdl.cuh)
  float acc = 0.0f;
  for (int i = threadIdx.x; i < packs; i += blockDim.x) {  // the row again: from L1, this CTA just read it
    P pack = in[i];
    if (s != 1.0f) {  // the same for the whole CTA
#pragma unroll
      for (int e = 0; e < kVec; ++e) pack.v[e] = static_cast<scalar_t>(static_cast<float>(pack.v[e]) * s);
    }
    if (dst) reinterpret_cast<P*>(dst)[i] = pack;
    if (q) {
      if constexpr (kVec % 4 == 0) {  // the pooled features of this pack, as 16-byte loads too
        const Pack<float, 4>* q4 = reinterpret_cast<const Pack<float, 4>*>(q + i * kVec);
#pragma unroll
        for (int h = 0; h < kVec / 4; ++h) {
          const Pack<float, 4> qq = q4[h];
#pragma unroll
          for (int e = 0; e < 4; ++e) acc += static_cast<float>(pack.v[4 * h + e]) * qq.v[e];
        }
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc += static_cast<float>(pack.v[e]) * q[i * kVec + e];
      }
    }
  }
  if (q) {
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) *dot_out = acc;
  }
  return s;
}

// The CTA of row blockIdx.x of a (rows, D) matrix whose batch rows hold `rows_per_batch` rows
// each; blockDim.x a multiple of 32, at most 1024; `scratch`: 32 floats of shared memory. A CTA
// per row, not a warp: with a few hundred rows a warp per row leaves an SM a handful of warps,
// each walking D/32 dependent-latency loads; a CTA takes D/blockDim.x. Rows whose start (in and
// out) is 16-byte aligned, D a multiple of the pack (every contiguous bf16 row with D % 8 == 0),
// move 16 bytes a load and store: the first H200 run moved 2 bytes an access and reached 1.7
// TB/s at LLaVA-1.5 B=32, against 4.3 for a copy. `band`: the scale is raw_scale (tokens),
// else pow2_scale (prompt rows). Returns the row's scale (1 without `scale`).
template <typename scalar_t>
__device__ float scale_row(const scalar_t* __restrict__ x,  // (rows, D)
                           scalar_t* __restrict__ scaled,   // (rows, D) scaled copy, or null
                           float* __restrict__ scale,       // (rows,), or null: no scaling
                           const float* __restrict__ pooled,  // (rows / rows_per_batch, D), or null: no dots
                           float* __restrict__ dots,        // (rows,), null with `pooled`
                           int64_t rows_per_batch, int D, bool band, float* scratch) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t r = blockIdx.x;
  const scalar_t* src = x + r * D;
  scalar_t* dst = scaled ? scaled + r * D : nullptr;
  const float* q = pooled ? pooled + (r / rows_per_batch) * D : nullptr;
  float* scale_out = scale ? scale + r : nullptr;
  float* dot_out = pooled ? dots + r : nullptr;
  const bool packed = D % kVec == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&  // the same for the whole CTA
                      (!dst || reinterpret_cast<uintptr_t>(dst) % 16 == 0) &&
                      (!q || reinterpret_cast<uintptr_t>(q) % 16 == 0);
  if (packed) return scale_row_packed<kVec>(src, dst, scale_out, q, dot_out, D, band, scratch);
  return scale_row_packed<1>(src, dst, scale_out, q, dot_out, D, band, scratch);
}

// The prompt rows of relevance "max" (bf16/fp32): scales and the scaled copy the dots GEMM reads.
template <typename scalar_t>
__global__ void scale_rows_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ scaled,
                                  float* __restrict__ scale, int D) {
  __shared__ float scratch[32];
  scale_row(x, scaled, scale, static_cast<const float*>(nullptr), static_cast<float*>(nullptr), 1, D, false,
            scratch);
}

// The token pass over the batch rows of one Gram chunk (pointers start at the chunk's first
// row), a CTA a token: grid rows * N.
template <typename scalar_t>
struct TokenPass {
  const scalar_t* x;        // (rows, N, D) the tokens as given
  float* scale;             // (rows, N) raw_scale of each token, or null (fp16: never scaled)
  const float* pooled;      // (rows, D) the scaled pooled prompt ("mean"), or null
  float* dots;              // (rows, N) dots with it, null with `pooled`
  float* gram_top;          // (rows, h, N) and (rows, N - h, N - h): the chunk's Gram (gram_view.cuh)
  float* gram_corner;       // null when h == N
  int gram_split;           // h
  const scalar_t* prompt;   // (rows, T, D) the scaled prompt rows ("max"), or null
  float* prompt_dots;       // (rows, N, T) the dots GEMM's output ("max"), null with `prompt`
  int N, T, D;
};

// Token blockIdx.x % N of chunk row blockIdx.x / N. Its scale and "mean" dot; then, for a token
// outside the raw band, the repair of its Gram entries and "max" dots (gram_repair.cuh), which
// the GEMMs before this kernel wrote: scale_row waited for them before its dots (pdl.cuh), in
// every CTA, so this grid ends only after they have.
template <typename scalar_t>
__device__ void token_pass_row(const TokenPass<scalar_t>& p, float* scratch) {
  const float c = scale_row(p.x, static_cast<scalar_t*>(nullptr), p.scale, p.pooled, p.dots, p.N, p.D, true, scratch);
  if (c == 1.0f) return;  // in the band: the GEMMs' entries are right as they are
  const int64_t r = blockIdx.x;
  const int64_t row = r / p.N;
  const int N = p.N, h = p.gram_split;
  BasicGramView<float> G;
  G.top = p.gram_top + row * h * N;
  G.corner = p.gram_corner ? p.gram_corner + row * (N - h) * (N - h) : nullptr;
  G.N = N;
  G.h = h;
  repair_token(p.x + row * N * p.D, N, p.D, static_cast<int>(r - row * N), c, G,
               p.prompt ? p.prompt + row * p.T * p.D : nullptr, p.prompt_dots ? p.prompt_dots + r * p.T : nullptr,
               p.T);
}

template <typename scalar_t>
__global__ void token_pass_kernel(TokenPass<scalar_t> p) {
  __shared__ float scratch[32];
  token_pass_row(p, scratch);
}

}  // namespace zspa
