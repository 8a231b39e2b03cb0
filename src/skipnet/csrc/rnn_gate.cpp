// One step of the RNN gate at inference, on the CPU in float32: the kernel of the op skipnet::rnn_gate_step.
// Its schema, its PyTorch reference implementation (what every other device and dtype runs, and what the tests
// compare with), its fake implementation and its FLOP formula are in skipnet/ops/__init__.py; the gate itself
// is skipnet.models.gates.RNNGateBank.
//
// Why a kernel: the RNN gate's tensors are tiny (a few hundred values per image), so as PyTorch ops a gate step
// at small batches is about fifteen calls whose dispatch costs more than their arithmetic. Here it is one call
// that pools only the images whose input changed, then runs projection, LSTM step, output layer and decision.
// Sums run in index order whatever the batch size; sigmoid and tanh use a polynomial exp, so probabilities
// agree with PyTorch's to float rounding (~1e-7), not bit for bit.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "skipnet_ops.h"

#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace {

// exp(x) for x in [-87, 88] (clamped), to ~1 ulp: 2^n e^r with |r| <= ln(2)/2 (Cephes' expf polynomial).
// Branch-free and call-free, so that the loops over images below vectorise.
inline float exp_(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float sigmoid_(float z) { return 1.0f / (1.0f + exp_(-z)); }

inline float tanh_(float z) { return 2.0f * sigmoid_(2.0f * z) - 1.0f; }

// out (rows, B) += w (rows, k) @ in (k, B): the inner loop runs over the images, so it vectorises without
// reordering any sum -- each image's sums run in index order, whatever B is.
void gemm_acc(float* out, const float* w, const float* in, int64_t rows, int64_t k, int64_t B) {
  for (int64_t r = 0; r < rows; r++) {
    float* o = out + r * B;
    for (int64_t j = 0; j < k; j++) {
      const float wj = w[r * k + j];
      const float* x = in + j * B;
      for (int64_t b = 0; b < B; b++) o[b] += wj * x[b];
    }
  }
}

void fill_rows(float* out, const float* bias, int64_t rows, int64_t B) {
  for (int64_t r = 0; r < rows; r++)
    for (int64_t b = 0; b < B; b++) out[r * B + b] = bias[r];
}

void check_param(const at::Tensor& t, at::IntArrayRef sizes, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.sizes() == sizes,
              "skipnet::rnn_gate_step: ", what, " must be a float32 CPU tensor of sizes ", sizes, "; got ",
              t.scalar_type(), " ", t.sizes());
}

// Means over H x W of x (rows, C, H, W) into rows idx[r] (or r) of pooled (B, ld).
void pool_rows(const at::Tensor& x, const int64_t* idx, float* pooled, int64_t ld) {
  const int64_t rows = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  const bool channels_last = !x.is_contiguous();
  const float* xp = x.const_data_ptr<float>();
  for (int64_t r = 0; r < rows; r++) {
    float* out = pooled + (idx ? idx[r] : r) * ld;
    if (channels_last) {  // x (rows, hw, C): 16 channels at a time, their sums in registers
      const float* src = xp + r * hw * C;
      int64_t k0 = 0;
      for (; k0 + 16 <= C; k0 += 16) {
        float acc[16] = {0};
        for (int64_t j = 0; j < hw; j++)
          for (int l = 0; l < 16; l++) acc[l] += src[j * C + k0 + l];
        for (int l = 0; l < 16; l++) out[k0 + l] = acc[l] / static_cast<float>(hw);
      }
      for (; k0 < C; k0++) {
        float s = 0.0f;
        for (int64_t j = 0; j < hw; j++) s += src[j * C + k0];
        out[k0] = s / static_cast<float>(hw);
      }
      continue;
    }
    for (int64_t k = 0; k < C; k++) {
      const float* src = xp + (r * C + k) * hw;
      float acc[16] = {0};
      int64_t j = 0;
      for (; j + 16 <= hw; j += 16)
        for (int l = 0; l < 16; l++) acc[l] += src[j + l];
      float s = 0.0f;
      for (int l = 0; l < 16; l++) s += acc[l];
      for (; j < hw; j++) s += src[j];
      out[k] = s / static_cast<float>(hw);
    }
  }
}

int64_t rnn_gate_step_impl(at::Tensor& pooled, at::Tensor& state, at::Tensor& probs, at::Tensor& decisions,
                           const std::optional<at::Tensor>& x_in, const std::optional<at::Tensor>& idx_in,
                           int64_t index, const at::Tensor& w_p_in, const at::Tensor& b_p_in,
                           const at::Tensor& w_ih_in, const at::Tensor& w_hh_in, const at::Tensor& b_ih_in,
                           const at::Tensor& b_hh_in, const at::Tensor& w_fc_in, const at::Tensor& b_fc_in,
                           double temperature, std::optional<double> tau) {
  // Parameters as they are (contiguous: no copy), else a contiguous copy.
  const at::Tensor w_p = w_p_in.contiguous(), b_p = b_p_in.contiguous(), w_ih = w_ih_in.contiguous();
  const at::Tensor w_hh = w_hh_in.contiguous(), b_ih = b_ih_in.contiguous(), b_hh = b_hh_in.contiguous();
  const at::Tensor w_fc = w_fc_in.contiguous(), b_fc = b_fc_in.contiguous();
  TORCH_CHECK(w_p.dim() == 2 && w_hh.dim() == 2, "skipnet::rnn_gate_step: weights must be matrices");
  const int64_t E = w_p.size(0), C = w_p.size(1), H = w_hh.size(1), G = 4 * H;
  check_param(w_p, {E, C}, "w_p");
  check_param(b_p, {E}, "b_p");
  check_param(w_ih, {G, E}, "w_ih");
  check_param(w_hh, {G, H}, "w_hh");
  check_param(b_ih, {G}, "b_ih");
  check_param(b_hh, {G}, "b_hh");
  check_param(w_fc, {1, H}, "w_fc");
  check_param(b_fc, {1}, "b_fc");
  const int64_t B = pooled.size(0), N = probs.size(1);
  for (const at::Tensor* t : {&pooled, &state, &probs, &decisions}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "skipnet::rnn_gate_step: pooled, state, probs and decisions must be contiguous float32 CPU "
                "tensors");
  }
  TORCH_CHECK(pooled.dim() == 2 && pooled.size(1) >= C, "skipnet::rnn_gate_step: pooled must be (B, >= ", C,
              "); got ", pooled.sizes());
  TORCH_CHECK(state.dim() == 3 && state.size(0) == 2 && state.size(1) == B && state.size(2) == H,
              "skipnet::rnn_gate_step: state must be (2, ", B, ", ", H, "); got ", state.sizes());
  TORCH_CHECK(probs.dim() == 2 && probs.size(0) == B && decisions.sizes() == probs.sizes(),
              "skipnet::rnn_gate_step: probs and decisions must be (", B, ", N); got ", probs.sizes(), " and ",
              decisions.sizes());
  TORCH_CHECK(0 <= index && index < N, "skipnet::rnn_gate_step: gate ", index, " of ", N);
  const int64_t ld = pooled.size(1);
  float* pp = pooled.mutable_data_ptr<float>();
  if (x_in.has_value()) {
    at::Tensor x = *x_in;
    TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.size(1) == C && x.size(2) * x.size(3) > 0,
                "skipnet::rnn_gate_step: gate ", index, " takes CPU input of shape (rows, ", C, ", H, W); got ",
                x.sizes());
    if (x.scalar_type() != at::kFloat) x = x.to(at::kFloat);
    if (!x.is_contiguous() && !x.is_contiguous(at::MemoryFormat::ChannelsLast)) x = x.contiguous();
    const int64_t* idx = nullptr;
    at::Tensor idx_t;
    if (idx_in.has_value()) {
      idx_t = idx_in->contiguous();
      TORCH_CHECK(idx_t.device().is_cpu() && idx_t.scalar_type() == at::kLong && idx_t.dim() == 1 &&
                      idx_t.size(0) == x.size(0) && x.size(0) <= B,
                  "skipnet::rnn_gate_step: idx must be an int64 CPU vector with one entry per row of x (",
                  x.size(0), "); got ", idx_t.scalar_type(), " ", idx_t.sizes());
      idx = idx_t.const_data_ptr<int64_t>();
      for (int64_t r = 0; r < idx_t.size(0); r++)
        TORCH_CHECK(0 <= idx[r] && idx[r] < B, "skipnet::rnn_gate_step: image index ", idx[r], " of ", B);
    } else {
      TORCH_CHECK(x.size(0) == B, "skipnet::rnn_gate_step: x has ", x.size(0), " rows for a batch of ", B,
                  " (give idx for some images)");
    }
    pool_rows(x, idx, pp, ld);
  }
  float* h = state.mutable_data_ptr<float>();
  float* cell = h + B * H;
  if (index == 0) std::memset(h, 0, static_cast<size_t>(2 * B * H) * sizeof(float));  // a pass starts at 0
  const float *wp = w_p.const_data_ptr<float>(), *bp = b_p.const_data_ptr<float>();
  const float *wih = w_ih.const_data_ptr<float>(), *whh = w_hh.const_data_ptr<float>();
  const float *bih = b_ih.const_data_ptr<float>(), *bhh = b_hh.const_data_ptr<float>();
  const float *wfc = w_fc.const_data_ptr<float>(), *bfc = b_fc.const_data_ptr<float>();
  std::vector<float> logit(static_cast<size_t>(B));
  if (B < 8) {  // few images: image by image (the same sums in the same order as below)
    std::vector<float> e(static_cast<size_t>(E)), z(static_cast<size_t>(G));
    for (int64_t b = 0; b < B; b++) {
      const float* m = pp + b * ld;
      float *hb = h + b * H, *cb = cell + b * H;
      for (int64_t j = 0; j < E; j++) {
        float acc = bp[j];
        for (int64_t k = 0; k < C; k++) acc += wp[j * C + k] * m[k];
        e[j] = acc;
      }
      for (int64_t g = 0; g < G; g++) {
        float acc = bih[g];
        for (int64_t k = 0; k < E; k++) acc += wih[g * E + k] * e[k];
        for (int64_t k = 0; k < H; k++) acc += whh[g * H + k] * hb[k];
        z[g] = acc + bhh[g];
      }
      for (int64_t k = 0; k < H; k++) {
        const float cn = sigmoid_(z[H + k]) * cb[k] + sigmoid_(z[k]) * tanh_(z[2 * H + k]);
        cb[k] = cn;
        hb[k] = sigmoid_(z[3 * H + k]) * tanh_(cn);
      }
      float acc = bfc[0];
      for (int64_t k = 0; k < H; k++) acc += wfc[k] * hb[k];
      logit[b] = acc;
    }
  } else {  // feature-major copies (features x images), so that every loop over images vectorises
    std::vector<float> buf(static_cast<size_t>((C + 2 * H + E + G) * B));
    float *m = buf.data(), *ht = m + C * B, *ct = ht + H * B, *e = ct + H * B, *z = e + E * B;
    for (int64_t b = 0; b < B; b++) {
      for (int64_t k = 0; k < C; k++) m[k * B + b] = pp[b * ld + k];
      for (int64_t k = 0; k < H; k++) {
        ht[k * B + b] = h[b * H + k];
        ct[k * B + b] = cell[b * H + k];
      }
    }
    fill_rows(e, bp, E, B);
    gemm_acc(e, wp, m, E, C, B);  // e = W_p m + b_p          (E, B)
    fill_rows(z, bih, G, B);
    gemm_acc(z, wih, e, G, E, B);
    gemm_acc(z, whh, ht, G, H, B);
    for (int64_t g = 0; g < G; g++)  // z = W_ih e + b_ih + W_hh h + b_hh  (4H, B)
      for (int64_t b = 0; b < B; b++) z[g * B + b] += bhh[g];
    for (int64_t k = 0; k < H; k++)
      for (int64_t b = 0; b < B; b++) {
        const float cn = sigmoid_(z[(H + k) * B + b]) * ct[k * B + b] +
                         sigmoid_(z[k * B + b]) * tanh_(z[(2 * H + k) * B + b]);
        ct[k * B + b] = cn;
        ht[k * B + b] = sigmoid_(z[(3 * H + k) * B + b]) * tanh_(cn);
      }
    fill_rows(logit.data(), bfc, 1, B);
    gemm_acc(logit.data(), wfc, ht, 1, H, B);
    for (int64_t b = 0; b < B; b++)
      for (int64_t k = 0; k < H; k++) {
        h[b * H + k] = ht[k * B + b];
        cell[b * H + k] = ct[k * B + b];
      }
  }
  float *pr = probs.mutable_data_ptr<float>(), *dr = decisions.mutable_data_ptr<float>();
  const float t = static_cast<float>(temperature), threshold = static_cast<float>(tau.value_or(0.0));
  int64_t count = 0;
  for (int64_t b = 0; b < B; b++) {
    const float p = sigmoid_(t != 1.0f ? logit[b] / t : logit[b]);
    pr[b * N + index] = p;
    if (tau.has_value()) {
      const bool run = p >= threshold;
      dr[b * N + index] = run ? 1.0f : 0.0f;
      count += run;
    }
  }
  return count;
}

}  // namespace

namespace skipnet {

// The op: the step with subnormal floats flushed to zero (x86's FTZ and DAZ; the caller's mode is restored on
// return). A saturated LSTM cell (large gate inputs: sigmoid(z) ~ 1e-38) makes subnormal products, each ~100
// cycles in the scalar loops, which made a whole step several times slower. Flushing changes values by less
// than 1.2e-38.
int64_t rnn_gate_step(at::Tensor& pooled, at::Tensor& state, at::Tensor& probs, at::Tensor& decisions,
                      const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& idx, int64_t index,
                      const at::Tensor& w_p, const at::Tensor& b_p, const at::Tensor& w_ih, const at::Tensor& w_hh,
                      const at::Tensor& b_ih, const at::Tensor& b_hh, const at::Tensor& w_fc, const at::Tensor& b_fc,
                      double temperature, std::optional<double> tau) {
#if defined(__SSE__)
  struct FlushSubnormals {
    unsigned int csr = _mm_getcsr();
    FlushSubnormals() { _mm_setcsr(csr | 0x8040); }  // FTZ | DAZ
    ~FlushSubnormals() { _mm_setcsr(csr); }          // (also when a check throws)
  } flush;
#endif
  return rnn_gate_step_impl(pooled, state, probs, decisions, x, idx, index, w_p, b_p, w_ih, w_hh, b_ih, b_hh, w_fc,
                            b_fc, temperature, tau);
}

}  // namespace skipnet

TORCH_LIBRARY_IMPL(skipnet, CPU, m) { m.impl("rnn_gate_step", &skipnet::rnn_gate_step); }
