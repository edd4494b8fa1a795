#pragma once
// Entry points of scaled-dot-product attention, called from attention_bind.cpp (the GPU kernels are
// Triton's, in kernels/attention.py).
//
// Tensors: q [B, Hq, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] with Hq a multiple of Hkv (query head
// h reads key/value head h / (Hq / Hkv)), any strides, one floating dtype (float32, float64, float16,
// bfloat16). mask: null or an additive mask in the compute type (float32; float64 for float64 inputs)
// seen as [B, Hq, L, S] through strides (0 on broadcast dimensions); -inf excludes a score. out
// [B, Hq, L, Dv] and the gradients (shaped as their inputs) are contiguous in the input dtype; lse
// [B, Hq, L] is contiguous in the compute type: the log-sum-exp of each row's scaled, masked scores
// (+inf for a row whose scores are all excluded: its output and gradients are 0, as in PyTorch).
//
// is_causal: query i sees keys j <= i (PyTorch's top-left alignment, also when L != S).
// Dropout: element (b, h, i, j) is kept as attention.h's dropout_keep decides from (seed, offset) (the
// same Philox words as the Triton kernels); kept probabilities are scaled by 1 / (1 - dropout_p). The
// backward regenerates the same mask from the same seed and offset (offset < 2^32).
#include <cstdint>

#include "common/tensor_view.h"

namespace fastcv {

struct AttentionShape {
  int64_t b, hq, hkv, l, s, d, dv;
};
// Checks shapes, dtypes, devices and the output layouts (attention_args.cpp); raises ArgError naming
// the offending argument. grad_out, dq, dk, dv are checked by the backward.
AttentionShape check_attention_args(const TensorView& q, const TensorView& k, const TensorView& v,
                                    const TensorView* mask, const TensorView& out, const TensorView& lse,
                                    DeviceType device);

// The backward's other tensors: grad_out like out, dq like q, dk like k, dv like v (contiguous);
// grad_mask (when not null) [B, Hq, L, S] in the compute type, any strides.
void check_attention_grads(const TensorView& grad_out, const TensorView& dq, const TensorView& dk,
                           const TensorView& dv, const TensorView& q, const TensorView& k, const TensorView& v,
                           const TensorView& out, const TensorView* grad_mask);

void attention_forward_cpu(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* mask,
                           double scale, bool is_causal, double dropout_p, uint64_t seed, uint64_t offset,
                           const TensorView& out, const TensorView& lse, int nthreads);

// out and lse: the forward's. Writes dq, dk, dv. grad_mask: null, or the mask's gradient accumulator
// (compute type, seen as [B, Hq, L, S] through strides, 0 on the dimensions the mask broadcasts over):
// dS = P * (dP - delta) of every score is ADDED to the entry its mask element occupies, so a broadcast
// mask's gradient is summed over its broadcast dimensions. Deterministic: tasks that could add to the
// same entry run in one thread in a fixed order, and the split does not depend on nthreads.
void attention_backward_cpu(const TensorView& grad_out, const TensorView& q, const TensorView& k,
                            const TensorView& v, const TensorView& out, const TensorView& lse,
                            const TensorView* mask, double scale, bool is_causal, double dropout_p, uint64_t seed,
                            uint64_t offset, const TensorView& dq, const TensorView& dk, const TensorView& dv,
                            const TensorView* grad_mask, int nthreads);

}  // namespace fastcv
