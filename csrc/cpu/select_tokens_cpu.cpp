// CPU kernels of the ZSPAPrune selection (SPEC §1), driven by zspa_kernels/cpu.py.
//
//   zspa::cpu_unit_tokens(visual, prompt_units, prompt_valid, ...) -> (unit16, relevance, finite, unit32)
//       one pass over the tokens: the norm (the token scaled by a power of two near max|v|, so no
//       finite token overflows; its squares summed in double), the relevance dots against the
//       prompt's unit vectors (summed in double), and the unit token stored in fp16 for the
//       greedy steps.
//   zspa::cpu_greedy(visual, unit16, relevance, finite, k_b, k_core, seed, k, ...) -> order
//       per row: core = top k_core relevance (ties: lower index), similarity to the core,
//       then k_b - k_core dependent steps, each ONE pass over the row's fp16 tokens that
//       updates the running max similarity and finds the next argmin in the same sweep.
//       The queries (the core's tokens, then each pick) are fp32 unit vectors recomputed from
//       `visual` as pass 1 computed them, so only the candidate's side of a cosine is rounded.
//
// Threads: rows in parallel when there are at least as many rows as threads; otherwise a row
// larger than kSplitBytes has each pass split over token chunks, the chunk minima reduced in
// chunk order, so the first minimum (lower index) wins exactly as in a serial scan.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

using at::Half;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kSplitBytes = 1 << 20;  // fp16 tokens of one row above which a sweep is split (1 MB)

// ---- fp32 -> fp16 and the fp16 x fp32 dot product (fp32 lanes folded into double) -----------

void to_half(const float* src, Half* dst, int64_t D) {
  int64_t d = 0;
#if defined(__AVX512F__)
  for (; d + 16 <= D; d += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + d), _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__)
  for (; d + 8 <= D; d += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + d), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; d < D; ++d) dst[d] = Half(src[d]);
}


// Summation: each fp32 lane adds at most kFold / (lanes) products (FMA: each product exact) before its
// sum moves to a double lane, so a cosine's fp32 accumulation error stays below (64 + 1)·2^-24 whatever D
// (a lane that ran D/16 terms in fp32 could drop every small product on an adversarial token).
constexpr int64_t kFold = 1024;

#if defined(__AVX512F__)
inline void fold16(__m512 acc, __m512d* sum) {  // sum[0..1] += the 16 lanes of acc, in double
  sum[0] = _mm512_add_pd(sum[0], _mm512_cvtps_pd(_mm512_castps512_ps256(acc)));
  sum[1] = _mm512_add_pd(sum[1], _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1))));
}
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
inline void fold8(__m256 acc, __m256d* sum) {  // sum[0..1] += the 8 lanes of acc, in double
  sum[0] = _mm256_add_pd(sum[0], _mm256_cvtps_pd(_mm256_castps256_ps128(acc)));
  sum[1] = _mm256_add_pd(sum[1], _mm256_cvtps_pd(_mm256_extractf128_ps(acc, 1)));
}
#endif

// The same arithmetic for every token (fixed lane split, fixed fold points, fixed reduction order),
// so equal tokens get bit-identical similarities and exact ties stay exact.
float dot(const Half* a, const float* b, int64_t D) {
  int64_t d = 0;
  double total = 0.0;
#if defined(__AVX512F__)
  __m512d sum[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};
  while (d + 32 <= D) {
    const int64_t stop = d + std::min<int64_t>(kFold, (D - d) / 32 * 32);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; d < stop; d += 32) {
      acc0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + d))),
                             _mm512_loadu_ps(b + d), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + d + 16))),
                             _mm512_loadu_ps(b + d + 16), acc1);
    }
    fold16(acc0, sum);
    fold16(acc1, sum);
  }
  total = _mm512_reduce_add_pd(_mm512_add_pd(sum[0], sum[1]));
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
  __m256d sum[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
  while (d + 16 <= D) {
    const int64_t stop = d + std::min<int64_t>(kFold, (D - d) / 16 * 16);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; d < stop; d += 16) {
      acc0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + d))),
                             _mm256_loadu_ps(b + d), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + d + 8))),
                             _mm256_loadu_ps(b + d + 8), acc1);
    }
    fold8(acc0, sum);
    fold8(acc1, sum);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(sum[0], sum[1]));
  for (double lane : lanes) total += lane;
#endif
  for (; d < D; ++d) total += static_cast<double>(static_cast<float>(a[d])) * b[d];  // exact products
  return static_cast<float>(total);
}

// sims[t] = max(sims[t], a_t . q_0, ..., a_t . q_3) for `tokens` (1 or 4) consecutive fp16 rows a_t
// and four consecutive fp32 rows q: the core's similarities are a small GEMM, compute-bound, so
// each loaded vector feeds several FMAs. Every (token, query) pair runs the same sequence of
// operations whatever the tile, so equal tokens keep bit-identical similarities.
void max_dots_4q(const Half* a, const float* q, int64_t D, int tokens, float* sims) {
#if defined(__AVX512F__)
  constexpr int kT = 4;
  __m512d sum[kT][4][2];
  for (int t = 0; t < kT; ++t)
    for (int r = 0; r < 4; ++r) sum[t][r][0] = sum[t][r][1] = _mm512_setzero_pd();
  int64_t d = 0;
  while (d + 16 <= D) {
    const int64_t stop = d + std::min<int64_t>(kFold, (D - d) / 16 * 16);
    __m512 acc[kT][4];
    for (int t = 0; t < kT; ++t)
      for (int r = 0; r < 4; ++r) acc[t][r] = _mm512_setzero_ps();
    for (; d < stop; d += 16) {
      __m512 x[kT];
      for (int t = 0; t < tokens; ++t)
        x[t] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + t * D + d)));
      for (int r = 0; r < 4; ++r) {
        const __m512 y = _mm512_loadu_ps(q + r * D + d);
        for (int t = 0; t < tokens; ++t) acc[t][r] = _mm512_fmadd_ps(x[t], y, acc[t][r]);
      }
    }
    for (int t = 0; t < tokens; ++t)
      for (int r = 0; r < 4; ++r) fold16(acc[t][r], sum[t][r]);
  }
  for (int t = 0; t < tokens; ++t)
    for (int r = 0; r < 4; ++r) {
      double total = _mm512_reduce_add_pd(_mm512_add_pd(sum[t][r][0], sum[t][r][1]));
      for (int64_t e = d; e < D; ++e) total += static_cast<double>(static_cast<float>(a[t * D + e])) * q[r * D + e];
      sims[t] = std::max(sims[t], static_cast<float>(total));
    }
#else
  for (int t = 0; t < tokens; ++t)
    for (int r = 0; r < 4; ++r) sims[t] = std::max(sims[t], dot(a + t * D, q + r * D, D));
#endif
}

// ---- pass 1: unit tokens, relevance, finiteness ---------------------------------------------

struct UnitSpec {  // the spec's constants of a unit vector (spec.py)
  float norm_eps;
  int64_t scale_exp_min, scale_exp_max;
};

// row <- the fp32 unit vector of token x (zeros for a zero or non-finite token); returns whether x is
// finite. Pass 1 stores it in fp16 and dots it with the prompt; the greedy chain recomputes its picks'
// with the same code (not inlined: one vectorisation of its sums for both callers), so a query is
// exactly the fp32 unit that pass 1 rounded.
template <typename scalar_t>
__attribute__((noinline)) bool unit_row(const scalar_t* x, int64_t D, const UnitSpec& spec, float* row) {
  float scale = 0.f, poison = 0.f;  // poison: 0 unless some feature is NaN or +-inf (x * 0)
  for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(x[d]);
#pragma omp simd reduction(max : scale) reduction(+ : poison)
  for (int64_t d = 0; d < D; ++d) {
    poison += row[d] * 0.f;
    scale = std::max(scale, std::fabs(row[d]));
  }
  const bool is_finite = poison == 0.f;
  // As the reference (spec.py): y = x * 2^-e with max|x| = m * 2^e (exact, e clamped to the
  // spec's range), unit = y / max(||y||, eps * 2^-e). Neither the squares nor the norm can
  // overflow, whatever the token's magnitude; the clamp is the spec's 1e-6 in x's units.
  float norm = 0.f, pow2 = 1.f;  // a non-finite token becomes a zero vector; so does a zero vector
  if (is_finite && scale > 0.f) {
    int e = 0;
    std::frexp(scale, &e);
    pow2 = std::ldexp(1.f, -static_cast<int>(std::min<int64_t>(std::max<int64_t>(e, spec.scale_exp_min),
                                                                spec.scale_exp_max)));
    // The squares (exact in double) summed in double: an fp32 sum over D/16 terms a lane could drift
    // ~D/16 half-ulps on an adversarial token (2.4e-5 at D = 16384, past spec.CORE_TOLERANCE).
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < D; ++d) sum += double(row[d] * pow2) * double(row[d] * pow2);
    norm = std::max(static_cast<float>(std::sqrt(sum)), spec.norm_eps * pow2);
  }
  for (int64_t d = 0; d < D; ++d) row[d] = norm > 0.f ? (row[d] * pow2) / norm : 0.f;
  return is_finite;
}

template <typename scalar_t>
void unit_tokens_kernel(const at::Tensor& visual, const at::Tensor& prompt_units, const at::Tensor& prompt_valid,
                        at::Tensor& unit16, at::Tensor& relevance, at::Tensor& finite, float* unit32,
                        const UnitSpec& spec, double nonfinite_relevance) {
  const int64_t B = visual.size(0), N = visual.size(1), D = visual.size(2), T = prompt_units.size(1);
  const scalar_t* x = visual.data_ptr<scalar_t>();
  const float* p = prompt_units.data_ptr<float>();
  const bool* valid = prompt_valid.data_ptr<bool>();
  Half* u = unit16.data_ptr<Half>();
  float* r = relevance.data_ptr<float>();
  bool* ok = finite.data_ptr<bool>();
  at::parallel_for(0, B * N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / N;
      const bool is_finite = unit_row(x + i * D, D, spec, row.data());
      ok[i] = is_finite;
      to_half(row.data(), u + i * D, D);
      if (unit32) std::copy(row.begin(), row.end(), unit32 + i * D);
      float best = -kInf;
      bool any = false;
      for (int64_t t = 0; t < T; ++t) {
        if (!valid[b * T + t]) continue;
        any = true;
        const float* pt = p + (b * T + t) * D;
        double s = 0.0;  // in double, as the norm: the relevance ranks the core to spec.CORE_TOLERANCE
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) s += double(row[d]) * double(pt[d]);
        best = std::max(best, static_cast<float>(s));
      }
      r[i] = !is_finite ? float(nonfinite_relevance) : (any ? best : 0.f);
    }
  });
}

// `keep_units`: also return the fp32 unit tokens (the isolation seed's fp32 side); else an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_unit_tokens(
    const at::Tensor& visual, const at::Tensor& prompt_units, const at::Tensor& prompt_valid, double norm_eps,
    double nonfinite_relevance, int64_t scale_exp_min, int64_t scale_exp_max, bool keep_units) {
  TORCH_CHECK(visual.dim() == 3 && visual.is_contiguous(), "visual: expected a contiguous (B, N, D) tensor");
  TORCH_CHECK(prompt_units.scalar_type() == at::kFloat && prompt_units.is_contiguous() &&
                  prompt_units.size(0) == visual.size(0) && prompt_units.size(2) == visual.size(2),
              "prompt_units: expected contiguous fp32 (B, T, D)");
  TORCH_CHECK(prompt_valid.scalar_type() == at::kBool && prompt_valid.is_contiguous(),
              "prompt_valid: expected contiguous bool (B, T)");
  auto unit16 = at::empty(visual.sizes(), visual.options().dtype(at::kHalf));
  auto relevance = at::empty({visual.size(0), visual.size(1)}, visual.options().dtype(at::kFloat));
  auto finite = at::empty({visual.size(0), visual.size(1)}, visual.options().dtype(at::kBool));
  auto unit32 = at::empty(keep_units ? visual.sizes() : at::IntArrayRef{0}, visual.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, visual.scalar_type(), "cpu_unit_tokens", [&] {
    unit_tokens_kernel<scalar_t>(visual, prompt_units, prompt_valid, unit16, relevance, finite,
                                 keep_units ? unit32.data_ptr<float>() : nullptr,
                                 UnitSpec{float(norm_eps), scale_exp_min, scale_exp_max}, nonfinite_relevance);
  });
  return {unit16, relevance, finite, unit32};
}

// ---- pass 2: core, then the greedy chain ------------------------------------------------------

struct Best {
  float score;
  int64_t index;
};

// s[i] <- max(s[i], max_q u_i . q) over the untaken finite tokens of [begin, end); returns their
// first minimum. Taken tokens hold +inf and non-finite ones the fixed "most redundant" score.
Best update_range(const Half* u, const bool* finite, float* s, const float* queries, int64_t n_queries, int64_t D,
                  int64_t begin, int64_t end) {
  Best best{kInf, -1};
  const int64_t q4 = n_queries / 4 * 4;
  for (int64_t i = begin; i < end;) {
    const int tokens = (q4 > 0 && i + 4 <= end) ? 4 : 1;  // 4-token tiles for the core's many queries
    float sims[4] = {-kInf, -kInf, -kInf, -kInf};
    for (int64_t q = 0; q < q4; q += 4) max_dots_4q(u + i * D, queries + q * D, D, tokens, sims);
    for (int t = 0; t < tokens; ++t, ++i) {
      if (s[i] != kInf && finite[i]) {
        float sim = std::max(s[i], sims[t]);
        for (int64_t q = q4; q < n_queries; ++q) sim = std::max(sim, dot(u + i * D, queries + q * D, D));
        s[i] = sim;
      }
      if (s[i] < best.score || best.index < 0) best = {s[i], i};
    }
  }
  return best;
}

// One pass over a row, split over token chunks when `split` (the chunks' minima reduced in
// order: the first minimum wins, as in one serial scan).
int64_t update(const Half* u, const bool* finite, float* s, const float* queries, int64_t n_queries, int64_t n,
               int64_t D, bool split) {
  if (!split) return update_range(u, finite, s, queries, n_queries, D, 0, n).index;
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, n / 64));
  std::vector<Best> partial(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      partial[c] = update_range(u, finite, s, queries, n_queries, D, n * c / chunks, n * (c + 1) / chunks);
  });
  Best best = partial[0];
  for (const Best& p : partial)
    if (p.score < best.score) best = p;
  return best.index;
}

// `unit_of(i, q)`: token i's fp32 unit vector into q (pass 1's, before its fp16 rounding). The queries
// (the core's tokens, then each pick) stay fp32, so a similarity rounds on the candidate's side alone.
using UnitOf = std::function<void(int64_t, float*)>;

void greedy_row(const Half* u, const UnitOf& unit_of, const float* r, const bool* finite, const float* seed,
                int64_t n, int64_t D, int64_t k_b, int64_t k_core, float nonfinite_similarity, int64_t* order,
                bool split) {
  std::vector<float> s(n);
  std::vector<float> queries;
  int64_t next;
  if (k_core > 0) {
    std::vector<int64_t> idx(n);
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + k_core, idx.end(),
                      [&](int64_t a, int64_t b) { return r[a] > r[b] || (r[a] == r[b] && a < b); });
    queries.resize(k_core * D);
    for (int64_t c = 0; c < k_core; ++c) {
      order[c] = idx[c];
      unit_of(idx[c], queries.data() + c * D);
    }
    for (int64_t i = 0; i < n; ++i) s[i] = finite[i] ? -kInf : nonfinite_similarity;
    for (int64_t c = 0; c < k_core; ++c) s[idx[c]] = kInf;
    if (k_core == k_b) return;
    next = update(u, finite, s.data(), queries.data(), k_core, n, D, split);
  } else {  // no core: the most isolated token (its score computed by the caller) seeds the chain
    next = 0;
    for (int64_t i = 1; i < n; ++i)
      if (seed[i] < seed[next]) next = i;
    for (int64_t i = 0; i < n; ++i) s[i] = finite[i] ? -kInf : nonfinite_similarity;
  }
  queries.resize(D);
  for (int64_t t = k_core; t < k_b; ++t) {
    order[t] = next;
    s[next] = kInf;
    if (t + 1 == k_b) break;
    unit_of(next, queries.data());
    next = update(u, finite, s.data(), queries.data(), 1, n, D, split);
  }
}

at::Tensor cpu_greedy(const at::Tensor& visual, const at::Tensor& unit16, const at::Tensor& relevance,
                      const at::Tensor& finite, const at::Tensor& n_valid, const at::Tensor& k_b,
                      const at::Tensor& k_core, const c10::optional<at::Tensor>& seed, int64_t k,
                      double nonfinite_similarity, double norm_eps, int64_t scale_exp_min, int64_t scale_exp_max) {
  TORCH_CHECK(unit16.scalar_type() == at::kHalf && unit16.dim() == 3 && unit16.is_contiguous(),
              "unit16: expected contiguous fp16 (B, N, D)");
  TORCH_CHECK(visual.sizes() == unit16.sizes() && visual.is_contiguous(),
              "visual: expected the contiguous (B, N, D) tokens unit16 was made from");
  const int64_t B = unit16.size(0), N = unit16.size(1), D = unit16.size(2);
  const UnitSpec spec{float(norm_eps), scale_exp_min, scale_exp_max};
  for (const auto* t : {&n_valid, &k_b, &k_core})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->numel() == B, "row sizes: expected int64 (B,)");
  auto order = at::full({B, k}, -1, unit16.options().dtype(at::kLong));
  const Half* u = unit16.data_ptr<Half>();
  const float* r = relevance.data_ptr<float>();
  const bool* ok = finite.data_ptr<bool>();
  const float* seeds = seed.has_value() ? seed->data_ptr<float>() : nullptr;
  const int64_t *n = n_valid.data_ptr<int64_t>(), *kb = k_b.data_ptr<int64_t>(), *kc = k_core.data_ptr<int64_t>();
  int64_t* out = order.data_ptr<int64_t>();
  auto row = [&](int64_t b, bool split) {
    TORCH_CHECK(kc[b] > 0 || seeds != nullptr, "seed: needed by a row without a core");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, visual.scalar_type(), "cpu_greedy", [&] {
      const scalar_t* x = visual.data_ptr<scalar_t>() + b * N * D;
      const UnitOf unit_of = [&](int64_t i, float* q) { unit_row(x + i * D, D, spec, q); };
      greedy_row(u + b * N * D, unit_of, r + b * N, ok + b * N, seeds ? seeds + b * N : nullptr, n[b], D, kb[b],
                 kc[b], float(nonfinite_similarity), out + b * k, split);
    });
  };
  if (B >= at::get_num_threads()) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) row(b, false);
    });
  } else {
    // Split a sweep over threads when it is worth a thread handoff per dependent step: at
    // N=576, D=4096 (4.7 MB of fp16) two threads take a step from ~70 to ~35 us on idle cores
    // (bench/results). On cores that other processes keep busy a handoff can wait a scheduler
    // time slice, as torch's own GEMMs do there; torch.set_num_threads(1) avoids both.
    for (int64_t b = 0; b < B; ++b) row(b, n[b] * D * int64_t(sizeof(Half)) > kSplitBytes);
  }
  return order;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zspa, m) {
  m.def("cpu_unit_tokens(Tensor visual, Tensor prompt_units, Tensor prompt_valid, float norm_eps, "
        "float nonfinite_relevance, int scale_exp_min, int scale_exp_max, bool keep_units) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_greedy(Tensor visual, Tensor unit16, Tensor relevance, Tensor finite, Tensor n_valid, Tensor k_b, "
        "Tensor k_core, Tensor? seed, int k, float nonfinite_similarity, float norm_eps, int scale_exp_min, "
        "int scale_exp_max) -> Tensor");
}

TORCH_LIBRARY_IMPL(zspa, CPU, m) {
  m.impl("cpu_unit_tokens", &cpu_unit_tokens);
  m.impl("cpu_greedy", &cpu_greedy);
}
