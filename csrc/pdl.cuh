// Programmatic dependent launch (sm_90+): a kernel launched with programmatic stream
// serialization may start while the kernel before it in the stream still runs, once that one
// has allowed it (or exited); before it reads anything that kernel writes it waits for that
// kernel's completion and its writes (griddepcontrol.wait). The launcher uses it where the
// next kernel has work that needs nothing from the one before: the token pass reads the tokens
// and finds their scales while prompt_stats pools the prompt (2 to 11 us at LLaVA-1.5 B=1 on the
// H200), and the greedy kernels' launch overlaps the token pass's tail. Every CTA of a dependent
// waits before it exits, so a grid never completes before the one it depends on (the greedy
// kernel, waiting for the token pass, also waits for the GEMMs before that). Both calls are no-ops in a kernel
// launched without the attribute, on older GPUs, and in the CPU emulation (tests/simt).
#pragma once

namespace zspa {

// Wait for the previous kernel in the stream to complete, its writes visible.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Let the next kernel in the stream start (it still waits for this one before reading its output).
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

}  // namespace zspa
