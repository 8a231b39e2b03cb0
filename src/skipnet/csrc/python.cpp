// The kernels' Python module: loading it registers the ops' CPU kernels (the TORCH_LIBRARY_IMPL blocks of the
// other sources), and it binds the RNN gate step directly.
//
// Why a direct binding: compact inference at batch 1 calls the gate step once per gate, and a call through
// torch.ops (argument parsing against the schema, boxing, dispatch) costs about as much as the step itself.
// skipnet.infer calls this binding instead on the eager CPU path when no dispatch mode (a FLOP counter, fake
// tensors) is active; everywhere else the op is called, so torch.compile, torch.export and the FLOP counter
// see it. Same function, same checks, same results.
#include <torch/extension.h>

#include "skipnet_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "skipnet's CPU kernels (the skipnet:: ops) and a direct binding of the RNN gate step";
  m.def(
      "rnn_gate_step",
      [](at::Tensor pooled, at::Tensor state, at::Tensor probs, at::Tensor decisions,
         const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& idx, int64_t index,
         const at::Tensor& w_p, const at::Tensor& b_p, const at::Tensor& w_ih, const at::Tensor& w_hh,
         const at::Tensor& b_ih, const at::Tensor& b_hh, const at::Tensor& w_fc, const at::Tensor& b_fc,
         double temperature, std::optional<double> tau) {
        return skipnet::rnn_gate_step(pooled, state, probs, decisions, x, idx, index, w_p, b_p, w_ih, w_hh, b_ih,
                                      b_hh, w_fc, b_fc, temperature, tau);
      },
      "skipnet::rnn_gate_step's CPU kernel, called without the dispatcher (float32 CPU tensors only)");
}
