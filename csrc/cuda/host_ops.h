// The CUDA ops' host logic on torch tensors, written once for two backends: the real GPU
// (bsconv_cuda.cu: device pointers, the current stream) and the CUDA emulator (csrc/emu_ext:
// CPU tensors copied into guarded buffers). A backend provides
//   Limits limits();  cudaStream_t stream();
//   template <class T> T* in(const at::Tensor&)   pointer the kernel reads
//   template <class T> T* out(at::Tensor&)        pointer the kernel writes (copied back by finish)
//   void finish();                                 after the launches
//   at::TensorOptions opts(const at::Tensor&)      where scratch tensors live
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <array>
#include <tuple>

#include "cuda/launchers.h"
#include "host_checks.h"

namespace bsconv::cuda {

template <typename T>
struct DeviceScalar {
  using type = T;
};
template <>
struct DeviceScalar<at::Half> {
  using type = __half;
};
template <>
struct DeviceScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};

inline void strides4(const at::Tensor& t, int64_t* s) {
  for (int i = 0; i < 4; ++i) s[i] = t.dim() == 4 ? t.stride(i) : 0;
}

// Weights as dense tensors of x's dtype, in the layouts the kernels index.
struct DenseWeights {
  at::Tensor w1, w2, dw, bias, scale, shift;
  DenseWeights(const Geometry& g, const at::Tensor& pw1, const std::optional<at::Tensor>& pw2,
               const at::Tensor& dwt, const std::optional<at::Tensor>& b,
               const std::optional<at::Tensor>& s, const std::optional<at::Tensor>& t) {
    w1 = pw1.reshape({g.proj1_rows(), g.M}).contiguous();
    if (pw2) w2 = pw2->reshape({g.N, g.Mmid}).contiguous();
    dw = dwt.reshape({g.N, g.taps()}).contiguous();
    if (b) bias = b->contiguous();
    if (s) scale = s->contiguous();
    if (t) shift = t->contiguous();
  }
  template <typename T, typename Backend>
  Inputs<T> inputs(Backend& be, const at::Tensor& x) const {
    auto p = [&](const at::Tensor& t) -> const T* { return t.defined() ? be.template in<T>(t) : nullptr; };
    Inputs<T> in;
    in.x = p(x);
    strides4(x, in.xs);
    in.w1 = p(w1);
    in.w2 = p(w2);
    in.dw = p(dw);
    in.bias = p(bias);
    in.scale = p(scale);
    in.shift = p(shift);
    return in;
  }
};

template <typename Backend>
at::Tensor forward_impl(Backend& be, const at::Tensor& x, const at::Tensor& pw1,
                        const std::optional<at::Tensor>& pw2, const at::Tensor& dw,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& scale,
                        const std::optional<at::Tensor>& shift, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t padding_mode,
                        int64_t activation, int proj_override) {
  const char* op = "bsconv_fused::forward";
  const Geometry g = make_geometry(op, x, pw1, pw2, dw, bias, scale, shift, stride, padding,
                                   dilation, padding_mode, activation);
  const auto fmt = x.suggest_memory_format();
  const at::Tensor xc = x.contiguous(fmt);
  at::Tensor y = at::empty({g.B, g.N, g.Ho, g.Wo}, x.options().memory_format(fmt));
  if (y.numel() == 0) return y;
  const DenseWeights w(g, pw1, pw2, dw, bias, scale, shift);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bsconv_forward_cuda",
                                  [&] {
    using T = typename DeviceScalar<scalar_t>::type;
    const int proj = proj_override >= 0 ? proj_override : be.template proj<T>();
    const ForwardConfig c = forward_config(g, proj, int64_t(sizeof(T)), be.limits());
    TORCH_CHECK(c.ok, op, ": ", c.error);
    ForwardParams<T> p;
    p.in = w.template inputs<T>(be, xc);
    p.y = be.template out<T>(y);
    strides4(y, p.ys);
    p.g = g;
    p.t = c;
    launch_forward(p, c, proj, be.stream());
    be.finish();
  });
  return y;
}

using GradTuple =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename Backend>
GradTuple backward_impl(Backend& be, const at::Tensor& grad_y, const at::Tensor& x,
                        const at::Tensor& pw1, const std::optional<at::Tensor>& pw2,
                        const at::Tensor& dw, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& scale,
                        const std::optional<at::Tensor>& shift, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t padding_mode,
                        int64_t activation, std::array<bool, 7> output_mask, bool deterministic,
                        int proj_override) {
  const char* op = "bsconv_fused::backward";
  const Geometry g = make_geometry(op, x, pw1, pw2, dw, bias, scale, shift, stride, padding,
                                   dilation, padding_mode, activation);
  check_grad_y(op, grad_y, x, g);
  const std::array<bool, 7> asked = requested_gradients(output_mask, g);
  const int bits[7] = {kNeedX, kNeedW1, kNeedW2, kNeedDw, kNeedBias, kNeedScale, kNeedShift};
  int need = 0;
  for (int i = 0; i < 7; ++i) need |= asked[i] ? bits[i] : 0;

  const auto fmt = x.suggest_memory_format();
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor gyc = grad_y.contiguous(fmt);
  const auto acc = at::toOpMathType(x.scalar_type());
  const PartialOffsets off(g);
  at::Tensor total = at::zeros({off.shift + g.N}, be.opts(x).dtype(acc));
  at::Tensor gx = (need & kNeedX) ? at::empty(x.sizes(), x.options().memory_format(fmt))
                                  : x.new_empty({0});
  const DenseWeights w(g, pw1, pw2, dw, bias, scale, shift);
  if (g.B > 0 && need != 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "bsconv_backward_cuda", [&] {
          using T = typename DeviceScalar<scalar_t>::type;
          using acc_t = typename AccOf<T>::type;
          const int proj = proj_override >= 0 ? proj_override : be.template proj<T>();
          const BackwardConfig c =
              backward_config(g, proj, int64_t(sizeof(T)), deterministic, be.limits());
          TORCH_CHECK(c.ok, op, ": ", c.error);
          BackwardParams<T> p;
          p.in = w.template inputs<T>(be, xc);
          p.gy = be.template in<T>(gyc);
          strides4(gyc, p.gys);
          p.gx = (need & kNeedX) ? be.template out<T>(gx) : nullptr;
          strides4(gx, p.gxs);
          p.need = need;
          p.g = g;
          p.t = c;
          at::Tensor partials;
          if (deterministic) {
            partials = at::zeros({c.grid * c.partial_size}, be.opts(x).dtype(acc));
            p.partials = be.template out<acc_t>(partials);
          } else {
            p.partials = be.template out<acc_t>(total);
          }
          launch_backward(p, c, proj, be.stream());
          if (deterministic) {
            launch_reduce_partials(be.template in<acc_t>(partials), c.grid, c.partial_size,
                                   be.template out<acc_t>(total), be.stream());
          }
          be.finish();
        });
  }
  auto piece = [&](int bit, int64_t offset, int64_t n, at::IntArrayRef shape) {
    if (!(need & bit)) return x.new_empty({0});
    return total.narrow(0, offset, n).view(shape).to(x.options(), false, true);
  };
  return {gx,
          piece(kNeedW1, off.w1, g.proj1_rows() * g.M, pw1.sizes()),
          pw2 ? piece(kNeedW2, off.w2, g.N * g.Mmid, pw2->sizes()) : x.new_empty({0}),
          piece(kNeedDw, off.dw, g.N * g.taps(), dw.sizes()),
          piece(kNeedBias, off.bias, g.N, {g.N}),
          piece(kNeedScale, off.scale, g.N, {g.N}),
          piece(kNeedShift, off.shift, g.N, {g.N})};
}

}  // namespace bsconv::cuda
