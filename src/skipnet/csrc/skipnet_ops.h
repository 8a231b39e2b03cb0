// The CPU kernels that python.cpp also binds directly (see there for why).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace skipnet {

// The kernel of skipnet::rnn_gate_step (rnn_gate.cpp); the op's schema and reference are in skipnet/ops.
int64_t rnn_gate_step(at::Tensor& pooled, at::Tensor& state, at::Tensor& probs, at::Tensor& decisions,
                      const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& idx, int64_t index,
                      const at::Tensor& w_p, const at::Tensor& b_p, const at::Tensor& w_ih, const at::Tensor& w_hh,
                      const at::Tensor& b_ih, const at::Tensor& b_hh, const at::Tensor& w_fc, const at::Tensor& b_fc,
                      double temperature, std::optional<double> tau);

}  // namespace skipnet
