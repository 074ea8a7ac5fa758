// Kernel 3 of 3: ZSPAPrune selection of one batch row per CTA (SPEC §1 steps 1, 3-7).
//
// Inputs, all fp32, computed by the launcher from the tokens v_i = c_i x_i, c_i their
// token_scale (gram_repair.cuh: 1 for every token in the raw band, else its power of two; so
// that no square overflows; null for fp16, which needs none):
//   G[i, j] = v_i . v_j   (the row's N x N Gram, cuBLAS on the tokens as given, entries of
//                          tokens outside the band repaired; whole or split: gram_view.cuh;
//                          its diagonal gives the norms),
//   relevance dots: v_i . pooled ("mean", scale_rows.cuh) or v_i . p_t ("max", cuBLAS, repaired
//   likewise), and the prompt norms of prompt_stats.cuh.
// Cosines are G[j, i] / (norm_i * norm_j), norm_i = max(||v_i||, 1e-6 * scale_i): the
// product is normalised afterwards, so no normalised copy of the tokens is written.
//
// State lives in shared memory, 12 bytes per token, each token owned by one thread
// (i = threadIdx.x + m * blockDim.x), so only the argmins (and the core's ranks) need barriers:
//   score[i]  relevance r_i during the core phase, then the similarity s_i to the
//             selected set; +inf (s) / -inf (r) marks taken and padded tokens;
//   norm[i]   the clamped norm, or -1 for a token with a non-finite feature;
//   picks[t]  the pick order.
// Phases: 1. core: the k_core best r, on chip (ranks counted at once for small rows, a radix
// select for long ones, else k_core argmax steps); 2. s_i = max over the core of
// cos(i, c) (k_core independent Gram row reads), or with an empty core the isolation
// max_{j != i} cos(i, j); 3. diversity: k_b - k_core dependent steps, each one argmin and
// one Gram row read (4 N bytes, from L2 while the Gram fits there).
// Non-finite tokens: relevance -2 and similarity 2 (beyond every finite cosine), so
// they are picked only when nothing finite is left, lowest index first. Zero vectors
// have G = 0, hence cosine 0 to everything. Measured times: bench/results.
#pragma once

#include <cmath>
#include <cstdint>

#include "gram_view.cuh"
#include "packed_key.cuh"
#include "pdl.cuh"
#include "prompt_stats.cuh"
#include "spec.cuh"

namespace zspa {

constexpr float kTaken = INFINITY;            // score of a taken or padded token (phase 2-3)

struct GreedyParams {
  const float* gram_top;      // (rows, h, N): the Gram's rows [0, h) (gram_view.cuh), rows of this launch only
  const float* gram_corner;   // (rows, N - h, N - h): its rows and columns [h, N); null when h == N
  int gram_split;             // h: N for a whole Gram
  const float* dots;          // (B, N) for "mean", (B, N, T) for "max"
  const float* prompt_norm;   // (B, T); for "mean" only [b, 0], the pooled norm
  const bool* prompt_mask;    // (B, T) or null
  const int64_t* lengths;     // (B,) or null
  const float* token_scale;   // (B, N) c_i: the tokens' scales in the Gram (gram_repair.cuh), or null (1)
  int64_t* out;               // (B, k)
  int row0;                   // batch row of blockIdx.x == 0
  int N, T, k;
  double core_ratio;
  bool max_relevance;
  bool pick_order;
  int rank_core_budget;       // the core by ranks where n·⌈n/threads⌉·warps <= k_core·this (0: never)
  bool radix_core;            // else by a radix select where N >= kRadixMinTokens (false: serial argmins)
};

// The launcher's rank_core_budget. Counting ranks costs each thread n compares per token it owns,
// the warps sharing 4 schedulers (~6 instructions a compare); k_core serial argmax steps cost
// ~1000 cycles each (an estimate: the H200's 0.9 us chain step at N = 576, less its Gram-row
// read). 512 keeps the ranks to where they should win by a margin: N <= ~700 at LLaVA's
// k_core = 32, never at N = 2880 with 1024 threads. To be checked against a GPU profile.
constexpr int kRankCoreBudget = 512;

// Rows this long and longer may find a large core by a radix select (packed_key.cuh), whose
// 256-bin histogram borrows picks[]. The H200 run (2026-11-30) at video size (N = 16384,
// k_core = 819) spent ~10 us on each of the k_core serial argmax steps with their core rows.
constexpr int kRadixMinTokens = 256;

// Tokens a thread loads before it uses any of them, in the loops over Gram rows and columns:
// the H200 run read a video row (64 KB from DRAM) in ~10 us a chain step, one latency after
// another; a batch keeps kLoadBatch loads in flight a thread.
constexpr int kLoadBatch = 8;

// r_i = cos(v_i, prompt); norm_i = max(||v_i||, 1e-6) of a finite token.
__device__ __forceinline__ float relevance(const GreedyParams& p, int b, int i, float norm_i, const bool* valid) {
  const float* prompt_norm = p.prompt_norm + static_cast<int64_t>(b) * p.T;
  if (!p.max_relevance) {
    const float norm_q = prompt_norm[0];
    return norm_q == 0.0f ? 0.0f : p.dots[static_cast<int64_t>(b) * p.N + i] / (norm_i * norm_q);
  }
  const float* dots_i = p.dots + (static_cast<int64_t>(b) * p.N + i) * p.T;
  bool any = false;
  float best = -INFINITY;
  for (int t = 0; t < p.T; ++t) {
    if (valid && !valid[t]) continue;
    any = true;
    best = fmaxf(best, prompt_norm[t] == 0.0f ? 0.0f : dots_i[t] / (norm_i * prompt_norm[t]));
  }
  return any ? best : 0.0f;  // no valid prompt row: a zero prompt
}

// cos(i, j) from the Gram entry G[j, i]. Always this expression, so that exact ties stay
// exact and resolve by index: duplicated tokens get bit-identical scores, and
// cos(i, j) == cos(j, i) bit for bit (the norm product commutes; across the blocks of a split
// Gram both are one stored entry, and within a GEMM's output the two entries sum the same exact
// products in the same order), which the isolation seed needs for mutual nearest neighbours.
__device__ __forceinline__ float cosine_of(float gram_ji, float norm_i, float norm_j) {
  if (norm_i < 0.0f) return kNonFiniteSimilarity;
  if (norm_j < 0.0f) return 0.0f;  // a non-finite token normalises to zero
  return gram_ji / (norm_i * norm_j);
}

// The Gram of row `row` of this launch.
__device__ __forceinline__ GramView gram_view(const GreedyParams& p, int row) {
  const int N = p.N, h = p.gram_split;
  GramView view;
  view.top = p.gram_top + static_cast<int64_t>(row) * h * N;
  view.corner = p.gram_corner ? p.gram_corner + static_cast<int64_t>(row) * (N - h) * (N - h) : nullptr;
  view.N = N;
  view.h = h;
  return view;
}

// The budgets of batch row b: n valid tokens (lengths clamped to [1, N]), k_b, k_core.
struct RowBudget {
  int n, k_b, k_core;
};

__device__ __forceinline__ RowBudget row_budget(const GreedyParams& p, int b) {
  const int64_t len = p.lengths ? p.lengths[b] : p.N;
  RowBudget r;
  r.n = static_cast<int>(len < 1 ? 1 : (len > p.N ? p.N : len));
  r.k_b = p.k < r.n ? p.k : r.n;
  r.k_core = core_count(p.core_ratio, r.k_b);
  return r;
}

// The norm of token i < n from the Gram diagonal, or -1 for a token with a non-finite feature.
__device__ __forceinline__ float token_norm(const GreedyParams& p, int b, const GramView& G, int i) {
  const float* token_scale = p.token_scale ? p.token_scale + static_cast<int64_t>(b) * p.N : nullptr;
  const float norm_i = clamped_norm(G.at(i, i), token_scale ? token_scale[i] : 1.0f);
  return norm_i > 0.0f ? norm_i : -1.0f;
}

// Norm and relevance of token i < n (step 1-2): relevance kNonFiniteRelevance for a token with
// a non-finite feature.
__device__ __forceinline__ void token_norm_relevance(const GreedyParams& p, int b, const GramView& G, int i,
                                                     const bool* valid, float* norm, float* rel) {
  const float norm_i = token_norm(p, b, G, i);
  *norm = norm_i;
  *rel = norm_i > 0.0f ? relevance(p, b, i, norm_i, valid) : kNonFiniteRelevance;
}

// Step 7, by one CTA: the pick order, or the kept tokens (kept(i) for i < n) in ascending order
// (a block-wide ballot scan); -1 after the k_b kept tokens. `warp_counts`: kMaxWarps ints.
template <typename Kept>
__device__ void write_output(const GreedyParams& p, int64_t* out, const int* picks, int n, int k_b, Kept kept,
                             int* warp_counts) {
  const int tid = threadIdx.x, threads = blockDim.x;
  // 64-bit: k may be up to 2^31 - 1, and t + threads would wrap past it
  for (int64_t t = k_b + tid; t < p.k; t += threads) out[t] = -1;
  if (p.pick_order) {
    for (int t = tid; t < k_b; t += threads) out[t] = picks[t];
    return;
  }
  const int lane = tid & 31, warp = tid >> 5, warps = threads >> 5;
  int base = 0;
  for (int start = 0; start < n; start += threads) {
    const int i = start + tid;
    const bool keep = i < n && kept(i);
    const unsigned ballot = __ballot_sync(kFullWarp, keep);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w2 = 0; w2 < warps; ++w2) {
      before += w2 < warp ? warp_counts[w2] : 0;
      total += warp_counts[w2];
    }
    if (keep) out[base + before + __popc(ballot & ((1u << lane) - 1u))] = i;
    base += total;
    __syncthreads();  // warp_counts is rewritten by the next round
  }
}

// The body of one CTA, given its shared memory: `smem` holds 3 * N 32-bit words,
// `slots` 2 * kMaxWarps keys, `warp_counts` kMaxWarps ints. blockDim.x: a multiple
// of 32, at most 1024 (any such size is correct; more threads, fewer tokens each).
__device__ void greedy_select_row(const GreedyParams& p, float* smem, uint64_t* slots, int* warp_counts) {
  float* score = smem;
  float* norm = smem + p.N;
  int* picks = reinterpret_cast<int*>(smem + 2 * p.N);

  const int b = p.row0 + blockIdx.x;
  const int N = p.N, tid = threadIdx.x, threads = blockDim.x;
  const GramView G = gram_view(p, blockIdx.x);
  const bool* valid = p.prompt_mask ? p.prompt_mask + static_cast<int64_t>(b) * p.T : nullptr;
  const RowBudget budget = row_budget(p, b);
  const int n = budget.n, k_b = budget.k_b, k_core = budget.k_core;

  // Step 1-2: norms from the Gram diagonal, relevance from the prompt dots.
  for (int i = tid; i < N; i += threads) {
    if (i >= n) { score[i] = -INFINITY; norm[i] = 0.0f; continue; }
    token_norm_relevance(p, b, G, i, valid, norm + i, score + i);
  }

  // Phase 1: core = the k_core largest r, by falling relevance, lower index first: the k_core
  // smallest keys pack_key(-r_i, i) in order. Keys are distinct (the index is in them), so the
  // token whose key has rank t is pick t, whichever way the ranks are found. Where it is cheap
  // (see kRankCoreBudget), every token counts the keys below its own at once (no barrier per
  // pick); else, in rows of kRadixMinTokens or more, a radix select finds the k_core-th key and
  // the core's tokens count the core keys below their own; else k_core serial block argmins.
  // -inf marks taken and padded tokens.
  const int owned = (n + threads - 1) / threads;
  const bool ranks = k_core > 0 && static_cast<int64_t>(n) * owned * (threads / 32) <=
                                       static_cast<int64_t>(k_core) * p.rank_core_budget;
  auto key_of = [&](int i) { return pack_key(-score[i], i); };
  if (ranks) {
    __syncthreads();  // every score[] written: each thread reads them all
    for (int i = tid; i < n; i += threads) {
      const int rank = key_rank(key_of, n, key_of(i));
      if (rank < k_core) picks[rank] = i;
    }
    __syncthreads();  // every rank counted before any score is marked taken
    for (int t = tid; t < k_core; t += threads) score[picks[t]] = -INFINITY;
  } else if (k_core > 1 && p.radix_core && N >= kRadixMinTokens) {
    __syncthreads();  // every score[] written
    const uint64_t last = block_kth_key(key_of, n, k_core, N, picks, slots);  // picks[0, 256): the histogram
    // The core (keys <= last) into norm[] (as ints), in any order; then each one's rank among them.
    int* unordered = reinterpret_cast<int*>(norm);
    int* count = reinterpret_cast<int*>(slots + 2);  // slots[0, 2): block_kth_key's, read by now
    if (tid == 0) *count = 0;
    __syncthreads();
    for (int i = tid; i < n; i += threads)
      if (key_of(i) <= last) unordered[atomicAdd(count, 1)] = i;
    __syncthreads();
    for (int e = tid; e < k_core; e += threads) {
      const int i = unordered[e];
      picks[key_rank([&](int c) { return key_of(unordered[c]); }, k_core, key_of(i))] = i;
    }
    __syncthreads();  // every rank counted before any score is marked taken or norm rewritten
    for (int t = tid; t < k_core; t += threads) score[picks[t]] = -INFINITY;
    for (int i = tid; i < n; i += threads) norm[i] = token_norm(p, b, G, i);  // norm[] held the core
  } else {
    for (int t = 0; t < k_core; ++t) {
      uint64_t key = kNoKey;
      for (int i = tid; i < n; i += threads)
        if (score[i] != -INFINITY) key = min(key, pack_key(-score[i], i));
      const int j = key_index(block_min(key, slots, t & 1));
      if (j % threads == tid) score[j] = -INFINITY;  // the owner marks it taken
      if (tid == 0) picks[t] = j;
    }
  }
  __syncthreads();  // picks[], score[] and norm[] of every token are read below

  // Phase 2: similarity to the core, or isolation when the core is empty.
  for (int i = tid; i < N; i += threads) {
    if (i >= n || score[i] == -INFINITY) { score[i] = kTaken; continue; }
    const float norm_i = norm[i];
    float s = -INFINITY;
    if (k_core > 0) {
      for (int c0 = 0; c0 < k_core; c0 += kLoadBatch) {  // core rows read in lockstep: coalesced over i
        int rows[kLoadBatch];
        float g[kLoadBatch];
#pragma unroll
        for (int u = 0; u < kLoadBatch; ++u) {
          rows[u] = c0 + u < k_core ? picks[c0 + u] : -1;
          g[u] = rows[u] >= 0 ? G.at(rows[u], i) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < kLoadBatch; ++u)
          if (rows[u] >= 0) s = fmaxf(s, cosine_of(g[u], norm_i, norm[rows[u]]));
      }
    } else if (norm_i < 0.0f) {
      s = kNonFiniteSimilarity;
    } else {
      for (int j0 = 0; j0 < n; j0 += kLoadBatch) {  // every row, in lockstep
        float g[kLoadBatch];
#pragma unroll
        for (int u = 0; u < kLoadBatch; ++u) g[u] = j0 + u < n ? G.at(j0 + u, i) : 0.0f;
#pragma unroll
        for (int u = 0; u < kLoadBatch; ++u) {
          const int j = j0 + u;
          if (j < n && j != i && norm[j] >= 0.0f) s = fmaxf(s, cosine_of(g[u], norm_i, norm[j]));
        }
      }
    }
    score[i] = s;
  }

  // Phase 3: greedy max-min diversity, argmin of s, lower index first.
  for (int t = k_core; t < k_b; ++t) {
    uint64_t key = kNoKey;
    for (int i = tid; i < n; i += threads)
      if (score[i] != kTaken) key = min(key, pack_key(score[i], i));
    const int j = key_index(block_min(key, slots, t & 1));
    if (tid == 0) picks[t] = j;
    const float norm_j = norm[j];
    for (int i0 = tid; i0 < n; i0 += kLoadBatch * threads) {  // this thread's tokens, kLoadBatch at a time
      float g[kLoadBatch];
#pragma unroll
      for (int u = 0; u < kLoadBatch; ++u) g[u] = i0 + u * threads < n ? G.at(j, i0 + u * threads) : 0.0f;
#pragma unroll
      for (int u = 0; u < kLoadBatch; ++u) {
        const int i = i0 + u * threads;
        if (i >= n || score[i] == kTaken) continue;
        if (i == j) { score[i] = kTaken; continue; }
        const float c = cosine_of(g[u], norm[i], norm_j);
        score[i] = t == 0 ? c : fmaxf(score[i], c);  // t == 0: drop the isolation seed score
      }
    }
  }
  __syncthreads();  // picks[] complete

  // Step 7: the taken tokens are those marked kTaken.
  write_output(p, p.out + static_cast<int64_t>(b) * p.k, picks, n, k_b, [&](int i) { return score[i] == kTaken; },
               warp_counts);
}

__global__ void __launch_bounds__(1024) greedy_select_kernel(GreedyParams p) {  // up to 1024 threads a row
  wait_for_previous_kernel();  // the token pass, or (fp16 "max") the Gram GEMM (pdl.cuh)
  extern __shared__ float smem[];
  __shared__ uint64_t slots[2 * kMaxWarps];
  __shared__ int warp_counts[kMaxWarps];
  greedy_select_row(p, smem, slots, warp_counts);
}

}  // namespace zspa
