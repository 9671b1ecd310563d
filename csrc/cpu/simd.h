// Inner loops of the CPU kernels: the depthwise stage, the mid transform, the backward's
// transposed depthwise and blueprint correlation, and the layout changes around them.
//
// Layouts. The projection GEMMs read and write channels-last matrices ("CL", [pixel][channel]
// with a pixel stride). The depthwise loops work on a channel-blocked layout ("B8"): blocks of
// kLanes = 8 channels, each block a [pixel][8] array, so that a block's rows are contiguous
// streams (a channels-last walk over a few rows of wide pixels misses L1 on most loads).
// Element (pixel p, channel n) of a B8 buffer sits at (n / 8) * cbs + p * 8 + n % 8, where
// `cbs` is the buffer's channel-block stride. Channel counts are rounded up to whole blocks
// ("lanes"); padded channels hold zeros.
//
// Every loop exists twice: a generic template (any accumulation type, any ISA; the float64
// path and CPUs without AVX2) and an AVX2/FMA float version compiled with a target attribute
// and chosen at run time. Both sum in a fixed order; which one runs depends on the CPU only.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <unistd.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <c10/util/BFloat16.h>

#include "common/bsconv_math.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define BSCONV_X86_AVX2 1
#define BSCONV_AVX2 __attribute__((target("avx2,fma")))
// For lambdas inside AVX2 functions (a lambda does not inherit its function's target).
#define BSCONV_AVX2_INLINE BSCONV_AVX2 __attribute__((always_inline))
#else
#define BSCONV_X86_AVX2 0
#endif

namespace bsconv::cpu {

constexpr int64_t kLanes = 8;  // channels per block
constexpr int64_t kMaxK = 16;  // the AVX2 loops handle kernels up to 16 x 16

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// floor(a / b) for b > 0 and any sign of a.
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
// Offset of (pixel p, channel n) in a B8 buffer with channel-block stride cbs.
inline int64_t b8(int64_t p, int64_t n, int64_t cbs) {
  return (n / kLanes) * cbs + p * kLanes + n % kLanes;
}

// True when the environment variable `name` is set to a non-empty value other than "0" (the
// CPU kernels' switches, each read once per process).
inline bool env_switch_on(const char* name) {
  const char* env = std::getenv(name);
  return env != nullptr && env[0] != '\0' && env[0] != '0';
}

// True when the AVX2 float loops run: the CPU has AVX2 and FMA, and BSCONV_CPU_GENERIC is
// not set to a non-zero value (a debugging switch that forces the generic loops).
inline bool avx2_enabled() {
  static const bool on = [] {
#if BSCONV_X86_AVX2
    if (env_switch_on("BSCONV_CPU_GENERIC")) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return on;
}

// True when the AVX-512 float loops run (stride 1, see below; and the bfloat16 rounding):
// avx2_enabled(), the CPU has AVX-512 F, DQ, BW and VL (every AVX-512 CPU since Skylake-SP),
// and BSCONV_CPU_NO_AVX512 is not set to a non-zero value (which leaves the AVX2 loops; their
// results are the same bit for bit).
inline bool avx512_enabled() {
  static const bool on = [] {
#if BSCONV_X86_AVX2
    if (env_switch_on("BSCONV_CPU_NO_AVX512")) return false;
    return avx2_enabled() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
#else
    return false;
#endif
  }();
  return on;
}

// True when the forward's depthwise may run on channels-last v rows (depthwise_rows_cl) and
// the backward's transposed depthwise and blueprint correlation on B16 rows (gv_rows_cl,
// gb_rows_cl): avx512_enabled() and BSCONV_CPU_NO_DW_CL not set to a non-zero value (which
// keeps the B8 loops; the results are the same bit for bit).
inline bool depthwise_cl_enabled() {
  static const bool on = [] {
    if (env_switch_on("BSCONV_CPU_NO_DW_CL")) return false;
    return avx512_enabled();
  }();
  return on;
}

// True when bfloat16 outputs are rounded by vcvtneps2bf16 where it gives c10's bits
// (bf16x16_round_avx512): avx512_enabled(), the CPU has AVX-512 BF16, and BSCONV_CPU_NO_BF16_INSN
// is not set to a non-zero value (which keeps the six-instruction rounding; same bits).
inline bool bf16_insn_enabled() {
  static const bool on = [] {
#if BSCONV_X86_AVX2
    if (env_switch_on("BSCONV_CPU_NO_BF16_INSN")) return false;
    return avx512_enabled() && __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
  }();
  return on;
}

// ---------------------------------------------------------------------------------------------
// Argument blocks.

// The depthwise loops read padded B8 rows: a row holds its image pixels at an offset and the
// padding pixels around them (zeros, or for reflect / replicate / circular padding the pixels
// they remap to), so every output column reads through the same dense loop.

// Forward depthwise of `rows_out` output rows over `lanes` channels (B8 in, B8 or CL out):
// out_i[j][n] = bias[n] + sum_{kh, kw} taps[(kh*Kw + kw)*ts + n] * v(i, kh)[j*sw + kw*dw][n]
// where v(i, kh) is the padded B8 row rows[i*Kh + kh] (column 0 = padded column 0) with
// channel-block stride rcbs[i*Kh + kh] (a row of zero padding: a zero row with stride 0).
template <typename T>
struct DwArgs {
  int64_t rows_out;
  const T* const* rows;
  const int64_t* rcbs;
  int64_t Kh, Kw, sw, dw;
  int64_t Wo;
  int64_t lanes;
  const T* taps;
  int64_t ts;
  const T* bias;
  T* const* outs;  // out_i(j, n) = outs[i][(n / 8) * ocbs + j * ops + n % 8], or with cm_out
  int64_t ocbs, ops;  // outs[i][n * ocs + j] for channels n < valid (NCHW rows)
  bool cm_out;
  int64_t ocs, valid;
};

// Backward, transposed depthwise of one v row (gather form), B8 in and out: for image column
// c = phase + sw*t, gv[c][n] = sum over the gy rows i that read this v row through tap row
// khs[i], and the taps kws[q] of the phase, of taps[(khs[i]*Kw + kws[q])*ts + n] *
// gy_i[t + offs[q]][n]; the gy rows are padded with zeros (offs include the left padding).
template <typename T>
struct GvArgs {
  const T* const* grows;
  const int64_t* khs;
  int64_t nk;
  int64_t gcbs;
  int64_t Kw, sw, W;
  const int64_t* ph_n;    // [sw]: taps of each phase
  const int64_t* ph_kw;   // [sw * Kw]
  const int64_t* ph_off;  // [sw * Kw]
  int64_t lanes;
  const T* taps;
  int64_t ts;
  T* out;  // plain B8 row of W pixels
  int64_t ocbs;
};

// Backward, blueprint correlation of one (gy row, act(v) row) pair joined by tap row kh (B8,
// both padded with zeros): gb[kw*gbs + n] += sum_{ow < Wo} gy[ow][n] * a[ow*sw + kw*dw][n].
template <typename T>
struct GbArgs {
  const T* grow;  // gy column 0 (not the padded column 0)
  int64_t gcbs;
  const T* arow;  // padded column 0
  int64_t acbs;
  int64_t Kw, sw, dw, Wo;
  int64_t lanes;
  T* gb;
  int64_t gbs;
};

// ---------------------------------------------------------------------------------------------
// Generic loops.

template <typename T>
void dw_generic(const DwArgs<T>& a) {
  for (int64_t i = 0; i < a.rows_out; ++i) {
    T* out = a.outs[i];
    for (int64_t j = 0; j < a.Wo; ++j) {
      for (int64_t n = 0; n < a.lanes; ++n) {
        T acc = a.bias[n];
        for (int64_t kh = 0; kh < a.Kh; ++kh) {
          const T* row = a.rows[i * a.Kh + kh];
          const int64_t cbs = a.rcbs[i * a.Kh + kh];
          for (int64_t kw = 0; kw < a.Kw; ++kw) {
            acc += a.taps[(kh * a.Kw + kw) * a.ts + n] * row[b8(j * a.sw + kw * a.dw, n, cbs)];
          }
        }
        if (!a.cm_out) {
          out[(n / kLanes) * a.ocbs + j * a.ops + n % kLanes] = acc;
        } else if (n < a.valid) {
          out[n * a.ocs + j] = acc;
        }
      }
    }
  }
}

template <typename T>
void gv_generic(const GvArgs<T>& a) {
  for (int64_t phase = 0; phase < std::min(a.sw, a.W); ++phase) {
    const int64_t T_ = ceil_div(a.W - phase, a.sw);
    for (int64_t t = 0; t < T_; ++t) {
      const int64_t c = phase + a.sw * t;
      for (int64_t n = 0; n < a.lanes; ++n) {
        T acc = T(0);
        for (int64_t i = 0; i < a.nk; ++i) {
          for (int64_t q = 0; q < a.ph_n[phase]; ++q) {
            const int64_t kw = a.ph_kw[phase * a.Kw + q];
            acc += a.taps[(a.khs[i] * a.Kw + kw) * a.ts + n] *
                   a.grows[i][b8(t + a.ph_off[phase * a.Kw + q], n, a.gcbs)];
          }
        }
        a.out[b8(c, n, a.ocbs)] = acc;
      }
    }
  }
}

template <typename T>
void gb_generic(const GbArgs<T>& a) {
  for (int64_t n = 0; n < a.lanes; ++n) {
    for (int64_t kw = 0; kw < a.Kw; ++kw) {
      T acc = T(0);
      for (int64_t ow = 0; ow < a.Wo; ++ow) {
        acc += a.grow[b8(ow, n, a.gcbs)] * a.arow[b8(ow * a.sw + kw * a.dw, n, a.acbs)];
      }
      a.gb[kw * a.gbs + n] += acc;
    }
  }
}

// CL -> B8 for `pixels` pixels: dst = src, or act(src * scale + shift) with `mid`. Channels
// [0, valid) are read; B8 lanes from `valid` up to the next block boundary are left alone
// (they stay zero in zero-filled buffers).
template <typename S, typename T>
void cl_to_b8_generic(const S* src, int64_t sps, int64_t pixels, int64_t valid, T* dst,
                      int64_t dcbs, bool mid, const T* scale, const T* shift, int act) {
  for (int64_t p = 0; p < pixels; ++p) {
    const S* s = src + p * sps;
    for (int64_t n = 0; n < valid; ++n) {
      const T v = T(s[n]);
      dst[b8(p, n, dcbs)] = mid ? activate(v * scale[n] + shift[n], act) : v;
    }
  }
}

// B8 gv -> CL gv for `pixels` pixels and `lanes` channels, through the mid transform when
// `mid`: with z = v * scale + shift (v: pre-activation, CL), gz = gv * act'(z),
// gscale += gz * v and gshift += gz (in double, in pixel order), gv = gz * scale.
template <typename T>
void gv_to_cl_generic(const T* gvb, int64_t gcbs, const T* v, T* gvc, int64_t ps,
                      int64_t pixels, int64_t lanes, bool mid, const T* scale, const T* shift,
                      int act, double* gscale, double* gshift) {
  for (int64_t p = 0; p < pixels; ++p) {
    for (int64_t n = 0; n < lanes; ++n) {
      const T g = gvb[b8(p, n, gcbs)];
      if (!mid) {
        gvc[p * ps + n] = g;
        continue;
      }
      const T vp = v[p * ps + n];
      const T gz = g * activate_grad(vp * scale[n] + shift[n], act);
      gscale[n] += double(gz * vp);
      gshift[n] += double(gz);
      gvc[p * ps + n] = gz * scale[n];
    }
  }
}

// Channel-major ("CM", [channel][pixel] rows with row stride sld) -> B8 for `pixels` pixels
// and channels [0, valid), with the mid transform when `mid` (as cl_to_b8).
template <typename S, typename T>
void cm_to_b8_generic(const S* src, int64_t sld, int64_t pixels, int64_t valid, T* dst,
                      int64_t dcbs, bool mid, const T* scale, const T* shift, int act) {
  for (int64_t n = 0; n < valid; ++n) {
    const S* s = src + n * sld;
    for (int64_t p = 0; p < pixels; ++p) {
      const T v = T(s[p]);
      dst[b8(p, n, dcbs)] = mid ? activate(v * scale[n] + shift[n], act) : v;
    }
  }
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols (in 8 x 8 tiles: both sides of a
// tile stay in a few cache lines).
template <typename T>
void transpose_generic(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst,
                       int64_t ldd) {
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    for (int64_t c0 = 0; c0 < cols; c0 += 8) {
      for (int64_t c = c0; c < std::min(cols, c0 + 8); ++c) {
        for (int64_t r = r0; r < std::min(rows, r0 + 8); ++r) dst[c * ldd + r] = src[r * lds + c];
      }
    }
  }
}

#if BSCONV_X86_AVX2
// ---------------------------------------------------------------------------------------------
// AVX2 / FMA float loops.

// Stores the first len (< 8) lanes of v. (vmaskmovps stores are microcoded on AMD Zen: ~13
// cycles each; these plain stores take 1-3.)
BSCONV_AVX2 inline void store_partial_avx2(float* p, __m256 v, int64_t len) {
  __m128 x = _mm256_castps256_ps128(v);
  if (len >= 4) {
    _mm_storeu_ps(p, x);
    p += 4;
    len -= 4;
    x = _mm256_extractf128_ps(v, 1);
  }
  if (len >= 2) {
    _mm_storel_pi(reinterpret_cast<__m64*>(p), x);
    p += 2;
    len -= 2;
    x = _mm_movehl_ps(x, x);
  }
  if (len >= 1) _mm_store_ss(p, x);
}

BSCONV_AVX2 inline __attribute__((always_inline)) __m256 avx2_activate(__m256 z, int act) {
  const __m256 zero = _mm256_setzero_ps();
  switch (act) {
    case kActRelu:
      return _mm256_blendv_ps(z, zero, _mm256_cmp_ps(z, zero, _CMP_LT_OQ));
    case kActRelu6: {
      const __m256 six = _mm256_set1_ps(6.f);
      __m256 r = _mm256_blendv_ps(z, zero, _mm256_cmp_ps(z, zero, _CMP_LT_OQ));
      return _mm256_blendv_ps(r, six, _mm256_cmp_ps(z, six, _CMP_GT_OQ));
    }
    case kActHardswish: {
      const __m256 three = _mm256_set1_ps(3.f);
      __m256 r = _mm256_div_ps(_mm256_mul_ps(z, _mm256_add_ps(z, three)), _mm256_set1_ps(6.f));
      r = _mm256_blendv_ps(r, zero, _mm256_cmp_ps(z, _mm256_set1_ps(-3.f), _CMP_LT_OQ));
      return _mm256_blendv_ps(r, z, _mm256_cmp_ps(z, three, _CMP_GT_OQ));
    }
    default:
      return z;
  }
}

BSCONV_AVX2 inline __attribute__((always_inline)) __m256 avx2_activate_grad(__m256 z,
                                                                           int act) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.f);
  switch (act) {
    case kActRelu:
      return _mm256_and_ps(_mm256_cmp_ps(z, zero, _CMP_GT_OQ), one);
    case kActRelu6: {
      const __m256 in = _mm256_and_ps(_mm256_cmp_ps(z, zero, _CMP_GT_OQ),
                                      _mm256_cmp_ps(z, _mm256_set1_ps(6.f), _CMP_LT_OQ));
      return _mm256_and_ps(in, one);
    }
    case kActHardswish: {
      __m256 r = _mm256_add_ps(_mm256_div_ps(z, _mm256_set1_ps(3.f)), _mm256_set1_ps(0.5f));
      r = _mm256_blendv_ps(r, one, _mm256_cmp_ps(z, _mm256_set1_ps(3.f), _CMP_NLE_UQ));
      return _mm256_blendv_ps(r, zero, _mm256_cmp_ps(z, _mm256_set1_ps(-3.f), _CMP_LT_OQ));
    }
    default:
      return one;
  }
}

BSCONV_AVX2 inline void transpose8_regs_avx2(__m256* r) {
  __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// f(i, r[i]) for i in [0, count), count <= 8, with constant indices: a loop bounded by a
// runtime count indexes the array in memory, and GCC then keeps all eight registers on the
// stack (cm_to_b8 of 14-pixel rows: stores to the stack and a `rep movs` copy of the array
// were most of its time; its backward callers 2-7% faster). Not in dw_block_cm_avx2: there
// the 112x112 NCHW forward was 2.5% slower with it.
template <typename F>
BSCONV_AVX2 inline __attribute__((always_inline)) void for_rows8(int64_t count,
                                                                 const __m256 (&r)[8], F&& f) {
  if (count >= 8) {
    f(0, r[0]), f(1, r[1]), f(2, r[2]), f(3, r[3]), f(4, r[4]), f(5, r[5]), f(6, r[6]);
    f(7, r[7]);
    return;
  }
  if (count > 0) f(0, r[0]);
  if (count > 1) f(1, r[1]);
  if (count > 2) f(2, r[2]);
  if (count > 3) f(3, r[3]);
  if (count > 4) f(4, r[4]);
  if (count > 5) f(5, r[5]);
  if (count > 6) f(6, r[6]);
}

// --- forward depthwise ---

// The Kh input rows of output row i, channel block cb.
inline void dw_input_rows(const DwArgs<float>& a, int64_t cb, int64_t i, const float** r) {
  for (int64_t kh = 0; kh < a.Kh; ++kh) {
    r[kh] = a.rows[i * a.Kh + kh] + cb * a.rcbs[i * a.Kh + kh];
  }
}

// J output columns from j, taps read from memory (any kernel size).
template <int J>
BSCONV_AVX2 inline void dw_block_avx2(const DwArgs<float>& a, const float* const* r,
                                      const float* tp, __m256 b, float* o, int64_t j) {
  const int64_t step = a.sw * kLanes;
  __m256 acc[J];
  for (int u = 0; u < J; ++u) acc[u] = b;
  for (int64_t kh = 0; kh < a.Kh; ++kh) {
    const float* row = r[kh] + j * step;
    const float* t = tp + kh * a.Kw * a.ts;
    for (int64_t kw = 0; kw < a.Kw; ++kw) {
      const __m256 tv = _mm256_loadu_ps(t + kw * a.ts);
      const float* p = row + kw * a.dw * kLanes;
      for (int u = 0; u < J; ++u) {
        acc[u] = _mm256_fmadd_ps(tv, _mm256_load_ps(p + u * step), acc[u]);
      }
    }
  }
  for (int u = 0; u < J; ++u) _mm256_storeu_ps(o + (j + u) * a.ops, acc[u]);
}

// 3 x 3 kernels: J output columns from j with the taps in registers.
template <int J>
BSCONV_AVX2 inline void dw_block3_avx2(const DwArgs<float>& a, const float* const* r,
                                       const __m256* t, __m256 b, float* o, int64_t j) {
  const int64_t step = a.sw * kLanes, d = a.dw * kLanes, base = j * step;
  __m256 acc[J];
  for (int u = 0; u < J; ++u) acc[u] = b;
  for (int kh = 0; kh < 3; ++kh) {
    const float* row = r[kh] + base;
    for (int u = 0; u < J; ++u) {
      const float* p = row + u * step;
      acc[u] = _mm256_fmadd_ps(t[kh * 3 + 0], _mm256_load_ps(p), acc[u]);
      acc[u] = _mm256_fmadd_ps(t[kh * 3 + 1], _mm256_load_ps(p + d), acc[u]);
      acc[u] = _mm256_fmadd_ps(t[kh * 3 + 2], _mm256_load_ps(p + 2 * d), acc[u]);
    }
  }
  for (int u = 0; u < J; ++u) _mm256_storeu_ps(o + (j + u) * a.ops, acc[u]);
}

BSCONV_AVX2 inline void dw_tail_avx2(const DwArgs<float>& a, const float* const* r,
                                     const float* tp, const __m256* t, bool k3, __m256 b,
                                     float* o, int64_t j, int64_t n) {
#define BSCONV_DW_TAIL(J)                                      \
  case J:                                                      \
    if (k3) {                                                  \
      dw_block3_avx2<J>(a, r, t, b, o, j);                     \
    } else {                                                   \
      dw_block_avx2<J>(a, r, tp, b, o, j);                     \
    }                                                          \
    return;
  switch (n) {
    BSCONV_DW_TAIL(1)
    BSCONV_DW_TAIL(2)
    BSCONV_DW_TAIL(3)
    BSCONV_DW_TAIL(4)
    BSCONV_DW_TAIL(5)
    BSCONV_DW_TAIL(6)
    BSCONV_DW_TAIL(7)
    default:
      return;
  }
#undef BSCONV_DW_TAIL
}

// The accumulators of 8 output columns from j (acc[u]: column j + u) of channel block cb,
// transposed in registers and stored as rows of the NCHW output (columns < Wo).
BSCONV_AVX2 inline void store_cm_block_avx2(const DwArgs<float>& a, __m256* acc, int64_t cb,
                                            float* o, int64_t j) {
  transpose8_regs_avx2(acc);
  const int64_t rows = std::min(kLanes, a.valid - cb * kLanes), len = a.Wo - j;
  float* dst = o + cb * kLanes * a.ocs + j;
  if (len >= 8) {
    for (int64_t c = 0; c < rows; ++c) _mm256_storeu_ps(dst + c * a.ocs, acc[c]);
  } else {
    for (int64_t c = 0; c < rows; ++c) store_partial_avx2(dst + c * a.ocs, acc[c], len);
  }
}

// NCHW output: 8 output columns from j of channel block cb, transposed in registers and stored
// as rows of the channels (the padded rows have room for the columns past Wo).
template <bool K3>
BSCONV_AVX2 inline void dw_block_cm_avx2(const DwArgs<float>& a, const float* const* r,
                                         const float* tp, __m256 b, int64_t cb, float* o,
                                         int64_t j) {
  const int64_t step = a.sw * kLanes, d = a.dw * kLanes;
  __m256 acc[8];
  for (int u = 0; u < 8; ++u) acc[u] = b;
  if constexpr (K3) {
    for (int kh = 0; kh < 3; ++kh) {
      const float* row = r[kh] + j * step;
      for (int kw = 0; kw < 3; ++kw) {
        const __m256 tv = _mm256_loadu_ps(tp + (kh * 3 + kw) * a.ts);
        const float* p = row + kw * d;
        for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(tv, _mm256_load_ps(p + u * step), acc[u]);
      }
    }
  } else {
    for (int64_t kh = 0; kh < a.Kh; ++kh) {
      const float* row = r[kh] + j * step;
      const float* t = tp + kh * a.Kw * a.ts;
      for (int64_t kw = 0; kw < a.Kw; ++kw) {
        const __m256 tv = _mm256_loadu_ps(t + kw * a.ts);
        const float* p = row + kw * d;
        for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(tv, _mm256_load_ps(p + u * step), acc[u]);
      }
    }
  }
  store_cm_block_avx2(a, acc, cb, o, j);
}

BSCONV_AVX2 inline void dw_cm_avx2(const DwArgs<float>& a) {
  const bool k3 = a.Kh == 3 && a.Kw == 3;
  const float* r[kMaxK];
  for (int64_t cb = 0; cb * kLanes < a.valid; ++cb) {
    const float* tp = a.taps + cb * kLanes;
    const __m256 b = _mm256_loadu_ps(a.bias + cb * kLanes);
    for (int64_t i = 0; i < a.rows_out; ++i) {
      dw_input_rows(a, cb, i, r);
      for (int64_t j = 0; j < a.Wo; j += 8) {
        if (k3) {
          dw_block_cm_avx2<true>(a, r, tp, b, cb, a.outs[i], j);
        } else {
          dw_block_cm_avx2<false>(a, r, tp, b, cb, a.outs[i], j);
        }
      }
    }
  }
}

BSCONV_AVX2 inline void dw_avx2(const DwArgs<float>& a) {
  if (a.cm_out) return dw_cm_avx2(a);
  const bool k3 = a.Kh == 3 && a.Kw == 3;
  const float* r[kMaxK];
  for (int64_t cb = 0; cb * kLanes < a.lanes; ++cb) {
    const float* tp = a.taps + cb * kLanes;
    const __m256 b = _mm256_loadu_ps(a.bias + cb * kLanes);
    __m256 t[9];
    if (k3) {
      for (int k = 0; k < 9; ++k) t[k] = _mm256_loadu_ps(tp + k * a.ts);
    }
    for (int64_t i = 0; i < a.rows_out; ++i) {
      dw_input_rows(a, cb, i, r);
      float* o = a.outs[i] + cb * a.ocbs;
      int64_t j = 0;
      if (k3) {
        for (; j + 6 <= a.Wo; j += 6) dw_block3_avx2<6>(a, r, t, b, o, j);
      } else {
        for (; j + 8 <= a.Wo; j += 8) dw_block_avx2<8>(a, r, tp, b, o, j);
      }
      if (j < a.Wo) dw_tail_avx2(a, r, tp, t, k3, b, o, j, a.Wo - j);
    }
  }
}

// --- backward transposed depthwise ---

// J pixels of one phase: pixel u is column c0 + u*sw and reads gy columns t + u + offs[q]
// through the taps kws[q].
template <int J>
BSCONV_AVX2 inline void gv_block_avx2(const GvArgs<float>& a, const float* const* g,
                                      const float* tp, float* o, const int64_t* kws,
                                      const int64_t* offs, int64_t nkw, int64_t t, int64_t c0) {
  __m256 acc[J];
  for (int u = 0; u < J; ++u) acc[u] = _mm256_setzero_ps();
  for (int64_t i = 0; i < a.nk; ++i) {
    const float* ti = tp + a.khs[i] * a.Kw * a.ts;
    for (int64_t q = 0; q < nkw; ++q) {
      const __m256 tv = _mm256_loadu_ps(ti + kws[q] * a.ts);
      const float* p = g[i] + (t + offs[q]) * kLanes;
      for (int u = 0; u < J; ++u) {
        acc[u] = _mm256_fmadd_ps(tv, _mm256_load_ps(p + u * kLanes), acc[u]);
      }
    }
  }
  const int64_t ostep = a.sw * kLanes;
  for (int u = 0; u < J; ++u) _mm256_store_ps(o + c0 * kLanes + u * ostep, acc[u]);
}

BSCONV_AVX2 inline void gv_avx2(const GvArgs<float>& a) {
  const float* g[kMaxK];
  for (int64_t cb = 0; cb * kLanes < a.lanes; ++cb) {
    for (int64_t i = 0; i < a.nk; ++i) g[i] = a.grows[i] + cb * a.gcbs;
    const float* tp = a.taps + cb * kLanes;
    float* o = a.out + cb * a.ocbs;
    for (int64_t phase = 0; phase < std::min(a.sw, a.W); ++phase) {
      const int64_t* kws = a.ph_kw + phase * a.Kw;
      const int64_t* offs = a.ph_off + phase * a.Kw;
      const int64_t nkw = a.ph_n[phase];
      const int64_t T = ceil_div(a.W - phase, a.sw);  // pixels phase + sw*t, t < T
      int64_t t = 0;
      for (; t + 8 <= T; t += 8) gv_block_avx2<8>(a, g, tp, o, kws, offs, nkw, t, phase + a.sw * t);
      if (t + 4 <= T) {
        gv_block_avx2<4>(a, g, tp, o, kws, offs, nkw, t, phase + a.sw * t);
        t += 4;
      }
      if (t + 2 <= T) {
        gv_block_avx2<2>(a, g, tp, o, kws, offs, nkw, t, phase + a.sw * t);
        t += 2;
      }
      if (t < T) gv_block_avx2<1>(a, g, tp, o, kws, offs, nkw, t, phase + a.sw * t);
    }
  }
}

// --- backward blueprint correlation ---

template <int KW>
BSCONV_AVX2 inline void gb_avx2_k(const GbArgs<float>& a) {
  const int64_t cstep = a.dw * kLanes, ostep = a.sw * kLanes;
  for (int64_t cb = 0; cb * kLanes < a.lanes; ++cb) {
    const float* g = a.grow + cb * a.gcbs;
    const float* v = a.arow + cb * a.acbs;
    __m256 x[KW], y[KW];
    for (int k = 0; k < KW; ++k) x[k] = y[k] = _mm256_setzero_ps();
    int64_t ow = 0;
    for (; ow + 2 <= a.Wo; ow += 2) {
      const __m256 g0 = _mm256_load_ps(g + ow * kLanes);
      const __m256 g1 = _mm256_load_ps(g + (ow + 1) * kLanes);
      const float* p = v + ow * ostep;
      for (int k = 0; k < KW; ++k) {
        x[k] = _mm256_fmadd_ps(g0, _mm256_load_ps(p + k * cstep), x[k]);
        y[k] = _mm256_fmadd_ps(g1, _mm256_load_ps(p + ostep + k * cstep), y[k]);
      }
    }
    if (ow < a.Wo) {
      const __m256 g0 = _mm256_load_ps(g + ow * kLanes);
      const float* p = v + ow * ostep;
      for (int k = 0; k < KW; ++k) x[k] = _mm256_fmadd_ps(g0, _mm256_load_ps(p + k * cstep), x[k]);
    }
    for (int k = 0; k < KW; ++k) {
      float* o = a.gb + k * a.gbs + cb * kLanes;
      _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), _mm256_add_ps(x[k], y[k])));
    }
  }
}

BSCONV_AVX2 inline bool gb_avx2(const GbArgs<float>& a) {
  switch (a.Kw) {
    case 1: gb_avx2_k<1>(a); return true;
    case 2: gb_avx2_k<2>(a); return true;
    case 3: gb_avx2_k<3>(a); return true;
    case 4: gb_avx2_k<4>(a); return true;
    case 5: gb_avx2_k<5>(a); return true;
    case 6: gb_avx2_k<6>(a); return true;
    case 7: gb_avx2_k<7>(a); return true;
    default: return false;
  }
}

// --- small projections straight into B8 rows ---

// dst[cb][p][8] = f(sum_k x(p, k) * wt[k * wts + cb*8 + j]) for PX pixels from p0 and NB
// channel blocks from cb0; x(p, k) = x[k * ldx + p] (XCM) or x[p * ldx + k].
template <int PX, int NB, bool XCM>
BSCONV_AVX2 inline void proj_tile_avx2(const float* x, int64_t ldx, int64_t K, const float* wt,
                                       int64_t wts, float* dst, int64_t dcbs, int64_t p0,
                                       int64_t cb0, bool mid, const float* scale,
                                       const float* shift, int act) {
  __m256 acc[PX * NB];  // one-dimensional: GCC keeps it in registers (a 2-D array it spills)
  for (int i = 0; i < PX * NB; ++i) acc[i] = _mm256_setzero_ps();
  const float* wk = wt + cb0 * kLanes;
  for (int64_t k = 0; k < K; ++k) {
    __m256 w[NB];
    for (int nb = 0; nb < NB; ++nb) w[nb] = _mm256_loadu_ps(wk + k * wts + nb * kLanes);
    for (int px = 0; px < PX; ++px) {
      const __m256 xb =
          _mm256_broadcast_ss(XCM ? x + k * ldx + p0 + px : x + (p0 + px) * ldx + k);
      for (int nb = 0; nb < NB; ++nb) {
        acc[px * NB + nb] = _mm256_fmadd_ps(xb, w[nb], acc[px * NB + nb]);
      }
    }
  }
  // Plain stores first (a loop over the accumulators that GCC unrolls, so they stay in
  // registers), then the mid transform in place.
#pragma GCC unroll 16
  for (int nb = 0; nb < NB; ++nb) {
#pragma GCC unroll 16
    for (int px = 0; px < PX; ++px) {
      _mm256_store_ps(dst + (cb0 + nb) * dcbs + (p0 + px) * kLanes, acc[px * NB + nb]);
    }
  }
  if (!mid) return;
  for (int nb = 0; nb < NB; ++nb) {
    const int64_t n0 = (cb0 + nb) * kLanes;
    float* d = dst + (cb0 + nb) * dcbs + p0 * kLanes;
    const __m256 sc = _mm256_loadu_ps(scale + n0), sh = _mm256_loadu_ps(shift + n0);
    for (int px = 0; px < PX; ++px) {
      const __m256 v = _mm256_load_ps(d + px * kLanes);
      _mm256_store_ps(d + px * kLanes, avx2_activate(_mm256_fmadd_ps(v, sc, sh), act));
    }
  }
}

template <int NB, bool XCM>
BSCONV_AVX2 inline void proj_row_nb_avx2(const float* x, int64_t ldx, int64_t K, const float* wt,
                                         int64_t wts, float* dst, int64_t dcbs, int64_t P,
                                         int64_t cb0, bool mid, const float* scale,
                                         const float* shift, int act) {
  int64_t p = 0;
  for (; p + 6 <= P; p += 6) {
    proj_tile_avx2<6, NB, XCM>(x, ldx, K, wt, wts, dst, dcbs, p, cb0, mid, scale, shift, act);
  }
  switch (P - p) {
#define BSCONV_PT(n) \
  case n: return proj_tile_avx2<n, NB, XCM>(x, ldx, K, wt, wts, dst, dcbs, p, cb0, mid, scale, shift, act);
    BSCONV_PT(1)
    BSCONV_PT(2)
    BSCONV_PT(3)
    BSCONV_PT(4)
    BSCONV_PT(5)
#undef BSCONV_PT
    default:
      return;
  }
}

// P pixels (x(p, k) as above), `lanes` channels (a multiple of 8) into a B8 row.
template <bool XCM>
BSCONV_AVX2 inline void proj_b8_avx2(const float* x, int64_t ldx, int64_t P, int64_t K,
                                     const float* wt, int64_t wts, int64_t lanes, float* dst,
                                     int64_t dcbs, bool mid, const float* scale,
                                     const float* shift, int act) {
  const int64_t ncb = lanes / kLanes;
  if (XCM) {
    // The next image row (if any) of each channel plane: K short streams, too many for the
    // hardware prefetchers to follow.
    for (int64_t k = 0; k < K; ++k) {
      const char* next = reinterpret_cast<const char*>(x + k * ldx + P);
      for (int64_t b = 0; b < P * int64_t(sizeof(float)); b += 64) {
        _mm_prefetch(next + b, _MM_HINT_T0);
      }
    }
  }
  int64_t cb = 0;
  for (; cb + 2 <= ncb; cb += 2) {
    proj_row_nb_avx2<2, XCM>(x, ldx, K, wt, wts, dst, dcbs, P, cb, mid, scale, shift, act);
  }
  if (cb < ncb) {
    proj_row_nb_avx2<1, XCM>(x, ldx, K, wt, wts, dst, dcbs, P, cb, mid, scale, shift, act);
  }
}

// --- layout changes ---

BSCONV_AVX2 inline void cl_to_b8_avx2(const float* src, int64_t sps, int64_t pixels,
                                      int64_t valid, float* dst, int64_t dcbs, bool mid,
                                      const float* scale, const float* shift, int act) {
  const int64_t full = valid / kLanes * kLanes;
  for (int64_t cb = 0; cb * kLanes < full; ++cb) {
    const int64_t n0 = cb * kLanes;
    float* d = dst + cb * dcbs;
    const float* s = src + n0;
    if (mid) {
      const __m256 sc = _mm256_loadu_ps(scale + n0), sh = _mm256_loadu_ps(shift + n0);
      for (int64_t p = 0; p < pixels; ++p) {
        const __m256 z = _mm256_fmadd_ps(_mm256_loadu_ps(s + p * sps), sc, sh);
        _mm256_storeu_ps(d + p * kLanes, avx2_activate(z, act));
      }
    } else {
      for (int64_t p = 0; p < pixels; ++p) {
        _mm256_storeu_ps(d + p * kLanes, _mm256_loadu_ps(s + p * sps));
      }
    }
  }
  if (full < valid) {
    // The partial last block (the source may end right after its last channel).
    for (int64_t p = 0; p < pixels; ++p) {
      for (int64_t n = full; n < valid; ++n) {
        const float v = src[p * sps + n];
        dst[b8(p, n, dcbs)] = mid ? activate(std::fma(v, scale[n], shift[n]), act) : v;
      }
    }
  }
}

BSCONV_AVX2 inline void gv_to_cl_avx2(const float* gvb, int64_t gcbs, const float* v,
                                      float* gvc, int64_t ps, int64_t pixels, int64_t lanes,
                                      bool mid, const float* scale, const float* shift, int act,
                                      double* gscale, double* gshift) {
  for (int64_t cb = 0; cb * kLanes < lanes; ++cb) {
    const int64_t n0 = cb * kLanes;
    const float* g = gvb + cb * gcbs;
    if (!mid) {
      for (int64_t p = 0; p < pixels; ++p) {
        _mm256_storeu_ps(gvc + p * ps + n0, _mm256_loadu_ps(g + p * kLanes));
      }
      continue;
    }
    const __m256 s = _mm256_loadu_ps(scale + n0), t = _mm256_loadu_ps(shift + n0);
    __m256d sl = _mm256_setzero_pd(), sh = _mm256_setzero_pd();
    __m256d tl = _mm256_setzero_pd(), th = _mm256_setzero_pd();
    for (int64_t p = 0; p < pixels; ++p) {
      const __m256 vv = _mm256_loadu_ps(v + p * ps + n0);
      const __m256 gz = _mm256_mul_ps(_mm256_loadu_ps(g + p * kLanes),
                                      avx2_activate_grad(_mm256_fmadd_ps(vv, s, t), act));
      const __m256 gzv = _mm256_mul_ps(gz, vv);
      sl = _mm256_add_pd(sl, _mm256_cvtps_pd(_mm256_castps256_ps128(gzv)));
      sh = _mm256_add_pd(sh, _mm256_cvtps_pd(_mm256_extractf128_ps(gzv, 1)));
      tl = _mm256_add_pd(tl, _mm256_cvtps_pd(_mm256_castps256_ps128(gz)));
      th = _mm256_add_pd(th, _mm256_cvtps_pd(_mm256_extractf128_ps(gz, 1)));
      _mm256_storeu_ps(gvc + p * ps + n0, _mm256_mul_ps(gz, s));
    }
    _mm256_storeu_pd(gscale + n0, _mm256_add_pd(_mm256_loadu_pd(gscale + n0), sl));
    _mm256_storeu_pd(gscale + n0 + 4, _mm256_add_pd(_mm256_loadu_pd(gscale + n0 + 4), sh));
    _mm256_storeu_pd(gshift + n0, _mm256_add_pd(_mm256_loadu_pd(gshift + n0), tl));
    _mm256_storeu_pd(gshift + n0 + 4, _mm256_add_pd(_mm256_loadu_pd(gshift + n0 + 4), th));
  }
}

// Rows [0, count) of 8 rows from src (stride sld), len <= 8 floats each (the rest zero).
BSCONV_AVX2 inline void load_rows8_avx2(const float* src, int64_t sld, int64_t count,
                                        int64_t len, __m256* r) {
  if (len == 8) {
    for (int64_t i = 0; i < 8; ++i) {
      r[i] = i < count ? _mm256_loadu_ps(src + i * sld) : _mm256_setzero_ps();
    }
    return;
  }
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(len)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (int64_t i = 0; i < 8; ++i) {
    r[i] = i < count ? _mm256_maskload_ps(src + i * sld, mask) : _mm256_setzero_ps();
  }
}


BSCONV_AVX2 inline void cm_to_b8_avx2(const float* src, int64_t sld, int64_t pixels,
                                      int64_t valid, float* dst, int64_t dcbs, bool mid,
                                      const float* scale, const float* shift, int act) {
  for (int64_t cb = 0; cb * kLanes < valid; ++cb) {
    const int64_t n0 = cb * kLanes, rows = std::min(kLanes, valid - n0);
    const float* s = src + n0 * sld;
    float* d = dst + cb * dcbs;
    __m256 sc = _mm256_setzero_ps(), sh = _mm256_setzero_ps();
    if (mid) {
      sc = _mm256_loadu_ps(scale + n0);
      sh = _mm256_loadu_ps(shift + n0);
    }
    for (int64_t p = 0; p < pixels; p += 8) {
      const int64_t len = std::min<int64_t>(8, pixels - p);
      __m256 r[8];
      load_rows8_avx2(s + p, sld, rows, len, r);
      transpose8_regs_avx2(r);
      float* dp = d + p * kLanes;
      if (mid) {
        for_rows8(len, r, [&](int u, __m256 v) BSCONV_AVX2_INLINE {
          _mm256_storeu_ps(dp + u * kLanes, avx2_activate(_mm256_fmadd_ps(v, sc, sh), act));
        });
      } else {
        for_rows8(len, r, [&](int u, __m256 v) BSCONV_AVX2_INLINE {
          _mm256_storeu_ps(dp + u * kLanes, v);
        });
      }
    }
  }
}

// In chunks of kTransposeRows source rows, eight source columns at a time across the chunk:
// each step writes eight destination rows, and the chunk's source lines (16 KiB) stay in L1
// between the two steps that read each of them. Walking a row block across all the columns
// instead wrote 32 bytes into every destination row per step: 8-32 passes over a destination
// larger than L1. Measured on the 2-core Xeon (AVX-512 host), one thread, transposing whole
// arrays: 64 x 12544 (NCHW x rows of 112x112, in 448-pixel runs) 14 -> 17 GB/s, 256 x 784
// 18 -> 32, 512 x 196 14 -> 31, 1024 x 49 13 -> 24; channels-last back to channel-major
// (rows = pixels): 512 x 196 30 -> 34, 16 x 1024 17 -> 37, 1568 x 512 14.1 -> 13.4.
constexpr int64_t kTransposeRows = 256;
BSCONV_AVX2 inline void transpose_avx2(int64_t rows, int64_t cols, const float* src,
                                       int64_t lds, float* dst, int64_t ldd) {
  const int64_t R8 = rows / 8 * 8, C8 = cols / 8 * 8;
  for (int64_t rb = 0; rb < R8; rb += kTransposeRows) {
    const int64_t re = std::min(R8, rb + kTransposeRows);
    for (int64_t c0 = 0; c0 < C8; c0 += 8) {
      for (int64_t r0 = rb; r0 < re; r0 += 8) {
        __m256 t[8];
        for (int i = 0; i < 8; ++i) t[i] = _mm256_loadu_ps(src + (r0 + i) * lds + c0);
        transpose8_regs_avx2(t);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (c0 + i) * ldd + r0, t[i]);
      }
    }
  }
  for (int64_t c = C8; c < cols; ++c) {
    for (int64_t r = 0; r < R8; ++r) dst[c * ldd + r] = src[r * lds + c];
  }
  for (int64_t r = R8; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 float loops for stride 1: a 512-bit register holds two neighbouring pixels of a B8
// block (16 floats, contiguous in a B8 row), so the depthwise, transposed depthwise and
// blueprint correlation loops do half the FMAs of the AVX2 ones with the taps broadcast to
// both halves. Every output element sums the same terms in the same order as the AVX2 loop
// (bit for bit the same results); stride 2 and the single last pixel of a row stay AVX2.

#define BSCONV_AVX512 __attribute__((target("avx2,fma,avx512f,avx512dq,avx512bw,avx512vl")))

// The taps (or bias) of one channel block, in both halves.
BSCONV_AVX512 inline __m512 bcast8_avx512(__m256 v) {
  // (the zero-masked form with all lanes set: the unmasked _mm512_broadcast_f32x8 trips GCC
  // 12's -Wmaybe-uninitialized in its own header)
  return _mm512_maskz_broadcast_f32x8(__mmask16(0xFFFF), v);
}
BSCONV_AVX512 inline __m512 bcast8_avx512(const float* p) {
  return bcast8_avx512(_mm256_loadu_ps(p));
}

// The low and high pixel of a pair (zero-masked forms, for the same reason; GCC 12's
// _mm512_castps512_ps256 is an extract with an undefined pass-through operand).
BSCONV_AVX512 inline __m256 lo8_avx512(__m512 v) {
  return _mm512_maskz_extractf32x8_ps(__mmask8(0xFF), v, 0);
}
BSCONV_AVX512 inline __m256 hi8_avx512(__m512 v) {
  return _mm512_maskz_extractf32x8_ps(__mmask8(0xFF), v, 1);
}

// Pixel j of the pair at o, pixel j + 1 at o + ops.
BSCONV_AVX512 inline void store_pair_avx512(float* o, int64_t ops, __m512 v) {
  if (ops == kLanes) {
    _mm512_storeu_ps(o, v);
    return;
  }
  _mm256_storeu_ps(o, lo8_avx512(v));
  _mm256_storeu_ps(o + ops, hi8_avx512(v));
}

// --- forward depthwise, stride 1 ---

// 2J output columns from j, taps read from memory (any kernel size).
template <int J>
BSCONV_AVX512 inline void dw_pairs_avx512(const DwArgs<float>& a, const float* const* r,
                                          const float* tp, __m512 b, float* o, int64_t j) {
  const int64_t d = a.dw * kLanes;
  __m512 acc[J];
  for (int u = 0; u < J; ++u) acc[u] = b;
  for (int64_t kh = 0; kh < a.Kh; ++kh) {
    const float* row = r[kh] + j * kLanes;
    const float* t = tp + kh * a.Kw * a.ts;
    for (int64_t kw = 0; kw < a.Kw; ++kw) {
      const __m512 tv = bcast8_avx512(t + kw * a.ts);
      const float* p = row + kw * d;
      for (int u = 0; u < J; ++u) {
        acc[u] = _mm512_fmadd_ps(tv, _mm512_loadu_ps(p + u * 2 * kLanes), acc[u]);
      }
    }
  }
  for (int u = 0; u < J; ++u) store_pair_avx512(o + (j + 2 * u) * a.ops, a.ops, acc[u]);
}

// 3 x 3 kernels: 2J output columns from j with the taps in registers.
template <int J>
BSCONV_AVX512 inline void dw_pairs3_avx512(const DwArgs<float>& a, const float* const* r,
                                           const __m512* t, __m512 b, float* o, int64_t j) {
  const int64_t d = a.dw * kLanes;
  __m512 acc[J];
  for (int u = 0; u < J; ++u) acc[u] = b;
  for (int kh = 0; kh < 3; ++kh) {
    const float* row = r[kh] + j * kLanes;
    for (int u = 0; u < J; ++u) {
      const float* p = row + u * 2 * kLanes;
      acc[u] = _mm512_fmadd_ps(t[kh * 3 + 0], _mm512_loadu_ps(p), acc[u]);
      acc[u] = _mm512_fmadd_ps(t[kh * 3 + 1], _mm512_loadu_ps(p + d), acc[u]);
      acc[u] = _mm512_fmadd_ps(t[kh * 3 + 2], _mm512_loadu_ps(p + 2 * d), acc[u]);
    }
  }
  for (int u = 0; u < J; ++u) store_pair_avx512(o + (j + 2 * u) * a.ops, a.ops, acc[u]);
}

// NCHW output: 8 output columns from j of channel block cb (as dw_block_cm_avx2).
template <bool K3>
BSCONV_AVX512 inline void dw_block_cm_avx512(const DwArgs<float>& a, const float* const* r,
                                             const float* tp, __m512 b, int64_t cb, float* o,
                                             int64_t j) {
  const int64_t d = a.dw * kLanes, Kh = K3 ? 3 : a.Kh, Kw = K3 ? 3 : a.Kw;
  __m512 acc[4];
  for (int u = 0; u < 4; ++u) acc[u] = b;
  for (int64_t kh = 0; kh < Kh; ++kh) {
    const float* row = r[kh] + j * kLanes;
    const float* t = tp + kh * Kw * a.ts;
    for (int64_t kw = 0; kw < Kw; ++kw) {
      const __m512 tv = bcast8_avx512(t + kw * a.ts);
      const float* p = row + kw * d;
      for (int u = 0; u < 4; ++u) {
        acc[u] = _mm512_fmadd_ps(tv, _mm512_loadu_ps(p + u * 2 * kLanes), acc[u]);
      }
    }
  }
  __m256 cols[8];
  for (int u = 0; u < 4; ++u) {
    cols[2 * u] = lo8_avx512(acc[u]);
    cols[2 * u + 1] = hi8_avx512(acc[u]);
  }
  store_cm_block_avx2(a, cols, cb, o, j);
}

BSCONV_AVX512 inline void dw_cm_avx512(const DwArgs<float>& a) {
  const bool k3 = a.Kh == 3 && a.Kw == 3;
  const float* r[kMaxK];
  for (int64_t cb = 0; cb * kLanes < a.valid; ++cb) {
    const float* tp = a.taps + cb * kLanes;
    const __m512 b = bcast8_avx512(a.bias + cb * kLanes);
    for (int64_t i = 0; i < a.rows_out; ++i) {
      dw_input_rows(a, cb, i, r);
      for (int64_t j = 0; j < a.Wo; j += 8) {
        if (k3) {
          dw_block_cm_avx512<true>(a, r, tp, b, cb, a.outs[i], j);
        } else {
          dw_block_cm_avx512<false>(a, r, tp, b, cb, a.outs[i], j);
        }
      }
    }
  }
}

BSCONV_AVX512 inline void dw_avx512(const DwArgs<float>& a) {
  if (a.sw != 1) return dw_avx2(a);
  if (a.cm_out) return dw_cm_avx512(a);
  const bool k3 = a.Kh == 3 && a.Kw == 3;
  const float* r[kMaxK];
  for (int64_t cb = 0; cb * kLanes < a.lanes; ++cb) {
    const float* tp = a.taps + cb * kLanes;
    const __m256 b = _mm256_loadu_ps(a.bias + cb * kLanes);
    const __m512 b2 = bcast8_avx512(b);
    __m256 t[9];
    __m512 t2[9];
    if (k3) {
      for (int k = 0; k < 9; ++k) {
        t[k] = _mm256_loadu_ps(tp + k * a.ts);
        t2[k] = bcast8_avx512(t[k]);
      }
    }
    for (int64_t i = 0; i < a.rows_out; ++i) {
      dw_input_rows(a, cb, i, r);
      float* o = a.outs[i] + cb * a.ocbs;
      int64_t j = 0;
      if (k3) {
        for (; j + 12 <= a.Wo; j += 12) dw_pairs3_avx512<6>(a, r, t2, b2, o, j);
      } else {
        for (; j + 16 <= a.Wo; j += 16) dw_pairs_avx512<8>(a, r, tp, b2, o, j);
      }
      const int64_t pairs = (a.Wo - j) / 2;
#define BSCONV_DW_PAIRS(J)                              \
  case J:                                               \
    if (k3) {                                           \
      dw_pairs3_avx512<J>(a, r, t2, b2, o, j);          \
    } else {                                            \
      dw_pairs_avx512<J>(a, r, tp, b2, o, j);           \
    }                                                   \
    break;
      switch (pairs) {
        BSCONV_DW_PAIRS(1)
        BSCONV_DW_PAIRS(2)
        BSCONV_DW_PAIRS(3)
        BSCONV_DW_PAIRS(4)
        BSCONV_DW_PAIRS(5)
        BSCONV_DW_PAIRS(6)
        BSCONV_DW_PAIRS(7)
        default:
          break;
      }
#undef BSCONV_DW_PAIRS
      j += 2 * pairs;
      if (j < a.Wo) dw_tail_avx2(a, r, tp, t, k3, b, o, j, a.Wo - j);
    }
  }
}

// --- backward transposed depthwise, stride 1 ---

// 2J pixels from t (one phase: pixel t + u reads gy columns t + u + offs[q]).
template <int J>
BSCONV_AVX512 inline void gv_pairs_avx512(const GvArgs<float>& a, const float* const* g,
                                          const float* tp, float* o, const int64_t* kws,
                                          const int64_t* offs, int64_t nkw, int64_t t) {
  __m512 acc[J];
  for (int u = 0; u < J; ++u) acc[u] = _mm512_setzero_ps();
  for (int64_t i = 0; i < a.nk; ++i) {
    const float* ti = tp + a.khs[i] * a.Kw * a.ts;
    for (int64_t q = 0; q < nkw; ++q) {
      const __m512 tv = bcast8_avx512(ti + kws[q] * a.ts);
      const float* p = g[i] + (t + offs[q]) * kLanes;
      for (int u = 0; u < J; ++u) {
        acc[u] = _mm512_fmadd_ps(tv, _mm512_loadu_ps(p + u * 2 * kLanes), acc[u]);
      }
    }
  }
  for (int u = 0; u < J; ++u) _mm512_storeu_ps(o + (t + 2 * u) * kLanes, acc[u]);
}

BSCONV_AVX512 inline void gv_avx512(const GvArgs<float>& a) {
  if (a.sw != 1) return gv_avx2(a);
  const float* g[kMaxK];
  const int64_t* kws = a.ph_kw;
  const int64_t* offs = a.ph_off;
  const int64_t nkw = a.ph_n[0];
  for (int64_t cb = 0; cb * kLanes < a.lanes; ++cb) {
    for (int64_t i = 0; i < a.nk; ++i) g[i] = a.grows[i] + cb * a.gcbs;
    const float* tp = a.taps + cb * kLanes;
    float* o = a.out + cb * a.ocbs;
    int64_t t = 0;
    for (; t + 16 <= a.W; t += 16) gv_pairs_avx512<8>(a, g, tp, o, kws, offs, nkw, t);
    const int64_t pairs = (a.W - t) / 2;
    switch (pairs) {
      case 1: gv_pairs_avx512<1>(a, g, tp, o, kws, offs, nkw, t); break;
      case 2: gv_pairs_avx512<2>(a, g, tp, o, kws, offs, nkw, t); break;
      case 3: gv_pairs_avx512<3>(a, g, tp, o, kws, offs, nkw, t); break;
      case 4: gv_pairs_avx512<4>(a, g, tp, o, kws, offs, nkw, t); break;
      case 5: gv_pairs_avx512<5>(a, g, tp, o, kws, offs, nkw, t); break;
      case 6: gv_pairs_avx512<6>(a, g, tp, o, kws, offs, nkw, t); break;
      case 7: gv_pairs_avx512<7>(a, g, tp, o, kws, offs, nkw, t); break;
      default: break;
    }
    t += 2 * pairs;
    if (t < a.W) gv_block_avx2<1>(a, g, tp, o, kws, offs, nkw, t, t);
  }
}

// --- backward blueprint correlation, stride 1 ---

// The AVX2 loop sums even output columns into x and odd ones into y, then adds x + y; here the
// low half of a register is x and the high half y.
template <int KW>
BSCONV_AVX512 inline void gb_avx512_k(const GbArgs<float>& a) {
  const int64_t cstep = a.dw * kLanes;
  for (int64_t cb = 0; cb * kLanes < a.lanes; ++cb) {
    const float* g = a.grow + cb * a.gcbs;
    const float* v = a.arow + cb * a.acbs;
    __m512 xy[KW];
    for (int k = 0; k < KW; ++k) xy[k] = _mm512_setzero_ps();
    int64_t ow = 0;
    for (; ow + 2 <= a.Wo; ow += 2) {
      const __m512 g01 = _mm512_loadu_ps(g + ow * kLanes);
      const float* p = v + ow * kLanes;
      for (int k = 0; k < KW; ++k) {
        xy[k] = _mm512_fmadd_ps(g01, _mm512_loadu_ps(p + k * cstep), xy[k]);
      }
    }
    __m256 x[KW];
    for (int k = 0; k < KW; ++k) x[k] = lo8_avx512(xy[k]);
    if (ow < a.Wo) {
      const __m256 g0 = _mm256_load_ps(g + ow * kLanes);
      const float* p = v + ow * kLanes;
      for (int k = 0; k < KW; ++k) x[k] = _mm256_fmadd_ps(g0, _mm256_load_ps(p + k * cstep), x[k]);
    }
    for (int k = 0; k < KW; ++k) {
      float* o = a.gb + k * a.gbs + cb * kLanes;
      const __m256 y = hi8_avx512(xy[k]);
      _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), _mm256_add_ps(x[k], y)));
    }
  }
}

BSCONV_AVX512 inline bool gb_avx512(const GbArgs<float>& a) {
  if (a.sw != 1) return gb_avx2(a);
  switch (a.Kw) {
    case 1: gb_avx512_k<1>(a); return true;
    case 2: gb_avx512_k<2>(a); return true;
    case 3: gb_avx512_k<3>(a); return true;
    case 4: gb_avx512_k<4>(a); return true;
    case 5: gb_avx512_k<5>(a); return true;
    case 6: gb_avx512_k<6>(a); return true;
    case 7: gb_avx512_k<7>(a); return true;
    default: return false;
  }
}

#endif  // BSCONV_X86_AVX2

// ---------------------------------------------------------------------------------------------
// Dispatch: the generic template for every type, the AVX2 loop for float when enabled.

// True when proj_b8 runs (float, AVX2, small K); otherwise the caller uses the GEMM path.
constexpr int64_t kSmallProjK = 64;
// Whether proj_b8 runs for small K and channel-major x with this accumulation type.
template <typename T>
bool small_proj_enabled() {
#if BSCONV_X86_AVX2
  if constexpr (std::is_same_v<T, float>) return avx2_enabled();
#endif
  return false;
}
template <typename T>
bool proj_b8(const T* x, int64_t ldx, bool xcm, int64_t P, int64_t K, const T* wt, int64_t wts,
             int64_t lanes, T* dst, int64_t dcbs, bool mid, const T* scale, const T* shift,
             int act) {
#if BSCONV_X86_AVX2
  if constexpr (std::is_same_v<T, float>) {
    // Channel-major x only: with channels-last x MKL's GEMM plus a copy is faster.
    if (small_proj_enabled<T>() && K <= kSmallProjK && xcm) {
      proj_b8_avx2<true>(x, ldx, P, K, wt, wts, lanes, dst, dcbs, mid, scale, shift, act);
      return true;
    }
  }
#endif
  (void)x, (void)ldx, (void)xcm, (void)P, (void)K, (void)wt, (void)wts, (void)lanes, (void)dst;
  (void)dcbs, (void)mid, (void)scale, (void)shift, (void)act;
  return false;
}

template <typename T>
void depthwise_rows(const DwArgs<T>& a) {
#if BSCONV_X86_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (avx512_enabled() && a.Kh <= kMaxK) return dw_avx512(a);
    if (avx2_enabled() && a.Kh <= kMaxK) return dw_avx2(a);
  }
#endif
  dw_generic(a);
}

template <typename T>
void transposed_depthwise_row(const GvArgs<T>& a) {
#if BSCONV_X86_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (avx512_enabled() && a.nk <= kMaxK) return gv_avx512(a);
    if (avx2_enabled() && a.nk <= kMaxK) return gv_avx2(a);
  }
#endif
  gv_generic(a);
}

template <typename T>
void blueprint_grad_row(const GbArgs<T>& a) {
#if BSCONV_X86_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (avx512_enabled() && gb_avx512(a)) return;
    if (avx2_enabled() && gb_avx2(a)) return;
  }
#endif
  gb_generic(a);
}

template <typename S, typename T>
void cl_to_b8(const S* src, int64_t sps, int64_t pixels, int64_t valid, T* dst, int64_t dcbs,
              bool mid, const T* scale, const T* shift, int act) {
#if BSCONV_X86_AVX2
  if constexpr (std::is_same_v<S, float> && std::is_same_v<T, float>) {
    if (avx2_enabled()) {
      return cl_to_b8_avx2(src, sps, pixels, valid, dst, dcbs, mid, scale, shift, act);
    }
  }
#endif
  cl_to_b8_generic(src, sps, pixels, valid, dst, dcbs, mid, scale, shift, act);
}

template <typename T>
void gv_to_cl(const T* gvb, int64_t gcbs, const T* v, T* gvc, int64_t ps, int64_t pixels,
              int64_t lanes, bool mid, const T* scale, const T* shift, int act, double* gscale,
              double* gshift) {
#if BSCONV_X86_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (avx2_enabled()) {
      return gv_to_cl_avx2(gvb, gcbs, v, gvc, ps, pixels, lanes, mid, scale, shift, act,
                           gscale, gshift);
    }
  }
#endif
  gv_to_cl_generic(gvb, gcbs, v, gvc, ps, pixels, lanes, mid, scale, shift, act, gscale,
                   gshift);
}

template <typename S, typename T>
void cm_to_b8(const S* src, int64_t sld, int64_t pixels, int64_t valid, T* dst, int64_t dcbs,
              bool mid, const T* scale, const T* shift, int act) {
#if BSCONV_X86_AVX2
  if constexpr (std::is_same_v<S, float> && std::is_same_v<T, float>) {
    if (avx2_enabled()) {
      return cm_to_b8_avx2(src, sld, pixels, valid, dst, dcbs, mid, scale, shift, act);
    }
  }
#endif
  cm_to_b8_generic(src, sld, pixels, valid, dst, dcbs, mid, scale, shift, act);
}

// d[i] = D(s[i]) for i < n: the copies between a tensor's dtype and the accumulation type.
// bfloat16 <-> float with AVX2, bit for bit c10's conversions (widening moves the 16 bits up;
// narrowing rounds to nearest even, NaN -> 0x7FC0); the element loop compiled for the baseline
// ISA otherwise. bfloat16 forward of 1024->1024 7x7 B=1 NCHW, one thread: the element loops
// were ~12% of its time (weights and x), 128->22->128 56x56 B=8: ~23% (x and y).
#if BSCONV_X86_AVX2
BSCONV_AVX2 inline void bf16_to_float_avx2(const c10::BFloat16* s, float* d, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
  for (; i < n; ++i) d[i] = float(s[i]);
}
BSCONV_AVX2 inline void float_to_bf16_avx2(const float* s, c10::BFloat16* d, int64_t n) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF);
  const __m256i qnan = _mm256_set1_epi32(0x7FC0);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(s + i);
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, bias)), 16);
    r = _mm256_blendv_epi8(r, qnan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    // Each 32-bit lane holds a value < 2^16: the saturating pack keeps it.
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), h);
  }
  for (; i < n; ++i) d[i] = c10::BFloat16(s[i]);
}
#endif

#if BSCONV_X86_AVX2
// The same rounding on 16 lanes (vpmovdw narrows the 32-bit lanes, each < 2^16; the tail is a
// masked 16-bit store, AVX-512 BW).
// Not vcvtneps2bf16 (AVX-512 BF16), which flushes denormal inputs and outputs to zero where
// c10 rounds them. bfloat16 forward of 32->64 112x112 B=8 channels-last, one thread: the AVX2
// loop on 64-channel pixel runs was 19% of its time (perf).
BSCONV_AVX512 inline __m256i bf16x16_avx512(__m512 v) {
  // (zero-masked forms with all lanes set: the unmasked ones trip GCC 12's
  // -Wmaybe-uninitialized on their undefined pass-through operand)
  const __mmask16 all = 0xFFFF;
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_maskz_srli_epi32(all, u, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __m512i r = _mm512_mask_mov_epi32(_mm512_maskz_srli_epi32(all, up, 16),
                                          _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                          _mm512_set1_epi32(0x7FC0));
  return _mm512_maskz_cvtepi32_epi16(all, r);
}
// The same rounding by vcvtneps2bf16 (AVX-512 BF16; inline assembly, so that the callers need
// no target of their own) where no lane is a NaN or a denormal, which it would treat otherwise
// than c10 (quieting NaNs with their payload, flushing denormals): the same bits, in one
// instruction instead of six. kInsn false: bf16x16_avx512 only.
template <bool kInsn>
BSCONV_AVX512 inline __m256i bf16x16_round_avx512(__m512 v) {
  if constexpr (kInsn) {
    // fpclass 0xA1: quiet NaN (0x01), denormal (0x20), signaling NaN (0x80)
    if (__builtin_expect(_mm512_fpclass_ps_mask(v, 0xA1) == 0, 1)) {
      __m256i r;
      asm("vcvtneps2bf16 %1, %0" : "=v"(r) : "v"(v));
      return r;
    }
  }
  return bf16x16_avx512(v);
}

BSCONV_AVX512 inline void float_to_bf16_avx512(const float* s, c10::BFloat16* d, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), bf16x16_avx512(_mm512_loadu_ps(s + i)));
  }
  if (i < n) {
    // The last n - i < 16 by a masked load and store (short NCHW output rows).
    const __mmask16 m = __mmask16((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(d + i, m, bf16x16_avx512(_mm512_maskz_loadu_ps(m, s + i)));
  }
}

BSCONV_AVX2 inline void float_to_bf16_rows_avx2(const float* s, int64_t sld, c10::BFloat16* d,
                                                int64_t dld, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) float_to_bf16_avx2(s + r * sld, d + r * dld, n);
}
#endif

// --- forward depthwise on B16 rows (AVX-512) ---
//
// Stride 1 or 2, dilation 1, Kw 3, 5 or 7, channel counts in whole 16-lane vectors. The v
// rows are blocks of 16 channels (B16: each block a [pixel][16] array, filled by whole-vector
// copies of the GEMM's channels-last rows), and a tile of U output columns of one 16-channel
// vector keeps its accumulators and one kernel row's taps in registers while each v pixel of
// the row is loaded once for the Kw taps that read it (a sliding window: Kh * (sw (U - 1) +
// Kw) aligned loads for Kh * Kw * U multiply-adds, against one load per multiply-add in the B8
// loops, half of them split across cache lines; stride 2 ran the AVX2 B8 loop). Each output
// sums its terms in the B8 loops' order (bias, then kh, then kw), so the results are the same
// bit for bit; bfloat16 outputs are rounded in registers (bf16x16_avx512, c10's rounding) as
// they are stored, instead of in a second pass. NCHW outputs: the 16 x 16 tile of
// accumulators is transposed in registers and stored as 16 channel rows of U pixels. The order
// of the tiles follows the stores: NCHW and channels-last float outputs go channel vector by
// channel vector, each over the block's rows (whole-line stores along 16 output rows; with the
// channel vectors innermost, float 32->64 112x112 B=8 NCHW ran twice as long as the B8 loops),
// channels-last bfloat16 outputs (half a line per store) go tile by tile with the channel
// vectors innermost, so that a pixel's line is filled at once.
template <typename O>
struct DwClArgs {
  int64_t rows_out;
  const float* const* rows;  // [rows_out * Kh] padded B16 rows (zero rows: cbs 0)
  const int64_t* rcbs;       // their channel-block strides
  int64_t Kh, Kw, sw, Wo;
  int64_t lanes;  // a multiple of 16
  const float* taps;  // taps[(kh * Kw + kw) * ts + n]
  int64_t ts;
  const float* bias;
  O* const* outs;  // out_i(j, n) = outs[i][j * ops + n], or with cm_out outs[i][n * ocs + j]
  int64_t ops;
  bool cm_out;
  int64_t ocs;
};

// Whether depthwise_rows_cl takes a layer's forward (and gv_rows_cl / gb_rows_cl its float32
// backward): stride, dilation, kernel width.
inline bool dw_cl_shape(int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t Kh, int64_t Kw) {
  return (sh == 1 || sh == 2) && (sw == 1 || sw == 2) && dh == 1 && dw == 1 && Kh <= kMaxK &&
         (Kw == 3 || Kw == 5 || Kw == 7);
}

#if BSCONV_X86_AVX2
// In-register transpose: r[u] lane n <- r[n] lane u (32-bit interleaves, 64-bit interleaves,
// then two rounds of 128-bit lane shuffles).
BSCONV_AVX512 inline __attribute__((always_inline)) void transpose16_avx512(__m512* r) {
  // (zero-masked forms with all lanes set, as in bf16x16_avx512)
  const __mmask16 all = 0xFFFF;
  const __mmask8 all8 = 0xFF;
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_maskz_unpacklo_ps(all, r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_maskz_unpackhi_ps(all, r[2 * i], r[2 * i + 1]);
  }
  // u[4g + e], 128-bit lane k: element 4k + e of rows 4g .. 4g + 3.
  __m512 u[16];
  for (int g = 0; g < 4; ++g) {
    const __m512d lo0 = _mm512_castps_pd(t[4 * g]), lo1 = _mm512_castps_pd(t[4 * g + 2]);
    const __m512d hi0 = _mm512_castps_pd(t[4 * g + 1]), hi1 = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g + 0] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(all8, lo0, lo1));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(all8, lo0, lo1));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(all8, hi0, hi1));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(all8, hi0, hi1));
  }
  for (int e = 0; e < 4; ++e) {
    const __m512 va = _mm512_maskz_shuffle_f32x4(all, u[e], u[4 + e], 0x88);
    const __m512 vb = _mm512_maskz_shuffle_f32x4(all, u[e], u[4 + e], 0xDD);
    const __m512 wa = _mm512_maskz_shuffle_f32x4(all, u[8 + e], u[12 + e], 0x88);
    const __m512 wb = _mm512_maskz_shuffle_f32x4(all, u[8 + e], u[12 + e], 0xDD);
    r[0 + e] = _mm512_maskz_shuffle_f32x4(all, va, wa, 0x88);
    r[4 + e] = _mm512_maskz_shuffle_f32x4(all, vb, wb, 0x88);
    r[8 + e] = _mm512_maskz_shuffle_f32x4(all, va, wa, 0xDD);
    r[12 + e] = _mm512_maskz_shuffle_f32x4(all, vb, wb, 0xDD);
  }
}

template <int KW, int SW, int U, typename O>
BSCONV_AVX512 inline void dwcl_tile_avx512(const DwClArgs<O>& a, const float* const* r,
                                           int64_t c, __m512 b, O* o, int64_t j) {
  __m512 acc[U];
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u) acc[u] = b;
  for (int64_t kh = 0; kh < a.Kh; ++kh) {
    __m512 t[KW];
    const float* tp = a.taps + kh * KW * a.ts + c;
#pragma GCC unroll 8
    for (int k = 0; k < KW; ++k) t[k] = _mm512_loadu_ps(tp + k * a.ts);
    // (p opaque: else GCC keeps j * 16 + q * 16 for every q in its own register, hoisted
    // out of the kh loop, and spills them)
    const float* p = r[kh] + j * SW * 16;
    asm("" : "+r"(p));
#pragma GCC unroll 40
    for (int q = 0; q < SW * (U - 1) + KW; ++q) {
      // One load per pixel, held in a register for its Kw multiply-adds (left to itself, GCC
      // folds the load into each of them: Kw loads per pixel).
      __m512 v = _mm512_load_ps(p + q * 16);
      asm("" : "+v"(v));
#pragma GCC unroll 8
      for (int k = 0; k < KW; ++k) {
        // Output u reads pixel SW * u + k.
        const int u = (q - k) / SW;
        if (q >= k && (q - k) % SW == 0 && u < U) acc[u] = _mm512_fmadd_ps(t[k], v, acc[u]);
      }
    }
  }
  if (a.cm_out) {
    // Rows u >= U of the 16 x 16 transpose are zeros, and masked off at the stores.
    __m512 r16[16];
#pragma GCC unroll 16
    for (int u = 0; u < 16; ++u) r16[u] = u < U ? acc[u] : _mm512_setzero_ps();
    transpose16_avx512(r16);
    const __mmask16 m = __mmask16((1u << U) - 1);
    O* d = o + c * a.ocs + j;
#pragma GCC unroll 16
    for (int n = 0; n < 16; ++n) {
      if constexpr (std::is_same_v<O, float>) {
        if constexpr (U == 16) {
          _mm512_storeu_ps(d + n * a.ocs, r16[n]);
        } else {
          _mm512_mask_storeu_ps(d + n * a.ocs, m, r16[n]);
        }
      } else {
        _mm256_mask_storeu_epi16(d + n * a.ocs, m, bf16x16_avx512(r16[n]));
      }
    }
    return;
  }
  O* d = o + j * a.ops + c;
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u) {
    if constexpr (std::is_same_v<O, float>) {
      _mm512_storeu_ps(d + u * a.ops, acc[u]);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + u * a.ops), bf16x16_avx512(acc[u]));
    }
  }
}

// Tiles of U columns from j of every channel vector (all vectors of a tile before the next
// tile, so that its Kh x (U + Kw - 1) pixels of v stay in L1).
template <int KW, int SW, int U, typename O>
BSCONV_AVX512 inline void dwcl_tiles_avx512(const DwClArgs<O>& a, const float* const* r,
                                            const int64_t* rcbs, O* o, int64_t j) {
  const float* rc[kMaxK];
  for (int64_t c = 0; c < a.lanes; c += 16) {
    for (int64_t kh = 0; kh < a.Kh; ++kh) rc[kh] = r[kh] + (c / 16) * rcbs[kh];
    dwcl_tile_avx512<KW, SW, U>(a, rc, c, _mm512_loadu_ps(a.bias + c), o, j);
  }
}

// NCHW outputs: the last R = Wo - j < 16 columns of channel vector c as one tile (a tile
// costs a whole transpose).
template <int KW, int SW, typename O, int R = 15>
BSCONV_AVX512 inline void dwcl_tail_cm_avx512(const DwClArgs<O>& a, const float* const* rc,
                                              int64_t c, __m512 b, O* o, int64_t j) {
  if constexpr (R >= 1) {
    if (a.Wo - j == R) return dwcl_tile_avx512<KW, SW, R>(a, rc, c, b, o, j);
    dwcl_tail_cm_avx512<KW, SW, O, R - 1>(a, rc, c, b, o, j);
  }
}

template <int KW, int SW, typename O>
BSCONV_AVX512 inline void dwcl_avx512_k(const DwClArgs<O>& a) {
  if (a.cm_out || std::is_same_v<O, float>) {
    // Channel vector by channel vector, its rows in order (see above).
    const float* rc[kMaxK];
    for (int64_t c = 0; c < a.lanes; c += 16) {
      const __m512 b = _mm512_loadu_ps(a.bias + c);
      for (int64_t i = 0; i < a.rows_out; ++i) {
        for (int64_t kh = 0; kh < a.Kh; ++kh) {
          rc[kh] = a.rows[i * a.Kh + kh] + (c / 16) * a.rcbs[i * a.Kh + kh];
        }
        O* o = a.outs[i];
        int64_t j = 0;
        for (; j + 16 <= a.Wo; j += 16) dwcl_tile_avx512<KW, SW, 16>(a, rc, c, b, o, j);
        dwcl_tail_cm_avx512<KW, SW>(a, rc, c, b, o, j);
      }
    }
    return;
  }
  for (int64_t i = 0; i < a.rows_out; ++i) {
    const float* const* r = a.rows + i * a.Kh;
    const int64_t* rcbs = a.rcbs + i * a.Kh;
    O* o = a.outs[i];
    // Tiles of 16 columns, then at most one of 8, 4, 2 and 1.
    int64_t j = 0;
    for (; j + 16 <= a.Wo; j += 16) dwcl_tiles_avx512<KW, SW, 16>(a, r, rcbs, o, j);
    if (j + 8 <= a.Wo) dwcl_tiles_avx512<KW, SW, 8>(a, r, rcbs, o, j), j += 8;
    if (j + 4 <= a.Wo) dwcl_tiles_avx512<KW, SW, 4>(a, r, rcbs, o, j), j += 4;
    if (j + 2 <= a.Wo) dwcl_tiles_avx512<KW, SW, 2>(a, r, rcbs, o, j), j += 2;
    if (j < a.Wo) dwcl_tiles_avx512<KW, SW, 1>(a, r, rcbs, o, j);
  }
}

template <typename O>
BSCONV_AVX512 inline void dwcl_avx512(const DwClArgs<O>& a) {
  const bool s2 = a.sw == 2;
  switch (a.Kw) {
    case 3: return s2 ? dwcl_avx512_k<3, 2>(a) : dwcl_avx512_k<3, 1>(a);
    case 5: return s2 ? dwcl_avx512_k<5, 2>(a) : dwcl_avx512_k<5, 1>(a);
    default: return s2 ? dwcl_avx512_k<7, 2>(a) : dwcl_avx512_k<7, 1>(a);
  }
}
#endif

// --- bfloat16 NCHW forward on channel-major rows (AVX-512) ---
//
// An NCHW bfloat16 x is already the B operand of v^T = W x (k = input channels, columns =
// pixels): the bfloat16 micro-kernel wants it in VNNI panels, each pair of channel rows
// interleaved, which is a pass of 16-bit interleaves over rows read in order (instead of
// transposing x channels-last). v^T comes out channel-major, so the depthwise runs per channel
// plane along image rows and stores NCHW y rows directly (no transposes on either side).

// One channel plane of the depthwise, stride s = 1 or 2 (2: square kernels), dilation 1, on a
// zero-padded copy of its v rows: output row u < rows_out, column j < Wo is bias + sum over kh,
// kw of taps[kh * Kw + kw] * v[(s u + kh) * ldv + s j + kw] (v from the first padding row and
// column the first output reads; ldv >= s round_up(Wo, 16) + Kw - 1, so that whole 16-column
// vectors are read without masks; rows up to s (round_up(rows_out, 8) - 1) + Kh readable),
// rounded to bfloat16 (c10's rounding) into o (row stride Wo). Each output sums bias, then kh,
// then kw, as dwcl_tile_avx512 does (padding terms included, multiplied by zero), so the
// results are those of the B16 loops bit for bit.
struct DwPlaneArgs {
  const float* v;
  int64_t ldv, Kh;
  int64_t stride;  // 1, or 2 (both axes; square kernels)
  const float* taps;  // this channel's taps[kh * Kw + kw]
  float bias;
  int64_t rows_out, Wo;
  c10::BFloat16* o;
};

#if BSCONV_X86_AVX2
// 16 bfloat16 values of a row, zeros in the lanes off mk: 16-bit words moved as they are, or
// floats rounded (bf16x16_avx512, c10's rounding).
BSCONV_AVX512 inline __m256i load_bf16x16_avx512(const uint16_t* p, __mmask16 mk) {
  return _mm256_maskz_loadu_epi16(mk, p);
}
BSCONV_AVX512 inline __m256i load_bf16x16_avx512(const float* p, __mmask16 mk) {
  return bf16x16_avx512(_mm512_maskz_loadu_ps(mk, p));
}

// Rows [0, k) (k even, row stride ld) of `cols` columns (16-bit words, or floats rounded to
// bfloat16) into VNNI panels of pw columns (pw a multiple of 16): panel q at dst + q * k * pw
// holds [k / 2][pw][2], element [m / 2][p][m % 2] = src[m][q * pw + p], zeros past cols.
template <typename T>
BSCONV_AVX512 inline void vnni_pack_avx512(const T* src, int64_t ld, int64_t k, int64_t cols,
                                           int64_t pw, uint16_t* dst) {
  const __mmask16 all = 0xFFFF;  // (zero-masked forms, as in bf16x16_avx512)
  for (int64_t p0 = 0; p0 < cols; p0 += pw) {
    uint16_t* d = dst + (p0 / pw) * k * pw;
    for (int64_t m = 0; m < k; m += 2) {
      const T* a = src + m * ld + p0;
      for (int64_t p = 0; p < pw; p += 16) {
        const int64_t n = cols - p0 - p;
        const __mmask16 mk = n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? 0 : __mmask16((1u << n) - 1);
        const __m512i lo = _mm512_maskz_cvtepu16_epi32(all, load_bf16x16_avx512(a + p, mk));
        const __m512i hi = _mm512_maskz_cvtepu16_epi32(all, load_bf16x16_avx512(a + ld + p, mk));
        _mm512_storeu_si512(d + (m * pw + 2 * p),
                            _mm512_or_si512(lo, _mm512_maskz_slli_epi32(all, hi, 16)));
      }
    }
  }
}

// Rows [0, rows) of `cols` floats (row stride sld) to dst (row stride dld).
BSCONV_AVX512 inline void copy_rows_avx512(const float* src, int64_t sld, int64_t rows,
                                           int64_t cols, float* dst, int64_t dld) {
  const __mmask16 tail = __mmask16((1u << (cols % 16)) - 1);
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = src + r * sld;
    float* d = dst + r * dld;
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16) _mm512_storeu_ps(d + c, _mm512_loadu_ps(a + c));
    if (tail != 0) _mm512_mask_storeu_ps(d + c, tail, _mm512_maskz_loadu_ps(tail, a + c));
  }
}

// Blocks of RB output rows of one 16-column vector: RB independent sums (a single one would
// wait on each multiply-add's latency). Square kernels (KH = KW = 3, 5 or 7) run fully unrolled
// with the input rows driving, so that each input row's KW shifted vectors are loaded once for
// the (up to KH) outputs of the block that read it, and 3 x 3 taps stay in registers; other
// kernels (KH = 0: runtime Kh) load a row's vectors once per output. Each output sums its kh,
// and within a kh its kw, in ascending order. The loads are plain ones from the padded copy:
// masked loads take a slot of the vector ports the multiply-adds run on (which made this loop
// about 15% slower on the AMX host), as does c10's rounding (bf16x16_round_avx512).
template <int KH, int KW, int S, bool kInsn>
BSCONV_AVX512 inline void dw_plane_bf16_avx512(const DwPlaneArgs& a) {
  static_assert(S == 1 || KH > 0, "stride 2: square kernels");
  constexpr int RB = 8;
  constexpr int NR = KH > 0 ? S * (RB - 1) + KH : RB + kMaxK - 1;  // input rows of a block
  // Stride 2: the even columns of two vectors (one lane permute per kernel column and row).
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2,
                                        0);
  constexpr bool hoist = KH > 0 && KH * KW <= 9;
  const float* const taps = a.taps;
  const int64_t ldv = a.ldv, Kh = KH > 0 ? KH : a.Kh;
  __m512 tr[hoist ? KH * KW : 1];
  if constexpr (hoist) {
#pragma GCC unroll 16
    for (int k = 0; k < KH * KW; ++k) tr[k] = _mm512_set1_ps(taps[k]);
  }
  for (int64_t j0 = 0; j0 < a.Wo; j0 += 16) {
    const __mmask16 out_mask = __mmask16((1u << std::min<int64_t>(16, a.Wo - j0)) - 1);
    for (int64_t ib = 0; ib < a.rows_out; ib += RB) {
      const int64_t nr = std::min<int64_t>(RB, a.rows_out - ib);
      const float* p = a.v + S * (ib * ldv + j0);
      const float* rp[NR];
#pragma GCC unroll 32
      for (int64_t rr = 0; rr < S * (RB - 1) + Kh; ++rr) rp[rr] = p + rr * ldv;
      __m512 acc[RB];
#pragma GCC unroll 8
      for (int u = 0; u < RB; ++u) acc[u] = _mm512_set1_ps(a.bias);
      if constexpr (KH > 0) {
#pragma GCC unroll 32
        for (int rr = 0; rr < NR; ++rr) {
          __m512 xs[KW];
#pragma GCC unroll 8
          for (int kw = 0; kw < KW; ++kw) {
            if constexpr (S == 1) {
              xs[kw] = _mm512_loadu_ps(rp[rr] + kw);
            } else {
              xs[kw] = _mm512_permutex2var_ps(_mm512_loadu_ps(rp[rr] + kw), even,
                                              _mm512_loadu_ps(rp[rr] + kw + 16));
            }
          }
#pragma GCC unroll 8
          for (int u = 0; u < RB; ++u) {
            const int kh = rr - S * u;
            if (kh < 0 || kh >= KH) continue;
#pragma GCC unroll 8
            for (int kw = 0; kw < KW; ++kw) {
              const int k = kh * KW + kw;
              const __m512 t = hoist ? tr[hoist ? k : 0] : _mm512_set1_ps(taps[k]);
              acc[u] = _mm512_fmadd_ps(t, xs[kw], acc[u]);
            }
          }
        }
      } else {
        for (int64_t kh = 0; kh < Kh; ++kh) {
#pragma GCC unroll 8
          for (int u = 0; u < RB; ++u) {
#pragma GCC unroll 8
            for (int kw = 0; kw < KW; ++kw) {
              const __m512 x = _mm512_loadu_ps(rp[u + kh] + kw);
              acc[u] = _mm512_fmadd_ps(_mm512_set1_ps(taps[kh * KW + kw]), x, acc[u]);
            }
          }
        }
      }
#pragma GCC unroll 8
      for (int u = 0; u < RB; ++u) {
        if (u < nr) {
          _mm256_mask_storeu_epi16(a.o + (ib + u) * a.Wo + j0, out_mask,
                                   bf16x16_round_avx512<kInsn>(acc[u]));
        }
      }
    }
  }
}

template <bool kInsn>
BSCONV_AVX512 inline void dw_plane_bf16_k(const DwPlaneArgs& a, int64_t Kw) {
  if (a.stride == 2) {
    switch (Kw) {
      case 3: return dw_plane_bf16_avx512<3, 3, 2, kInsn>(a);
      case 5: return dw_plane_bf16_avx512<5, 5, 2, kInsn>(a);
      default: return dw_plane_bf16_avx512<7, 7, 2, kInsn>(a);
    }
  }
  if (a.Kh == Kw) {
    switch (Kw) {
      case 3: return dw_plane_bf16_avx512<3, 3, 1, kInsn>(a);
      case 5: return dw_plane_bf16_avx512<5, 5, 1, kInsn>(a);
      default: return dw_plane_bf16_avx512<7, 7, 1, kInsn>(a);
    }
  }
  switch (Kw) {
    case 3: return dw_plane_bf16_avx512<0, 3, 1, kInsn>(a);
    case 5: return dw_plane_bf16_avx512<0, 5, 1, kInsn>(a);
    default: return dw_plane_bf16_avx512<0, 7, 1, kInsn>(a);
  }
}
#endif

// Callers check avx512_enabled() (and Kw 3, 5 or 7 for dw_plane_bf16) first.
template <typename T>  // uint16_t (bfloat16 bits) or float
inline void vnni_pack(const T* src, int64_t ld, int64_t k, int64_t cols, int64_t pw,
                      uint16_t* dst) {
#if BSCONV_X86_AVX2
  vnni_pack_avx512(src, ld, k, cols, pw, dst);
#else
  (void)src, (void)ld, (void)k, (void)cols, (void)pw, (void)dst;
  std::abort();  // unreachable: avx512_enabled() is false off x86-64
#endif
}

inline void copy_rows(const float* src, int64_t sld, int64_t rows, int64_t cols, float* dst,
                      int64_t dld) {
#if BSCONV_X86_AVX2
  copy_rows_avx512(src, sld, rows, cols, dst, dld);
#else
  (void)src, (void)sld, (void)rows, (void)cols, (void)dst, (void)dld;
  std::abort();
#endif
}

inline void dw_plane_bf16(const DwPlaneArgs& a, int64_t Kw) {
#if BSCONV_X86_AVX2
  if (bf16_insn_enabled()) return dw_plane_bf16_k<true>(a, Kw);
  return dw_plane_bf16_k<false>(a, Kw);
#else
  (void)a, (void)Kw;
  std::abort();
#endif
}

// CL -> B16 (blocks of 16 channels, each a [pixel][16] array, block stride dcbs) for `pixels`
// pixels of `lanes` channels, a multiple of 16.
#if BSCONV_X86_AVX2
BSCONV_AVX512 inline void cl_to_b16_avx512(const float* src, int64_t sps, int64_t pixels,
                                           int64_t lanes, float* dst, int64_t dcbs) {
  for (int64_t p = 0; p < pixels; ++p) {
    for (int64_t c = 0; c < lanes; c += 16) {
      _mm512_store_ps(dst + (c / 16) * dcbs + p * 16, _mm512_loadu_ps(src + p * sps + c));
    }
  }
}
#endif

template <typename T>
void cl_to_b16(const T* src, int64_t sps, int64_t pixels, int64_t lanes, T* dst, int64_t dcbs) {
#if BSCONV_X86_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (avx512_enabled()) return cl_to_b16_avx512(src, sps, pixels, lanes, dst, dcbs);
  }
#endif
  for (int64_t p = 0; p < pixels; ++p) {
    for (int64_t c = 0; c < lanes; c += 16) {
      std::memcpy(dst + (c / 16) * dcbs + p * 16, src + p * sps + c, 16 * sizeof(T));
    }
  }
}

// The channels-last depthwise (see DwClArgs): AVX-512 only; callers check
// depthwise_cl_enabled() and dw_cl_shape() first.
template <typename O>
void depthwise_rows_cl(const DwClArgs<O>& a) {
#if BSCONV_X86_AVX2
  return dwcl_avx512(a);
#else
  (void)a;
  std::abort();  // unreachable: depthwise_cl_enabled() is false off x86-64
#endif
}

// --- backward on B16 rows (AVX-512): stride 1 or 2, dilation 1 ---
//
// The backward's counterparts of the B16 forward, for the layers the forward's B16 loops take
// (float32 here; zero padding, no mid transform, Kw 3, 5 or 7, channel counts in whole
// 16-lane vectors). act(v) and gy rows are B16 rows (whole-vector copies, or 16 x 16 register
// transposes of NCHW gy rows), and:
// - the transposed depthwise (gv_rows_cl) runs a sliding window per 16-channel vector and
//   phase of v columns (stride 2: the even and the odd columns, each read by every other
//   tap): a tile of U pixels keeps its accumulators and the phase's taps of one tap row in
//   registers while each gy pixel is loaded once for the taps that read it, and stores gv
//   straight into the channels-last rows the GEMMs read (the B8 loops wrote B8 rows, then
//   copied them to channels-last);
// - the blueprint correlation (gb_rows_cl) keeps a tile of 8 gy pixels in registers while
//   each act(v) pixel is loaded once for its taps (the B8 loops loaded both per
//   multiply-add; stride 2 ran the AVX2 loop).
// Both sum every output's terms in the B8 loops' order (gv: zero, then gy row by gy row in
// tap-row order, each over kw ascending; gb: per (gy row, act row) pair the even and the odd
// output columns into two sums, then gb += even + odd, pairs in output-row order), so the
// results are the same bit for bit.

struct GvClArgs {
  int64_t rows;           // v rows, consecutive in `out`
  const float* const* g;  // [rows * Kh]: v row i's nk[i] gy rows (B16, padded column 0)
  const int64_t* nk;      // [rows]
  const int64_t* khs;     // [rows * Kh]: the tap rows of those gy rows
  int64_t Kh, Kw, sw, W, gcbs;
  // Per phase of v columns (c = phase + sw * t) its taps kw (ascending; sw apart) and the
  // padded gy column t + off each reads (as GvArgs: [sw], [sw * Kw], [sw * Kw]).
  const int64_t* ph_n;
  const int64_t* ph_kw;
  const int64_t* ph_off;
  int64_t lanes;          // a multiple of 16
  const float* taps;      // taps[(kh * Kw + kw) * ts + n]
  int64_t ts;
  float* out;             // gv(row i, column c, n) at out[(i * W + c) * ops + n]
  int64_t ops;
};

struct GbClArgs {
  int64_t pairs;
  const float* const* g;  // [pairs]: gy rows (B16; gy column 0)
  const float* const* a;  // [pairs]: act(v) rows (B16; padded column 0)
  const int64_t* kh;      // [pairs]: the tap row joining them
  int64_t gcbs, acbs, Kw, sw, Wo;
  int64_t lanes;  // a multiple of 16
  float* gb;      // gb[(kh * Kw + kw) * gbs + n] += sum_ow gy[ow][n] * a[ow * sw + kw][n]
  int64_t gbs;
};

#if BSCONV_X86_AVX2
// U pixels t .. t + U - 1 of one phase (v column phase + sw * t): the phase's NT taps
// tp[i * tstep] (kw ascending), tap i of pixel t + u read at g[(t + u + NT - 1 - i) * 16]
// (consecutive taps of a phase read neighbouring gy columns), outputs o[(t + u) * ostep].
template <int NT, int U>
BSCONV_AVX512 inline __attribute__((always_inline)) void gvcl_tile_avx512(
    const float* const* g, const int64_t* khs, int64_t nk, const float* tp, int64_t tkh,
    int64_t tstep, float* o, int64_t ostep, int64_t t) {
  __m512 acc[U];
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u) acc[u] = _mm512_setzero_ps();
  for (int64_t i = 0; i < nk; ++i) {
    __m512 tv[NT];
    const float* ti = tp + khs[i] * tkh;
#pragma GCC unroll 8
    for (int k = 0; k < NT; ++k) tv[k] = _mm512_loadu_ps(ti + k * tstep);
    const float* p = g[i] + t * 16;
    asm("" : "+r"(p));  // (as in dwcl_tile_avx512)
    // Pixels from the right: each output meets its taps in kw order.
#pragma GCC unroll 40
    for (int q = U + NT - 2; q >= 0; --q) {
      __m512 v = _mm512_load_ps(p + q * 16);
      asm("" : "+v"(v));
#pragma GCC unroll 8
      for (int k = 0; k < NT; ++k) {
        const int u = q - (NT - 1 - k);
        if (u >= 0 && u < U) acc[u] = _mm512_fmadd_ps(tv[k], v, acc[u]);
      }
    }
  }
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u) _mm512_storeu_ps(o + (t + u) * ostep, acc[u]);
}

template <int NT>
BSCONV_AVX512 inline void gvcl_phase_avx512(const float* const* g, const int64_t* khs,
                                            int64_t nk, const float* tp, int64_t tkh,
                                            int64_t tstep, float* o, int64_t ostep, int64_t T) {
  int64_t t = 0;
  for (; t + 16 <= T; t += 16) gvcl_tile_avx512<NT, 16>(g, khs, nk, tp, tkh, tstep, o, ostep, t);
  if (t + 8 <= T) gvcl_tile_avx512<NT, 8>(g, khs, nk, tp, tkh, tstep, o, ostep, t), t += 8;
  if (t + 4 <= T) gvcl_tile_avx512<NT, 4>(g, khs, nk, tp, tkh, tstep, o, ostep, t), t += 4;
  if (t + 2 <= T) gvcl_tile_avx512<NT, 2>(g, khs, nk, tp, tkh, tstep, o, ostep, t), t += 2;
  if (t < T) gvcl_tile_avx512<NT, 1>(g, khs, nk, tp, tkh, tstep, o, ostep, t);
}

BSCONV_AVX512 inline void gvcl_avx512(const GvClArgs& a) {
  const float* gc[kMaxK];
  for (int64_t c = 0; c < a.lanes; c += 16) {
    for (int64_t i = 0; i < a.rows; ++i) {
      const int64_t nk = a.nk[i];
      const int64_t* khs = a.khs + i * a.Kh;
      for (int64_t phase = 0; phase < std::min(a.sw, a.W); ++phase) {
        const int64_t n = a.ph_n[phase];
        const int64_t* kws = a.ph_kw + phase * a.Kw;
        const int64_t base = a.ph_off[phase * a.Kw + n - 1];  // the last tap's (smallest)
        for (int64_t q = 0; q < nk; ++q) {
          gc[q] = a.g[i * a.Kh + q] + (c / 16) * a.gcbs + base * 16;
        }
        const float* tp = a.taps + kws[0] * a.ts + c;
        float* o = a.out + (i * a.W + phase) * a.ops + c;
        const int64_t T = ceil_div(a.W - phase, a.sw), tkh = a.Kw * a.ts, tstep = a.sw * a.ts;
        const int64_t ostep = a.sw * a.ops;
        switch (n) {
          case 1: gvcl_phase_avx512<1>(gc, khs, nk, tp, tkh, tstep, o, ostep, T); break;
          case 2: gvcl_phase_avx512<2>(gc, khs, nk, tp, tkh, tstep, o, ostep, T); break;
          case 3: gvcl_phase_avx512<3>(gc, khs, nk, tp, tkh, tstep, o, ostep, T); break;
          case 4: gvcl_phase_avx512<4>(gc, khs, nk, tp, tkh, tstep, o, ostep, T); break;
          case 5: gvcl_phase_avx512<5>(gc, khs, nk, tp, tkh, tstep, o, ostep, T); break;
          case 6: gvcl_phase_avx512<6>(gc, khs, nk, tp, tkh, tstep, o, ostep, T); break;
          default: gvcl_phase_avx512<7>(gc, khs, nk, tp, tkh, tstep, o, ostep, T); break;
        }
      }
    }
  }
}

// U gy columns from j (j even) of one pair: even columns into E, odd ones into O.
template <int KW, int SW, int U>
BSCONV_AVX512 inline __attribute__((always_inline)) void gbcl_tile_avx512(const float* g,
                                                                          const float* v,
                                                                          int64_t j, __m512* E,
                                                                          __m512* O) {
  __m512 gy[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) gy[u] = _mm512_load_ps(g + (j + u) * 16);
  const float* p = v + j * SW * 16;
  asm("" : "+r"(p));
#pragma GCC unroll 24
  for (int q = 0; q < SW * (U - 1) + KW; ++q) {
    __m512 x = _mm512_load_ps(p + q * 16);
    asm("" : "+v"(x));
#pragma GCC unroll 8
    for (int kw = 0; kw < KW; ++kw) {
      // column j + u meets tap kw at act pixel SW * (j + u) + kw
      if (q < kw || (q - kw) % SW != 0 || (q - kw) / SW >= U) continue;
      const int u = (q - kw) / SW;
      if (u % 2 == 0) {
        E[kw] = _mm512_fmadd_ps(gy[u], x, E[kw]);
      } else {
        O[kw] = _mm512_fmadd_ps(gy[u], x, O[kw]);
      }
    }
  }
}

template <int KW, int SW, int R = 7>
BSCONV_AVX512 inline __attribute__((always_inline)) void gbcl_tail_avx512(
    const float* g, const float* v, int64_t j, int64_t rest, __m512* E, __m512* O) {
  if constexpr (R >= 1) {
    if (rest == R) return gbcl_tile_avx512<KW, SW, R>(g, v, j, E, O);
    gbcl_tail_avx512<KW, SW, R - 1>(g, v, j, rest, E, O);
  }
}

template <int KW, int SW>
BSCONV_AVX512 inline void gbcl_avx512_k(const GbClArgs& a) {
  for (int64_t c = 0; c < a.lanes; c += 16) {
    for (int64_t i = 0; i < a.pairs; ++i) {
      const float* g = a.g[i] + (c / 16) * a.gcbs;
      const float* v = a.a[i] + (c / 16) * a.acbs;
      __m512 E[KW], O[KW];
#pragma GCC unroll 8
      for (int k = 0; k < KW; ++k) E[k] = O[k] = _mm512_setzero_ps();
      int64_t j = 0;
      for (; j + 8 <= a.Wo; j += 8) gbcl_tile_avx512<KW, SW, 8>(g, v, j, E, O);
      if (j < a.Wo) gbcl_tail_avx512<KW, SW>(g, v, j, a.Wo - j, E, O);
      float* o = a.gb + a.kh[i] * KW * a.gbs + c;
#pragma GCC unroll 8
      for (int k = 0; k < KW; ++k) {
        _mm512_storeu_ps(o + k * a.gbs,
                         _mm512_add_ps(_mm512_loadu_ps(o + k * a.gbs), _mm512_add_ps(E[k], O[k])));
      }
    }
  }
}

// The bias gradient's sums from B16 gy rows: acc[n] += the sum of Wo pixels of each of `nrows`
// rows (rows[r]: column 0; channel-block stride cbs), for `lanes` channels (a multiple of 16),
// in add_gy_rows's order: pixel by pixel over the rows (`by8` false: its channels-last order),
// or (`by8`: its NCHW order, sum8) eight interleaved partial sums over the pixels of all the rows
// in turn, the last count % 8 of them into the first, then ((s0+s1)+(s2+s3))+((s4+s5)+(s6+s7)).
// The same sums in the same order, so the same bits; several channel vectors at a time keep
// independent chains in flight (a pixel-ordered sum is one chain per channel).
template <int NV>
BSCONV_AVX512 inline void bias_b16_pixels_avx512(const float* const* rows, int64_t nrows,
                                                 int64_t off, int64_t Wo, int64_t cbs,
                                                 float* acc) {
  __m512 a[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) a[v] = _mm512_loadu_ps(acc + v * 16);
  for (int64_t r = 0; r < nrows; ++r) {
    const float* p = rows[r] + off;
    for (int64_t q = 0; q < Wo; ++q) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) a[v] = _mm512_add_ps(a[v], _mm512_load_ps(p + v * cbs + q * 16));
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc + v * 16, a[v]);
}

BSCONV_AVX512 inline void bias_b16_rows_avx512(const float* const* rows, int64_t nrows,
                                               int64_t Wo, int64_t cbs, int64_t lanes, bool by8,
                                               float* acc) {
  if (!by8) {
    for (int64_t c = 0; c < lanes; c += 64) {
      const int64_t off = (c / 16) * cbs;
      switch (std::min<int64_t>(4, (lanes - c) / 16)) {
        case 1: bias_b16_pixels_avx512<1>(rows, nrows, off, Wo, cbs, acc + c); break;
        case 2: bias_b16_pixels_avx512<2>(rows, nrows, off, Wo, cbs, acc + c); break;
        case 3: bias_b16_pixels_avx512<3>(rows, nrows, off, Wo, cbs, acc + c); break;
        default: bias_b16_pixels_avx512<4>(rows, nrows, off, Wo, cbs, acc + c); break;
      }
    }
    return;
  }
  const int64_t full = nrows * Wo / 8 * 8;
  for (int64_t c = 0; c < lanes; c += 16) {
    __m512 s8[8];
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) s8[k] = _mm512_setzero_ps();
    int64_t i = 0;
    for (int64_t r = 0; r < nrows; ++r) {
      const float* p = rows[r] + (c / 16) * cbs;
      int64_t q = 0;
      // Whole groups of 8 pixels that start at a multiple of 8 in the run.
      for (; q < Wo && i % 8 != 0 && i < full; ++q, ++i) {
        s8[i % 8] = _mm512_add_ps(s8[i % 8], _mm512_load_ps(p + q * 16));
      }
      for (; q + 8 <= Wo && i + 8 <= full; q += 8, i += 8) {
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) s8[k] = _mm512_add_ps(s8[k], _mm512_load_ps(p + (q + k) * 16));
      }
      for (; q < Wo; ++q, ++i) {
        const int k = i < full ? int(i % 8) : 0;
        s8[k] = _mm512_add_ps(s8[k], _mm512_load_ps(p + q * 16));
      }
    }
    const __m512 t = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s8[0], s8[1]),
                                                 _mm512_add_ps(s8[2], s8[3])),
                                   _mm512_add_ps(_mm512_add_ps(s8[4], s8[5]),
                                                 _mm512_add_ps(s8[6], s8[7])));
    _mm512_storeu_ps(acc + c, _mm512_add_ps(_mm512_loadu_ps(acc + c), t));
  }
}

// Channel-major rows (row stride sld) -> B16 for `pixels` pixels of `lanes` channels (a
// multiple of 16), 16 x 16 tiles transposed in registers.
BSCONV_AVX512 inline void cm_to_b16_avx512(const float* src, int64_t sld, int64_t pixels,
                                           int64_t lanes, float* dst, int64_t dcbs) {
  for (int64_t c = 0; c < lanes; c += 16) {
    float* d = dst + (c / 16) * dcbs;
    for (int64_t p = 0; p < pixels; p += 16) {
      const int64_t n = std::min<int64_t>(16, pixels - p);
      const __mmask16 m = __mmask16((1u << n) - 1);
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_ps(m, src + (c + i) * sld + p);
      transpose16_avx512(r);
      if (n == 16) {
#pragma GCC unroll 16
        for (int u = 0; u < 16; ++u) _mm512_store_ps(d + (p + u) * 16, r[u]);
      } else {
        for (int u = 0; u < n; ++u) _mm512_store_ps(d + (p + u) * 16, r[u]);
      }
    }
  }
}
#endif

// The backward's B16 loops (see GvClArgs): AVX-512 only; callers check depthwise_cl_enabled()
// and dw_cl_shape() (the forward's B16 shapes) first.
inline void gv_rows_cl(const GvClArgs& a) {
#if BSCONV_X86_AVX2
  return gvcl_avx512(a);
#else
  (void)a;
  std::abort();  // unreachable: depthwise_cl_enabled() is false off x86-64
#endif
}
inline void gb_rows_cl(const GbClArgs& a) {
#if BSCONV_X86_AVX2
  const bool s2 = a.sw == 2;
  switch (a.Kw) {
    case 3: return s2 ? gbcl_avx512_k<3, 2>(a) : gbcl_avx512_k<3, 1>(a);
    case 5: return s2 ? gbcl_avx512_k<5, 2>(a) : gbcl_avx512_k<5, 1>(a);
    default: return s2 ? gbcl_avx512_k<7, 2>(a) : gbcl_avx512_k<7, 1>(a);
  }
#else
  (void)a;
  std::abort();
#endif
}
inline void bias_b16_rows(const float* const* rows, int64_t nrows, int64_t Wo, int64_t cbs,
                          int64_t lanes, bool by8, float* acc) {
#if BSCONV_X86_AVX2
  return bias_b16_rows_avx512(rows, nrows, Wo, cbs, lanes, by8, acc);
#else
  (void)rows, (void)nrows, (void)Wo, (void)cbs, (void)lanes, (void)by8, (void)acc;
  std::abort();
#endif
}
inline void cm_to_b16(const float* src, int64_t sld, int64_t pixels, int64_t lanes, float* dst,
                      int64_t dcbs) {
#if BSCONV_X86_AVX2
  return cm_to_b16_avx512(src, sld, pixels, lanes, dst, dcbs);
#else
  (void)src, (void)sld, (void)pixels, (void)lanes, (void)dst, (void)dcbs;
  std::abort();
#endif
}

template <typename S, typename D>
void convert_n(const S* s, D* d, int64_t n);

// convert_n on `rows` rows of n elements (row strides sld, dld) in one call: NCHW output rows
// of a few pixels per channel, where a call per row cost more than its conversion.
template <typename S, typename D>
void convert_rows(const S* s, int64_t sld, D* d, int64_t dld, int64_t rows, int64_t n) {
#if BSCONV_X86_AVX2
  if constexpr (std::is_same_v<S, float> && std::is_same_v<D, c10::BFloat16>) {
    if (avx512_enabled()) {
      for (int64_t r = 0; r < rows; ++r) float_to_bf16_avx512(s + r * sld, d + r * dld, n);
      return;
    }
    if (avx2_enabled()) return float_to_bf16_rows_avx2(s, sld, d, dld, rows, n);
  }
#endif
  for (int64_t r = 0; r < rows; ++r) convert_n(s + r * sld, d + r * dld, n);
}

template <typename S, typename D>
void convert_n(const S* s, D* d, int64_t n) {
#if BSCONV_X86_AVX2
  if constexpr (std::is_same_v<S, c10::BFloat16> && std::is_same_v<D, float>) {
    if (avx2_enabled()) return bf16_to_float_avx2(s, d, n);
  }
  if constexpr (std::is_same_v<S, float> && std::is_same_v<D, c10::BFloat16>) {
    if (avx512_enabled()) return float_to_bf16_avx512(s, d, n);
    if (avx2_enabled()) return float_to_bf16_avx2(s, d, n);
  }
#endif
  for (int64_t i = 0; i < n; ++i) d[i] = D(s[i]);
}

// ---------------------------------------------------------------------------------------------
// Non-temporal output stores. A plain store to a line that is not in cache first reads the line
// (read for ownership) and later writes it back: an output that cannot stay in cache costs
// twice its size in memory traffic. Streaming stores write whole lines without reading them.
// A float forward's channels-last output rows go through them when the output is at least the
// size of the last-level cache (it cannot stay in cache anyway) and its pages are resident (see
// pages_resident); smaller outputs keep plain stores, which leave them in cache for whatever
// reads them next. In a loop of one layer, streaming pays from a core's L2 up: paired A/B on
// the 2-core Xeon (AMX) host, two threads, channels-last forward, 32->64 112x112 B=8 5.4 ->
// 3.8 ms, 128->22->128 56x56 B=8 2.9 -> 2.4 ms, 512->86->512 14x14 B=8 2.1 -> 1.5 ms (the
// CIFAR layers' 0.1-0.5 MB outputs 8-22% slower). But in the benchmark's round-robin, where
// other variants' tensors used that memory just before, streaming the outputs from a core's
// L2 up made every variant slower on the same host with its 480 MiB L3 (the likely cause: a
// line still cached, dirty, from the memory's previous use is written back before a
// streaming store replaces it, and the next reader finds the memory uncached),
// the fused ones most (32->64 112x112 B=8 channels-last 6.5 -> 9.2 ms, NCHW 5.5 -> 11 ms,
// the channels-last reference after it 10.8 -> 18.8 ms; medians of two runs each). Hence the
// last-level cache's size: on CPUs whose caches are small next to their outputs, streaming
// still saves the read for ownership.

// Output bytes from which the forward streams its output (on resident pages, see
// stream_output): the size of the largest cache level the C library reports (L3, else L2;
// 32 MiB when it reports none), or BSCONV_CPU_STREAM_STORES=0 (never) / =1 (always, resident
// or not).
inline int64_t stream_store_threshold() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("BSCONV_CPU_STREAM_STORES");
    if (env != nullptr && env[0] != '\0') return env[0] == '0' ? int64_t(-1) : int64_t(0);
    int64_t llc = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
    llc = std::max<int64_t>(llc, int64_t(sysconf(_SC_LEVEL2_CACHE_SIZE)));
#endif
#ifdef _SC_LEVEL3_CACHE_SIZE
    llc = std::max<int64_t>(llc, int64_t(sysconf(_SC_LEVEL3_CACHE_SIZE)));
#endif
    return llc > 0 ? llc : int64_t(32) << 20;
  }();
  return bytes;
}
// Whether the pages of [p, p + bytes) are backed by memory already, judged by the first, the
// middle and the last page (false where mincore is not available). A fresh mapping (glibc
// serves large blocks by mmap, or returns trimmed heap memory) is faulted in by the first store
// to each page, which zeroes the page in cache: plain stores then hit cache, while streaming
// stores write every line again past it. Paired A/B on the Xeon (AMX) host, two threads, with
// every output freshly mapped (mmap threshold 1 MiB): streamed 9-33% slower than plain stores
// (32->64 112x112 B=8, 128->22->128 56x56 B=8, 512->512 14x14 B=8), against 14-33% faster on
// reused pages.
inline bool pages_resident(const void* p, int64_t bytes) {
#if defined(__linux__)
  if (bytes <= 0) return false;
  const long page_size = sysconf(_SC_PAGESIZE);
  if (page_size <= 0) return false;
  const uintptr_t first = reinterpret_cast<uintptr_t>(p);
  for (uintptr_t a : {first, first + uintptr_t(bytes) / 2, first + uintptr_t(bytes) - 1}) {
    unsigned char in_core = 0;
    void* page = reinterpret_cast<void*>(a & ~uintptr_t(page_size - 1));
    if (mincore(page, size_t(page_size), &in_core) != 0 || (in_core & 1) == 0) return false;
  }
  return true;
#else
  (void)p, (void)bytes;
  return false;
#endif
}

// Whether an output of `bytes` at p is written by streaming stores: at least the threshold, on
// pages already backed (BSCONV_CPU_STREAM_STORES=1: always).
inline bool stream_output(const void* p, int64_t bytes) {
  const int64_t t = stream_store_threshold();
  if (t < 0 || bytes < t) return false;
  return t == 0 || pages_resident(p, bytes);
}

#if BSCONV_X86_AVX2
// The 64-byte-aligned lines of [d, d + n) by 32-byte streaming stores, the partial lines at
// either end by plain copies.
BSCONV_AVX2 inline void stream_copy_avx2(const char* s, char* d, int64_t n) {
  const int64_t misalign = int64_t(reinterpret_cast<uintptr_t>(d) & 63);
  const int64_t head = std::min<int64_t>(n, (64 - misalign) & 63);
  std::memcpy(d, s, size_t(head));
  int64_t i = head;
  for (; i + 64 <= n; i += 64) {
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 32));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), lo);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 32), hi);
  }
  std::memcpy(d + i, s + i, size_t(n - i));
}
#endif

// d[0, n) = s[0, n) (elements of type T), by streaming stores where the CPU has them (a plain
// copy otherwise). Other threads may read d only after stream_fence() on the writing thread.
template <typename T>
void stream_copy(const T* s, T* d, int64_t n) {
#if BSCONV_X86_AVX2
  if (avx2_enabled()) {
    return stream_copy_avx2(reinterpret_cast<const char*>(s), reinterpret_cast<char*>(d),
                            n * int64_t(sizeof(T)));
  }
#endif
  std::copy(s, s + n, d);
}

// Orders the streaming stores before any later store of this thread (the end of a parallel
// region, or a flag another thread waits on).
inline void stream_fence() {
#if BSCONV_X86_AVX2
  _mm_sfence();
#endif
}

#if defined(__SSE2__)
// 16-bit words (bfloat16 / half moved as bits) in 8 x 8 tiles of SSE2 registers: the element
// loop of transpose_generic made the NCHW -> channels-last copy of a bfloat16 x 16% of a
// 512->512 14x14 B=8 forward.
inline void transpose_u16(int64_t rows, int64_t cols, const uint16_t* src, int64_t lds,
                          uint16_t* dst, int64_t ldd) {
  const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  for (int64_t r0 = 0; r0 < r8; r0 += 8) {
    for (int64_t c0 = 0; c0 < c8; c0 += 8) {
      __m128i a[8], b[8];
      for (int i = 0; i < 8; ++i) {
        a[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + (r0 + i) * lds + c0));
      }
      for (int i = 0; i < 4; ++i) {
        b[2 * i] = _mm_unpacklo_epi16(a[2 * i], a[2 * i + 1]);
        b[2 * i + 1] = _mm_unpackhi_epi16(a[2 * i], a[2 * i + 1]);
      }
      // b[0]: (r0 r1) pairs of columns 0-3, b[1]: columns 4-7, b[2], b[3]: rows 2-3, ...
      for (int h = 0; h < 2; ++h) {
        const __m128i p0 = _mm_unpacklo_epi32(b[h], b[2 + h]);
        const __m128i p1 = _mm_unpackhi_epi32(b[h], b[2 + h]);
        const __m128i q0 = _mm_unpacklo_epi32(b[4 + h], b[6 + h]);
        const __m128i q1 = _mm_unpackhi_epi32(b[4 + h], b[6 + h]);
        a[4 * h + 0] = _mm_unpacklo_epi64(p0, q0);
        a[4 * h + 1] = _mm_unpackhi_epi64(p0, q0);
        a[4 * h + 2] = _mm_unpacklo_epi64(p1, q1);
        a[4 * h + 3] = _mm_unpackhi_epi64(p1, q1);
      }
      for (int i = 0; i < 8; ++i) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (c0 + i) * ldd + r0), a[i]);
      }
    }
  }
  // The edges.
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = r < r8 ? c8 : 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
}
#endif

#if BSCONV_X86_AVX2
// 16 x 16 tiles of 16-bit words in AVX2 registers: the SSE2 network above on both 128-bit
// lanes at once (columns 0-7 and 8-15 of 8 rows), for rows 0-7 and 8-15, then the halves
// paired by lane permutes; the strips left over by the SSE2 loop. In a bfloat16 forward of
// 128->22->128 56x56 B=8 with NCHW x, the SSE2 transposes of x were 20% of the time (perf).
BSCONV_AVX2 inline void transpose_u16_avx2(int64_t rows, int64_t cols, const uint16_t* src,
                                           int64_t lds, uint16_t* dst, int64_t ldd) {
  const int64_t r16 = rows / 16 * 16, c16 = cols / 16 * 16;
  for (int64_t r0 = 0; r0 < r16; r0 += 16) {
    for (int64_t c0 = 0; c0 < c16; c0 += 16) {
      __m256i t[2][8];
      for (int h8 = 0; h8 < 2; ++h8) {
        __m256i a[8], b[8];
        for (int i = 0; i < 8; ++i) {
          a[i] = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(src + (r0 + 8 * h8 + i) * lds + c0));
        }
        for (int i = 0; i < 4; ++i) {
          b[2 * i] = _mm256_unpacklo_epi16(a[2 * i], a[2 * i + 1]);
          b[2 * i + 1] = _mm256_unpackhi_epi16(a[2 * i], a[2 * i + 1]);
        }
        for (int h = 0; h < 2; ++h) {
          const __m256i p0 = _mm256_unpacklo_epi32(b[h], b[2 + h]);
          const __m256i p1 = _mm256_unpackhi_epi32(b[h], b[2 + h]);
          const __m256i q0 = _mm256_unpacklo_epi32(b[4 + h], b[6 + h]);
          const __m256i q1 = _mm256_unpackhi_epi32(b[4 + h], b[6 + h]);
          // Lane 0: column 4h + k of these 8 rows; lane 1: column 8 + 4h + k.
          t[h8][4 * h + 0] = _mm256_unpacklo_epi64(p0, q0);
          t[h8][4 * h + 1] = _mm256_unpackhi_epi64(p0, q0);
          t[h8][4 * h + 2] = _mm256_unpacklo_epi64(p1, q1);
          t[h8][4 * h + 3] = _mm256_unpackhi_epi64(p1, q1);
        }
      }
      for (int i = 0; i < 8; ++i) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (c0 + i) * ldd + r0),
                            _mm256_permute2x128_si256(t[0][i], t[1][i], 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (c0 + 8 + i) * ldd + r0),
                            _mm256_permute2x128_si256(t[0][i], t[1][i], 0x31));
      }
    }
  }
  if (c16 < cols) transpose_u16(r16, cols - c16, src + c16, lds, dst + c16 * ldd, ldd);
  if (r16 < rows) transpose_u16(rows - r16, cols, src + r16 * lds, lds, dst + r16, ldd);
}
#endif

template <typename T>
void transpose(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd) {
#if BSCONV_X86_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (avx2_enabled()) return transpose_avx2(rows, cols, src, lds, dst, ldd);
  }
#endif
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, uint16_t>) {
#if BSCONV_X86_AVX2
    if (avx2_enabled()) return transpose_u16_avx2(rows, cols, src, lds, dst, ldd);
#endif
    return transpose_u16(rows, cols, src, lds, dst, ldd);
  }
#endif
  transpose_generic(rows, cols, src, lds, dst, ldd);
}

}  // namespace bsconv::cpu
