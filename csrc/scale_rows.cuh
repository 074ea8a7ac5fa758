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
// one fp32 written; 16 bytes an access where the row allows it. The dots were a kernel of their
// own until the H200 profile (2026-11-30) showed that second pass over the tokens costing as much
// as this one (126 us against 178 us at LLaVA-1.5 B=32). Every row of a call takes the same
// path (packed or not: the same D and alignment), so duplicated tokens get identical dots.
#pragma once

#include <cmath>
#include <cstdint>

#include "pdl.cuh"
#include "prompt_stats.cuh"
#include "spec.cuh"

namespace zspa {

// kVec consecutive values, loaded and stored as one 16-byte access when kVec * sizeof = 16.
template <typename scalar_t, int kVec>
struct alignas(kVec * sizeof(scalar_t)) Pack {
  scalar_t v[kVec];
};

// The body below, kVec values a thread at a time (the caller checked the 16-byte alignment).
template <int kVec, typename scalar_t>
__device__ void scale_row_packed(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst,
                                 float* __restrict__ scale_out, const float* __restrict__ q,
                                 float* __restrict__ dot_out, int D, float* scratch) {
  using P = Pack<scalar_t, kVec>;
  const P* in = reinterpret_cast<const P*>(src);
  const int packs = D / kVec;
  float s = 1.0f;
  if (scale_out) {
    float amax = 0.0f;
    for (int i = threadIdx.x; i < packs; i += blockDim.x) {
      const P pack = in[i];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const float v = fabsf(static_cast<float>(pack.v[e]));
        if (isfinite(v)) amax = fmaxf(amax, v);  // NaN and inf count as 0, like nan_to_num
      }
    }
    s = pow2_scale(block_max(amax, scratch));
    if (threadIdx.x == 0) *scale_out = s;
  }
  wait_for_previous_kernel();  // `q` is prompt_stats' output (pdl.cuh); the tokens were ready before it
  float acc = 0.0f;
  for (int i = threadIdx.x; i < packs; i += blockDim.x) {  // the row again: from L1, this CTA just read it
    P pack = in[i];
    if (dst) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) pack.v[e] = static_cast<scalar_t>(static_cast<float>(pack.v[e]) * s);
      reinterpret_cast<P*>(dst)[i] = pack;
    }
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
}

// The CTA of row blockIdx.x of a (rows, D) matrix whose batch rows hold `rows_per_batch` rows
// each; blockDim.x a multiple of 32, at most 1024; `scratch`: 32 floats of shared memory. A CTA
// per row, not a warp: with a few hundred rows a warp per row leaves an SM a handful of warps,
// each walking D/32 dependent-latency loads; a CTA takes D/blockDim.x. Rows whose start (in and
// out) is 16-byte aligned, D a multiple of the pack (every contiguous bf16 row with D % 8 == 0),
// move 16 bytes a load and store: the first H200 run moved 2 bytes an access and reached 1.7
// TB/s at LLaVA-1.5 B=32, against 4.3 for a copy.
template <typename scalar_t>
__device__ void scale_row(const scalar_t* __restrict__ x,  // (rows, D)
                          scalar_t* __restrict__ scaled,   // (rows, D), or null: no scaling
                          float* __restrict__ scale,       // (rows,), null with `scaled`
                          const float* __restrict__ pooled,  // (rows / rows_per_batch, D), or null: no dots
                          float* __restrict__ dots,        // (rows,), null with `pooled`
                          int64_t rows_per_batch, int D, float* scratch) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t r = blockIdx.x;
  const scalar_t* src = x + r * D;
  scalar_t* dst = scaled ? scaled + r * D : nullptr;
  const float* q = pooled ? pooled + (r / rows_per_batch) * D : nullptr;
  float* scale_out = scaled ? scale + r : nullptr;
  float* dot_out = pooled ? dots + r : nullptr;
  const bool packed = D % kVec == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&  // the same for the whole CTA
                      (!dst || reinterpret_cast<uintptr_t>(dst) % 16 == 0) &&
                      (!q || reinterpret_cast<uintptr_t>(q) % 16 == 0);
  if (packed) {
    scale_row_packed<kVec>(src, dst, scale_out, q, dot_out, D, scratch);
  } else {
    scale_row_packed<1>(src, dst, scale_out, q, dot_out, D, scratch);
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
