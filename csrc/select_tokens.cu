// Launcher: the three kernels and the fp32-accumulating GEMMs (cuBLAS through ATen). Everything
// is enqueued on the current stream without reading any device value, so the op can be captured
// in a CUDA graph. Launches per call, "mean": prompt stats (with the pooled prompt), one pass
// over the tokens (scale_rows.cuh: scales and scaled copy for bf16/fp32, dots with the pooled
// prompt), the Gram GEMM and the greedy kernel per Gram chunk; "max": the prompt rows' and the
// tokens' scaling passes, prompt stats, the dots GEMM, the Gram GEMM and the greedy kernel.
#include "select_tokens.h"

#include <algorithm>
#include <climits>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "greedy_select.cuh"
#include "prompt_stats.cuh"
#include "scale_rows.cuh"
#include "spec.cuh"

namespace zspa {
namespace {

// a @ b with fp32 accumulation and an fp32, contiguous result. 16-bit inputs use aten::bmm.dtype
// (products of 16-bit floats are exact in fp32); fp32 inputs refuse TF32, whose 10-bit
// mantissa would blur near-ties far beyond the fp32 tolerance.
at::Tensor fp32_bmm(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) {
    at::NoTF32Guard no_tf32;
    return at::bmm(a, b).contiguous();
  }
  return at::bmm(a, b, at::kFloat).contiguous();  // the kernels index densely (free if already so)
}

int threads_for(int64_t n, int64_t cap) {
  return static_cast<int>(std::min<int64_t>(cap, (n + 31) / 32 * 32));
}

// Bytes of the greedy kernel's static shared arrays (the argmin slots, the ballot counts).
size_t greedy_static_smem_bytes() {
  static const size_t bytes = [] {
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, greedy_select_kernel));
    return attributes.sharedSizeBytes;
  }();
  return bytes;
}

// One launch of scale_rows.cuh over x (B, L, D), contiguous: {x scaled row by row, (B, L) fp32
// scales} when `scale` (bf16/fp32; fp16 is never scaled: its squares cannot overflow fp32, and
// scaling fp16 values down could round the small ones), and with `pooled` (B, D) the (B, L) fp32
// dots of the (scaled) rows with it. Undefined tensors for what was not asked.
struct RowPass {
  at::Tensor scaled, scales, dots;
};

RowPass scale_rows(const at::Tensor& x, bool scale, const at::Tensor& pooled, cudaStream_t stream) {
  const int64_t rows = x.size(0) * x.size(1), D = x.size(2);
  TORCH_CHECK(rows <= INT_MAX, "visual: too many rows for one scaling launch");
  RowPass out;
  const auto f32 = x.options().dtype(at::kFloat);
  if (scale) {
    out.scaled = at::empty_like(x);
    out.scales = at::empty({x.size(0), x.size(1)}, f32);
  }
  if (pooled.defined()) out.dots = at::empty({x.size(0), x.size(1)}, f32);
  AT_DISPATCH_V2(x.scalar_type(), "zspa_scale_rows", AT_WRAP([&] {
    scale_rows_kernel<scalar_t><<<static_cast<unsigned>(rows), threads_for(D, 256), 0, stream>>>(
        x.data_ptr<scalar_t>(), scale ? out.scaled.data_ptr<scalar_t>() : nullptr,
        scale ? out.scales.data_ptr<float>() : nullptr, pooled.defined() ? pooled.data_ptr<float>() : nullptr,
        pooled.defined() ? out.dots.data_ptr<float>() : nullptr, x.size(1), static_cast<int>(D));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return out;
}

}  // namespace

at::Tensor select_tokens_cuda(const at::Tensor& visual, const at::Tensor& prompt, int64_t k,
                              double core_ratio, const std::optional<at::Tensor>& lengths,
                              const std::optional<at::Tensor>& prompt_mask, c10::string_view relevance,
                              bool pick_order, int64_t gram_budget) {
  // The Python op validates every argument with clear messages; these guard direct callers.
  TORCH_CHECK(visual.is_cuda() && visual.dim() == 3, "visual: expected a CUDA tensor (B, N, D)");
  TORCH_CHECK(prompt.device() == visual.device() && (prompt.dim() == 2 || prompt.dim() == 3),
              "prompt: expected (B, D) or (B, T, D) on the device of visual");
  TORCH_CHECK(prompt.scalar_type() == visual.scalar_type(), "prompt: expected the dtype of visual");
  TORCH_CHECK(k >= 1 && k <= INT_MAX, "k: expected an int >= 1");
  TORCH_CHECK(relevance == "mean" || relevance == "max", "relevance: expected 'mean' or 'max'");
  TORCH_CHECK(gram_budget >= 0, "gram_budget: expected a byte count >= 0");
  c10::cuda::CUDAGuard device_guard(visual.device());

  at::Tensor V = visual.contiguous();
  at::Tensor P = (prompt.dim() == 2 ? prompt.unsqueeze(1) : prompt).contiguous();
  const int64_t B = V.size(0), N = V.size(1), D = V.size(2), T = P.size(1);
  TORCH_CHECK(P.size(0) == B && P.size(2) == D, "prompt: expected batch size and feature size of visual");
  TORCH_CHECK(B >= 1 && N >= 1 && D >= 1 && T >= 1, "visual, prompt: expected non-empty tensors");
  TORCH_CHECK(B <= 65535 && N <= INT_MAX / 2 && D <= INT_MAX && T <= INT_MAX,
              "visual: too large for the cuda backend");
  const bool max_relevance = relevance == "max";
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool scaled = V.scalar_type() != at::kHalf;
  at::Tensor token_scale, prompt_scale;  // undefined: unscaled (fp16)
  if (scaled && max_relevance) {  // "mean": prompt_stats scales the pooled vector
    RowPass pass = scale_rows(P, true, at::Tensor(), stream);
    P = pass.scaled;
    prompt_scale = pass.scales;
  }

  at::Tensor mask;
  if (prompt_mask.has_value()) {
    TORCH_CHECK(prompt.dim() == 3 && prompt_mask->scalar_type() == at::kBool &&
                    prompt_mask->sizes() == at::IntArrayRef({B, T}),
                "prompt_mask: expected a bool (B, T) tensor with a per-token prompt");
    mask = prompt_mask->to(visual.device()).contiguous();
  }
  at::Tensor lens;
  if (lengths.has_value()) {
    TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == B, "lengths: expected shape (B,)");
    lens = lengths->to(visual.device(), at::kLong).contiguous();  // clamped to [1, N] in the kernel
  }

  // Dynamic shared memory: 12 bytes a token; the kernel's static arrays come on top, and the
  // sum (not the dynamic part alone) must stay within 48 KiB unless the kernel opts in.
  const size_t smem_bytes = 3 * sizeof(float) * static_cast<size_t>(N);
  const size_t static_smem = greedy_static_smem_bytes();
  const int device_smem = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(smem_bytes + static_smem <= static_cast<size_t>(device_smem), "visual: N=", N,
              " tokens need ", smem_bytes + static_smem, " bytes of shared memory per row, more than this GPU's ",
              device_smem, "; use backend='triton'");

  const auto f32 = V.options().dtype(at::kFloat);
  at::Tensor prompt_norm = at::empty({B, T}, f32);
  at::Tensor pooled = max_relevance ? at::Tensor() : at::empty({B, D}, f32);
  at::Tensor dots;  // relevance numerators: (B, N) for "mean", (B, N, T) for "max"
  AT_DISPATCH_V2(V.scalar_type(), "zspa_prompt_stats", AT_WRAP([&] {
    prompt_stats_kernel<scalar_t><<<B, threads_for(std::max(D, T * 32), 1024), 0, stream>>>(
        P.data_ptr<scalar_t>(), mask.defined() ? mask.data_ptr<bool>() : nullptr,
        max_relevance ? nullptr : pooled.data_ptr<float>(), prompt_norm.data_ptr<float>(),
        prompt_scale.defined() ? prompt_scale.data_ptr<float>() : nullptr, static_cast<int>(T),
        static_cast<int>(D), max_relevance);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }), at::kFloat, at::kHalf, at::kBFloat16);
  // The tokens in one pass: scaled (bf16/fp32) and, for "mean", dotted with the pooled prompt.
  if (scaled || !max_relevance) {
    RowPass pass = scale_rows(V, scaled, pooled, stream);
    if (scaled) {
      V = pass.scaled;
      token_scale = pass.scales;
    }
    dots = pass.dots;
  }
  if (max_relevance) dots = fp32_bmm(V, P.transpose(1, 2));  // (B, N, T) on cuBLAS

  at::Tensor out = at::empty({B, k}, V.options().dtype(at::kLong));
  if (smem_bytes + static_smem > 48 * 1024) {  // N >= 4043: at N = 4096 the dynamic part alone is exactly 48 KiB
    C10_CUDA_CHECK(cudaFuncSetAttribute(greedy_select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
  }
  GreedyParams params{};
  params.dots = dots.data_ptr<float>();
  params.prompt_norm = prompt_norm.data_ptr<float>();
  params.prompt_mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  params.lengths = lens.defined() ? lens.data_ptr<int64_t>() : nullptr;
  params.token_scale = token_scale.defined() ? token_scale.data_ptr<float>() : nullptr;
  params.out = out.data_ptr<int64_t>();
  params.N = static_cast<int>(N);
  params.T = static_cast<int>(T);
  params.k = static_cast<int>(k);
  params.core_ratio = core_ratio;
  params.max_relevance = max_relevance;
  params.pick_order = pick_order;
  params.rank_core_budget = kRankCoreBudget;

  // The Gram workspace of one launch stays within gram_budget (spec.gram_budget(), shared
  // with the triton backend), at least one row per chunk.
  const int64_t rows_per_chunk = std::max<int64_t>(1, gram_budget / (N * N * int64_t{4}));
  for (int64_t row0 = 0; row0 < B; row0 += rows_per_chunk) {
    const int64_t rows = std::min(rows_per_chunk, B - row0);
    const at::Tensor chunk = V.narrow(0, row0, rows);
    const at::Tensor gram = fp32_bmm(chunk, chunk.transpose(1, 2));  // (rows, N, N)
    params.gram = gram.data_ptr<float>();
    params.row0 = static_cast<int>(row0);
    greedy_select_kernel<<<static_cast<unsigned>(rows), threads_for(N, 1024), smem_bytes, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace zspa
