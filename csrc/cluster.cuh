// The thread-block-cluster primitives greedy_cluster.cuh uses (sm_90+), in one place: the
// CTA's rank in its cluster, the cluster-wide barrier (release/acquire: shared-memory stores
// to any CTA of the cluster before it are visible to every thread after it), a pointer into
// another CTA's shared memory (distributed shared memory), and a relaxed 64-bit store into
// another CTA's shared memory with the relaxed load that polls for it. tests/simt/simt.h
// supplies CPU versions, so the kernel's own source runs there against the fp64 oracle.
//
// Why both a barrier and relaxed messages: on sm_90 every cluster-scope release (the barrier's
// arrive, or a fence) compiles to MEMBAR.ALL.GPU before the barrier and an L1 invalidation
// after it (SASS of nvcc 13.0), a GPU-wide round trip. A message that carries its own step
// number needs no ordering with anything else, so the greedy chain, one exchange a step,
// sends relaxed stores (ST.STRONG.GPU into the other CTA) and polls its own shared memory.
#pragma once

#ifdef ZSPA_SIMT
namespace zspa {
using simt::cluster_map;
using simt::cluster_rank;
using simt::cluster_store_relaxed;
using simt::cluster_sync;
using simt::load_relaxed;
inline void cluster_sync_relaxed() { simt::cluster_sync(); }
}  // namespace zspa
#else
#include <cstdint>

#include <cooperative_groups.h>

namespace zspa {

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned cluster_rank() { return cooperative_groups::this_cluster().block_rank(); }

__device__ __forceinline__ void cluster_sync() { cooperative_groups::this_cluster().sync(); }

// An execution barrier of the cluster without memory ordering (a relaxed arrive: no
// MEMBAR.ALL.GPU in SASS): every CTA reaches it before any passes.
__device__ __forceinline__ void cluster_sync_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
}

// The same shared variable in the CTA of rank `rank` (a generic pointer: ordinary loads and
// stores reach it).
template <typename T>
__device__ __forceinline__ T* cluster_map(T* shared, unsigned rank) {
  return cooperative_groups::this_cluster().map_shared_rank(shared, rank);
}

// *shared in the CTA of rank `rank` = value, a relaxed store at cluster scope (single-copy atomic).
__device__ __forceinline__ void cluster_store_relaxed(uint64_t* shared, unsigned rank, uint64_t value) {
  const uint32_t local = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
  asm volatile("st.relaxed.cluster.shared::cluster.u64 [%0], %1;" ::"r"(remote), "l"(value) : "memory");
}

// *shared (this CTA's), a relaxed load at cluster scope: never hoisted out of a polling loop.
__device__ __forceinline__ uint64_t load_relaxed(const uint64_t* shared) {
  const uint32_t local = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  uint64_t value;
  asm volatile("ld.relaxed.cluster.shared::cta.u64 %0, [%1];" : "=l"(value) : "r"(local) : "memory");
  return value;
}
#endif

}  // namespace zspa
#endif
