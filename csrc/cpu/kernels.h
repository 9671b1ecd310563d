// Fused BSConv CPU kernels (forward and one-pass backward) on raw pointers.
//
// Structure (shared/design/bsconv.md, "A structure that keeps the options from multiplying"):
//   patch stage     gather_patch + project: the patch of v a tile needs, with all padding,
//                   projection and mid-transform logic;
//   depthwise stage depthwise_tile: a plain valid depthwise conv over the stored patch.
// The backward mirrors it over disjoint tiles of v-space: the depthwise transpose and the
// blueprint gradient read gy through (output, tap) pairs whose padded read position remaps into
// the tile, then the adjoint of the patch stage produces gx for the tile's own pixels (no
// atomics) and per-group weight-gradient partials summed in a fixed order (deterministic, and
// independent of the thread count).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "common/bsconv_math.h"
#include "common/geometry.h"
#include "cpu/gemm.h"

namespace bsconv::cpu {

// A 4-D strided view (any memory format); element (b, c, h, w).
template <typename T>
struct View4 {
  T* data;
  int64_t sb, sc, sh, sw;
  T& operator()(int64_t b, int64_t c, int64_t h, int64_t w) const {
    return data[b * sb + c * sc + h * sh + w * sw];
  }
};

// Weights converted once per call to the accumulation type, dense row-major.
template <typename acc_t>
struct Weights {
  const acc_t* w1;     // [proj1_rows, M]
  const acc_t* w2;     // [N, Mmid] or nullptr
  const acc_t* dw;     // [N, Kh*Kw]
  const acc_t* bias;   // [N] or nullptr
  const acc_t* scale;  // [N] or nullptr
  const acc_t* shift;  // [N] or nullptr
};

// 64-byte aligned scratch (a consistent alignment keeps the BLAS bitwise reproducible).
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) : n_(n) {
    const size_t bytes = ((size_t(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64) * 64;
    ptr_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(ptr_ != nullptr, "bsconv_fused: out of memory allocating ", bytes,
                " bytes of scratch");
  }
  T* get() const { return ptr_.get(); }
  void zero() const { std::memset(ptr_.get(), 0, size_t(n_) * sizeof(T)); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  int64_t n_;
  std::unique_ptr<T, Free> ptr_;
};

// ---------------------------------------------------------------------------------------------
// Tiling. One function decides the tile sizes for a call, from the channel counts: a tile's
// patch buffers should stay within a per-core cache budget.
struct Tiling {
  int64_t th = 1, tw = 1;  // forward: output tile; backward: v-space tile
  int64_t nc = 1;          // forward: channels per chunk
  int64_t tiles_h = 0, tiles_w = 0, chunks = 1;
  int64_t tiles() const { return tiles_h * tiles_w; }
};

constexpr int64_t kCacheBudgetBytes = 384 * 1024;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Halves the larger side until `bytes(th, tw)` fits the budget (or the tile is one pixel).
template <typename F>
void shrink_to_budget(int64_t& th, int64_t& tw, F bytes) {
  while (bytes(th, tw) > kCacheBudgetBytes && (th > 1 || tw > 1)) {
    if (th >= tw) th = ceil_div(th, 2); else tw = ceil_div(tw, 2);
  }
}

inline Tiling forward_tiling(const Geometry& g, int64_t acc_size) {
  Tiling t;
  // BSConv-S recomputes the M' subspace per chunk, so it keeps all N channels in one chunk.
  t.nc = g.subspace() ? g.N : std::min<int64_t>(g.N, 128);
  t.chunks = ceil_div(g.N, t.nc);
  t.th = std::max<int64_t>(g.Ho, 1);
  t.tw = std::max<int64_t>(g.Wo, 1);
  const int64_t per_pos = (g.M + g.Mmid + t.nc) * acc_size;
  shrink_to_budget(t.th, t.tw, [&](int64_t th, int64_t tw) {
    return ((th - 1) * g.sh + (g.Kh - 1) * g.dh + 1) * ((tw - 1) * g.sw + (g.Kw - 1) * g.dw + 1) *
           per_pos;
  });
  // Enough tasks to keep every core busy on single-image calls.
  while (g.B * t.chunks * ceil_div(g.Ho, t.th) * ceil_div(g.Wo, t.tw) < 16 &&
         (t.th > 8 || t.tw > 8)) {
    if (t.th >= t.tw) t.th = ceil_div(t.th, 2); else t.tw = ceil_div(t.tw, 2);
  }
  t.tiles_h = ceil_div(g.Ho, t.th);
  t.tiles_w = ceil_div(g.Wo, t.tw);
  return t;
}

inline Tiling backward_tiling(const Geometry& g, int64_t acc_size) {
  Tiling t;
  t.th = std::max<int64_t>(g.H, 1);
  t.tw = std::max<int64_t>(g.W, 1);
  // x and gx, u and gu, v (pre-activation), act(v) and gv per v-space position.
  const int64_t per_pos = (2 * g.M + 2 * g.Mmid + 3 * g.N) * acc_size;
  shrink_to_budget(t.th, t.tw, [&](int64_t th, int64_t tw) { return th * tw * per_pos; });
  t.tiles_h = g.H > 0 ? ceil_div(g.H, t.th) : 0;
  t.tiles_w = g.W > 0 ? ceil_div(g.W, t.tw) : 0;
  return t;
}

// ---------------------------------------------------------------------------------------------
// Patch stage.

// Source pixel of each patch row/column (image coordinate origin = first patch position), or -1
// for a zero. `origin` is the image coordinate of patch position 0.
inline void remap_axis(int64_t origin, int64_t count, int64_t size, int mode, int64_t* src) {
  for (int64_t i = 0; i < count; ++i) src[i] = remap_index(origin + i, size, mode);
}

// X[m][r*pw + c] = x[b, m, src_row[r], src_col[c]] (0 where either source is -1).
template <typename scalar_t, typename acc_t>
void gather_patch(const View4<const scalar_t>& x, int64_t b, int64_t M, const int64_t* src_row,
                  int64_t ph, const int64_t* src_col, int64_t pw, acc_t* X) {
  const int64_t P = ph * pw;
  if (x.sc == 1) {
    // channels_last: channels are contiguous, so walk pixels outside and channels inside.
    for (int64_t r = 0; r < ph; ++r) {
      for (int64_t c = 0; c < pw; ++c) {
        const int64_t p = r * pw + c;
        if (src_row[r] < 0 || src_col[c] < 0) {
          for (int64_t m = 0; m < M; ++m) X[m * P + p] = acc_t(0);
        } else {
          const scalar_t* px = &x(b, 0, src_row[r], src_col[c]);
          for (int64_t m = 0; m < M; ++m) X[m * P + p] = acc_t(px[m]);
        }
      }
    }
    return;
  }
  for (int64_t m = 0; m < M; ++m) {
    acc_t* Xm = X + m * P;
    for (int64_t r = 0; r < ph; ++r) {
      acc_t* dst = Xm + r * pw;
      if (src_row[r] < 0) {
        for (int64_t c = 0; c < pw; ++c) dst[c] = acc_t(0);
        continue;
      }
      const scalar_t* row = &x(b, m, src_row[r], 0);
      for (int64_t c = 0; c < pw; ++c) {
        dst[c] = src_col[c] < 0 ? acc_t(0) : acc_t(row[src_col[c] * x.sw]);
      }
    }
  }
}

// V[rows][P] = projection of X (W1 X, or W2 (W1 X) with U kept in `U`), for output channels
// [n0, n0 + rows).
template <typename acc_t>
void project(const Geometry& g, const Weights<acc_t>& w, int64_t n0, int64_t rows,
             const acc_t* X, int64_t P, acc_t* U, acc_t* V) {
  if (g.subspace()) {
    gemm(false, false, g.Mmid, P, g.M, acc_t(1), w.w1, g.M, X, P, acc_t(0), U, P);
    gemm(false, false, rows, P, g.Mmid, acc_t(1), w.w2 + n0 * g.Mmid, g.Mmid, U, P, acc_t(0),
         V, P);
  } else {
    gemm(false, false, rows, P, g.M, acc_t(1), w.w1 + n0 * g.M, g.M, X, P, acc_t(0), V, P);
  }
}

// In place: V = act(scale * V + shift) at image pixels, 0 at zero-padding positions. (Without a
// mid transform V is already 0 there, since X was.)
template <typename acc_t>
void mid_transform(const Geometry& g, const Weights<acc_t>& w, int64_t n0, int64_t rows,
                   const int64_t* src_row, int64_t ph, const int64_t* src_col, int64_t pw,
                   acc_t* V) {
  if (!g.has_mid()) return;
  const int64_t P = ph * pw;
  for (int64_t n = 0; n < rows; ++n) {
    const acc_t s = w.scale ? w.scale[n0 + n] : acc_t(1);
    const acc_t t = w.shift ? w.shift[n0 + n] : acc_t(0);
    acc_t* Vn = V + n * P;
    for (int64_t r = 0; r < ph; ++r) {
      for (int64_t c = 0; c < pw; ++c) {
        acc_t& v = Vn[r * pw + c];
        v = (src_row[r] < 0 || src_col[c] < 0) ? acc_t(0) : activate(v * s + t, g.act);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Depthwise stage: valid depthwise conv of one channel's patch into a th x tw output tile.
// `acc` is a tw-long row accumulator.
template <typename scalar_t, typename acc_t>
void depthwise_tile(const Geometry& g, const acc_t* Vn, int64_t pw, const acc_t* taps,
                    acc_t bias, int64_t th, int64_t tw, scalar_t* out, int64_t out_sh,
                    int64_t out_sw, acc_t* acc) {
  for (int64_t i = 0; i < th; ++i) {
    for (int64_t j = 0; j < tw; ++j) acc[j] = bias;
    for (int64_t kh = 0; kh < g.Kh; ++kh) {
      const acc_t* row = Vn + (i * g.sh + kh * g.dh) * pw;
      for (int64_t kw = 0; kw < g.Kw; ++kw) {
        const acc_t wk = taps[kh * g.Kw + kw];
        const acc_t* src = row + kw * g.dw;
        if (g.sw == 1) {
          for (int64_t j = 0; j < tw; ++j) acc[j] += wk * src[j];
        } else {
          for (int64_t j = 0; j < tw; ++j) acc[j] += wk * src[j * g.sw];
        }
      }
    }
    scalar_t* orow = out + i * out_sh;
    for (int64_t j = 0; j < tw; ++j) orow[j * out_sw] = scalar_t(acc[j]);
  }
}

}  // namespace bsconv::cpu
