// Typed dispatcher handles of the bsconv_fused ops, for C++ callers (the autograd kernel and
// the eager Python entry). A call through them goes through the whole dispatcher (autograd,
// autocast, Python modes, tracing), exactly like torch.ops.bsconv_fused.*.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace bsconv {

using OptTensor = std::optional<at::Tensor>;
constexpr int kNumGrads = 7;  // x, pw1_weight, pw2_weight, dw_weight, dw_bias, mid_scale, mid_shift
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor>;

inline const auto& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bsconv_fused::forward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&,
                            const at::Tensor&, const OptTensor&, const OptTensor&,
                            const OptTensor&, c10::IntArrayRef, c10::IntArrayRef,
                            c10::IntArrayRef, int64_t, int64_t)>();
  return op;
}

inline const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bsconv_fused::backward", "")
          .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                       const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                       c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t, int64_t,
                       std::array<bool, kNumGrads>)>();
  return op;
}

}  // namespace bsconv
