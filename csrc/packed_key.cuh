// Deterministic block-wide argmin and k-th smallest on packed 64-bit (score, index) keys.
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

// The smallest key of the warp, to every lane: the smallest high word, then the smallest low
// word among the lanes that hold it, two 32-bit warp reductions (REDUX, sm_80+) where a shuffle
// tree on 64-bit keys takes 5 rounds of two shuffles and a compare, on the dependent path of
// every greedy step.
__device__ __forceinline__ uint64_t warp_min(uint64_t key) {
  const uint32_t high = static_cast<uint32_t>(key >> 32), low = static_cast<uint32_t>(key);
  const uint32_t best_high = __reduce_min_sync(kFullWarp, high);
  const uint32_t best_low = __reduce_min_sync(kFullWarp, high == best_high ? low : ~0u);
  return (uint64_t{best_high} << 32) | best_low;
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

// How many of the distinct keys key_of(0), ..., key_of(count - 1) are smaller than `key`: its
// rank among them when it is one of them (the core's picks by rank, counted by every token).
template <typename KeyOf>
__device__ __forceinline__ int key_rank(KeyOf key_of, int count, uint64_t key) {
  int rank = 0;
  for (int j = 0; j < count; ++j) rank += key_of(j) < key ? 1 : 0;
  return rank;
}

// The k-th smallest (1 <= k <= count) of the distinct keys key_of(i), i < count, returned to
// every thread: a radix select, one 8-bit digit a pass from the top, each pass a histogram of
// the keys that match the digits found so far; index digits above `index_limit` - 1 are zero in
// every key and skipped (4 score passes and 2 index passes for up to 65536 tokens). Barriers:
// three a pass; k dependent argmins would take k. `hist`: 256 ints of shared memory, `found`: 2
// keys of shared memory; blockDim.x a multiple of 32. Deterministic: counts do not depend on
// the order of the atomics.
template <typename KeyOf>
__device__ uint64_t block_kth_key(KeyOf key_of, int count, int k, int index_limit, int* hist, uint64_t* found) {
  const int tid = threadIdx.x, threads = blockDim.x, lane = tid & 31;
  uint64_t prefix = 0, mask = 0;
  int want = k;  // rank of the wanted key among the keys that match the prefix
  for (int shift = 56; shift >= 0; shift -= 8) {
    if (shift < 32 && (static_cast<uint64_t>(index_limit - 1) >> shift) == 0) continue;
    for (int d = tid; d < 256; d += threads) hist[d] = 0;
    __syncthreads();
    for (int i = tid; i < count; i += threads) {
      const uint64_t key = key_of(i);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255], 1);
    }
    __syncthreads();
    if (tid < 32) {  // warp 0: lane l holds bins 8l..8l+7; the bin where the count reaches want
      int bins[8], sum = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) sum += (bins[e] = hist[8 * lane + e]);
      int before = sum;  // inclusive prefix over lanes, then made exclusive
#pragma unroll
      for (int offset = 1; offset < 32; offset <<= 1) {
        const int other = __shfl_up_sync(kFullWarp, before, offset);
        if (lane >= offset) before += other;
      }
      before -= sum;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (before < want && want <= before + bins[e]) {  // exactly one bin of one lane
          found[0] = static_cast<uint64_t>(8 * lane + e);
          found[1] = static_cast<uint64_t>(want - before);
        }
        before += bins[e];
      }
    }
    __syncthreads();
    prefix |= found[0] << shift;
    mask |= uint64_t{255} << shift;
    want = static_cast<int>(found[1]);
  }
  return prefix;
}

}  // namespace zspa
