// Streaming a weight matrix through a few activation rows on CPU: the inner loop of the
// weight-streaming kernels (grouped_experts_cpu.cpp, linear_cpu.cpp).
//
// Decode is bound by reading weights. oneDNN/MKL reach the memory roofline for fp32 only with
// enough rows per call (small-M sgemm packs the weight first), and on AVX2 machines their bf16
// path runs at half fp32's speed. Here each weight row is loaded once (fp32, or bf16 / fp16
// widened to fp32 in registers) and multiplied into every activation row, accumulating in
// fp32, while the activation rows stay in cache.

#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace weight_stream {

#ifdef __AVX512F__
constexpr int V = 16;  // floats per vector: one register
#else
constexpr int V = 8;
#endif
typedef float vf __attribute__((vector_size(V * 4)));
typedef uint16_t vh __attribute__((vector_size(V * 2)));
typedef uint32_t vu __attribute__((vector_size(V * 4)));
typedef _Float16 v16 __attribute__((vector_size(V * 2)));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline vf load(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
  vh h; std::memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu) << 16;
  vf f; std::memcpy(&f, &u, sizeof f); return f;
}
inline vf load(const c10::Half* p) { v16 h; std::memcpy(&h, p, sizeof h); return __builtin_convertvector(h, vf); }

inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < V; ++i) s += v[i];
  return s;
}

constexpr int MB = 4;  // activation rows per pass over the weight rows
constexpr int NR = 2;  // weight rows per pass: NR * MB independent accumulators in registers

// y[m * ldy + n] = sum_k x[m][k] * w[n][k] for n in [n0, n1), m < M; x rows given by pointer.
template <typename W, int nr, int mb>
inline void block(const float* const* x, int64_t K, const W* w, int64_t n, float* y, int64_t ldy) {
  const int64_t kv = K / V * V;
  vf acc[nr][mb] = {};  // mb and nr are compile-time, so the accumulators live in registers
  // The hardware prefetchers stop at page boundaries, and a weight row is a page or two: fetch
  // the next rows' lines ahead while these are consumed (measured: bf16 10 -> 12.6 GB/s on one core, fp32 unchanged).
  const W* next = w + (n + nr) * K;
  for (int64_t k = 0; k < kv; k += V) {
    vf wv[nr];
    for (int j = 0; j < nr; ++j) {
      __builtin_prefetch(next + j * K + k, 0, 3);
      wv[j] = load(w + (n + j) * K + k);
    }
    for (int m = 0; m < mb; ++m) {
      const vf xv = load(x[m] + k);
      for (int j = 0; j < nr; ++j) acc[j][m] += wv[j] * xv;
    }
  }
  for (int j = 0; j < nr; ++j)
    for (int m = 0; m < mb; ++m) {
      float s = hsum(acc[j][m]);
      for (int64_t k = kv; k < K; ++k) s += static_cast<float>(w[(n + j) * K + k]) * x[m][k];
      y[m * ldy + n + j] = s;
    }
}

template <typename W, int nr>
inline void rows_block(const float* const* x, int64_t M, int64_t K, const W* w, int64_t n, float* y, int64_t ldy) {
  for (int64_t m0 = 0; m0 < M; m0 += MB) {  // the weight rows stay in L1 between passes
    const float* const* xm = x + m0;
    float* ym = y + m0 * ldy;
    switch (std::min<int64_t>(MB, M - m0)) {
      case 1: block<W, nr, 1>(xm, K, w, n, ym, ldy); break;
      case 2: block<W, nr, 2>(xm, K, w, n, ym, ldy); break;
      case 3: block<W, nr, 3>(xm, K, w, n, ym, ldy); break;
      default: block<W, nr, 4>(xm, K, w, n, ym, ldy); break;
    }
  }
}

template <typename W>
void rows_times_wt(const float* const* x, int64_t M, int64_t K, const W* w, int64_t n0, int64_t n1,
                   float* y, int64_t ldy) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) rows_block<W, NR>(x, M, K, w, n, y, ldy);
  for (; n < n1; ++n) rows_block<W, 1>(x, M, K, w, n, y, ldy);
}

// Calls f(W{}) with W the C++ type of the weights' dtype (float32, bfloat16 or float16).
template <typename F>
void dispatch_weight_dtype(c10::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case c10::kFloat: f(float{}); break;
    case c10::kBFloat16: f(c10::BFloat16{}); break;
    case c10::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, op, ": weights must be float32, bfloat16 or float16, got ", dtype);
  }
}

}  // namespace weight_stream
