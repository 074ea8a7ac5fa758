// The rules of the selection that csrc/ needs, in one place: the C++ side of
// zspa_kernels/spec.py (tests/test_cuda_kernels_emulated.py checks them against it).
#pragma once

#include <cmath>

namespace zspa {

constexpr float kNormEps = 1e-6f;              // v / max(||v||, 1e-6)
constexpr float kNonFiniteRelevance = -2.0f;   // below every finite cosine
constexpr float kNonFiniteSimilarity = 2.0f;   // above every finite cosine
constexpr int kScaleExpMin = -126, kScaleExpMax = 126;

// k_core = floor(alpha * k_b + 0.5) clamped to [0, k_b], two fp64 roundings (no contraction
// into an fma, which would round differently at .5 edges).
__host__ __device__ inline int core_count(double core_ratio, int k_b) {
#ifdef __CUDA_ARCH__
  const double rounded = floor(__dadd_rn(__dmul_rn(core_ratio, static_cast<double>(k_b)), 0.5));
#else
  volatile double product = core_ratio * static_cast<double>(k_b);  // volatile: no fma on the host
  const double rounded = std::floor(product + 0.5);
#endif
  return rounded < 0.0 ? 0 : (rounded > k_b ? k_b : static_cast<int>(rounded));
}

// |x|, and 0 for a non-finite x: the largest of these over a vector is the `amax` its scale
// is taken of (NaN and inf count as 0, like nan_to_num). Every pass that finds a scale folds
// its elements with this, so that two passes over the same vector find the same scale.
__host__ __device__ inline float finite_abs(float x) {
  const float a = fabsf(x);
  return isfinite(a) ? a : 0.0f;
}

// 2^-e with amax = m * 2^e, m in [0.5, 1) (e = 0 for 0; clamped to the spec's range): a
// normal power of two, so multiplying a token by it is exact and squares cannot overflow.
// `amax` is the largest finite |x| of the token.
__host__ __device__ inline float pow2_scale(float amax) {
  if (!(amax > 0.0f)) return 1.0f;
  int e = 0;
  frexpf(amax, &e);
  e = e < kScaleExpMin ? kScaleExpMin : (e > kScaleExpMax ? kScaleExpMax : e);
  return ldexpf(1.0f, -e);
}

// Relevance "mean"'s overflow-safe pooling (spec.pool_shift): a feature whose fp32 sum of
// finite prompt values overflows is pooled from the values times 2^-k, k = pool_shift(T) (the
// prompt's rows, masked ones too), its mean scaled back by 2^k and saturated at float32's largest
// value (the exact mean is at most max|x|, so a finite prompt has a finite mean).
__host__ __device__ inline int pool_shift(int T) {
  int bits = 0;
  for (unsigned t = static_cast<unsigned>(T); t != 0; t >>= 1) ++bits;
  return bits + 1;
}

// The pooled feature from its plain mean and its mean of the values times 2^-pool_shift(T)
// (`up` = 2^pool_shift(T)): the plain one where finite.
__host__ __device__ inline float pooled_feature(float mean, float mean_down, float up) {
  if (isfinite(mean)) return mean;
  const float rescaled = mean_down * up;
  return isfinite(mean_down) && !isfinite(rescaled) ? copysignf(3.40282347e38f, rescaled) : rescaled;
}

// kVec consecutive values, loaded and stored as one 16-byte access when kVec * sizeof = 16.
template <typename scalar_t, int kVec>
struct alignas(kVec * sizeof(scalar_t)) Pack {
  scalar_t v[kVec];
};

}  // namespace zspa
