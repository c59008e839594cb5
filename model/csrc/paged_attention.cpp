// Decode attention that reads the paged KV cache in place (CPU, float32 and bfloat16).
//
// One query token per sequence attends over its first context_len cached positions, found through
// its block table. The torch fallback copies every sequence's blocks into a dense tensor in every
// layer before SDPA; reading them where they lie is 1.5-7x faster (bench/bench_attention.py).
//
// Work item = one sequence: each cached row (all its kv heads) is read once, for all query heads.
// Scores go through an exact softmax (max, exp, sum) in float32.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "float_convert.h"
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

using shardserve::to_float;

// Calls row_fn(t, row) for t = 0..len-1, where row is position t's cached row (all kv heads) in the
// blocks the table lists. The K and V passes walk the blocks the same way.
template <typename T, typename RowFn>
inline void for_each_row(const T* cache, const int64_t* table, int64_t len, int64_t block_size,
                         int64_t block_stride, int64_t row_stride, RowFn&& row_fn) {
  for (int64_t start = 0; start < len; start += block_size) {
    const T* block = cache + table[start / block_size] * block_stride;
    for (int64_t o = 0, n = std::min(block_size, len - start); o < n; ++o) row_fn(start + o, block + o * row_stride);
  }
}

// HD > 0 fixes the head size at compile time so the inner loops vectorize without a remainder;
// HD == 0 reads it at run time (any other head size).
template <typename T, int HD>
void decode_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& cache, const at::Tensor& tables,
                      const at::Tensor& context_lens, double scale) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1);
  const int64_t hd = HD > 0 ? HD : q.size(2);
  const int64_t num_blocks = cache.size(1), block_size = cache.size(2), num_kv_heads = cache.size(3);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t block_stride = cache.stride(1), row_stride = cache.stride(2);
  const int64_t table_stride = tables.stride(0), max_len = tables.size(1) * block_size;
  const T* k_cache = cache.data_ptr<T>();
  const T* v_cache = k_cache + cache.stride(0);
  const int64_t* table_data = tables.data_ptr<int64_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const T* q_data = q.data_ptr<T>();
  const int64_t q_stride = q.stride(0);
  T* out_data = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, num_seqs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(num_heads * hd), acc(num_heads * hd), inv_sum(num_heads), scores;
    for (int64_t seq = begin; seq < end; ++seq) {
      const int64_t len = lens[seq];
      TORCH_CHECK(len >= 1 && len <= max_len, "paged_decode_attention: context length ", len,
                  " is outside 1..", max_len);
      const int64_t* table = table_data + seq * table_stride;
      const int64_t num_used = (len + block_size - 1) / block_size;
      // Check every block id, and ask for all the rows at once so that their cache misses overlap:
      // the blocks are scattered, and reading them one after the other waits on each in turn.
      for (int64_t b = 0; b < num_used; ++b) {
        TORCH_CHECK(table[b] >= 0 && table[b] < num_blocks, "paged_decode_attention: block id ", table[b],
                    " is outside 0..", num_blocks - 1);
        const int64_t bytes = std::min(block_size, len - b * block_size) * row_stride * int64_t(sizeof(T));
        const char* k = reinterpret_cast<const char*>(k_cache + table[b] * block_stride);
        const char* v = reinterpret_cast<const char*>(v_cache + table[b] * block_stride);
        for (int64_t i = 0; i < bytes; i += 64) {
          __builtin_prefetch(k + i, 0, 2);
          __builtin_prefetch(v + i, 0, 2);
        }
      }
      const T* q_row = q_data + seq * q_stride;
      for (int64_t i = 0; i < num_heads * hd; ++i) qf[i] = to_float(q_row[i]) * fscale;
      scores.resize(num_heads * len);

      // scores[h, t] = q_h . k_t, reading each cached row (all kv heads) once
      for_each_row(k_cache, table, len, block_size, block_stride, row_stride, [&](int64_t t, const T* k_row) {
        for (int64_t h = 0; h < num_heads; ++h) {
          const T* k = k_row + (h / group) * hd;
          const float* qh = qf.data() + h * hd;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < hd; ++i) s += qh[i] * to_float(k[i]);
          scores[h * len + t] = s;
        }
      });

      // softmax over t, in place, keeping 1 / sum for the end
      for (int64_t h = 0; h < num_heads; ++h) {
        float* s = scores.data() + h * len;
        const float m = *std::max_element(s, s + len);
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          s[t] = std::exp(s[t] - m);
          sum += s[t];
        }
        inv_sum[h] = 1.f / sum;
      }

      // acc[h] = sum_t p[h, t] v_t
      std::fill(acc.begin(), acc.end(), 0.f);
      for_each_row(v_cache, table, len, block_size, block_stride, row_stride, [&](int64_t t, const T* v_row) {
        for (int64_t h = 0; h < num_heads; ++h) {
          const T* v = v_row + (h / group) * hd;
          const float p = scores[h * len + t];
          float* a = acc.data() + h * hd;
#pragma omp simd
          for (int64_t i = 0; i < hd; ++i) a[i] += p * to_float(v[i]);
        }
      });

      T* out_row = out_data + seq * num_heads * hd;
      for (int64_t h = 0; h < num_heads; ++h)
        for (int64_t i = 0; i < hd; ++i) out_row[h * hd + i] = static_cast<T>(acc[h * hd + i] * inv_sum[h]);
    }
  });
}

template <typename T>
void dispatch_head_dim(at::Tensor& out, const at::Tensor& q, const at::Tensor& cache, const at::Tensor& tables,
                       const at::Tensor& context_lens, double scale) {
  switch (q.size(2)) {
    case 64: return decode_attention<T, 64>(out, q, cache, tables, context_lens, scale);
    case 128: return decode_attention<T, 128>(out, q, cache, tables, context_lens, scale);
    default: return decode_attention<T, 0>(out, q, cache, tables, context_lens, scale);
  }
}

}  // namespace

namespace shardserve {

// out, q: (num_seqs, num_heads, head_dim), q's rows may be strided; cache: (2, num_blocks, block_size, num_kv_heads, head_dim);
// tables: (>= num_seqs, max_blocks) int64; context_lens: (num_seqs,) int32, each >= 1.
void paged_decode_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& cache, const at::Tensor& tables,
                            const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 5 && tables.dim() == 2 && context_lens.dim() == 1,
              "paged_decode_attention: bad ranks");
  // q may be a row slice of a wider projection: only its heads and head dims must be packed.
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && out.is_contiguous() && cache.is_contiguous() &&
                  tables.stride(1) == 1,
              "paged_decode_attention: out and cache must be contiguous, and each row of q packed");
  TORCH_CHECK(out.sizes() == q.sizes() && cache.size(0) == 2 && cache.size(4) == q.size(2),
              "paged_decode_attention: shapes of q, out and cache disagree");
  TORCH_CHECK(q.size(1) % cache.size(3) == 0, "paged_decode_attention: query heads must be a multiple of kv heads");
  TORCH_CHECK(tables.size(0) >= q.size(0) && context_lens.size(0) == q.size(0),
              "paged_decode_attention: one block table and one length per sequence");
  TORCH_CHECK(tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kInt,
              "paged_decode_attention: tables must be int64 and context_lens int32");
  TORCH_CHECK(q.scalar_type() == cache.scalar_type() && out.scalar_type() == q.scalar_type(),
              "paged_decode_attention: q, out and cache must share a dtype");
  if (q.scalar_type() == at::kFloat) {
    dispatch_head_dim<float>(out, q, cache, tables, context_lens, scale);
  } else if (q.scalar_type() == at::kBFloat16) {
    dispatch_head_dim<c10::BFloat16>(out, q, cache, tables, context_lens, scale);
  } else {
    TORCH_CHECK(false, "paged_decode_attention: float32 or bfloat16 only, got ", q.scalar_type());
  }
}

}  // namespace shardserve

TORCH_LIBRARY(shardserve, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor cache, Tensor tables, Tensor context_lens, "
        "float scale) -> ()");
}

TORCH_LIBRARY_IMPL(shardserve, CPU, m) { m.impl("paged_decode_attention", &shardserve::paged_decode_attention); }
