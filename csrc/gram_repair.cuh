// The Gram of the tokens as given, and the repair of the few tokens it cannot hold.
//
// The launcher's GEMMs read the tokens as the caller passed them: no scaled copy is written
// (at LLaVA-1.5 B=32 that copy was 151 MB written and read again, ~35-45 us of the 200 us
// target). Scaling by a power of two is exact, so for a token whose largest finite |x| lies in
// the raw band [2^-33, 2^48) the entries of the unscaled Gram are the scaled ones times powers
// of two: every cosine (G / (norm_i * norm_j), greedy_select.cuh) is the same number, and
// nothing overflows (|G| <= D * 2^96 < 2^127 for any D < 2^31) or loses accuracy to
// underflow (at most D * 2^-149 in a dot of two vectors of norm >= 2^-33: < 2^-52 of a cosine).
// Such a token keeps scale 1. A token outside the band (amax >= 2^48, or 0 < amax < 2^-33)
// keeps its power-of-two scale s (pow2_scale, spec.cuh), and its Gram row and column (and its
// "max" dots) are rewritten by the token pass from the scaled values, after the GEMMs:
//   G[i, j] = G[j, i] = (c_i x_i) . (c_j x_j),  c = the token's scale in this convention,
// computed by one warp in fp32 in a fixed order whose products commute, so that the token
// pass's CTA of j, if j is out of the band too, writes the same bits into the same entries.
// fp16 tokens are always in the band (|x| <= 65504, subnormals >= 2^-24). Real features are in
// the band (a VLM's hidden states lie within ~1e-4..1e4): the repair is the exception's path,
// N·D reads of L2 per out-of-band token, never taken by a model's tokens in practice.
#pragma once

#include <cmath>
#include <cstdint>

#include "gram_view.cuh"
#include "prompt_stats.cuh"
#include "spec.cuh"

namespace zspa {

constexpr int kRawExpMin = -32, kRawExpMax = 48;  // amax = m * 2^e, m in [0.5, 1): in band for e in [min, max]

// A token's scale in the launcher's Gram: 1 in the raw band (or for a zero row), else pow2_scale.
__host__ __device__ inline float raw_scale(float amax) {
  if (!(amax > 0.0f)) return 1.0f;
  int e = 0;
  frexpf(amax, &e);
  return e >= kRawExpMin && e <= kRawExpMax ? 1.0f : pow2_scale(amax);
}

// x * c as the scaled token would hold it, in fp32 (exact: c is a power of two).
template <typename scalar_t>
__device__ __forceinline__ float scaled_value(scalar_t x, float c) {
  return static_cast<float>(static_cast<scalar_t>(static_cast<float>(x) * c));
}

// Largest finite |x| of a row, by one warp (every lane gets it): the same number the token
// pass's block-wide max finds for that row (spec.cuh's finite_abs, and max is exact).
template <typename scalar_t>
__device__ __forceinline__ float warp_row_amax(const scalar_t* x, int D) {
  float amax = 0.0f;
  for (int d = threadIdx.x & 31; d < D; d += 32) amax = fmaxf(amax, finite_abs(static_cast<float>(x[d])));
  return warp_max(amax);
}

// (ca a) . (cb b) by one warp: lane l sums d = l, l + 32, ... in order, then the xor tree, so
// swapping (a, ca) with (b, cb) gives the same bits (the products commute).
template <typename scalar_t, typename other_t>
__device__ __forceinline__ float warp_pair_dot(const scalar_t* a, float ca, const other_t* b, float cb, int D) {
  float acc = 0.0f;
  for (int d = threadIdx.x & 31; d < D; d += 32) acc += scaled_value(a[d], ca) * scaled_value(b[d], cb);
  return warp_sum(acc);
}

// Rewrite token i's Gram row and column from the scaled tokens, c_i != 1 (its CTA, every warp
// taking tokens j by turns), and for "max" its dots with the (already scaled) prompt rows.
// `x`: the batch row's N tokens; `G`: its Gram; `prompt`/`dots`: (T, D) rows and token i's T
// dots, or null ("mean": the token pass dots the scaled token itself).
template <typename scalar_t>
__device__ void repair_token(const scalar_t* x, int N, int D, int i, float c_i, const BasicGramView<float>& G,
                             const scalar_t* prompt, float* dots, int T) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const scalar_t* x_i = x + static_cast<int64_t>(i) * D;
  for (int j = warp; j < N; j += warps) {
    const scalar_t* x_j = x + static_cast<int64_t>(j) * D;
    const float c_j = raw_scale(warp_row_amax(x_j, D));
    const float g = warp_pair_dot(x_i, c_i, x_j, c_j, D);
    if (lane == 0) {
      *G.ptr(i, j) = g;
      *G.ptr(j, i) = g;
    }
  }
  if (dots == nullptr) return;
  for (int t = warp; t < T; t += warps) {
    const float d = warp_pair_dot(x_i, c_i, prompt + static_cast<int64_t>(t) * D, 1.0f, D);
    if (lane == 0) dots[t] = d;
  }
}

}  // namespace zspa
