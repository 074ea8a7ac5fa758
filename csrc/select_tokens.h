// zspa::select_tokens_cuda: the CUDA implementation of zspa::select_tokens (SPEC §1).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace zspa {

// (B, k) int64: the pick order when pick_order, else the ascending kept indices;
// -1 after each row's min(k, n) picks. Asynchronous: no host synchronisation. greedy: which
// greedy kernel ("auto", "cluster", "block": ZSPA_CUDA_GREEDY); gram: the Gram whole or split
// ("auto", "full", "split": ZSPA_CUDA_GRAM); both explained in select_tokens.cu.
at::Tensor select_tokens_cuda(const at::Tensor& visual, const at::Tensor& prompt, int64_t k,
                              double core_ratio, const std::optional<at::Tensor>& lengths,
                              const std::optional<at::Tensor>& prompt_mask, c10::string_view relevance,
                              bool pick_order, int64_t gram_budget, c10::string_view greedy,
                              c10::string_view gram);

}  // namespace zspa
