// Deterministic block-wide argmin on packed 64-bit (score, index) keys.
//
// The high 32 bits hold the score mapped to an unsigned integer with the same
// order as the float, the low 32 bits the token index. The minimum key is then
// the lowest score, and among equal scores the lowest index (SPEC §1 ties), in
// one integer min that shuffles and reductions can apply in any order.
#pragma once

#include <cstdint>

namespace zspa {

constexpr uint64_t kNoKey = ~uint64_t{0};  // loses to every real key: "no candidate"
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kMaxWarps = 32;

// Float -> uint32 with the same order (finite values and +-inf; NaN never reaches here).
__device__ __forceinline__ uint32_t ordered_bits(float x) {
  if (x == 0.0f) x = 0.0f;  // -0 and +0 compare equal, so they must share one key
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ uint64_t pack_key(float score, int index) {
  return (uint64_t{ordered_bits(score)} << 32) | static_cast<uint32_t>(index);
}

__device__ __forceinline__ int key_index(uint64_t key) { return static_cast<int>(key & 0xffffffffu); }

__device__ __forceinline__ uint64_t warp_min(uint64_t key) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const uint64_t other = __shfl_xor_sync(kFullWarp, key, offset);
    key = other < key ? other : key;
  }
  return key;
}

// Minimum key over the block, returned to every thread, with ONE barrier.
// `slots` holds 2 * kMaxWarps keys: callers alternate `parity` between calls so
// that a fast warp writing call t+1's slots cannot clobber slots that a slow
// warp is still reading for call t (the barrier of call t+1 separates t and t+2).
// blockDim.x must be a multiple of 32.
__device__ __forceinline__ uint64_t block_min(uint64_t key, uint64_t* slots, int parity) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  uint64_t* buf = slots + parity * kMaxWarps;
  key = warp_min(key);
  if (lane == 0) buf[warp] = key;
  __syncthreads();
  return warp_min(lane < warps ? buf[lane] : kNoKey);
}

}  // namespace zspa
