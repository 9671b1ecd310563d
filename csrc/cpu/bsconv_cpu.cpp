// CPU implementations of bsconv_fused::forward / bsconv_fused::backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "cpu/kernels.h"
#include "host_checks.h"

namespace bsconv::cpu {
namespace {

// A null view for the placeholder of a gradient that was not asked for.
template <typename T>
View4<T> view4(const at::Tensor& t) {
  if (t.dim() != 4) return {nullptr, 0, 0, 0, 0};
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// ---------------------------------------------------------------------------------------------
// Forward: one task per (image, channel chunk, output tile).
template <typename scalar_t, typename acc_t>
void forward_kernel(const Geometry& g, const View4<const scalar_t>& x, const Weights<acc_t>& w,
                    const View4<scalar_t>& y) {
  const Tiling t = forward_tiling(g, sizeof(acc_t));
  const int64_t tasks = g.B * t.chunks * t.tiles();
  const int64_t ph_max = (t.th - 1) * g.sh + (g.Kh - 1) * g.dh + 1;
  const int64_t pw_max = (t.tw - 1) * g.sw + (g.Kw - 1) * g.dw + 1;
  const int64_t p_max = ph_max * pw_max;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas blas_guard;
    Scratch<acc_t> X(g.M * p_max), U(g.Mmid * p_max), V(t.nc * p_max), acc(t.tw);
    std::vector<int64_t> src_row(ph_max), src_col(pw_max);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task % t.tiles(), rest = task / t.tiles();
      const int64_t chunk = rest % t.chunks, b = rest / t.chunks;
      const int64_t oh0 = (tile / t.tiles_w) * t.th, ow0 = (tile % t.tiles_w) * t.tw;
      const int64_t th = std::min(t.th, g.Ho - oh0), tw = std::min(t.tw, g.Wo - ow0);
      const int64_t ph = (th - 1) * g.sh + (g.Kh - 1) * g.dh + 1;
      const int64_t pw = (tw - 1) * g.sw + (g.Kw - 1) * g.dw + 1;
      const int64_t P = ph * pw;
      remap_axis(oh0 * g.sh - g.pt, ph, g.H, g.mode, src_row.data());
      remap_axis(ow0 * g.sw - g.pl, pw, g.W, g.mode, src_col.data());
      const int64_t n0 = chunk * t.nc, rows = std::min(t.nc, g.N - n0);

      gather_patch(x, b, g.M, src_row.data(), ph, src_col.data(), pw, X.get());
      project(g, w, n0, rows, X.get(), P, U.get(), V.get());
      mid_transform(g, w, n0, rows, src_row.data(), ph, src_col.data(), pw, V.get());
      for (int64_t n = 0; n < rows; ++n) {
        depthwise_tile(g, V.get() + n * P, pw, w.dw + (n0 + n) * g.taps(),
                       w.bias ? w.bias[n0 + n] : acc_t(0), th, tw, &y(b, n0 + n, oh0, ow0),
                       y.sh, y.sw, acc.get());
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward.

enum GradIndex { kGx = 0, kGw1, kGw2, kGdw, kGbias, kGscale, kGshift };
using Mask = std::array<bool, 7>;

// One (output, tap) pair along an axis whose padded read position remaps to tile-local
// position `local`.
struct TapEntry {
  int64_t local, k, o;
};

// All (local, tap, output) triples of one axis for the v-space tile [lo, lo + count).
inline void axis_entries(int64_t lo, int64_t count, int64_t size, int64_t pad_lo,
                         int64_t pad_hi, int64_t K, int64_t s, int64_t d, int64_t out_size,
                         int mode, std::vector<TapEntry>& out) {
  out.clear();
  const int64_t padded = size + pad_lo + pad_hi;
  const int64_t last_read = (out_size - 1) * s + (K - 1) * d;
  for (int64_t rp = 0; rp < padded && rp <= last_read; ++rp) {
    const int64_t src = remap_index(rp - pad_lo, size, mode);
    if (src < lo || src >= lo + count) continue;
    for (int64_t k = 0; k < K && rp - k * d >= 0; ++k) {
      const int64_t q = rp - k * d;
      if (q % s == 0 && q / s < out_size) out.push_back({src - lo, k, q / s});
    }
  }
}

// Layout of one group's weight-gradient partials.
struct PartialLayout {
  int64_t w1 = 0, w2 = 0, dw = 0, scale = 0, shift = 0, size = 0;
  PartialLayout(const Geometry& g, const Mask& mask) {
    auto take = [&](bool need, int64_t n) {
      const int64_t at = size;
      size += need ? n : 0;
      return at;
    };
    w1 = take(mask[kGw1], g.proj1_rows() * g.M);
    w2 = take(mask[kGw2], g.N * g.Mmid);
    dw = take(mask[kGdw], g.N * g.taps());
    scale = take(mask[kGscale], g.N);
    shift = take(mask[kGshift], g.N);
  }
};

template <typename scalar_t, typename acc_t>
void backward_kernel(const Geometry& g, const View4<const scalar_t>& gy,
                     const View4<const scalar_t>& x, const Weights<acc_t>& w, const Mask& mask,
                     const View4<scalar_t>& gx, acc_t* grads_out /* PartialLayout */) {
  const PartialLayout lay(g, mask);
  const Tiling t = backward_tiling(g, sizeof(acc_t));
  const int64_t tasks = g.B * t.tiles();
  const bool need_gv =
      mask[kGx] || mask[kGw1] || mask[kGw2] || mask[kGscale] || mask[kGshift];
  if (tasks == 0) {
    std::fill(grads_out, grads_out + lay.size, acc_t(0));
    return;
  }
  // Fixed group count (not the thread count): each group sums its tiles in order into its own
  // partials, then the partials are added in group order.
  const int64_t budget = int64_t(64) << 20;
  const int64_t per_group = std::max<int64_t>(lay.size, 1) * int64_t(sizeof(acc_t));
  const int64_t groups =
      std::min(tasks, std::clamp<int64_t>(budget / per_group, 8, 64));
  Scratch<acc_t> partials(groups * lay.size);
  const int64_t P_max = t.th * t.tw;
  const int64_t N = g.N, M = g.M, Mm = g.Mmid, KK = g.taps();

  at::parallel_for(0, groups, 1, [&](int64_t gbegin, int64_t gend) {
    SingleThreadedBlas blas_guard;
    Scratch<acc_t> X(M * P_max), U(Mm * P_max), V(N * P_max), gv(N * P_max);
    Scratch<acc_t> A(g.has_mid() ? N * P_max : 0), gU(Mm * P_max), gxT(M * P_max);
    Scratch<acc_t> dw_tile(N * KK), mid_tile(2 * N);
    std::vector<TapEntry> rows, cols;
    for (int64_t grp = gbegin; grp < gend; ++grp) {
      acc_t* part = partials.get() + grp * lay.size;
      std::fill(part, part + lay.size, acc_t(0));
      const int64_t tb = grp * tasks / groups, te = (grp + 1) * tasks / groups;
      for (int64_t task = tb; task < te; ++task) {
        const int64_t tile = task % t.tiles(), b = task / t.tiles();
        const int64_t r0 = (tile / t.tiles_w) * t.th, c0 = (tile % t.tiles_w) * t.tw;
        const int64_t nr = std::min(t.th, g.H - r0), nc = std::min(t.tw, g.W - c0);
        const int64_t P = nr * nc;

        // 1. Recompute the patch: x, (u), v = pre-activation, act(v).
        std::vector<int64_t> src_r(nr), src_c(nc);
        for (int64_t i = 0; i < nr; ++i) src_r[i] = r0 + i;
        for (int64_t j = 0; j < nc; ++j) src_c[j] = c0 + j;
        gather_patch(x, b, M, src_r.data(), nr, src_c.data(), nc, X.get());
        project(g, w, 0, N, X.get(), P, U.get(), V.get());
        acc_t* act = V.get();
        if (g.has_mid()) {
          std::copy(V.get(), V.get() + N * P, A.get());
          mid_transform(g, w, 0, N, src_r.data(), nr, src_c.data(), nc, A.get());
          act = A.get();
        }

        // 2-3. Transposed depthwise into gv and the blueprint gradient, over the (output, tap)
        // pairs that read this tile.
        axis_entries(r0, nr, g.H, g.pt, g.pb, g.Kh, g.sh, g.dh, g.Ho, g.mode, rows);
        axis_entries(c0, nc, g.W, g.pl, g.pr, g.Kw, g.sw, g.dw, g.Wo, g.mode, cols);
        gv.zero();
        dw_tile.zero();
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* gyn = gy.data + b * gy.sb + n * gy.sc;
          const acc_t* taps = w.dw + n * KK;
          acc_t* gvn = gv.get() + n * P;
          const acc_t* an = act + n * P;
          acc_t* gdw = dw_tile.get() + n * KK;
          for (const TapEntry& er : rows) {
            const scalar_t* gyrow = gyn + er.o * gy.sh;
            acc_t* gvrow = gvn + er.local * nc;
            const acc_t* arow = an + er.local * nc;
            const acc_t* trow = taps + er.k * g.Kw;
            acc_t* drow = gdw + er.k * g.Kw;
            for (const TapEntry& ec : cols) {
              const acc_t go = acc_t(gyrow[ec.o * gy.sw]);
              gvrow[ec.local] += trow[ec.k] * go;
              drow[ec.k] += go * arow[ec.local];
            }
          }
        }
        if (mask[kGdw]) {
          for (int64_t i = 0; i < N * KK; ++i) part[lay.dw + i] += dw_tile.get()[i];
        }
        if (!need_gv) continue;

        // 4. Through the mid transform: gv <- act'(z) * scale * gv, with z = scale * v + shift.
        if (g.has_mid()) {
          for (int64_t n = 0; n < N; ++n) {
            const acc_t s = w.scale ? w.scale[n] : acc_t(1);
            const acc_t sh = w.shift ? w.shift[n] : acc_t(0);
            const acc_t* vn = V.get() + n * P;
            acc_t* gvn = gv.get() + n * P;
            // These two sums run over every pixel of the tile; double keeps them as accurate
            // as the pairwise sums of the unfused path.
            double gscale = 0, gshift = 0;
            for (int64_t p = 0; p < P; ++p) {
              const acc_t gz = gvn[p] * activate_grad(vn[p] * s + sh, g.act);
              gscale += double(gz * vn[p]);
              gshift += double(gz);
              gvn[p] = gz * s;
            }
            if (mask[kGscale]) part[lay.scale + n] += acc_t(gscale);
            if (mask[kGshift]) part[lay.shift + n] += acc_t(gshift);
          }
        }

        // 5. Projection adjoints: weight gradients and gx for this tile's pixels.
        const acc_t one = 1, zero = 0;
        if (g.subspace()) {
          if (mask[kGw2]) gemm(false, true, N, Mm, P, one, gv.get(), P, U.get(), P, one,
                               part + lay.w2, Mm);
          if (mask[kGw1] || mask[kGx]) {
            gemm(true, false, Mm, P, N, one, w.w2, Mm, gv.get(), P, zero, gU.get(), P);
            if (mask[kGw1]) gemm(false, true, Mm, M, P, one, gU.get(), P, X.get(), P, one,
                                 part + lay.w1, M);
            if (mask[kGx]) gemm(true, false, M, P, Mm, one, w.w1, M, gU.get(), P, zero,
                                gxT.get(), P);
          }
        } else {
          if (mask[kGw1]) gemm(false, true, N, M, P, one, gv.get(), P, X.get(), P, one,
                               part + lay.w1, M);
          if (mask[kGx]) gemm(true, false, M, P, N, one, w.w1, M, gv.get(), P, zero, gxT.get(),
                              P);
        }
        if (mask[kGx]) {
          for (int64_t m = 0; m < M; ++m) {
            for (int64_t i = 0; i < nr; ++i) {
              const acc_t* src = gxT.get() + m * P + i * nc;
              scalar_t* dst = &gx(b, m, r0 + i, c0);
              for (int64_t j = 0; j < nc; ++j) dst[j * gx.sw] = scalar_t(src[j]);
            }
          }
        }
      }
    }
  });

  // Fixed-order sum of the group partials.
  at::parallel_for(0, lay.size, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t s = 0;
      for (int64_t grp = 0; grp < groups; ++grp) s += partials.get()[grp * lay.size + i];
      grads_out[i] = s;
    }
  });
}

// Depthwise bias gradient: the sum of gy over batch and space, per channel, in a fixed order.
template <typename scalar_t, typename acc_t>
void bias_grad_kernel(const Geometry& g, const View4<const scalar_t>& gy, acc_t* out) {
  at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      acc_t s = 0;
      for (int64_t b = 0; b < g.B; ++b)
        for (int64_t i = 0; i < g.Ho; ++i)
          for (int64_t j = 0; j < g.Wo; ++j) s += acc_t(gy(b, n, i, j));
      out[n] = s;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Host entry points.

// Weights as dense accumulation-type tensors; the tensors keep the storage alive.
struct WeightTensors {
  at::Tensor w1, w2, dw, bias, scale, shift;
  WeightTensors(const Geometry& g, at::ScalarType acc, const at::Tensor& pw1,
                const std::optional<at::Tensor>& pw2, const at::Tensor& dwt,
                const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& s,
                const std::optional<at::Tensor>& t) {
    auto conv = [&](const at::Tensor& x) { return x.to(acc).contiguous(); };
    w1 = conv(pw1.reshape({g.proj1_rows(), g.M}));
    if (pw2) w2 = conv(pw2->reshape({g.N, g.Mmid}));
    dw = conv(dwt.reshape({g.N, g.taps()}));
    if (b) bias = conv(*b);
    if (s) scale = conv(*s);
    if (t) shift = conv(*t);
  }
  template <typename acc_t>
  Weights<acc_t> get() const {
    auto p = [](const at::Tensor& x) {
      return x.defined() ? x.data_ptr<acc_t>() : static_cast<acc_t*>(nullptr);
    };
    return {p(w1), p(w2), p(dw), p(bias), p(scale), p(shift)};
  }
};

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& pw1,
                       const std::optional<at::Tensor>& pw2, const at::Tensor& dw,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& scale,
                       const std::optional<at::Tensor>& shift, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t padding_mode,
                       int64_t activation) {
  const Geometry g = make_geometry("bsconv_fused::forward", x, pw1, pw2, dw, bias, scale, shift,
                                   stride, padding, dilation, padding_mode, activation);
  const auto fmt = x.suggest_memory_format();
  const at::Tensor xc = x.contiguous(fmt);
  at::Tensor y = at::empty({g.B, g.N, g.Ho, g.Wo}, x.options().memory_format(fmt));
  if (y.numel() == 0) return y;
  const auto acc = at::toOpMathType(x.scalar_type());
  const WeightTensors wt(g, acc, pw1, pw2, dw, bias, scale, shift);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bsconv_forward",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    forward_kernel<scalar_t, acc_t>(
                                        g, view4<const scalar_t>(xc), wt.get<acc_t>(),
                                        view4<scalar_t>(y));
                                  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& pw1,
             const std::optional<at::Tensor>& pw2, const at::Tensor& dw,
             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
             const std::optional<at::Tensor>& shift, at::IntArrayRef stride,
             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t padding_mode,
             int64_t activation, std::array<bool, 7> output_mask) {
  const char* op = "bsconv_fused::backward";
  const Geometry g = make_geometry(op, x, pw1, pw2, dw, bias, scale, shift, stride, padding,
                                   dilation, padding_mode, activation);
  check_grad_y(op, grad_y, x, g);
  const Mask mask = requested_gradients(output_mask, g);

  const auto fmt = x.suggest_memory_format();
  const at::Tensor xc = x.contiguous(fmt);
  const auto acc = at::toOpMathType(x.scalar_type());
  const PartialLayout lay(g, mask);
  at::Tensor flat = at::zeros({lay.size}, x.options().dtype(acc));
  at::Tensor gbias_acc = mask[kGbias] ? at::zeros({g.N}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor gx = mask[kGx] ? at::empty(x.sizes(), x.options().memory_format(fmt))
                            : x.new_empty({0});

  const WeightTensors wt(g, acc, pw1, pw2, dw, bias, scale, shift);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bsconv_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto gyv = view4<const scalar_t>(grad_y);
        if (g.B > 0 && (lay.size > 0 || mask[kGx])) {
          backward_kernel<scalar_t, acc_t>(g, gyv, view4<const scalar_t>(xc), wt.get<acc_t>(),
                                           mask, view4<scalar_t>(gx), flat.data_ptr<acc_t>());
        }
        if (mask[kGbias] && g.B > 0) bias_grad_kernel<scalar_t, acc_t>(g, gyv,
                                                                      gbias_acc.data_ptr<acc_t>());
      });

  auto piece = [&](int i, int64_t offset, int64_t n, at::IntArrayRef shape) {
    if (!mask[i]) return x.new_empty({0});
    // A copy even when the dtype matches: the outputs must not alias one buffer.
    return flat.narrow(0, offset, n).view(shape).to(x.scalar_type(), false, true);
  };
  auto empty = [&] { return x.new_empty({0}); };  // a fresh one per slot: outputs never alias
  return {gx,
          piece(kGw1, lay.w1, g.proj1_rows() * g.M, pw1.sizes()),
          pw2 ? piece(kGw2, lay.w2, g.N * g.Mmid, pw2->sizes()) : empty(),
          piece(kGdw, lay.dw, g.N * g.taps(), dw.sizes()),
          mask[kGbias] ? gbias_acc.to(x.scalar_type(), false, true) : empty(),
          piece(kGscale, lay.scale, g.N, {g.N}),
          piece(kGshift, lay.shift, g.N, {g.N})};
}

}  // namespace

TORCH_LIBRARY_IMPL(bsconv_fused, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
}

}  // namespace bsconv::cpu
