// The N x N Gram of one batch row as the greedy kernels read it: stored whole, or split at a
// row h into its top rows [0, h) (all N columns) and its bottom-right block [h, N)^2. The
// lower-left block is never computed: entry (j, i) there is read as (i, j) of the top rows (the
// Gram is symmetric), so the launcher's GEMMs do 3/4 of the whole Gram's work at h = N/2 and
// write 3/4 of its bytes. With the split, cos(i, j) and cos(j, i) across the blocks are the same
// stored number, so their bit-for-bit symmetry no longer rests on the GEMM.
#pragma once

#include <cstdint>

namespace zspa {

// Entry = const float for the greedy kernels, which read it; float for the token pass, which
// rewrites the entries of tokens outside the raw band (gram_repair.cuh).
template <typename Entry>
struct BasicGramView {
  Entry* top;     // (h, N): rows [0, h)
  Entry* corner;  // (N - h, N - h): rows and columns [h, N); unused when h == N
  int N, h;

  // The stored entry (j, i); (i, j) is the same one wherever the split stores only one of them.
  __host__ __device__ Entry* ptr(int j, int i) const {
    if (j < h) return top + static_cast<int64_t>(j) * N + i;
    if (i < h) return top + static_cast<int64_t>(i) * N + j;
    return corner + static_cast<int64_t>(j - h) * (N - h) + (i - h);
  }

  __host__ __device__ Entry at(int j, int i) const { return *ptr(j, i); }

  // Whether row j's entries from column i on are consecutive in memory (to the row's end).
  __host__ __device__ bool contiguous_from(int j, int i) const { return j < h || i >= h; }
};

using GramView = BasicGramView<const float>;

}  // namespace zspa
