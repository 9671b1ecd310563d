// Fused BSConv CUDA kernels: device code only (no torch types). Compiled by nvcc for GPUs and, the
// same source, by the host compiler under the CUDA emulator (cuda/emu) for the tests.
//
// Forward, one launch: each block task is (image, group of channel chunks, output tile). It
// gathers the input patch the tile reads (padding remap), projects it into shared memory
// (BSConv-S: first the whole M' subspace of the patch, shared by the group's chunks), applies the
// mid transform, then runs the valid depthwise conv from shared memory and writes y, chunk by
// chunk. v never reaches global memory.
//
// Backward, one launch: each block task is (image, v-space tile) with all N channels. It
// recomputes v (and u) for the tile, then per channel: the blueprint gradient over the (output,
// tap) pairs reading the tile, the bias gradient over the outputs assigned to the tile, gv by the
// transposed depthwise and the mid-transform adjoint; then the projection adjoints: weight
// gradients and gx for the tile's own pixels (disjoint, no atomics). Weight gradients go to
// atomics, or in deterministic mode to per-block partials summed by reduce_partials_kernel.
// Math and algorithms: shared/design/bsconv.md.
#pragma once

#include <type_traits>

#include "common/bsconv_math.h"
#include "common/geometry.h"
#include "cuda/emu/launch.h"
#include "cuda/tile_config.h"

// Test-only fault injection (tests/test_planted_bugs.py proves the emulator catches these in the
// real kernel): 1 drops a barrier, 2 writes past the output tile, 3 reads padding from x[-1].
// Always 0 in the extension builds.
#ifndef BSCONV_PLANT
#define BSCONV_PLANT 0
#endif

namespace bsconv::cuda {

// ------------------------------------------------------------------------------------------------
// Types and conversions.

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <int PROJ, typename acc_t>
struct OperandOf {
  using type = acc_t;  // SIMT and TF32 (float storage)
};
template <typename acc_t>
struct OperandOf<kWmmaHalf, acc_t> {
  using type = __half;
};
template <typename acc_t>
struct OperandOf<kWmmaBf16, acc_t> {
  using type = __nv_bfloat16;
};

__device__ __forceinline__ float to_float_acc(float v) { return v; }
__device__ __forceinline__ double to_float_acc(double v) { return v; }
__device__ __forceinline__ float to_float_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct Cast;
template <>
struct Cast<float> {
  __device__ __forceinline__ static float from(float v) { return v; }
};
template <>
struct Cast<double> {
  __device__ __forceinline__ static double from(double v) { return v; }
};
template <>
struct Cast<__half> {
  __device__ __forceinline__ static __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Cast<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

template <typename op_t, typename acc_t>
__device__ __forceinline__ op_t to_operand(acc_t v) {
  if constexpr (sizeof(op_t) == 2) {
    return Cast<op_t>::from(float(v));
  } else {
    return op_t(v);
  }
}

// ------------------------------------------------------------------------------------------------
// Parameters (plain data, passed by value).

template <typename scalar_t>
struct Inputs {
  const scalar_t* x;
  int64_t xs[4];          // strides of x (b, c, h, w)
  const scalar_t* w1;     // [proj1_rows, M]
  const scalar_t* w2;     // [N, Mmid] or null
  const scalar_t* dw;     // [N, Kh * Kw]
  const scalar_t* bias;   // [N] or null
  const scalar_t* scale;  // [N] or null
  const scalar_t* shift;  // [N] or null
};

template <typename scalar_t>
struct ForwardParams {
  Inputs<scalar_t> in;
  scalar_t* y;
  int64_t ys[4];
  Geometry g;
  ForwardTiles t;
};

// Which gradients to compute (bits) and where the weight gradients go.
enum GradBit : int {
  kNeedX = 1,
  kNeedW1 = 2,
  kNeedW2 = 4,
  kNeedDw = 8,
  kNeedBias = 16,
  kNeedScale = 32,
  kNeedShift = 64
};

// Offsets inside one partial (or the final accumulator): [w1 | w2 | dw | bias | scale | shift].
struct PartialOffsets {
  int64_t w1, w2, dw, bias, scale, shift;
  __host__ __device__ explicit PartialOffsets(const Geometry& g)
      : w1(0),
        w2(g.proj1_rows() * g.M),
        dw(w2 + g.N * g.Mmid),
        bias(dw + g.N * g.taps()),
        scale(bias + g.N),
        shift(scale + g.N) {}
};

template <typename scalar_t>
struct BackwardParams {
  Inputs<scalar_t> in;
  const scalar_t* gy;
  int64_t gys[4];
  scalar_t* gx;
  int64_t gxs[4];
  // Accumulation-type weight gradients: deterministic mode, one PartialOffsets-laid-out slice per
  // block (zeroed by the host); otherwise one shared slice updated with atomics.
  typename AccOf<scalar_t>::type* partials;
  int need;
  Geometry g;
  BackwardTiles t;
};

// ------------------------------------------------------------------------------------------------
// Block-wide building blocks.

__device__ __forceinline__ int thread_id() { return int(threadIdx.x); }
__device__ __forceinline__ int block_threads() { return int(blockDim.x); }

template <typename acc_t>
__device__ __forceinline__ void accumulate(acc_t* dst, acc_t v, bool use_atomics) {
  if (use_atomics) {
    atomicAdd(dst, v);
  } else {
    *dst += v;
  }
}

template <typename T>
__device__ void block_fill_zero(T* p, int64_t n) {
  for (int64_t i = thread_id(); i < n; i += block_threads()) p[i] = T(0);
}

// C[r][c] += sum_k A(r, k0 + k) * B[k][c] for r < rows, c < cols (a multiple of 16), k < kChunk,
// with A(r, k) = a[r * lda + k] read from global memory (zero for k >= kdim) and B staged in
// shared memory (row stride ldb). C is in shared memory (row stride ldc, rows_pad rows).
// SIMT: each thread owns whole elements of C. WMMA: each warp owns 16 x 16 tiles of C, stages
// its A tile in its own `aw` slice (16 x kChunk) and runs the tensor-core product.
template <int PROJ, typename scalar_t, typename acc_t, typename op_t>
__device__ void block_gemm_acc(acc_t* C, int64_t ldc, int64_t rows, int64_t rows_pad,
                               int64_t cols, const scalar_t* a, int64_t lda, int64_t k0,
                               int64_t kdim, const op_t* B, int64_t ldb, op_t* aw) {
  const int64_t kc = kdim - k0 < kChunk ? kdim - k0 : kChunk;
  if constexpr (PROJ == kSimt) {
    (void)rows_pad;
    (void)aw;
    for (int64_t e = thread_id(); e < rows * cols; e += block_threads()) {
      const int64_t r = e / cols, c = e % cols;
      const scalar_t* ar = a + r * lda + k0;
      acc_t s = 0;
      for (int64_t k = 0; k < kc; ++k) s += acc_t(to_float_acc(ar[k])) * acc_t(B[k * ldb + c]);
      C[r * ldc + c] += s;
    }
  } else {
    using namespace nvcuda;
    const int warp = thread_id() / 32, lane = thread_id() % 32;
    const int warps = block_threads() / 32;
    op_t* my_aw = aw + warp * 16 * kChunk;
    const int64_t rt_count = rows_pad / 16, ct_count = cols / 16;
    for (int64_t t = warp; t < rt_count * ct_count; t += warps) {
      const int64_t rt = t / ct_count, ct = t % ct_count;
      for (int e = lane; e < 16 * kChunk; e += 32) {
        const int64_t r = rt * 16 + e / kChunk, k = e % kChunk;
        const float v = (r < rows && k < kc) ? to_float_acc(a[r * lda + k0 + k]) : 0.0f;
        if constexpr (PROJ == kWmmaTf32) {
          my_aw[e] = v;
        } else {
          my_aw[e] = Cast<op_t>::from(v);
        }
      }
      __syncwarp();
      float* c_tile = C + rt * 16 * ldc + ct * 16;
      if constexpr (PROJ == kWmmaTf32) {
        wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
        wmma::load_matrix_sync(acc, c_tile, unsigned(ldc), wmma::mem_row_major);
        for (int ks = 0; ks < kChunk; ks += 8) {
          wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
          wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb;
          wmma::load_matrix_sync(fa, my_aw + ks, unsigned(kChunk));
          wmma::load_matrix_sync(fb, B + ks * ldb + ct * 16, unsigned(ldb));
          for (int i = 0; i < fa.num_elements; ++i) fa.x[i] = wmma::__float_to_tf32(fa.x[i]);
          for (int i = 0; i < fb.num_elements; ++i) fb.x[i] = wmma::__float_to_tf32(fb.x[i]);
          wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(c_tile, acc, unsigned(ldc), wmma::mem_row_major);
      } else {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, op_t, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, op_t, wmma::row_major> fb;
        wmma::load_matrix_sync(acc, c_tile, unsigned(ldc), wmma::mem_row_major);
        wmma::load_matrix_sync(fa, my_aw, unsigned(kChunk));
        wmma::load_matrix_sync(fb, B + ct * 16, unsigned(ldb));
        wmma::mma_sync(acc, fa, fb, acc);
        wmma::store_matrix_sync(c_tile, acc, unsigned(ldc), wmma::mem_row_major);
      }
      __syncwarp();  // the next tile restages my_aw
    }
  }
}


// ------------------------------------------------------------------------------------------------
// Forward.

// B[k][p] = x[b, m0 + k, src_row[p / pw], src_col[p % pw]] (0 for padding, k >= kdim, p >= P).
template <typename scalar_t, typename op_t>
__device__ void stage_patch(op_t* B, int64_t ld, const Inputs<scalar_t>& in, int64_t b,
                            int64_t m0, int64_t M, const int* src_row, const int* src_col,
                            int64_t pw, int64_t P) {
  using val_t = std::conditional_t<sizeof(op_t) == 8, double, float>;
  for (int64_t e = thread_id(); e < kChunk * ld; e += block_threads()) {
    const int64_t k = e / ld, q = e % ld, m = m0 + k;
    val_t v = 0;
    if (m < M && q < P) {
      const int sr = src_row[q / pw], sc = src_col[q % pw];
      if (BSCONV_PLANT == 3 || (sr >= 0 && sc >= 0))
        v = val_t(to_float_acc(in.x[b * in.xs[0] + m * in.xs[1] + sr * in.xs[2] + sc * in.xs[3]]));
    }
    B[e] = to_operand<op_t>(v);
  }
}

template <typename scalar_t, int PROJ, int KH, int KW, int S>
__global__ void __launch_bounds__(kThreads, 1) bsconv_forward_kernel(ForwardParams<scalar_t> p) {
  using acc_t = typename AccOf<scalar_t>::type;
  using op_t = typename OperandOf<PROJ, acc_t>::type;
  BSCONV_DYNAMIC_SHARED(unsigned char, smem);
  const Geometry& g = p.g;
  const ForwardTiles& t = p.t;
  acc_t* V = reinterpret_cast<acc_t*>(smem + t.smem.v);
  op_t* Bs = reinterpret_cast<op_t*>(smem + t.smem.b);
  acc_t* U = reinterpret_cast<acc_t*>(smem + t.smem.u);
  op_t* aw = reinterpret_cast<op_t*>(smem + t.smem.aw);
  int* src_row = reinterpret_cast<int*>(smem + t.smem.rows);
  int* src_col = reinterpret_cast<int*>(smem + t.smem.cols);
  const int64_t kh_n = KH ? KH : g.Kh, kw_n = KW ? KW : g.Kw;
  const int64_t sh = S ? S : g.sh, sw = S ? S : g.sw;
  const int64_t tiles = t.tiles_h * t.tiles_w;

  for (int64_t task = blockIdx.x; task < t.tasks; task += gridDim.x) {
    const int64_t tile = task % tiles, rest = task / tiles;
    const int64_t group = rest % t.groups, b = rest / t.groups;
    const int64_t oh0 = (tile / t.tiles_w) * t.th, ow0 = (tile % t.tiles_w) * t.tw;
    const int64_t th = t.th < g.Ho - oh0 ? t.th : g.Ho - oh0;
    const int64_t tw = t.tw < g.Wo - ow0 ? t.tw : g.Wo - ow0;
    const int64_t ph = (th - 1) * sh + (kh_n - 1) * g.dh + 1;
    const int64_t pw = (tw - 1) * sw + (kw_n - 1) * g.dw + 1;
    const int64_t P = ph * pw;
    const int64_t chunk_end = (group + 1) * t.group < t.chunks ? (group + 1) * t.group : t.chunks;

    // Patch stage: source pixel of every patch row / column; BSConv-S: the subspace u of the
    // patch, once for the whole group of chunks.
    for (int64_t i = thread_id(); i < ph; i += block_threads())
      src_row[i] = int(remap_index(oh0 * sh - g.pt + i, g.H, g.mode));
    for (int64_t i = thread_id(); i < pw; i += block_threads())
      src_col[i] = int(remap_index(ow0 * sw - g.pl + i, g.W, g.mode));
    if (g.subspace()) {
      block_fill_zero(U, t.mid_pad * t.ld);
      __syncthreads();
      for (int64_t m0 = 0; m0 < g.M; m0 += kChunk) {
        stage_patch(Bs, t.ld, p.in, b, m0, g.M, src_row, src_col, pw, P);
        __syncthreads();
        block_gemm_acc<PROJ>(U, t.ld, g.Mmid, t.mid_pad, t.ld, p.in.w1, g.M, m0, g.M, Bs, t.ld,
                             aw);
        __syncthreads();
      }
    }
    for (int64_t chunk = group * t.group; chunk < chunk_end; ++chunk) {
      const int64_t n0 = chunk * t.nc;
      const int64_t rows = t.nc < g.N - n0 ? t.nc : g.N - n0;
      block_fill_zero(V, t.nc_pad * t.ld);
      __syncthreads();
      if (!g.subspace()) {
        for (int64_t m0 = 0; m0 < g.M; m0 += kChunk) {
          stage_patch(Bs, t.ld, p.in, b, m0, g.M, src_row, src_col, pw, P);
          if (BSCONV_PLANT != 1) __syncthreads();
          block_gemm_acc<PROJ>(V, t.ld, rows, t.nc_pad, t.ld, p.in.w1 + n0 * g.M, g.M, m0, g.M,
                               Bs, t.ld, aw);
          __syncthreads();
        }
      } else {
        for (int64_t u0 = 0; u0 < g.Mmid; u0 += kChunk) {
          for (int64_t e = thread_id(); e < kChunk * t.ld; e += block_threads()) {
            const int64_t k = e / t.ld;
            Bs[e] = to_operand<op_t>(u0 + k < g.Mmid ? U[(u0 + k) * t.ld + e % t.ld] : acc_t(0));
          }
          __syncthreads();
          block_gemm_acc<PROJ>(V, t.ld, rows, t.nc_pad, t.ld, p.in.w2 + n0 * g.Mmid, g.Mmid, u0,
                               g.Mmid, Bs, t.ld, aw);
          __syncthreads();
        }
      }
      if (g.has_mid()) {
        for (int64_t e = thread_id(); e < rows * P; e += block_threads()) {
          const int64_t n = e / P, q = e % P;
          acc_t& v = V[n * t.ld + q];
          const bool inside = src_row[q / pw] >= 0 && src_col[q % pw] >= 0;
          const acc_t s = p.in.scale ? acc_t(to_float_acc(p.in.scale[n0 + n])) : acc_t(1);
          const acc_t z = p.in.shift ? acc_t(to_float_acc(p.in.shift[n0 + n])) : acc_t(0);
          v = inside ? activate(v * s + z, g.act) : acc_t(0);
        }
        __syncthreads();
      }

      // Depthwise stage: a valid conv over the patch, no bounds checks.
      for (int64_t e = thread_id(); e < rows * th * tw; e += block_threads()) {
        const int64_t n = e / (th * tw), i = (e / tw) % th, j = e % tw;
        const acc_t* vn = V + n * t.ld + (i * sh) * pw + j * sw;
        const scalar_t* taps = p.in.dw + (n0 + n) * kh_n * kw_n;
        acc_t acc = p.in.bias ? acc_t(to_float_acc(p.in.bias[n0 + n])) : acc_t(0);
        for (int64_t kh = 0; kh < kh_n; ++kh) {
          for (int64_t kw = 0; kw < kw_n; ++kw) {
            acc += acc_t(to_float_acc(taps[kh * kw_n + kw])) * vn[kh * g.dh * pw + kw * g.dw];
          }
        }
        p.y[b * p.ys[0] + (n0 + n) * p.ys[1] + (oh0 + i) * p.ys[2] +
            (ow0 + j + (BSCONV_PLANT == 2)) * p.ys[3]] = Cast<scalar_t>::from(acc);
      }
      __syncthreads();  // the next chunk / task reuses the shared buffers
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward.

// Lists of (output, tap) pairs of one axis whose padded read position remaps into the tile
// [lo, lo + count), as two CSR tables in `buf`: by local position (for gv) and by tap (for the
// blueprint gradient). Layout (ints): local_start[count + 1], tap_start[K + 1], cursors[count + K],
// by_local[2 * max_entries] (tap, output), by_tap[2 * max_entries] (local, output). Built by one
// thread; entries are in increasing padded position, a fixed summation order.
struct AxisLists {
  const int* local_start;
  const int* tap_start;
  const int* by_local;
  const int* by_tap;
};

__device__ inline AxisLists axis_lists_view(const int* buf, int64_t count, int64_t K,
                                            int64_t max_entries) {
  AxisLists l;
  l.local_start = buf;
  l.tap_start = buf + count + 1;
  l.by_local = l.tap_start + K + 1 + count + K;
  l.by_tap = l.by_local + 2 * max_entries;
  return l;
}

// Calls f(padded position, image position) for the padded positions that can read the tile:
// the tile's own interior span and the two borders (which remap into the image).
template <typename F>
__device__ __forceinline__ void for_each_candidate(int64_t lo, int64_t count, int64_t size,
                                          int64_t pad_lo, int64_t pad_hi, int mode, F f) {
  for (int64_t rp = 0; rp < pad_lo; ++rp) f(rp, remap_index(rp - pad_lo, size, mode));
  for (int64_t rp = lo + pad_lo; rp < lo + count + pad_lo; ++rp) f(rp, rp - pad_lo);
  for (int64_t rp = pad_lo + size; rp < pad_lo + size + pad_hi; ++rp)
    f(rp, remap_index(rp - pad_lo, size, mode));
}

__device__ __forceinline__ void build_axis_lists(int* buf, int64_t lo, int64_t count, int64_t size,
                                        int64_t pad_lo, int64_t pad_hi, int64_t K, int64_t s,
                                        int64_t d, int64_t out_size, int mode,
                                        int64_t max_entries) {
  int* local_start = buf;
  int* tap_start = local_start + count + 1;
  int* cursor = tap_start + K + 1;  // count local cursors, then K tap cursors
  int* by_local = cursor + count + K;
  int* by_tap = by_local + 2 * max_entries;
  for (int64_t i = 0; i <= count; ++i) local_start[i] = 0;
  for (int64_t k = 0; k <= K; ++k) tap_start[k] = 0;
  auto visit = [&](auto emit) {
    for_each_candidate(lo, count, size, pad_lo, pad_hi, mode, [&](int64_t rp, int64_t src) {
      if (src < lo || src >= lo + count) return;
      for (int64_t k = 0; k < K && rp - k * d >= 0; ++k) {
        const int64_t q = rp - k * d;
        if (q % s == 0 && q / s < out_size) emit(src - lo, k, q / s);
      }
    });
  };
  visit([&](int64_t l, int64_t k, int64_t) {
    ++local_start[l + 1];
    ++tap_start[k + 1];
  });
  for (int64_t i = 0; i < count; ++i) local_start[i + 1] += local_start[i];
  for (int64_t k = 0; k < K; ++k) tap_start[k + 1] += tap_start[k];
  for (int64_t i = 0; i < count; ++i) cursor[i] = local_start[i];
  for (int64_t k = 0; k < K; ++k) cursor[count + k] = tap_start[k];
  visit([&](int64_t l, int64_t k, int64_t o) {
    const int a = cursor[l]++, b = cursor[count + k]++;
    by_local[2 * a] = int(k);
    by_local[2 * a + 1] = int(o);
    by_tap[2 * b] = int(l);
    by_tap[2 * b + 1] = int(o);
  });
}

// B[k][q] = x[b, m0 + k, r0 + q / tw, c0 + q % tw] (0 for k >= kdim or q >= Q).
template <typename scalar_t, typename op_t>
__device__ void stage_tile(op_t* B, int64_t ld, const Inputs<scalar_t>& in, int64_t b, int64_t m0,
                           int64_t M, int64_t r0, int64_t c0, int64_t tw, int64_t Q) {
  using val_t = std::conditional_t<sizeof(op_t) == 8, double, float>;
  for (int64_t e = thread_id(); e < kChunk * ld; e += block_threads()) {
    const int64_t k = e / ld, q = e % ld, m = m0 + k;
    val_t v = 0;
    if (m < M && q < Q) {
      v = val_t(to_float_acc(
          in.x[b * in.xs[0] + m * in.xs[1] + (r0 + q / tw) * in.xs[2] + (c0 + q % tw) * in.xs[3]]));
    }
    B[e] = to_operand<op_t>(v);
  }
}

template <typename scalar_t, int PROJ, int KH, int KW, int S>
__global__ void __launch_bounds__(kThreads, 1) bsconv_backward_kernel(BackwardParams<scalar_t> p) {
  using acc_t = typename AccOf<scalar_t>::type;
  using op_t = typename OperandOf<PROJ, acc_t>::type;
  BSCONV_DYNAMIC_SHARED(unsigned char, smem);
  const Geometry& g = p.g;
  const BackwardTiles& t = p.t;
  acc_t* V = reinterpret_cast<acc_t*>(smem + t.smem.v);
  op_t* Bs = reinterpret_cast<op_t*>(smem + t.smem.b);
  acc_t* U = reinterpret_cast<acc_t*>(smem + t.smem.u);
  acc_t* GU = reinterpret_cast<acc_t*>(smem + t.smem.gu);
  op_t* aw = reinterpret_cast<op_t*>(smem + t.smem.aw);
  int* row_buf = reinterpret_cast<int*>(smem + t.smem.rows);
  int* col_buf = reinterpret_cast<int*>(smem + t.smem.cols);
  const int64_t kh_n = KH ? KH : g.Kh, kw_n = KW ? KW : g.Kw;
  const int64_t sh = S ? S : g.sh, sw = S ? S : g.sw;
  const int64_t KK = kh_n * kw_n;
  const int64_t tiles = t.tiles_h * t.tiles_w;
  const bool atomics = !t.deterministic;
  acc_t* part = p.partials + (t.deterministic ? int64_t(blockIdx.x) * t.partial_size : 0);
  const PartialOffsets off(g);
  const bool need_gv = (p.need & (kNeedX | kNeedW1 | kNeedW2 | kNeedScale | kNeedShift)) != 0;

  for (int64_t task = blockIdx.x; task < t.tasks; task += gridDim.x) {
    const int64_t tile = task % tiles, b = task / tiles;
    const int64_t ti = tile / t.tiles_w, tj = tile % t.tiles_w;
    const int64_t r0 = ti * t.th, c0 = tj * t.tw;
    const int64_t nr = t.th < g.H - r0 ? t.th : g.H - r0;
    const int64_t nc = t.tw < g.W - c0 ? t.tw : g.W - c0;
    const int64_t Q = nr * nc;

    if (thread_id() == 0) {
      build_axis_lists(row_buf, r0, nr, g.H, g.pt, g.pb, kh_n, sh, g.dh, g.Ho, g.mode,
                       t.max_row_entries);
      build_axis_lists(col_buf, c0, nc, g.W, g.pl, g.pr, kw_n, sw, g.dw, g.Wo, g.mode,
                       t.max_col_entries);
    }
    block_fill_zero(V, t.n_pad * t.ld);
    block_fill_zero(U, t.mid_pad * t.ld);
    __syncthreads();

    // 1. Recompute v (pre-activation) for the tile's pixels, all channels.
    if (!g.subspace()) {
      for (int64_t m0 = 0; m0 < g.M; m0 += kChunk) {
        stage_tile(Bs, t.ld, p.in, b, m0, g.M, r0, c0, nc, Q);
        __syncthreads();
        block_gemm_acc<PROJ>(V, t.ld, g.N, t.n_pad, t.ld, p.in.w1, g.M, m0, g.M, Bs, t.ld, aw);
        __syncthreads();
      }
    } else {
      for (int64_t m0 = 0; m0 < g.M; m0 += kChunk) {
        stage_tile(Bs, t.ld, p.in, b, m0, g.M, r0, c0, nc, Q);
        __syncthreads();
        block_gemm_acc<PROJ>(U, t.ld, g.Mmid, t.mid_pad, t.ld, p.in.w1, g.M, m0, g.M, Bs, t.ld,
                             aw);
        __syncthreads();
      }
      for (int64_t u0 = 0; u0 < g.Mmid; u0 += kChunk) {
        for (int64_t e = thread_id(); e < kChunk * t.ld; e += block_threads()) {
          const int64_t k = e / t.ld;
          Bs[e] = to_operand<op_t>(u0 + k < g.Mmid ? U[(u0 + k) * t.ld + e % t.ld] : acc_t(0));
        }
        __syncthreads();
        block_gemm_acc<PROJ>(V, t.ld, g.N, t.n_pad, t.ld, p.in.w2, g.Mmid, u0, g.Mmid, Bs, t.ld,
                             aw);
        __syncthreads();
      }
    }

    // 2. Per channel: blueprint and bias gradients, gv, the mid-transform adjoint. V[n] turns
    // from v into the gradient w.r.t. v (pre-activation).
    const AxisLists rl = axis_lists_view(row_buf, nr, kh_n, t.max_row_entries);
    const AxisLists cl = axis_lists_view(col_buf, nc, kw_n, t.max_col_entries);
    // Outputs whose bias gradient this tile owns: a proportional split of the output grid.
    const int64_t oh_lo = ti * g.Ho / t.tiles_h, oh_hi = (ti + 1) * g.Ho / t.tiles_h;
    const int64_t ow_lo = tj * g.Wo / t.tiles_w, ow_hi = (tj + 1) * g.Wo / t.tiles_w;
    for (int64_t n = thread_id(); n < g.N; n += block_threads()) {
      const scalar_t* gyn = p.gy + b * p.gys[0] + n * p.gys[1];
      acc_t* vn = V + n * t.ld;
      const acc_t s = p.in.scale ? acc_t(to_float_acc(p.in.scale[n])) : acc_t(1);
      const acc_t z0 = p.in.shift ? acc_t(to_float_acc(p.in.shift[n])) : acc_t(0);
      const bool mid = g.has_mid();
      if (p.need & kNeedDw) {
        for (int64_t kh = 0; kh < kh_n; ++kh) {
          for (int64_t kw = 0; kw < kw_n; ++kw) {
            acc_t acc = 0;
            for (int ir = rl.tap_start[kh]; ir < rl.tap_start[kh + 1]; ++ir) {
              const int loc_r = rl.by_tap[2 * ir], oh = rl.by_tap[2 * ir + 1];
              for (int ic = cl.tap_start[kw]; ic < cl.tap_start[kw + 1]; ++ic) {
                const int loc_c = cl.by_tap[2 * ic], ow = cl.by_tap[2 * ic + 1];
                const acc_t v = vn[loc_r * nc + loc_c];
                const acc_t a = mid ? activate(v * s + z0, g.act) : v;
                acc += acc_t(to_float_acc(gyn[oh * p.gys[2] + ow * p.gys[3]])) * a;
              }
            }
            accumulate(part + off.dw + n * KK + kh * kw_n + kw, acc, atomics);
          }
        }
      }
      if (p.need & kNeedBias) {
        acc_t acc = 0;
        for (int64_t oh = oh_lo; oh < oh_hi; ++oh)
          for (int64_t ow = ow_lo; ow < ow_hi; ++ow)
            acc += acc_t(to_float_acc(gyn[oh * p.gys[2] + ow * p.gys[3]]));
        accumulate(part + off.bias + n, acc, atomics);
      }
      if (!need_gv) continue;
      const scalar_t* taps = p.in.dw + n * KK;
      acc_t gscale = 0, gshift = 0;
      for (int64_t q = 0; q < Q; ++q) {
        const int64_t lr = q / nc, lc = q % nc;
        acc_t gv = 0;
        for (int ir = rl.local_start[lr]; ir < rl.local_start[lr + 1]; ++ir) {
          const int kh = rl.by_local[2 * ir], oh = rl.by_local[2 * ir + 1];
          for (int ic = cl.local_start[lc]; ic < cl.local_start[lc + 1]; ++ic) {
            const int kw = cl.by_local[2 * ic], ow = cl.by_local[2 * ic + 1];
            gv += acc_t(to_float_acc(taps[kh * kw_n + kw])) *
                  acc_t(to_float_acc(gyn[oh * p.gys[2] + ow * p.gys[3]]));
          }
        }
        if (mid) {
          const acc_t v = vn[q];
          const acc_t gz = gv * activate_grad(v * s + z0, g.act);
          gscale += gz * v;
          gshift += gz;
          gv = gz * s;
        }
        vn[q] = gv;
      }
      if (p.need & kNeedScale) accumulate(part + off.scale + n, gscale, atomics);
      if (p.need & kNeedShift) accumulate(part + off.shift + n, gshift, atomics);
    }
    __syncthreads();
    if (!(p.need & (kNeedX | kNeedW1 | kNeedW2))) continue;

    // 3. Projection adjoints (SIMT): weight gradients and gx of the tile's pixels.
    const acc_t* G = V;  // gradient w.r.t. the output of the last projection
    int64_t g_rows = g.N;
    if (g.subspace()) {
      if (p.need & kNeedW2) {
        for (int64_t e = thread_id(); e < g.N * g.Mmid; e += block_threads()) {
          const int64_t n = e / g.Mmid, j = e % g.Mmid;
          acc_t acc = 0;
          for (int64_t q = 0; q < Q; ++q) acc += V[n * t.ld + q] * U[j * t.ld + q];
          accumulate(part + off.w2 + e, acc, atomics);
        }
      }
      if (p.need & (kNeedX | kNeedW1)) {
        for (int64_t e = thread_id(); e < g.Mmid * Q; e += block_threads()) {
          const int64_t j = e / Q, q = e % Q;
          acc_t acc = 0;
          for (int64_t n = 0; n < g.N; ++n)
            acc += acc_t(to_float_acc(p.in.w2[n * g.Mmid + j])) * V[n * t.ld + q];
          GU[j * t.ld + q] = acc;
        }
      }
      __syncthreads();
      G = GU;
      g_rows = g.Mmid;
    }
    if (p.need & (kNeedX | kNeedW1)) {
      for (int64_t m0 = 0; m0 < g.M; m0 += kChunk) {
        const int64_t kc = kChunk < g.M - m0 ? kChunk : g.M - m0;
        stage_tile(Bs, t.ld, p.in, b, m0, g.M, r0, c0, nc, Q);
        __syncthreads();
        if (p.need & kNeedW1) {
          for (int64_t e = thread_id(); e < g_rows * kc; e += block_threads()) {
            const int64_t r = e / kc, k = e % kc;
            acc_t acc = 0;
            for (int64_t q = 0; q < Q; ++q) acc += G[r * t.ld + q] * acc_t(to_float_acc(Bs[k * t.ld + q]));
            accumulate(part + off.w1 + r * g.M + m0 + k, acc, atomics);
          }
        }
        if (p.need & kNeedX) {
          for (int64_t e = thread_id(); e < kc * Q; e += block_threads()) {
            const int64_t k = e / Q, q = e % Q;
            acc_t acc = 0;
            for (int64_t r = 0; r < g_rows; ++r)
              acc += acc_t(to_float_acc(p.in.w1[r * g.M + m0 + k])) * G[r * t.ld + q];
            p.gx[b * p.gxs[0] + (m0 + k) * p.gxs[1] + (r0 + q / nc) * p.gxs[2] +
                 (c0 + q % nc) * p.gxs[3]] = Cast<scalar_t>::from(acc);
          }
        }
        __syncthreads();
      }
    }
  }
}

// out[i] = sum over blocks of partials[block][i], in block order (deterministic mode).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    reduce_partials_kernel(const acc_t* partials, int64_t blocks, int64_t size, acc_t* out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
       i += int64_t(gridDim.x) * blockDim.x) {
    acc_t s = 0;
    for (int64_t k = 0; k < blocks; ++k) s += partials[k * size + i];
    out[i] = s;
  }
}

}  // namespace bsconv::cuda
