// Argument checks of the ops, shared by the CPU and CUDA entry points: every bad input fails
// here with a message naming the argument, before any kernel runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/OptionalArrayRef.h>

#include <array>
#include <optional>

#include "common/bsconv_math.h"
#include "common/geometry.h"

namespace bsconv {

inline void check_same(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name,
              " must have the dtype of x (", x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of x (",
              x.device(), "), got ", t.device());
}

inline void check_vector(const char* op, const char* name, const std::optional<at::Tensor>& t,
                         const at::Tensor& x, int64_t n) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, op, ": ", name, " must have shape [", n,
              "], got ", t->sizes());
  check_same(op, name, *t, x);
}

// Validates the op arguments and returns the geometry. `op` prefixes every message.
inline Geometry make_geometry(const char* op, const at::Tensor& x, const at::Tensor& pw1,
                              const std::optional<at::Tensor>& pw2, const at::Tensor& dw,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& shift, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t padding_mode, int64_t activation) {
  TORCH_CHECK(x.dim() == 4, op, ": x must have 4 dimensions [B, M, H, W], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": x must be float64, float32, bfloat16 or float16, got ", x.scalar_type());
  Geometry g;
  g.B = x.size(0);
  g.M = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  TORCH_CHECK(pw1.dim() == 4 && pw1.size(1) == g.M && pw1.size(2) == 1 && pw1.size(3) == 1 &&
                  pw1.size(0) >= 1,
              op, ": pw1_weight must have shape [C_out, ", g.M, ", 1, 1], got ", pw1.sizes());
  check_same(op, "pw1_weight", pw1, x);
  int64_t channels = pw1.size(0);
  if (pw2.has_value()) {
    TORCH_CHECK(pw2->dim() == 4 && pw2->size(1) == channels && pw2->size(2) == 1 &&
                    pw2->size(3) == 1 && pw2->size(0) >= 1,
                op, ": pw2_weight must have shape [N, ", channels, ", 1, 1], got ",
                pw2->sizes());
    check_same(op, "pw2_weight", *pw2, x);
    g.Mmid = channels;
    channels = pw2->size(0);
  }
  g.N = channels;
  TORCH_CHECK(dw.dim() == 4 && dw.size(0) == g.N && dw.size(1) == 1 && dw.size(2) >= 1 &&
                  dw.size(3) >= 1,
              op, ": dw_weight must have shape [", g.N, ", 1, K_h, K_w], got ", dw.sizes());
  check_same(op, "dw_weight", dw, x);
  check_vector(op, "dw_bias", bias, x, g.N);
  check_vector(op, "mid_scale", scale, x, g.N);
  check_vector(op, "mid_shift", shift, x, g.N);
  g.has_bias = bias.has_value();
  g.has_scale = scale.has_value();
  g.has_shift = shift.has_value();
  g.Kh = dw.size(2);
  g.Kw = dw.size(3);

  TORCH_CHECK(stride.size() == 2, op, ": stride must have 2 values, got ", stride);
  TORCH_CHECK(dilation.size() == 2, op, ": dilation must have 2 values, got ", dilation);
  TORCH_CHECK(padding.size() == 4, op, ": padding must have 4 values (top, bottom, left, right), got ",
              padding);
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op, ": dilation must be positive, got ",
              dilation);
  for (auto p : padding) {
    TORCH_CHECK(p >= 0, op, ": padding must be non-negative, got ", padding);
  }
  g.sh = stride[0];
  g.sw = stride[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.pt = padding[0];
  g.pb = padding[1];
  g.pl = padding[2];
  g.pr = padding[3];
  TORCH_CHECK(padding_mode >= kZeros && padding_mode <= kCircular, op,
              ": padding_mode must be 0 (zeros), 1 (reflect), 2 (replicate) or 3 (circular), "
              "got ", padding_mode);
  TORCH_CHECK(activation >= kActNone && activation <= kActHardswish, op,
              ": activation must be 0 (none), 1 (relu), 2 (relu6) or 3 (hardswish), got ",
              activation);
  g.mode = int(padding_mode);
  g.act = int(activation);
  if (g.mode == kReflect || g.mode == kCircular) {
    const bool reflect = g.mode == kReflect;
    const int64_t pads[4] = {g.pt, g.pb, g.pl, g.pr};
    for (int i = 0; i < 4; ++i) {
      const int64_t size = i < 2 ? g.H : g.W;
      const bool bad = pads[i] > 0 && (reflect ? pads[i] >= size : pads[i] > size);
      TORCH_CHECK(!bad, op, ": ", reflect ? "reflect" : "circular", " padding (", pads[i],
                  ") must be ", reflect ? "smaller than" : "at most", " the input ",
                  i < 2 ? "height (" : "width (", size, ")");
    }
  }
  const int64_t eff_h = g.dh * (g.Kh - 1) + 1, eff_w = g.dw * (g.Kw - 1) + 1;
  TORCH_CHECK(g.H + g.pt + g.pb >= eff_h && g.W + g.pl + g.pr >= eff_w, op, ": kernel size (",
              g.Kh, ", ", g.Kw, ") with dilation (", g.dh, ", ", g.dw,
              ") is larger than the padded input (", g.H + g.pt + g.pb, ", ",
              g.W + g.pl + g.pr, ")");
  g.Ho = conv_out_size(g.H, g.pt, g.pb, g.Kh, g.sh, g.dh);
  g.Wo = conv_out_size(g.W, g.pl, g.pr, g.Kw, g.sw, g.dw);
  return g;
}

// The backward's incoming gradient must have the output's shape, dtype and device.
inline void check_grad_y(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                         const Geometry& g) {
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.size(0) == g.B && grad_y.size(1) == g.N &&
                  grad_y.size(2) == g.Ho && grad_y.size(3) == g.Wo,
              op, ": grad_y must have shape [", g.B, ", ", g.N, ", ", g.Ho, ", ", g.Wo,
              "], got ", grad_y.sizes());
  check_same(op, "grad_y", grad_y, x);
}

// The gradients asked for whose inputs exist, in the order (x, pw1_weight, pw2_weight,
// dw_weight, dw_bias, mid_scale, mid_shift).
inline std::array<bool, 7> requested_gradients(const std::array<bool, 7>& output_mask,
                                               const Geometry& g) {
  const bool present[7] = {true, true, g.subspace(), true, g.has_bias, g.has_scale, g.has_shift};
  std::array<bool, 7> mask;
  for (int i = 0; i < 7; ++i) mask[i] = output_mask[i] && present[i];
  return mask;
}

}  // namespace bsconv
