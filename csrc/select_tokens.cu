// Launcher: the kernels and the fp32-accumulating GEMMs (cuBLAS through ATen). Everything is
// enqueued on the current stream without reading any device value, so the op can be captured
// in a CUDA graph. The GEMMs read the tokens as given (gram_repair.cuh: no scaled copy).
// Launches per call, "mean", per Gram chunk: the Gram GEMM (two for a split Gram: gram_split;
// a batched GEMM and a sum for a Gram summed over slices of D: gram_slices),
// in the first chunk prompt stats (with the pooled prompt), the token pass of the chunk's rows
// (scale_rows.cuh: scales, dots with the pooled prompt, repair of tokens outside the raw band),
// one greedy kernel (greedy_cluster.cuh or greedy_select.cuh: greedy_launch); "max": the prompt
// rows' scaling pass, prompt stats, the dots GEMM, then per chunk the same without prompt stats.
#include "select_tokens.h"

#include <algorithm>
#include <climits>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "greedy_cluster.cuh"
#include "greedy_select.cuh"
#include "pdl.cuh"
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

// Bytes of a kernel's static shared arrays (greedy kernels: the argmin slots, the ballot
// counts), asked once per kernel.
template <auto Kernel>
size_t static_smem_bytes() {
  static const size_t bytes = [] {
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, Kernel));
    return attributes.sharedSizeBytes;
  }();
  return bytes;
}

// How the greedy kernel runs for rows of N tokens on the current device: greedy_cluster.cuh
// when the device is sm_90+, a cluster's shared memory holds the Gram (cluster_shape) and the
// device can co-schedule such a cluster (cudaOccupancyMaxActiveClusters > 0), else
// greedy_select.cuh. `mode` is ZSPA_CUDA_GREEDY (spec.py): "auto" takes the cluster form
// while the rows of a launch fit in two waves of clusters (each cluster takes ctas SMs where
// greedy_select takes one, so many rows favour the latter; to be checked against a GPU
// profile), "cluster" insists on it, "block" never takes it.
struct GreedyLaunch {
  ClusterShape shape;  // ctas == 0: greedy_select.cuh
  int active = 0;      // clusters of this shape the device runs at once
};

// A launch's configuration with its optional attributes: a cluster of `cluster` CTAs (0: none),
// and programmatic dependent launch (pdl.cuh; sm_90+ only). `attributes` holds them and must
// outlive the launch call.
struct LaunchAttributes {
  cudaLaunchAttribute items[2];
};

cudaLaunchConfig_t launch_config(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, unsigned cluster,
                                 bool pdl, LaunchAttributes* attributes) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attributes->items;
  config.numAttrs = 0;
  if (cluster > 0) {
    cudaLaunchAttribute& item = attributes->items[config.numAttrs++];
    item.id = cudaLaunchAttributeClusterDimension;
    item.val.clusterDim.x = cluster;
    item.val.clusterDim.y = 1;
    item.val.clusterDim.z = 1;
  }
  if (pdl) {
    cudaLaunchAttribute& item = attributes->items[config.numAttrs++];
    item.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    item.val.programmaticStreamSerializationAllowed = 1;
  }
  return config;
}

// Per device, once (host calls only, nothing enqueued: graph capture is unaffected):
// - greedy_select_kernel's shared-memory opt-in, set to the most it can take (rows of N >= 4043
//   tokens pass the default 48 KiB). Never to one call's size: a later call, another thread's
//   or a CUDA graph's replay, with a larger N would then launch above the limit in force.
// - whether the kernels run with thread-block clusters and programmatic dependent launch (the
//   return value): an sm_90+ device running code compiled for sm_90+. A build for "8.0+PTX"
//   runs on an H100 through the driver's JIT of the compute_80 PTX, in which pdl.cuh's waits
//   are compiled out and the cluster kernel traps: launching with PDL there would let a kernel
//   read its predecessor's output before it is written. All kernels share this translation
//   unit and its -gencode flags, so one kernel's PTX version (as CUB asks it) answers for all;
//   an unknown version (0) trusts the device.
bool prepare_device() {
  static std::mutex mutex;
  static std::map<int, bool> sm90_of;
  const int device = at::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = sm90_of.find(device);
  if (found == sm90_of.end()) {
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, greedy_select_kernel));
    C10_CUDA_CHECK(cudaFuncSetAttribute(greedy_select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(prop->sharedMemPerBlockOptin - attributes.sharedSizeBytes)));
    const bool sm90_code = attributes.ptxVersion >= 90 || attributes.ptxVersion == 0;
    found = sm90_of.emplace(device, prop->major >= 9 && sm90_code).first;
  }
  return found->second;
}

GreedyLaunch greedy_launch(int64_t N, int64_t rows, bool sm90, c10::string_view mode) {
  TORCH_CHECK(mode == "auto" || mode == "cluster" || mode == "block",
              "ZSPA_CUDA_GREEDY: expected 'auto', 'cluster' or 'block', got '", mode, "'");
  GreedyLaunch launch;
  if (mode == "block") return launch;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const ClusterShape shape =
      sm90 ? cluster_shape(N, prop->sharedMemPerBlockOptin, static_smem_bytes<greedy_cluster_kernel>()) : ClusterShape{};
  if (shape.ctas > 0) {
    // Per device and shape, once: the kernel's attributes and the co-scheduling count (host
    // queries only, nothing enqueued, so graph capture is unaffected).
    static std::mutex mutex;
    static std::map<std::tuple<int, int, int, size_t>, int> active_clusters;
    const std::lock_guard<std::mutex> lock(mutex);
    // The shared memory is in the key: it grows with N at one (ctas, slice), and with it the
    // number of clusters the GPU co-schedules.
    const auto key = std::make_tuple(static_cast<int>(at::cuda::current_device()), shape.ctas, shape.slice, shape.smem);
    auto found = active_clusters.find(key);
    if (found == active_clusters.end()) {
      // A driver that refuses any of this leaves the device without the cluster kernel (0
      // clusters; "cluster" mode then says so), rather than failing every call of "auto".
      LaunchAttributes attributes;
      const cudaLaunchConfig_t config = launch_config(dim3(shape.ctas), dim3(shape.threads), shape.smem, nullptr,
                                                      shape.ctas, false, &attributes);
      const int smem_limit = static_cast<int>(prop->sharedMemPerBlockOptin - static_smem_bytes<greedy_cluster_kernel>());
      int active = 0;
      cudaError_t status =
          cudaFuncSetAttribute(greedy_cluster_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_limit);
      if (status == cudaSuccess && shape.ctas > 8)
        status = cudaFuncSetAttribute(greedy_cluster_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
      if (status == cudaSuccess) status = cudaOccupancyMaxActiveClusters(&active, greedy_cluster_kernel, &config);
      if (status != cudaSuccess) {
        (void)cudaGetLastError();  // not sticky: clear it, so that the next check does not see it
        active = 0;
      }
      found = active_clusters.emplace(key, active).first;
    }
    launch.active = found->second;
  }
  if (mode == "cluster") {
    TORCH_CHECK(sm90, "ZSPA_CUDA_GREEDY=cluster: thread-block clusters need an sm_90 or newer GPU and a build "
                      "for it (TORCH_CUDA_ARCH_LIST with 9.0 or newer, not only an older arch's +PTX)");
    TORCH_CHECK(shape.ctas > 0, "ZSPA_CUDA_GREEDY=cluster: no cluster of this GPU holds the Gram of N=", N,
                " tokens in shared memory; use 'auto' or 'block'");
    TORCH_CHECK(launch.active > 0, "ZSPA_CUDA_GREEDY=cluster: this GPU's driver runs no cluster of ", shape.ctas,
                " CTAs with ", shape.smem, " bytes of shared memory each; use 'auto' or 'block'");
  } else if (shape.ctas == 0 || launch.active == 0 || rows > 2 * static_cast<int64_t>(launch.active)) {
    return GreedyLaunch{};
  }
  launch.shape = shape;
  return launch;
}

// Where a launch's Gram is split (gram_view.cuh). "auto" splits it at h = N/2 rounded down to a
// multiple of 4 (16-byte rows for the cluster kernel's copies) when the cluster kernel runs the
// greedy steps and the Gram takes kSplitGramMacs multiply-adds or more (LLaVA-1.5 from B=8:
// 11 G; B=32: 44 G): the GEMMs then do 3/4 of the work (the H200 run's B=32 Gram took 137 us at
// 640 TFLOP/s, near cuBLAS's ceiling, so only less work makes it faster), and the cluster
// kernel reads the lower-left block once, into shared memory. Below that one GEMM is
// latency-bound and two would add a launch's latency (LLaVA-1.5 at B=1: 1.4 G). greedy_select
// keeps the whole Gram in "auto": it reads a Gram row every step from L2 or DRAM, and in the
// lower-left block that row is a column of the top rows, one 32-byte sector a token instead of
// one per 8 (at video size, 262 KB of sectors a step from DRAM instead of 32 KB). `mode` is
// ZSPA_CUDA_GRAM (spec.py): "auto" this rule, "full" or "split" forced (a split needs N >= 8);
// "splitk" is a whole Gram summed over slices of D (gram_slices).
constexpr int64_t kSplitGramMacs = int64_t{1} << 33;

int64_t gram_split(int64_t rows, int64_t N, int64_t D, bool cluster, c10::string_view mode) {
  TORCH_CHECK(mode == "auto" || mode == "full" || mode == "split" || mode == "splitk",
              "ZSPA_CUDA_GRAM: expected 'auto', 'full', 'split' or 'splitk', got '", mode, "'");
  const int64_t half = N / 2 / 4 * 4;
  const bool split = mode == "split" || (mode == "auto" && cluster && rows * N * N * D >= kSplitGramMacs);
  if (!split || half == 0) return N;
  return half;
}

// ZSPA_CUDA_GRAM=splitk, forced only until a GPU run has timed it (bench/tune.py): each row's
// whole Gram as kGramSlices GEMMs over slices of D, one strided batched call on views of the
// tokens, then the fp32 sum of the partial Grams in slice order (sliced_gram). At LLaVA-1.5 B=1
// one 576 x 576 x 4096 GEMM is ~25 output tiles, ~25 of 132 SMs for the whole K loop (13.8 us
// in the H200 run); four slices give ~100 CTAs a quarter of the loop each, for a second
// launch and four partial Grams. The Gram is then made a row at a time; where D is not a
// multiple of kGramSlices * 8 (16-byte slices) or the partials of a row would pass the Gram
// budget, the whole GEMM runs instead. Returns the number of slices, 1 for the whole GEMM.
constexpr int64_t kGramSlices = 4;

int64_t gram_slices(int64_t N, int64_t D, c10::string_view mode, int64_t gram_budget) {
  const bool fits = D % (kGramSlices * 8) == 0 && kGramSlices * N * N * int64_t{4} <= gram_budget;
  return mode == "splitk" && fits ? kGramSlices : 1;
}

// The whole Gram (1, N, N) of a one-row chunk summed over `slices` slices of D (gram_slices).
at::Tensor sliced_gram(const at::Tensor& chunk, int64_t slices) {
  const int64_t N = chunk.size(1), D = chunk.size(2);
  const at::Tensor parts = chunk.select(0, 0).view({N, slices, D / slices}).transpose(0, 1);  // (slices, N, D/slices)
  return fp32_bmm(parts, parts.transpose(1, 2)).sum(0, /*keepdim=*/true);
}

// The prompt rows of relevance "max" (bf16/fp32), (B, T, D) contiguous: {scaled copy, (B, T)
// scales} (scale_rows.cuh), for the dots GEMM. The call's first launch.
std::pair<at::Tensor, at::Tensor> scale_prompt_rows(const at::Tensor& P, cudaStream_t stream) {
  const int64_t rows = P.size(0) * P.size(1), D = P.size(2);
  TORCH_CHECK(rows <= INT_MAX, "prompt: too many rows for one scaling launch");
  at::Tensor scaled = at::empty_like(P);
  at::Tensor scales = at::empty({P.size(0), P.size(1)}, P.options().dtype(at::kFloat));
  AT_DISPATCH_V2(P.scalar_type(), "zspa_scale_rows", AT_WRAP([&] {
    scale_rows_kernel<scalar_t><<<static_cast<unsigned>(rows), threads_for(D, 256), 0, stream>>>(
        P.data_ptr<scalar_t>(), scaled.data_ptr<scalar_t>(), scales.data_ptr<float>(), static_cast<int>(D));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }), at::kFloat, at::kBFloat16);
  return {scaled, scales};
}

}  // namespace

at::Tensor select_tokens_cuda(const at::Tensor& visual, const at::Tensor& prompt, int64_t k,
                              double core_ratio, const std::optional<at::Tensor>& lengths,
                              const std::optional<at::Tensor>& prompt_mask, c10::string_view relevance,
                              bool pick_order, int64_t gram_budget, c10::string_view greedy,
                              c10::string_view gram) {
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
  const bool scaled = V.scalar_type() != at::kHalf;  // fp16 is never scaled: its squares cannot overflow
  const bool sm90 = prepare_device();  // clusters and programmatic dependent launch
  at::Tensor prompt_scale;  // undefined: unscaled ("mean": prompt_stats scales the pooled vector)
  if (scaled && max_relevance) std::tie(P, prompt_scale) = scale_prompt_rows(P, stream);

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
  const size_t static_smem = static_smem_bytes<greedy_select_kernel>();
  const int device_smem = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(smem_bytes + static_smem <= static_cast<size_t>(device_smem), "visual: N=", N,
              " tokens need ", smem_bytes + static_smem, " bytes of shared memory per row, more than this GPU's ",
              device_smem, "; use backend='triton'");
  TORCH_CHECK(B * N <= INT_MAX, "visual: too many tokens for one token pass");

  const auto f32 = V.options().dtype(at::kFloat);
  at::Tensor prompt_norm = at::empty({B, T}, f32);
  at::Tensor pooled = max_relevance ? at::Tensor() : at::empty({B, D}, f32);
  const auto launch_prompt_stats = [&] {
    AT_DISPATCH_V2(V.scalar_type(), "zspa_prompt_stats", AT_WRAP([&] {
      prompt_stats_kernel<scalar_t><<<B, threads_for(std::max(D, T * 32), 1024), 0, stream>>>(
          P.data_ptr<scalar_t>(), mask.defined() ? mask.data_ptr<bool>() : nullptr,
          max_relevance ? nullptr : pooled.data_ptr<float>(), prompt_norm.data_ptr<float>(),
          prompt_scale.defined() ? prompt_scale.data_ptr<float>() : nullptr, static_cast<int>(T),
          static_cast<int>(D), max_relevance);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }), at::kFloat, at::kHalf, at::kBFloat16);
  };
  // Relevance numerators: (B, N) dots with the pooled prompt ("mean", the token pass), or (B, N,
  // T) dots with every prompt row ("max": cuBLAS, on the tokens as given; the token pass repairs
  // the rows of tokens outside the raw band).
  at::Tensor dots;
  if (max_relevance) {
    launch_prompt_stats();
    dots = fp32_bmm(V, P.transpose(1, 2));
  } else {
    dots = at::empty({B, N}, f32);
  }
  at::Tensor token_scale = scaled ? at::empty({B, N}, f32) : at::Tensor();  // gram_repair.cuh's convention

  at::Tensor out = at::empty({B, k}, V.options().dtype(at::kLong));
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
  params.radix_core = true;

  // The Gram workspace of one launch stays within gram_budget (spec.gram_budget(), shared
  // with the triton backend), at least one row per chunk. Per chunk: the Gram GEMMs on the
  // tokens as given, (first chunk, "mean") prompt_stats, the token pass of the chunk's rows,
  // the greedy kernel.
  const int64_t slices = gram_slices(N, D, gram, gram_budget);
  const int64_t rows_per_chunk = slices > 1 ? 1 : std::max<int64_t>(1, gram_budget / (N * N * int64_t{4}));
  for (int64_t row0 = 0; row0 < B; row0 += rows_per_chunk) {
    const int64_t rows = std::min(rows_per_chunk, B - row0);
    const at::Tensor chunk = V.narrow(0, row0, rows);
    const GreedyLaunch launch = greedy_launch(N, rows, sm90, greedy);
    const int64_t h = gram_split(rows, N, D, launch.shape.ctas > 0, gram);
    // The top rows (rows, h, N), and for a split Gram the bottom-right block (rows, N - h, N - h)
    // (gram_view.cuh): strided views of the tokens, no copies.
    const at::Tensor top =
        slices > 1 ? sliced_gram(chunk, slices) : fp32_bmm(chunk.narrow(1, 0, h), chunk.transpose(1, 2));
    at::Tensor corner;
    if (h < N) {
      const at::Tensor bottom = chunk.narrow(1, h, N - h);
      corner = fp32_bmm(bottom, bottom.transpose(1, 2));
    }
    // "mean": prompt_stats here, after the first GEMMs, so that the token pass, its
    // programmatic dependent, reads and scales the tokens while it pools the prompt.
    if (!max_relevance && row0 == 0) launch_prompt_stats();
    if (scaled || !max_relevance) {  // fp16 "max": no scales, no dots to make
      AT_DISPATCH_V2(V.scalar_type(), "zspa_token_pass", AT_WRAP([&] {
        TokenPass<scalar_t> pass{};
        pass.x = chunk.data_ptr<scalar_t>();
        pass.scale = scaled ? token_scale.data_ptr<float>() + row0 * N : nullptr;
        pass.pooled = max_relevance ? nullptr : pooled.data_ptr<float>() + row0 * D;
        pass.dots = max_relevance ? nullptr : dots.data_ptr<float>() + row0 * N;
        pass.gram_top = top.data_ptr<float>();
        pass.gram_corner = corner.defined() ? corner.data_ptr<float>() : nullptr;
        pass.gram_split = static_cast<int>(h);
        pass.prompt = max_relevance && scaled ? P.data_ptr<scalar_t>() + row0 * T * D : nullptr;
        pass.prompt_dots = max_relevance && scaled ? dots.data_ptr<float>() + row0 * N * T : nullptr;
        pass.N = static_cast<int>(N);
        pass.T = static_cast<int>(T);
        pass.D = static_cast<int>(D);
        LaunchAttributes attributes;
        const cudaLaunchConfig_t config = launch_config(dim3(static_cast<unsigned>(rows * N)),
                                                        dim3(threads_for(D, 256)), 0, stream, 0, sm90, &attributes);
        C10_CUDA_CHECK(cudaLaunchKernelEx(&config, token_pass_kernel<scalar_t>, pass));
      }), at::kFloat, at::kHalf, at::kBFloat16);
    }
    params.gram_top = top.data_ptr<float>();
    params.gram_corner = corner.defined() ? corner.data_ptr<float>() : nullptr;
    params.gram_split = static_cast<int>(h);
    params.row0 = static_cast<int>(row0);
    if (launch.shape.ctas > 0) {
      LaunchAttributes attributes;
      const cudaLaunchConfig_t config =
          launch_config(dim3(static_cast<unsigned>(rows * launch.shape.ctas)), dim3(launch.shape.threads),
                        launch.shape.smem, stream, launch.shape.ctas, sm90, &attributes);
      C10_CUDA_CHECK(cudaLaunchKernelEx(&config, greedy_cluster_kernel, params, launch.shape.ctas, launch.shape.slice));
    } else {
      LaunchAttributes attributes;
      const cudaLaunchConfig_t config = launch_config(dim3(static_cast<unsigned>(rows)), dim3(threads_for(N, 1024)),
                                                      smem_bytes, stream, 0, sm90, &attributes);
      C10_CUDA_CHECK(cudaLaunchKernelEx(&config, greedy_select_kernel, params));
    }
  }
  return out;
}

}  // namespace zspa
