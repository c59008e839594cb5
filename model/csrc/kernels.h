// The CPU kernels' entry points, callable from C++ without the dispatcher (the compiled decode
// step calls them layer after layer). Each is also registered as torch.ops.shardserve.<name>,
// which model/ops.py calls from Python; both routes run the same function.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace shardserve {

// fused_ops.cpp: the element-wise steps of a Llama layer, float32 or bfloat16.
void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps);
void add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps);
void silu_and_mul(at::Tensor out, const at::Tensor& x);
void rotary(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin_signed);

// gemv.cpp: out (M, N) = x (M, K) weight (N, K)^T + bias, for decode steps of a few rows.
void gemv(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// paged_attention.cpp: one query per sequence over its paged KV blocks.
void paged_decode_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& cache, const at::Tensor& tables,
                            const at::Tensor& context_lens, double scale);

}  // namespace shardserve
