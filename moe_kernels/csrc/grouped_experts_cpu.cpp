// Routed experts of one MoE layer on CPU, reading each touched expert's weights once.
//
// A decode step must stream every touched expert's matrices from memory once, whatever number
// of its (token, k) pairs chose it; weight_stream.h streams them through the rows routed to
// each. Work is split over (expert, block of weight rows) items, so a layer is two parallel
// regions (gate/up, then down) whatever the number of experts.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "weight_stream.h"

namespace {

using weight_stream::rows_times_wt;

struct Plan {
  std::vector<int64_t> pair_of_row;  // rows sorted by local expert: the (token, k) pair of each
  std::vector<int64_t> start;        // first row of each local expert, num_local + 1 entries
};

Plan plan_rows(const int64_t* ids, int64_t pairs, int64_t first_expert, int64_t num_local) {
  Plan p;
  p.start.assign(num_local + 1, 0);
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t e = ids[i] - first_expert;
    if (e >= 0 && e < num_local) ++p.start[e + 1];
  }
  for (int64_t e = 0; e < num_local; ++e) p.start[e + 1] += p.start[e];
  std::vector<int64_t> fill(p.start.begin(), p.start.end() - 1);
  p.pair_of_row.resize(p.start[num_local]);
  for (int64_t i = 0; i < pairs; ++i) {  // pair order within an expert: stable, so sums are deterministic
    const int64_t e = ids[i] - first_expert;
    if (e >= 0 && e < num_local) p.pair_of_row[fill[e]++] = i;
  }
  return p;
}

struct Item { int64_t expert, n0, n1; };

// Items of (expert with rows, block of weight rows): about 4 per thread, blocks of >= 16 rows.
std::vector<Item> items(const Plan& p, int64_t num_local, int64_t N) {
  int64_t touched = 0;
  for (int64_t e = 0; e < num_local; ++e) touched += p.start[e + 1] > p.start[e];
  const int64_t want = 4 * at::get_num_threads();
  const int64_t per_expert = std::max<int64_t>(1, (want + touched - 1) / std::max<int64_t>(touched, 1));
  const int64_t block = std::max<int64_t>(16, (N + per_expert - 1) / per_expert);
  std::vector<Item> out;
  for (int64_t e = 0; e < num_local; ++e)
    if (p.start[e + 1] > p.start[e])
      for (int64_t n0 = 0; n0 < N; n0 += block) out.push_back({e, n0, std::min(N, n0 + block)});
  return out;
}

template <typename W>
void run(const float* x, int64_t H, const int64_t* ids, const float* weights, int64_t tokens, int64_t top_k,
         const W* w13, const W* w2, int64_t num_local, int64_t I, int64_t first_expert, float* out) {
  const Plan p = plan_rows(ids, tokens * top_k, first_expert, num_local);
  const int64_t rows = p.start[num_local];
  if (rows == 0) return;
  std::vector<const float*> xrow(rows);
  for (int64_t r = 0; r < rows; ++r) xrow[r] = x + (p.pair_of_row[r] / top_k) * H;
  // Scratch that every row fully overwrites: no zero fill.
  const at::Tensor scratch = at::empty({rows * (3 * I + H)}, at::kFloat);
  float* const gate_up = scratch.data_ptr<float>();
  float* const act = gate_up + rows * 2 * I;
  float* const down = act + rows * I;

  const auto up_items = items(p, num_local, 2 * I);
  at::parallel_for(0, up_items.size(), 1, [&](int64_t b, int64_t e_) {
    for (int64_t i = b; i < e_; ++i) {
      const Item& it = up_items[i];
      const int64_t r0 = p.start[it.expert], m = p.start[it.expert + 1] - r0;
      rows_times_wt(xrow.data() + r0, m, H, w13 + it.expert * 2 * I * H, it.n0, it.n1,
                    gate_up + r0 * 2 * I, 2 * I);
    }
  });
  // Elementwise passes go parallel only past ~32k elements: a parallel region costs microseconds.
  constexpr int64_t kGrain = 1 << 15;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / I), [&](int64_t b, int64_t e_) {  // silu(gate) * up
    for (int64_t r = b; r < e_; ++r) {
      const float* g = gate_up + r * 2 * I;
      for (int64_t i = 0; i < I; ++i) act[r * I + i] = g[i] / (1.f + std::exp(-g[i])) * g[I + i];
    }
  });
  std::vector<const float*> arow(rows);
  for (int64_t r = 0; r < rows; ++r) arow[r] = act + r * I;
  const auto down_items = items(p, num_local, H);
  at::parallel_for(0, down_items.size(), 1, [&](int64_t b, int64_t e_) {
    for (int64_t i = b; i < e_; ++i) {
      const Item& it = down_items[i];
      const int64_t r0 = p.start[it.expert], m = p.start[it.expert + 1] - r0;
      rows_times_wt(arow.data() + r0, m, I, w2 + it.expert * H * I, it.n0, it.n1, down + r0 * H, H);
    }
  });
  // Combine in (token, k) order, as the reference sums over k.
  std::vector<int64_t> row_of_pair(tokens * top_k, -1);
  for (int64_t r = 0; r < rows; ++r) row_of_pair[p.pair_of_row[r]] = r;
  at::parallel_for(0, tokens, std::max<int64_t>(1, kGrain / (top_k * H)), [&](int64_t b, int64_t e_) {
    for (int64_t t = b; t < e_; ++t)
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t r = row_of_pair[t * top_k + k];
        if (r < 0) continue;
        const float wgt = weights[t * top_k + k];
        for (int64_t h = 0; h < H; ++h) out[t * H + h] += wgt * down[r * H + h];
      }
  });
}

at::Tensor grouped_experts(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                           const at::Tensor& w13, const at::Tensor& w2, int64_t first_expert) {
  TORCH_CHECK(x.dim() == 2 && topk_ids.dim() == 2 && w13.dim() == 3 && w2.dim() == 3, "grouped_experts: bad ranks");
  TORCH_CHECK(w13.scalar_type() == w2.scalar_type(), "grouped_experts: w13 and w2 differ in dtype");
  const int64_t tokens = x.size(0), H = x.size(1), top_k = topk_ids.size(1);
  const int64_t num_local = w13.size(0), I = w2.size(2);
  TORCH_CHECK(w13.size(1) == 2 * I && w13.size(2) == H && w2.size(1) == H, "grouped_experts: weight shapes");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const at::Tensor wts = topk_weights.to(at::kFloat).contiguous();
  const at::Tensor a = w13.contiguous(), b = w2.contiguous();
  at::Tensor out = at::zeros({tokens, H}, x.options().dtype(at::kFloat));
  weight_stream::dispatch_weight_dtype(w13.scalar_type(), "grouped_experts", [&](auto tag) {
    using W = decltype(tag);
    run<W>(xf.data_ptr<float>(), H, ids.data_ptr<int64_t>(), wts.data_ptr<float>(), tokens, top_k,
           a.data_ptr<W>(), b.data_ptr<W>(), num_local, I, first_expert, out.data_ptr<float>());
  });
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(moe_cpu, m) {
  m.def("grouped_experts(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor w13, Tensor w2, int first_expert) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_cpu, CPU, m) { m.impl("grouped_experts", &grouped_experts); }
