// Autograd for bsconv_fused::forward, registered in C++ at the Autograd key.
//
// The forward runs the fused op below autograd and saves its inputs (never the intermediate);
// the backward calls bsconv_fused::backward once with a mask of the gradients autograd needs.
// Doing this in C++ keeps Python out of every call: a Python autograd kernel
// (torch.library.register_autograd) costs tens of microseconds per call, as much as the whole
// kernel of a small layer, even under torch.no_grad(). torch.compile traces through this kernel
// like through any C++ autograd op: both ops have fake kernels (bsconv_fused/ops.py), so the
// traced graph holds one forward and one backward call.
#include <torch/autograd.h>
#include <torch/library.h>

#include "op_handles.h"

namespace {

using at::Tensor;
using bsconv::Grads;
using bsconv::kNumGrads;
using bsconv::OptTensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int kNumArgs = 12;  // ... stride, padding, dilation, padding_mode, activation

Tensor call_forward(const Tensor& x, const Tensor& pw1, const OptTensor& pw2, const Tensor& dw,
                    const OptTensor& bias, const OptTensor& scale, const OptTensor& shift,
                    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                    int64_t padding_mode, int64_t activation) {
  return bsconv::forward_op().call(x, pw1, pw2, dw, bias, scale, shift, stride, padding,
                                   dilation, padding_mode, activation);
}

Grads call_backward(const Tensor& gy, const Tensor& x, const Tensor& pw1, const OptTensor& pw2,
                    const Tensor& dw, const OptTensor& bias, const OptTensor& scale,
                    const OptTensor& shift, c10::IntArrayRef stride, c10::IntArrayRef padding,
                    c10::IntArrayRef dilation, int64_t padding_mode, int64_t activation,
                    std::array<bool, kNumGrads> mask) {
  return bsconv::backward_op().call(gy, x, pw1, pw2, dw, bias, scale, shift, stride, padding,
                                    dilation, padding_mode, activation, mask);
}

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

class BSConvFunction : public torch::autograd::Function<BSConvFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& pw1,
                        const OptTensor& pw2, const Tensor& dw, const OptTensor& bias,
                        const OptTensor& scale, const OptTensor& shift, c10::IntArrayRef stride,
                        c10::IntArrayRef padding, c10::IntArrayRef dilation,
                        int64_t padding_mode, int64_t activation) {
    Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      y = call_forward(x, pw1, pw2, dw, bias, scale, shift, stride, padding, dilation,
                       padding_mode, activation);
    }
    const Tensor none;
    ctx->save_for_backward({x, pw1, pw2.value_or(none), dw, bias.value_or(none),
                            scale.value_or(none), shift.value_or(none)});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["padding_mode"] = padding_mode;
    ctx->saved_data["activation"] = activation;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list s = ctx->get_saved_variables();
    std::array<bool, kNumGrads> mask{};
    bool any = false;
    // needs_input_grad counts the tensors that were given (absent optionals have no edge);
    // the returned list has one slot per argument of forward.
    size_t edge = 0;
    for (int i = 0; i < kNumGrads; ++i) {
      mask[i] = s[i].defined() && ctx->needs_input_grad(edge++);
      any = any || mask[i];
    }
    variable_list out(kNumArgs);
    const Tensor& gy = grad_outputs[0];
    if (!any || !gy.defined()) {
      return out;
    }
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    Grads g = call_backward(gy, s[0], s[1], opt(s[2]), s[3], opt(s[4]), opt(s[5]), opt(s[6]),
                            stride, padding, dilation, ctx->saved_data["padding_mode"].toInt(),
                            ctx->saved_data["activation"].toInt(), mask);
    const Tensor all[kNumGrads] = {std::get<0>(g), std::get<1>(g), std::get<2>(g),
                                   std::get<3>(g), std::get<4>(g), std::get<5>(g),
                                   std::get<6>(g)};
    for (int i = 0; i < kNumGrads; ++i) {
      if (mask[i]) {
        out[i] = all[i];
      }
    }
    return out;
  }
};

// Whether the call needs autograd's bookkeeping: an input that requires grad (with grad mode
// on), or one that carries a forward-mode tangent (which BSConvFunction rejects, as before).
bool needs_autograd(std::initializer_list<const Tensor*> ts) {
  const bool grad_mode = at::GradMode::is_enabled();
  for (const Tensor* t : ts) {
    if (t == nullptr || !t->defined()) continue;
    if ((grad_mode && t->requires_grad()) || t->_fw_grad(/*level=*/0).defined()) return true;
  }
  return false;
}

const Tensor* ptr(const OptTensor& t) { return t ? &*t : nullptr; }

Tensor forward_autograd(const Tensor& x, const Tensor& pw1, const OptTensor& pw2,
                        const Tensor& dw, const OptTensor& bias, const OptTensor& scale,
                        const OptTensor& shift, c10::IntArrayRef stride,
                        c10::IntArrayRef padding, c10::IntArrayRef dilation,
                        int64_t padding_mode, int64_t activation) {
  if (!needs_autograd({&x, &pw1, ptr(pw2), &dw, ptr(bias), ptr(scale), ptr(shift)})) {
    // Inference (no_grad, or nothing requires grad): no graph node, nothing saved.
    at::AutoDispatchBelowADInplaceOrView below;
    return call_forward(x, pw1, pw2, dw, bias, scale, shift, stride, padding, dilation,
                        padding_mode, activation);
  }
  return BSConvFunction::apply(x, pw1, pw2, dw, bias, scale, shift, stride, padding, dilation,
                               padding_mode, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(bsconv_fused, Autograd, m) {
  m.impl("forward", forward_autograd);
}
