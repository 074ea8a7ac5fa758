// Registers zspa::select_tokens_cuda: its schema, the CUDA kernel and a Meta kernel
// (shapes only, so torch.compile can trace through it). The public op
// zspa::select_tokens is the Python custom op, which dispatches here for backend="cuda".
#include <torch/library.h>

#include <ATen/ATen.h>

#include "select_tokens.h"

namespace {

at::Tensor select_tokens_meta(const at::Tensor& visual, const at::Tensor& /*prompt*/, c10::SymInt k,
                              double /*core_ratio*/, const std::optional<at::Tensor>& /*lengths*/,
                              const std::optional<at::Tensor>& /*prompt_mask*/, c10::string_view /*relevance*/,
                              bool /*pick_order*/, int64_t /*gram_budget*/, c10::string_view /*greedy*/,
                              c10::string_view /*gram*/) {
  return at::empty_symint({visual.sym_size(0), std::move(k)}, visual.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zspa, m) {
  m.def(
      "select_tokens_cuda(Tensor visual, Tensor prompt, SymInt k, float core_ratio=0.5, Tensor? lengths=None, "
      "Tensor? prompt_mask=None, str relevance=\"mean\", bool pick_order=False, int gram_budget=4294967296, "
      "str greedy=\"auto\", str gram=\"auto\") -> Tensor");
}

TORCH_LIBRARY_IMPL(zspa, CUDA, m) { m.impl("select_tokens_cuda", &zspa::select_tokens_cuda); }

TORCH_LIBRARY_IMPL(zspa, Meta, m) { m.impl("select_tokens_cuda", &select_tokens_meta); }
