// C entry points that run csrc/'s kernels on the CPU (see simt.h), for ctypes, one block
// after the other with the launcher's grid shapes. The GEMM outputs the launcher gets
// from cuBLAS (Gram rows, "max" dot products) are inputs here; tokens and prompts are
// fp32 (the dtype only changes the loads and the scaled values' rounding).
#include "simt.h"

#include "greedy_cluster.cuh"
#include "greedy_select.cuh"
#include "prompt_stats.cuh"
#include "scale_rows.cuh"

extern "C" void emulate_prompt_stats(const float* prompt, const bool* mask, float* pooled, float* norm,
                                     const float* scale, int B, int T, int D, bool max_relevance, int threads) {
  for (int b = 0; b < B; ++b) {
    float scratch[32];
    simt::run_block(b, 0, threads, [&] {
      zspa::prompt_stats_row<float>(prompt, mask, pooled, norm, scale, T, D, max_relevance, scratch);
    });
  }
}

// The prompt rows' pass of relevance "max": scaled copy and scales (scale_rows_kernel).
extern "C" void emulate_scale_rows(const float* x, float* scaled, float* scale, int64_t rows, int D, int threads) {
  for (int64_t r = 0; r < rows; ++r) {
    float scratch[32];
    simt::run_block(static_cast<unsigned>(r), 0, threads, [&] {
      zspa::scale_row<float>(x, scaled, scale, nullptr, nullptr, 1, D, false, scratch);
    });
  }
}

// The token pass over B batch rows of N tokens (token_pass_kernel, one Gram chunk): scale null:
// fp16 (never scaled); pooled/dots null: "max"; prompt/prompt_dots null: "mean" or fp16. The
// Gram (top, corner, h as gram_view.cuh) and prompt_dots are rewritten where the pass repairs them.
extern "C" void emulate_token_pass(const float* x, float* scale, const float* pooled, float* dots, float* gram_top,
                                   float* gram_corner, int h, const float* prompt, float* prompt_dots, int B, int N,
                                   int T, int D, int threads) {
  zspa::TokenPass<float> p{};
  p.x = x;
  p.scale = scale;
  p.pooled = pooled;
  p.dots = dots;
  p.gram_top = gram_top;
  p.gram_corner = gram_corner;
  p.gram_split = h;
  p.prompt = prompt;
  p.prompt_dots = prompt_dots;
  p.N = N;
  p.T = T;
  p.D = D;
  for (int64_t r = 0; r < static_cast<int64_t>(B) * N; ++r) {
    float scratch[32];
    simt::run_block(static_cast<unsigned>(r), 0, threads, [&] { zspa::token_pass_row(p, scratch); });
  }
}

// The rules of spec.cuh, for the test that checks them against zspa_kernels/spec.py.
extern "C" int emulate_core_count(double core_ratio, int k_b) { return zspa::core_count(core_ratio, k_b); }
extern "C" float emulate_pow2_scale(float amax) { return zspa::pow2_scale(amax); }
extern "C" float emulate_raw_scale(float amax) { return zspa::raw_scale(amax); }
extern "C" int emulate_pool_shift(int T) { return zspa::pool_shift(T); }
extern "C" float emulate_pooled_feature(float mean, float mean_down, float up) {
  return zspa::pooled_feature(mean, mean_down, up);
}
extern "C" float emulate_constant(int which) {
  const float values[] = {zspa::kNormEps, zspa::kNonFiniteRelevance, zspa::kNonFiniteSimilarity,
                          static_cast<float>(zspa::kScaleExpMin), static_cast<float>(zspa::kScaleExpMax),
                          static_cast<float>(zspa::kRankCoreBudget), static_cast<float>(zspa::kRadixMinTokens),
                          static_cast<float>(zspa::kRawExpMin), static_cast<float>(zspa::kRawExpMax)};
  return values[which];
}

namespace {

zspa::GreedyParams greedy_params(const float* dots, const float* prompt_norm, const bool* mask,
                                 const int64_t* lengths, const float* token_scale, int64_t* out, int N, int T, int k,
                                 double core_ratio, bool max_relevance, bool pick_order, int rank_core_budget,
                                 bool radix_core) {
  zspa::GreedyParams p{};
  p.dots = dots;
  p.prompt_norm = prompt_norm;
  p.prompt_mask = mask;
  p.lengths = lengths;
  p.token_scale = token_scale;
  p.out = out;
  p.N = N;
  p.T = T;
  p.k = k;
  p.core_ratio = core_ratio;
  p.max_relevance = max_relevance;
  p.pick_order = pick_order;
  p.rank_core_budget = rank_core_budget;
  p.radix_core = radix_core;
  return p;
}

// The Gram of the launch whose first batch row is row0.
void set_gram(zspa::GreedyParams& p, const float* top, const float* corner, int h, int row0) {
  const int64_t N = p.N;
  p.gram_top = top + row0 * h * N;
  p.gram_corner = corner ? corner + row0 * (N - h) * (N - h) : nullptr;
  p.gram_split = h;
  p.row0 = row0;
}

}  // namespace

// gram_top (B, h, N) and gram_corner (B, N - h, N - h): the Gram, whole (h = N, corner null) or
// split as the launcher splits it (gram_view.cuh).
extern "C" void emulate_greedy_select(const float* gram_top, const float* gram_corner, int h,
                                      const float* dots, const float* prompt_norm,
                                      const bool* mask, const int64_t* lengths, const float* token_scale,
                                      int64_t* out, int B, int N, int T,
                                      int k, double core_ratio, bool max_relevance, bool pick_order, int threads,
                                      int rows_per_chunk, int rank_core_budget, bool radix_core) {
  zspa::GreedyParams p = greedy_params(dots, prompt_norm, mask, lengths, token_scale, out, N, T, k, core_ratio,
                                       max_relevance, pick_order, rank_core_budget, radix_core);
  // Launches over chunks of `rows_per_chunk` rows, as the launcher bounds its Gram workspace.
  for (int row0 = 0; row0 < B; row0 += rows_per_chunk) {
    set_gram(p, gram_top, gram_corner, h, row0);
    for (int block = 0; block < rows_per_chunk && row0 + block < B; ++block) {
      std::vector<float> smem(3 * static_cast<size_t>(N));
      uint64_t slots[2 * zspa::kMaxWarps];
      int warp_counts[zspa::kMaxWarps];
      simt::run_block(block, 0, threads, [&] { zspa::greedy_select_row(p, smem.data(), slots, warp_counts); });
    }
  }
}

// greedy_cluster.cuh: one cluster of `ctas` blocks per batch row, in Gram chunks like the above.
// Each block's shared memory is one buffer (dynamic part, then the slots and warp counts), so
// that cluster_map can move a pointer from one block's buffer to another's.
extern "C" void emulate_greedy_cluster(const float* gram_top, const float* gram_corner, int h,
                                       const float* dots, const float* prompt_norm,
                                       const bool* mask, const int64_t* lengths, const float* token_scale,
                                       int64_t* out, int B, int N, int T, int k, double core_ratio,
                                       bool max_relevance, bool pick_order, int ctas, int slice, int threads,
                                       int rows_per_chunk) {
  zspa::GreedyParams p = greedy_params(dots, prompt_norm, mask, lengths, token_scale, out, N, T, k, core_ratio,
                                       max_relevance, pick_order, 0, false);
  const size_t dynamic = (zspa::cluster_smem_bytes(N, slice) + 15) / 16 * 16;  // the slots 8-byte aligned
  const size_t slots_bytes = 2 * zspa::kMaxClusterSlots * sizeof(uint64_t);
  const size_t bytes = dynamic + slots_bytes + zspa::kMaxWarps * sizeof(int);
  for (int row0 = 0; row0 < B; row0 += rows_per_chunk) {
    set_gram(p, gram_top, gram_corner, h, row0);
    for (int row = 0; row < rows_per_chunk && row0 + row < B; ++row) {
      std::vector<std::vector<float4>> buffers(ctas, std::vector<float4>((bytes + 15) / 16));
      std::vector<char*> shared;
      for (auto& buffer : buffers) shared.push_back(reinterpret_cast<char*>(buffer.data()));
      simt::run_cluster(row * ctas, threads, shared, [&] {
        char* mine = shared[simt::cluster_rank()];
        zspa::greedy_cluster_row(p, ctas, slice, reinterpret_cast<float*>(mine),
                                 reinterpret_cast<uint64_t*>(mine + dynamic),
                                 reinterpret_cast<int*>(mine + dynamic + slots_bytes));
      });
    }
  }
}

// The launcher's cluster plan: {ctas, slice, threads} (ctas 0: none fits).
extern "C" void emulate_cluster_shape(int64_t N, int64_t smem_limit, int64_t static_bytes, int* shape) {
  const zspa::ClusterShape plan = zspa::cluster_shape(N, static_cast<size_t>(smem_limit), static_cast<size_t>(static_bytes));
  shape[0] = plan.ctas;
  shape[1] = plan.slice;
  shape[2] = plan.threads;
}
