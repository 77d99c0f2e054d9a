// y = x @ w^T for a few rows of x (decode), streaming the weight once (weight_stream.h): the
// dense layers, attention projections and shared experts of a decode step, where it measures
// faster than F.linear (model/layers.py decides per shape). 2-byte weights run at half fp32's
// speed through oneDNN on AVX2 machines, and MKL's small-M sgemm packs an fp32 weight first.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "weight_stream.h"

namespace {

at::Tensor stream_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && x.size(-1) == w.size(1), "stream_linear: x [..., K] and w [N, K] expected");
  const int64_t K = w.size(1), N = w.size(0);
  const at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const at::Tensor wc = w.contiguous();
  const int64_t M = xf.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  std::vector<const float*> rows(M);
  for (int64_t m = 0; m < M; ++m) rows[m] = xf.data_ptr<float>() + m * K;
  weight_stream::dispatch_weight_dtype(w.scalar_type(), "stream_linear", [&](auto tag) {
    using W = decltype(tag);
    const W* wp = wc.data_ptr<W>();
    // Blocks of >= 16 weight rows, about 4 per thread: each a contiguous stretch of the matrix.
    const int64_t grain = std::max<int64_t>(16, N / (4 * at::get_num_threads()));
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      weight_stream::rows_times_wt(rows.data(), M, K, wp, n0, n1, y.data_ptr<float>(), N);
    });
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return y.to(x.scalar_type()).view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_cpu, m) { m.def("linear(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(moe_cpu, CPU, m) { m.impl("linear", &stream_linear); }
