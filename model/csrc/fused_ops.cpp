// The element-wise steps of a Llama layer, each in one pass over memory (CPU, float32 and bfloat16).
//
// In plain torch a layer runs ~15 small ops between its matmuls: the RMSNorm alone is pow, mean,
// add, rsqrt and two muls, each reading and writing the whole activation. Here each step reads its
// inputs once and writes its result once:
//   rms_norm       out = norm(x) * w
//   add_rms_norm   residual += x, then x = norm(residual) * w (both in place)
//   silu_and_mul   out = silu(gate) * up, from the fused gate_up projection
//   rotary         x = x * cos + rotate_half(x) * sin, in place on q and k inside the qkv projection
//
// Arithmetic is float32. In bfloat16 every intermediate the reference model rounds to bfloat16 is
// rounded here too (the normalized row before the weight, silu(gate) before the product, each
// product of the rotation), so results match the reference implementation up to float rounding.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "float_convert.h"
#include "kernels.h"

#include <cmath>
#include <cstring>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
using shardserve::to_float;

// Round to nearest even, as torch does; written without branches so that loops over it vectorize.
template <typename T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) { return x; }
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  c10::BFloat16 out;
  out.x = static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);  // NaN stays NaN
  return out;
}

// Rounds v to T and back: what the reference model's intermediate tensor of dtype T holds.
template <typename T>
inline float round_to(float v) { return to_float(from_float<T>(v)); }

// Rows per parallel task, so that a task has enough work to pay for waking a thread: decode-sized
// steps run on one thread, prefill-sized ones on all.
inline int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_elems, 1)); }

template <typename T>
inline void normalize_row(const float* r, const T* w, T* out, int64_t n, float eps) {
  float sq = 0.f;
  for (int64_t i = 0; i < n; ++i) sq += r[i] * r[i];
  const float inv = 1.f / std::sqrt(sq / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = from_float<T>(to_float(w[i]) * round_to<T>(r[i] * inv));
}

// Calls fn with a value of the element type (float or c10::BFloat16); check_dtype has refused others.
template <typename Fn>
void dispatch(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::kFloat) {
    fn(float{});
  } else {
    fn(c10::BFloat16{});
  }
}

void check_rows(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.dim() == 2 && t.size(1) == n && t.stride(1) == 1,
              name, " must be (rows, ", n, ") with contiguous rows, got ", t.sizes(), " strides ", t.strides());
}

void check_dtype(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "fused CPU ops take float32 or bfloat16, got ", t.scalar_type());
}

// The norms' arguments: x and `other` (out or residual) of the same rows and dtype, and a weight per column.
void check_norm_args(const at::Tensor& x, const at::Tensor& other, const char* other_name, const at::Tensor& w) {
  check_dtype(x);
  const int64_t n = x.size(-1);
  check_rows(x, "x", n);
  check_rows(other, other_name, n);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == n && w.is_contiguous() && w.scalar_type() == x.scalar_type(),
              "weight must be a contiguous (", n, ") tensor of ", x.scalar_type(), ", got ", w.sizes(), " ",
              w.scalar_type());
  TORCH_CHECK(other.size(0) == x.size(0) && other.scalar_type() == x.scalar_type(), other_name, " must match x");
}

}  // namespace

namespace shardserve {

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, out, "out", weight);
  const int64_t n = x.size(1);
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t xs = x.stride(0), os = out.stride(0);
    at::parallel_for(0, x.size(0), grain(n), [&](int64_t begin, int64_t end) {
      std::vector<float> row(n);
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t i = 0; i < n; ++i) row[i] = to_float(xp[t * xs + i]);
        normalize_row(row.data(), wp, op + t * os, n, static_cast<float>(eps));
      }
    });
  });
}

void add_rms_norm(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps) {
  check_norm_args(x, residual, "residual", weight);
  const int64_t n = x.size(1);
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* rp = residual.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const int64_t xs = x.stride(0), rs = residual.stride(0);
    at::parallel_for(0, x.size(0), grain(n), [&](int64_t begin, int64_t end) {
      std::vector<float> row(n);
      for (int64_t t = begin; t < end; ++t) {
        scalar_t* r = rp + t * rs;
        for (int64_t i = 0; i < n; ++i) {
          r[i] = from_float<scalar_t>(to_float(r[i]) + to_float(xp[t * xs + i]));
          row[i] = to_float(r[i]);
        }
        normalize_row(row.data(), wp, xp + t * xs, n, static_cast<float>(eps));
      }
    });
  });
}

void silu_and_mul(at::Tensor out, const at::Tensor& x) {
  check_dtype(x);
  const int64_t d = out.size(-1);
  check_rows(x, "x", 2 * d);
  check_rows(out, "out", d);
  TORCH_CHECK(out.size(0) == x.size(0) && out.scalar_type() == x.scalar_type(), "out must match x");
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t xs = x.stride(0), os = out.stride(0);
    const int64_t vec_end = d - d % Vec::size();
    at::parallel_for(0, x.size(0), grain(3 * d), [&](int64_t begin, int64_t end) {
      std::vector<float> gate(d);
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* g = xp + t * xs;
        const scalar_t* u = g + d;
        for (int64_t i = 0; i < d; ++i) gate[i] = to_float(g[i]);
        // silu(g) = g / (1 + exp(-g)), with torch's vectorized exp.
        int64_t i = 0;
        for (; i < vec_end; i += Vec::size()) {
          const Vec v = Vec::loadu(gate.data() + i);
          (v / (Vec(1.f) + v.neg().exp())).store(gate.data() + i);
        }
        for (; i < d; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i]));
        scalar_t* o = op + t * os;
        for (int64_t j = 0; j < d; ++j) o[j] = from_float<scalar_t>(round_to<scalar_t>(gate[j]) * to_float(u[j]));
      }
    });
  });
}

// x (tokens, heads, head_dim), rows of any stride; cos and sin_signed (tokens, head_dim), where
// sin_signed = [-sin, sin] over the two halves, so rotate_half(x) * sin = roll(x, hd/2) * sin_signed.
void rotary(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin_signed) {
  check_dtype(x);
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x must be (tokens, heads, head_dim) with contiguous heads, got ",
              x.sizes(), " strides ", x.strides());
  const int64_t T = x.size(0), H = x.size(1), hd = x.size(2);
  TORCH_CHECK(hd % 2 == 0, "head_dim must be even, got ", hd);
  for (const auto* t : {&cos, &sin_signed}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == T && t->size(1) == hd && t->is_contiguous() &&
                    t->scalar_type() == x.scalar_type(),
                "cos and sin must be contiguous (", T, ", ", hd, ") tensors of ", x.scalar_type(), ", got ", t->sizes());
  }
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin_signed.data_ptr<scalar_t>();
    const int64_t ts = x.stride(0), hs = x.stride(1), half = hd / 2;
    at::parallel_for(0, T, grain(H * hd), [&](int64_t begin, int64_t end) {
      std::vector<float> row(hd);
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* c = cp + t * hd;
        const scalar_t* s = sp + t * hd;
        for (int64_t h = 0; h < H; ++h) {
          scalar_t* r = xp + t * ts + h * hs;
          for (int64_t i = 0; i < hd; ++i) row[i] = to_float(r[i]);
          auto rotate = [&](int64_t i, float rolled) {
            r[i] = from_float<scalar_t>(round_to<scalar_t>(row[i] * to_float(c[i])) +
                                        round_to<scalar_t>(rolled * to_float(s[i])));
          };
          for (int64_t i = 0; i < half; ++i) rotate(i, row[i + half]);
          for (int64_t i = half; i < hd; ++i) rotate(i, row[i - half]);
        }
      }
    });
  });
}

}  // namespace shardserve

TORCH_LIBRARY_FRAGMENT(shardserve, m) {
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
  m.def("rotary(Tensor(a!) x, Tensor cos, Tensor sin_signed) -> ()");
}

TORCH_LIBRARY_IMPL(shardserve, CPU, m) {
  m.impl("rms_norm", &shardserve::rms_norm);
  m.impl("add_rms_norm", &shardserve::add_rms_norm);
  m.impl("silu_and_mul", &shardserve::silu_and_mul);
  m.impl("rotary", &shardserve::rotary);
}
