// Kernel 3, cluster form (sm_90+): the selection of one batch row by a thread-block cluster
// whose CTAs' shared memories hold the row's Gram between them, so that a chain step reads its
// Gram row on chip instead of from L2. Same inputs, rules and output as greedy_select.cuh,
// whose helpers (row budget, norms and relevance, cosine, output) it shares.
//
// Why: on the H200 (2026-11-30) greedy_select's chain step cost 0.9 us at LLaVA-1.5 (N = 576),
// an L2 round trip for the Gram row after a block-wide argmin (two shuffle trees around a
// barrier). The row's 2.3 KB cannot stay on one SM (the Gram is 1.3 MB), but 8 SMs hold it.
//
// CTA r of a cluster of `ctas` owns the tokens [lo, lo + width), lo = r * slice, one a thread
// (blockDim.x >= slice), and keeps their Gram columns, cols[j * slice + i - lo] = G[j, i] for
// every j < n: 4 * slice * N bytes, copied asynchronously (16-byte cp.async where aligned) while
// it computes every token's norm and relevance (each CTA all N of them: N reads, no exchange).
//  1. core: each token counts the n keys below its own; a rank < k_core is pick `rank`, which
//     its thread stores into `picks` of every CTA; one cluster barrier.
//  2. s_i = max over the core of cos(i, c), or the isolation max_{j != i} cos(i, j), from cols.
//  3. chain: per step every warp reduces its tokens' keys (shuffles) and stores the result,
//     tagged with the step, into slot (r, warp) of every CTA (lanes 0..ctas-1, one relaxed
//     remote store each); then every warp polls its own CTA's ctas * warps slots until all
//     carry this step's tag, and reduces them itself: no barrier of any kind in a step (see
//     cluster.cuh for what a cluster barrier costs). Slots alternate between two sets by step
//     parity: a warp stores step t + 2's key into a CTA only after it has read every warp's
//     step t + 1 key, which each warp sends only after reading step t's slots.
//  4. CTA 0 writes the output (greedy_select.cuh's write_output).
// No remote store comes before a first cluster barrier (a CTA's shared memory may be written only
// once the CTA runs), and no CTA exits before every CTA has received every message sent to it
// (the core's picks before a cluster barrier, the chain's keys by polling, then a last barrier
// without memory ordering), so no CTA exits while a store to or from it is in flight. Cosines use the same expression on the same
// Gram entries G[j, i] as greedy_select, so both kernels make the same picks.
#pragma once

#include <cstdint>

#include "cluster.cuh"
#include "gram_view.cuh"
#include "greedy_select.cuh"
#include "packed_key.cuh"

#ifndef ZSPA_SIMT
#include <cuda_pipeline.h>
#endif

namespace zspa {

constexpr int kMaxClusterCtas = 16;   // the largest cluster sm_90 launches (non-portable above 8)
constexpr int kMaxClusterSlots = 64;  // ctas * warps a CTA, one argmin key each
constexpr int kSlotIndexBits = 11;    // a chain message: score bits, step, token index < 2^11
constexpr uint64_t kSlotIndexMask = (uint64_t{1} << kSlotIndexBits) - 1;
constexpr uint64_t kSlotStepMask = (uint64_t{1} << (32 - kSlotIndexBits)) - 1;
constexpr uint64_t kNoMessage = ~uint64_t{0};  // its step field (all ones) matches no step < N

// pack_key(score, i) with step t between the score and the index. Messages of one step order as
// their keys do (the tag is equal), kNoKey included (all ones where the index was).
__host__ __device__ inline uint64_t tag_key(uint64_t key, int t) {
  return (key & ~uint64_t{0xffffffffu}) | (static_cast<uint64_t>(t) << kSlotIndexBits) | (key & kSlotIndexMask);
}

// Shared memory of one CTA: the Gram columns (slice * N floats), then the norms, the relevances
// (reused as kept flags by CTA 0 at the end) and the picks, N words each. slice % 4 == 0 keeps
// every column block 16-byte aligned.
__host__ __device__ inline size_t cluster_smem_bytes(int64_t N, int64_t slice) {
  return 4 * static_cast<size_t>(slice * N + 3 * N);
}

// The cluster the launcher uses for N tokens: the fewest CTAs (at most kMaxClusterCtas) whose
// shared memory, `smem_limit` bytes a CTA of which `static_bytes` are the kernel's static arrays,
// holds the N x N Gram between them; slice = ceil(N / ctas) rounded up to a multiple of 4 (fewer
// CTAs where the last would hold no token), a thread a token. ctas = 0: no cluster holds it
// (N > ~950 at 227 KiB a CTA).
struct ClusterShape {
  int ctas = 0, slice = 0, threads = 0;
  size_t smem = 0;  // dynamic shared memory a CTA
};

__host__ __device__ inline ClusterShape cluster_shape(int64_t N, size_t smem_limit, size_t static_bytes) {
  ClusterShape shape;
  for (int ctas = 1; ctas <= kMaxClusterCtas; ++ctas) {
    const int64_t slice = ((N + ctas - 1) / ctas + 3) / 4 * 4;
    if ((ctas - 1) * slice >= N) continue;  // the last CTA would hold no token
    const int64_t threads = (slice + 31) / 32 * 32;
    const size_t smem = cluster_smem_bytes(N, slice);
    if (threads <= 1024 && ctas * (threads / 32) <= kMaxClusterSlots && smem + static_bytes <= smem_limit &&
        N <= static_cast<int64_t>(kSlotIndexMask)) {
      shape.ctas = ctas;
      shape.slice = static_cast<int>(slice);
      shape.threads = static_cast<int>(threads);
      shape.smem = smem;
      return shape;
    }
  }
  return shape;
}

// Rows j < n of this CTA's Gram columns into cols, asynchronously (the caller waits): a
// 16-byte copy for each 4 columns that are consecutive and aligned in the Gram's storage (N, h
// and slice multiples of 4; in a split Gram the lower-left block is read transposed, a column
// at a time), else 4-byte copies. The copy units are spread over all threads.
__device__ __forceinline__ void copy_gram_columns(float* cols, const GramView& G, int n, int lo, int width,
                                                  int slice) {
  const bool wide = G.N % 4 == 0 && G.h % 4 == 0 && slice % 4 == 0;
  const int unit = wide ? 4 : 1;  // columns a copy unit
  const int per_row = (width + unit - 1) / unit;
  const int total = n * per_row;
  for (int u = threadIdx.x; u < total; u += blockDim.x) {
    const int j = u / per_row, q = (u - j * per_row) * unit;
    float* dst = cols + static_cast<int64_t>(j) * slice + q;
    if (wide && G.contiguous_from(j, lo + q)) {
      __pipeline_memcpy_async(dst, G.ptr(j, lo + q), 16);
    } else {
      for (int e = 0; e < unit; ++e) __pipeline_memcpy_async(dst + e, G.ptr(j, lo + q + e), 4);
    }
  }
  __pipeline_commit();
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900  // clusters: sm_90+ (and the CPU emulation)
// This CTA's slot once it holds step t's message (polled). A message arrives within
// microseconds; one that has not after kMaxPolls polls (about a second) means a broken
// exchange, which traps (a launch error the caller sees) rather than hang the GPU.
constexpr int64_t kMaxPolls = int64_t{1} << 25;

__device__ __forceinline__ uint64_t await_step(const uint64_t* slot, int t) {
  uint64_t message;
  int64_t polls = 0;
  do {
    message = load_relaxed(slot);
    if (++polls > kMaxPolls) __trap();
  } while (((message >> kSlotIndexBits) & kSlotStepMask) != static_cast<uint64_t>(t));
  return message;
}

// One CTA's part of batch row p.row0 + blockIdx.x / ctas. `smem`: cluster_smem_bytes(N, slice),
// 16-byte aligned; `slots`: 2 * kMaxClusterSlots keys; `warp_counts`: kMaxWarps ints.
__device__ void greedy_cluster_row(const GreedyParams& p, int ctas, int slice, float* smem, uint64_t* slots,
                                   int* warp_counts) {
  const int N = p.N, tid = threadIdx.x, threads = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, warps = threads >> 5;
  const int rank = static_cast<int>(cluster_rank());
  const int row = static_cast<int>(blockIdx.x) / ctas;
  const int b = p.row0 + row;
  const GramView G = gram_view(p, row);
  const bool* valid = p.prompt_mask ? p.prompt_mask + static_cast<int64_t>(b) * p.T : nullptr;
  const RowBudget budget = row_budget(p, b);
  const int n = budget.n, k_b = budget.k_b, k_core = budget.k_core;

  float* cols = smem;
  float* norm = cols + static_cast<int64_t>(slice) * N;
  float* rel = norm + N;
  int* picks = reinterpret_cast<int*>(rel + N);
  const int lo = rank * slice;
  const int width = lo < N ? (N - lo < slice ? N - lo : slice) : 0;

  copy_gram_columns(cols, G, n, lo, width, slice);
  for (int i = tid; i < n; i += threads) token_norm_relevance(p, b, G, i, valid, norm + i, rel + i);
  for (int q = tid; q < 2 * kMaxClusterSlots; q += threads) slots[q] = kNoMessage;
  __pipeline_wait_prior(0);
  __syncthreads();  // cols, norm[] and rel[] complete
  cluster_sync();   // every CTA of the cluster running: only then may its shared memory be written

  const int i = lo + tid;
  const bool mine = tid < width && i < n;  // this thread's token, if it has one

  // 1. Core: the token whose key pack_key(-r_i, i) has rank t < k_core is pick t (keys are distinct).
  bool taken = false;
  if (k_core > 0 && mine) {
    const int rank_i = key_rank([&](int j) { return pack_key(-rel[j], j); }, n, pack_key(-rel[i], i));
    if (rank_i < k_core) {
      taken = true;
      for (int r = 0; r < ctas; ++r) cluster_map(picks, r)[rank_i] = i;
    }
  }
  cluster_sync();  // picks[0, k_core) complete in every CTA

  // 2. Similarity to the core, or isolation when the core is empty; kTaken marks taken tokens.
  float s = kTaken;
  const float* col = cols + (tid < width ? tid : 0);  // col[j * slice] = G[j, i]
  if (mine && !taken) {
    const float norm_i = norm[i];
    s = -INFINITY;
    if (k_core > 0) {
#pragma unroll 4
      for (int c = 0; c < k_core; ++c) {
        const int j = picks[c];
        s = fmaxf(s, cosine_of(col[static_cast<int64_t>(j) * slice], norm_i, norm[j]));
      }
    } else if (norm_i < 0.0f) {
      s = kNonFiniteSimilarity;
    } else {
      for (int j = 0; j < n; ++j)
        if (j != i && norm[j] >= 0.0f) s = fmaxf(s, cosine_of(col[static_cast<int64_t>(j) * slice], norm_i, norm[j]));
    }
  }

  // 3. Greedy max-min diversity: argmin of s over the cluster, lower index first.
  const int slot_count = ctas * warps;
  for (int t = k_core; t < k_b; ++t) {
    uint64_t* set = slots + (t & 1) * kMaxClusterSlots;
    const uint64_t key = warp_min(s != kTaken ? pack_key(s, i) : kNoKey);  // kTaken: taken, padded or not mine
    if (lane < ctas) cluster_store_relaxed(set + rank * warps + warp, lane, tag_key(key, t));
    uint64_t best = kNoMessage;
    for (int q = lane; q < slot_count; q += 32) best = min(best, await_step(set + q, t));
    const int j = static_cast<int>(warp_min(best) & kSlotIndexMask);
    if (tid == 0) picks[t] = j;
    if (s != kTaken) {
      if (i == j) {
        s = kTaken;
      } else {
        const float c = cosine_of(col[static_cast<int64_t>(j) * slice], norm[i], norm[j]);
        s = t == 0 ? c : fmaxf(s, c);  // t == 0: drop the isolation seed score
      }
    }
  }

  // No CTA leaves while a store it sent may still be in flight to another: each CTA arrives here
  // only after it has received every message sent to it.
  cluster_sync_relaxed();

  // 4. Output, by CTA 0: every CTA knows every pick; rel[] becomes the kept flags.
  if (rank != 0) return;
  __syncthreads();  // picks[] complete, every rel[] read done
  for (int q = tid; q < n; q += threads) rel[q] = 0.0f;
  __syncthreads();
  for (int t = tid; t < k_b; t += threads) rel[picks[t]] = 1.0f;
  __syncthreads();
  write_output(p, p.out + static_cast<int64_t>(b) * p.k, picks, n, k_b, [&](int q) { return rel[q] != 0.0f; },
               warp_counts);
}

#endif

// Grid: rows * ctas CTAs in clusters of `ctas` (cudaLaunchKernelEx), blockDim.x >= slice, a
// multiple of 32, ctas * blockDim.x / 32 <= kMaxClusterSlots; dynamic shared memory
// cluster_smem_bytes(N, slice). Compiled for sm_80 too, where the launcher never selects it.
__global__ void __launch_bounds__(1024) greedy_cluster_kernel(GreedyParams p, int ctas, int slice) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();
#else
  wait_for_previous_kernel();  // the token pass, or (fp16 "max") the Gram GEMM (pdl.cuh)
  extern __shared__ float4 cluster_smem[];  // float4: 16-byte aligned for the 16-byte copies
  __shared__ uint64_t slots[2 * kMaxClusterSlots];
  __shared__ int warp_counts[kMaxWarps];
  greedy_cluster_row(p, ctas, slice, reinterpret_cast<float*>(cluster_smem), slots, warp_counts);
#endif
}

}  // namespace zspa
