// y = x W^T + b for a few rows of x (decode steps), streaming W from memory on every core.
//
// A decode step multiplies one activation row per sequence by every weight matrix: the weights
// are read once and each is used for only a few multiply-adds, so the step is bound by how fast
// the weights stream from memory. oneDNN's kernel for such a matmul reads the packed weights at
// ~20 GB/s in float32 and ~14 GB/s in bfloat16 on this 2-core machine, against ~30 GB/s the
// memory gives (bench/bench_linear.py). Here every thread streams its own run of weight rows,
// four at a time, with the activations held in registers; bfloat16 weights are widened to
// float32 as they are loaded. Arithmetic is float32; a bfloat16 output is rounded once at the end,
// as torch's bfloat16 matmul does.
//
//   gemv(out (M, N), x (M, K), weight (N, K), bias (N) or None), M <= 4, one dtype for all.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "float_convert.h"
#include "kernels.h"

#include <array>
#include <optional>

namespace {

using Vec = at::vec::Vectorized<float>;
using shardserve::to_float;

constexpr int64_t kMaxRows = 4;  // activation rows one call takes
constexpr int64_t kWidth = Vec::size();

// kWidth weights from row w at column k, as floats.
inline Vec load(const float* w) { return Vec::loadu(w); }
inline Vec load(const c10::BFloat16* w) {
  Vec v;
  at::vec::load_to_float(w, v);  // bfloat16 is the top half of a float32: widened in registers
  return v;
}

template <typename T>
inline T store_as(float v);
template <>
inline float store_as<float>(float v) { return v; }
template <>
inline c10::BFloat16 store_as<c10::BFloat16>(float v) { return c10::BFloat16(v); }  // round to nearest even

// out[m, n] for M activation rows against weight row n: one sequential stream through the row,
// two independent sums per activation row so that consecutive multiply-adds do not wait on each other.
template <typename T, int64_t M>
inline void one_row(const float* x, int64_t K, const T* wr, float bias, T* out, int64_t N, int64_t n) {
  std::array<Vec, M> acc0, acc1;
  for (int64_t m = 0; m < M; ++m) acc0[m] = acc1[m] = Vec(0.f);
  const int64_t body2 = K - K % (2 * kWidth);
  for (int64_t k = 0; k < body2; k += 2 * kWidth) {
    const Vec w0 = load(wr + k), w1 = load(wr + k + kWidth);
    for (int64_t m = 0; m < M; ++m) {
      acc0[m] = at::vec::fmadd(w0, Vec::loadu(x + m * K + k), acc0[m]);
      acc1[m] = at::vec::fmadd(w1, Vec::loadu(x + m * K + k + kWidth), acc1[m]);
    }
  }
  const int64_t body = K - K % kWidth;
  for (int64_t k = body2; k < body; k += kWidth) {
    const Vec w0 = load(wr + k);
    for (int64_t m = 0; m < M; ++m) acc0[m] = at::vec::fmadd(w0, Vec::loadu(x + m * K + k), acc0[m]);
  }
  for (int64_t m = 0; m < M; ++m) {
    float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc0[m] + acc1[m]);
    for (int64_t k = body; k < K; ++k) sum += to_float(wr[k]) * x[m * K + k];
    out[m * N + n] = store_as<T>(sum + bias);
  }
}

template <typename T, int64_t M>
void gemv_rows(const float* x, int64_t K, const T* w, const T* bias, T* out, int64_t N) {
  // Enough rows per task that waking a thread pays (a 576-wide float32 row is ~2 KB).
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) one_row<T, M>(x, K, w + n * K, bias ? to_float(bias[n]) : 0.f, out, N, n);
  });
}

template <typename T>
void gemv_typed(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();  // M * K floats: small, read once per tile
  const float* xp = xf.data_ptr<float>();
  const T* wp = weight.data_ptr<T>();
  const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  switch (M) {
    case 1: gemv_rows<T, 1>(xp, K, wp, bp, op, N); break;
    case 2: gemv_rows<T, 2>(xp, K, wp, bp, op, N); break;
    case 3: gemv_rows<T, 3>(xp, K, wp, bp, op, N); break;
    default: gemv_rows<T, 4>(xp, K, wp, bp, op, N); break;
  }
}

}  // namespace

namespace shardserve {

void gemv(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "gemv takes float32 or bfloat16 weights, got ", dtype);
  TORCH_CHECK(x.scalar_type() == dtype && out.scalar_type() == dtype, "gemv: x and out must be ", dtype);
  TORCH_CHECK(weight.device().is_cpu() && x.device().is_cpu() && out.device().is_cpu(), "gemv runs on the CPU");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "gemv: weight must be a contiguous (N, K) tensor");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.size(0) >= 1 && x.size(0) <= kMaxRows,
              "gemv: x must be (M, ", K, ") with 1 <= M <= ", kMaxRows, ", got ", x.sizes());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == N && out.is_contiguous(),
              "gemv: out must be a contiguous (", x.size(0), ", ", N, ") tensor, got ", out.sizes());
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == dtype && bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(),
                "gemv: bias must be a contiguous (", N, ") ", dtype, " tensor");
  }
  if (dtype == at::kFloat) {
    gemv_typed<float>(out, x, weight, bias);
  } else {
    gemv_typed<c10::BFloat16>(out, x, weight, bias);
  }
}

}  // namespace shardserve

TORCH_LIBRARY_FRAGMENT(shardserve, m) { m.def("gemv(Tensor(a!) out, Tensor x, Tensor weight, Tensor? bias) -> ()"); }

TORCH_LIBRARY_IMPL(shardserve, CPU, m) { m.impl("gemv", &shardserve::gemv); }
