// CPU execution of the csrc/ device code for tests on machines without a GPU.
//
// One std::thread per CUDA thread; __syncthreads is a barrier over the block, and
// warp shuffles and ballots exchange values through per-thread slots between two
// warp-wide barriers. This runs the kernels' own source (thread ownership, barrier
// placement, shuffle trees, ballot scans) against the fp64 oracle; it does not model
// the GPU memory system, so races that only a weak memory model exposes are out of
// its reach (every shared access in csrc/ is ordered by a barrier or owned by one thread).
// A thread-block cluster runs all its blocks' threads at once: the cluster barrier spans them
// all, and a pointer into one block's shared memory maps to the same offset in another's (each
// block's shared memory is one buffer the caller owns). Asynchronous copies are plain copies.
#pragma once

#define ZSPA_SIMT 1

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstddef>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <memory>
#include <thread>
#include <vector>

#define __device__
#define __host__
#define __global__ static inline  // the launch wrappers are never called here
#define __launch_bounds__(...)
#define __shared__
#define __forceinline__ inline
#define __restrict__ __restrict

struct alignas(16) float4 {
  float x, y, z, w;
};

struct SimtDim {
  unsigned x = 0, y = 0;
};

namespace simt {

struct Block {
  explicit Block(int threads) : barrier(threads), exchange(threads) {
    for (int w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<uint64_t> exchange;  // one slot per thread
};

// The blocks of one cluster: a barrier over all their threads, and each block's shared memory.
struct Cluster {
  Cluster(int blocks, int threads) : barrier(blocks * threads), shared(blocks) {}
  std::barrier<> barrier;
  std::vector<char*> shared;  // block rank -> the start of its shared-memory buffer
};

inline thread_local SimtDim thread_idx, block_idx, block_dim;
inline thread_local Block* block = nullptr;
inline thread_local Cluster* cluster = nullptr;
inline thread_local unsigned cluster_block_rank = 0;

inline unsigned cluster_rank() { return cluster_block_rank; }
inline void cluster_sync() { cluster->barrier.arrive_and_wait(); }

// `mine` points into this block's shared buffer; the same offset in block `rank`'s buffer.
template <typename T>
T* cluster_map(T* mine, unsigned rank) {
  const std::ptrdiff_t offset = reinterpret_cast<char*>(mine) - cluster->shared[cluster_block_rank];
  return reinterpret_cast<T*>(cluster->shared[rank] + offset);
}

// Every lane publishes `mine`; returns the value published by `src_lane` of the same warp.
inline uint64_t warp_exchange(uint64_t mine, int src_lane) {
  const int tid = static_cast<int>(thread_idx.x);
  std::barrier<>& warp = *block->warp_barriers[tid / 32];
  block->exchange[tid] = mine;
  warp.arrive_and_wait();
  const uint64_t theirs = block->exchange[(tid & ~31) + src_lane];
  warp.arrive_and_wait();  // no lane overwrites its slot before all have read
  return theirs;
}

// The minimum of `mine` over the warp, to every lane (all lanes publish, then each reads all).
inline uint32_t warp_reduce_min(uint32_t mine) {
  const int tid = static_cast<int>(thread_idx.x);
  std::barrier<>& warp = *block->warp_barriers[tid / 32];
  block->exchange[tid] = mine;
  warp.arrive_and_wait();
  uint32_t best = ~0u;
  for (int lane = 0; lane < 32; ++lane) best = std::min<uint32_t>(best, static_cast<uint32_t>(block->exchange[(tid & ~31) + lane]));
  warp.arrive_and_wait();  // no lane overwrites its slot before all have read
  return best;
}

// Runs body() on the `threads` threads of block (x, y); the caller owns the block's
// shared memory (it outlives the threads).
template <typename Body>
void run_block(unsigned x, unsigned y, int threads, Body body) {
  Block shared_block(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      thread_idx.x = t;
      block_idx.x = x;
      block_idx.y = y;
      block_dim.x = threads;
      block = &shared_block;
      body();
    });
  }
  for (std::thread& thread : pool) thread.join();
}

// Relaxed 64-bit messages between blocks' shared memory; the load yields, so that a polling
// thread leaves the CPU to the threads it waits for.
inline void cluster_store_relaxed(uint64_t* shared, unsigned rank, uint64_t value) {
  std::atomic_ref<uint64_t>(*cluster_map(shared, rank)).store(value, std::memory_order_relaxed);
}

inline uint64_t load_relaxed(const uint64_t* shared) {
  std::this_thread::yield();
  return std::atomic_ref<uint64_t>(*const_cast<uint64_t*>(shared)).load(std::memory_order_relaxed);
}

// Runs body() on every thread of the `shared.size()` blocks (first_block + rank, 0) of one
// cluster, `threads` threads each, all at once; shared[rank] is block rank's shared memory.
template <typename Body>
void run_cluster(unsigned first_block, int threads, const std::vector<char*>& shared, Body body) {
  const int blocks = static_cast<int>(shared.size());
  Cluster shared_cluster(blocks, threads);
  shared_cluster.shared = shared;
  std::vector<std::unique_ptr<Block>> cluster_blocks;
  for (int r = 0; r < blocks; ++r) cluster_blocks.push_back(std::make_unique<Block>(threads));
  std::vector<std::thread> pool;
  for (int r = 0; r < blocks; ++r) {
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, r, t] {
        thread_idx.x = t;
        block_idx.x = first_block + r;
        block_idx.y = 0;
        block_dim.x = threads;
        block = cluster_blocks[r].get();
        cluster = &shared_cluster;
        cluster_block_rank = r;
        body();
      });
    }
  }
  for (std::thread& thread : pool) thread.join();
}

}  // namespace simt

#define threadIdx (simt::thread_idx)
#define blockIdx (simt::block_idx)
#define blockDim (simt::block_dim)

inline void __syncthreads() { simt::block->barrier.arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = simt::warp_exchange(bits, static_cast<int>(simt::thread_idx.x & 31) ^ lane_mask);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

template <typename T>
T __shfl_up_sync(unsigned /*mask*/, T value, unsigned delta) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  const int lane = static_cast<int>(simt::thread_idx.x & 31);
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = simt::warp_exchange(bits, lane >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

inline int atomicAdd(int* address, int value) { return std::atomic_ref<int>(*address).fetch_add(value); }

inline unsigned __reduce_min_sync(unsigned /*mask*/, unsigned value) { return simt::warp_reduce_min(value); }

inline unsigned __ballot_sync(unsigned /*mask*/, bool predicate) {
  unsigned ballot = 0;
  for (int lane = 0; lane < 32; ++lane)
    if (simt::warp_exchange(predicate, lane)) ballot |= 1u << lane;
  return ballot;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline uint32_t __float_as_uint(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
inline int __float_as_int(float x) { return static_cast<int>(__float_as_uint(x)); }
inline float __int_as_float(int i) {
  float x;
  std::memcpy(&x, &i, sizeof(x));
  return x;
}
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline uint64_t min(uint64_t a, uint64_t b) { return a < b ? a : b; }
inline void __trap() { std::abort(); }
// cuda_pipeline.h's asynchronous copies, done at once.
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
inline void __pipeline_commit() {}
inline void __pipeline_wait_prior(size_t) {}
