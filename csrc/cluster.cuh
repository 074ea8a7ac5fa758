// The thread-block-cluster primitives greedy_cluster.cuh uses (sm_90+), in one place: the
// CTA's rank in its cluster, the cluster-wide barrier (release/acquire: shared-memory stores
// to any CTA of the cluster before it are visible to every thread after it), and a pointer into
// another CTA's shared memory (distributed shared memory). tests/simt/simt.h supplies CPU
// versions, so the kernel's own source runs there against the fp64 oracle.
#pragma once

#ifdef ZSPA_SIMT
namespace zspa {
using simt::cluster_map;
using simt::cluster_rank;
using simt::cluster_sync;
}  // namespace zspa
#else
#include <cooperative_groups.h>

namespace zspa {

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned cluster_rank() { return cooperative_groups::this_cluster().block_rank(); }

__device__ __forceinline__ void cluster_sync() { cooperative_groups::this_cluster().sync(); }

// The same shared variable in the CTA of rank `rank` (a generic pointer: ordinary loads and
// stores reach it).
template <typename T>
__device__ __forceinline__ T* cluster_map(T* shared, unsigned rank) {
  return cooperative_groups::this_cluster().map_shared_rank(shared, rank);
}
#endif

}  // namespace zspa
#endif
