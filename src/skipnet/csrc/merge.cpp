// The residual merge of a block, on the CPU in float32: the kernels of the ops skipnet::gated_merge,
// skipnet::gated_merge_backward and skipnet::add_relu_pool_. The ops' schemas, their PyTorch reference
// implementations (what every other device, dtype and layout runs, and what the tests compare with), their
// fake implementations and the autograd formula are in skipnet/ops/__init__.py.
//
// All three are one pass over memory-bound data that PyTorch runs as a chain of elementwise ops: the gated
// merge is lerp(s, relu(r + s), g) per image, and its backward also needs the gate's gradient, a per-image
// dot product. The batch is B rows of K values (image b is values [b K, (b+1) K) of every tensor: contiguous
// or channels_last tensors of one shape and the same strides); the rows are split over PyTorch's threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace {

bool dense_rows(const at::Tensor& t) {
  return t.dim() == 4 && (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast));
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && a.scalar_type() == at::kFloat &&
                  b.scalar_type() == at::kFloat,
              op, ": the CPU kernel takes float32 CPU tensors; got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(dense_rows(a) && a.sizes() == b.sizes() && a.strides() == b.strides(), op,
              ": the CPU kernel takes 4-D tensors of one shape and the same dense strides (contiguous or "
              "channels_last); got sizes ",
              a.sizes(), " and ", b.sizes(), ", strides ", a.strides(), " and ", b.strides());
}

// The per-image weights as float32, contiguous, one per image.
at::Tensor gate_weights(const at::Tensor& g, int64_t batch, const char* op) {
  TORCH_CHECK(g.numel() == batch, op, ": expected one gate value per image (", batch, "); got ", g.numel());
  return g.to(at::kFloat).contiguous();
}

// out = lerp(s, relu(r + s), g): torch.lerp's formula, so exact for g in {0, 1}; a NaN anywhere shows, as
// with lerp (also from a skipped image's residual).
at::Tensor gated_merge(const at::Tensor& r, const at::Tensor& s, const at::Tensor& g) {
  check_pair(r, s, "skipnet::gated_merge");
  const int64_t B = r.size(0);
  const at::Tensor w = gate_weights(g, B, "skipnet::gated_merge");
  at::Tensor out = at::empty_like(r);  // r's strides (dense): the rows the loops assume
  const int64_t K = B ? r.numel() / B : 0;
  const float *rp = r.const_data_ptr<float>(), *sp = s.const_data_ptr<float>(), *wp = w.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
      const float wb = wp[b], u = 1.0f - wb;
      const float *rb = rp + b * K, *sb = sp + b * K;
      float* ob = op + b * K;
      for (int64_t k = 0; k < K; k++) {
        float v = rb[k] + sb[k];
        v = v < 0.0f ? 0.0f : v;  // relu, NaN kept (as torch.relu)
        ob[k] = wb < 0.5f ? sb[k] + wb * (v - sb[k]) : v - (v - sb[k]) * u;
      }
    }
  });
  return out;
}

// The backward of gated_merge from the incoming gradient d, given f = relu(r + s) -- or r itself when
// from_r, then f is recomputed: grad_r = g 1[f > 0] d, grad_s = grad_r + (1 - g) d (only with need_s: when
// every g is 1 it equals grad_r) and, with need_g, grad_g[b] = sum_k d (f - s), in 16 partial sums per image so
// that the loop vectorises. One pass over d, f (or r) and s. Tensors not asked for come back empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_merge_backward(const at::Tensor& grad, const at::Tensor& f,
                                                                    const at::Tensor& s, const at::Tensor& g,
                                                                    bool from_r, bool need_s, bool need_g) {
  const char* name = "skipnet::gated_merge_backward";
  check_pair(f, s, name);
  const int64_t B = f.size(0);
  const at::Tensor w = gate_weights(g, B, name);
  TORCH_CHECK(grad.sizes() == f.sizes(), name, ": the gradient has sizes ", grad.sizes(), ", expected ", f.sizes());
  at::Tensor d = grad;
  if (d.scalar_type() != at::kFloat || d.strides() != f.strides() || !d.device().is_cpu()) {
    d = at::empty_like(f).copy_(grad);  // (the rows must line up with f's)
  }
  at::Tensor grad_r = at::empty_like(f);
  at::Tensor grad_s = need_s ? at::empty_like(f) : at::empty({0}, f.options());
  at::Tensor grad_g = need_g ? at::empty({B}, f.options().memory_format(at::MemoryFormat::Contiguous))
                             : at::empty({0}, f.options());
  const int64_t K = B ? f.numel() / B : 0;
  const float *dp = d.const_data_ptr<float>(), *fp = f.const_data_ptr<float>(), *sp = s.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* rp = grad_r.mutable_data_ptr<float>();
  float* qp = need_s ? grad_s.mutable_data_ptr<float>() : nullptr;
  float* gp = need_g ? grad_g.mutable_data_ptr<float>() : nullptr;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
      const float wb = wp[b], u = 1.0f - wb;
      const float *db = dp + b * K, *fb = fp + b * K, *sb = sp + b * K;
      float *rb = rp + b * K, *qb = qp ? qp + b * K : nullptr;
      float acc[16] = {0};
      const int64_t K16 = gp ? K - K % 16 : 0;
      for (int64_t k = 0; k < K16; k += 16) {
        for (int l = 0; l < 16; l++) {
          const float dv = db[k + l], sv = sb[k + l];
          float fv = fb[k + l];
          if (from_r) {
            fv += sv;
            fv = fv < 0.0f ? 0.0f : fv;
          }
          acc[l] += dv * (fv - sv);
          const float rv = fv > 0.0f ? wb * dv : 0.0f;
          rb[k + l] = rv;
          if (qb) qb[k + l] = rv + u * dv;
        }
      }
      for (int64_t k = K16; k < K; k++) {
        const float dv = db[k], sv = sb[k];
        float fv = fb[k];
        if (from_r) {
          fv += sv;
          fv = fv < 0.0f ? 0.0f : fv;
        }
        if (gp) acc[0] += dv * (fv - sv);
        const float rv = fv > 0.0f ? wb * dv : 0.0f;
        rb[k] = rv;
        if (qb) qb[k] = rv + u * dv;
      }
      if (gp) {
        float t = 0.0f;
        for (int l = 0; l < 16; l++) t += acc[l];
        gp[b] = t;
      }
    }
  });
  return {grad_r, grad_s, grad_g};
}

// Images b0..b1-1 of the inference merge r = relu(r + s), B images of C channels x HW positions
// (channels_last: (HW, C) per image, else (C, HW)); with pooled, also each image's channel means of the
// result. r and s do not overlap (checked by the caller), which lets the loops vectorise.
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && defined(__GNUC__) && __GNUC__ >= 6 && \
    !defined(__clang__) && !defined(SKIPNET_NO_CLONES)
__attribute__((target_clones("avx512f", "avx2", "default")))  // one build per vector width, picked at load
#endif
void add_relu_pool_rows(float* __restrict__ r, const float* __restrict__ s, int64_t b0, int64_t b1, int64_t C,
                        int64_t HW, bool channels_last, float* __restrict__ pooled, float* __restrict__ acc) {
  for (int64_t b = b0; b < b1; b++) {
    float* __restrict__ rb = r + b * C * HW;
    const float* __restrict__ sb = s + b * C * HW;
    if (channels_last) {
      for (int64_t c = 0; c < C; c++) acc[c] = 0.0f;
      for (int64_t j = 0; j < HW; j++) {
        float* __restrict__ rj = rb + j * C;
        const float* __restrict__ sj = sb + j * C;
        for (int64_t c = 0; c < C; c++) {
          float v = rj[c] + sj[c];
          v = v < 0.0f ? 0.0f : v;
          rj[c] = v;
          acc[c] += v;
        }
      }
      if (pooled) {
        for (int64_t c = 0; c < C; c++) pooled[b * C + c] = acc[c] / static_cast<float>(HW);
      }
      continue;
    }
    for (int64_t c = 0; c < C; c++) {
      float* __restrict__ rc = rb + c * HW;
      const float* __restrict__ sc = sb + c * HW;
      float part[16] = {0};
      const int64_t n16 = HW - HW % 16;
      for (int64_t j = 0; j < n16; j += 16) {
        for (int l = 0; l < 16; l++) {
          float v = rc[j + l] + sc[j + l];
          v = v < 0.0f ? 0.0f : v;
          rc[j + l] = v;
          part[l] += v;
        }
      }
      for (int64_t j = n16; j < HW; j++) {
        float v = rc[j] + sc[j];
        v = v < 0.0f ? 0.0f : v;
        rc[j] = v;
        part[0] += v;
      }
      if (pooled) {
        float total = 0.0f;
        for (int l = 0; l < 16; l++) total += part[l];
        pooled[b * C + c] = total / static_cast<float>(HW);
      }
    }
  }
}

// Inference merge in place, r = relu(r + s); with pool, returns each image's channel means of the result
// (B, C, 1, 1), which the next gate would otherwise read the whole output again for (else an empty tensor).
at::Tensor add_relu_pool_(at::Tensor& r, const at::Tensor& s, bool pool) {
  check_pair(r, s, "skipnet::add_relu_pool_");
  TORCH_CHECK(!r.is_alias_of(s), "skipnet::add_relu_pool_: r and s must not share memory");
  const int64_t B = r.size(0), C = r.size(1), HW = r.size(2) * r.size(3);
  const bool channels_last = !r.is_contiguous();
  at::Tensor pooled = pool ? at::empty({B, C, 1, 1}, r.options().memory_format(at::MemoryFormat::Contiguous))
                           : at::empty({0}, r.options());
  float* rp = r.mutable_data_ptr<float>();
  const float* sp = s.const_data_ptr<float>();
  float* pp = pool ? pooled.mutable_data_ptr<float>() : nullptr;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> acc(static_cast<size_t>(C));
    add_relu_pool_rows(rp, sp, b0, b1, C, HW, channels_last, pp, acc.data());
  });
  return pooled;
}

}  // namespace

TORCH_LIBRARY_IMPL(skipnet, CPU, m) {
  m.impl("gated_merge", &gated_merge);
  m.impl("gated_merge_backward", &gated_merge_backward);
  m.impl("add_relu_pool_", &add_relu_pool_);
}
