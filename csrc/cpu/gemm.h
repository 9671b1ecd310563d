// Row-major GEMM on float/double scratch buffers for the projection stages of the CPU kernels.
//
// The projections are ordinary GEMMs on cache-sized tiles. float GEMMs run on oneDNN's brgemm
// micro-kernel, which PyTorch exposes as at::native::cpublas::brgemm (it falls back to the BLAS
// itself where oneDNN's ukernel is unavailable: no AVX2, or oneDNN disabled), on B packed into
// panels of kPanel columns (or read in place, see gemm()) and k in chunks of kChunkK (bfloat16
// operands: gemm_bf16 below). Measured on the 2-core AMD EPYC (Zen 2) build machine, one
// thread, the tile shapes of the benchmark suite (P x N x K from 196 x 512 x 512 to 3136 x 64 x
// 32, and the weight gradients' 64 x 32 x 4096): 91-101 GFLOP/s, against
// 64-78 for MKL's sgemm on the same operands; wider panels (40-64 columns) or unpacked B with a
// power-of-two row stride drop to 63-80. double GEMMs go to the BLAS that PyTorch links (MKL on
// x86-64 wheels exports the Fortran `sgemm_` / `dgemm_`). The BLAS symbols are declared weak:
// if a torch build does not export them, a plain loop nest takes over, so the extension never
// fails to load for want of a BLAS. Called from inside at::parallel_for, where the BLAS runs
// single-threaded on each tile.
#pragma once

#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <unistd.h>

#include "cpu/simd.h"

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc)
    __attribute__((weak));
// MKL's C entry point (the lower-case name is the Fortran one, which takes a pointer).
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace bsconv::cpu {

// Keeps the BLAS on the calling thread for the guard's lifetime: each tile is one task of
// at::parallel_for, and a fixed per-tile summation order keeps the results bitwise
// reproducible whether or not the loop ran in parallel.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : prev_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int prev_;
};

// C[m x n] = alpha * op(A) * op(B) + beta * C, all row-major. op(A) is m x k, op(B) is k x n.
template <typename T>
void gemm_fallback(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                   const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* crow = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) crow[j] = beta == T(0) ? T(0) : beta * crow[j];
    for (int64_t p = 0; p < k; ++p) {
      const T av = alpha * (trans_a ? a[p * lda + i] : a[i * lda + p]);
      if (!trans_b) {
        const T* brow = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) crow[j] += av * brow[j];
      } else {
        for (int64_t j = 0; j < n; ++j) crow[j] += av * b[j * ldb + p];
      }
    }
  }
}

// Row-major C = alpha op(A) op(B) + beta C through the Fortran BLAS routine `blas` (sgemm_ or
// dgemm_; weak, so it may be missing), else the loop nest.
template <typename T, typename Blas>
inline void blas_or_loops(Blas* blas, bool trans_a, bool trans_b, int64_t m, int64_t n,
                          int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
                          T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (blas != nullptr && k > 0) {
    // Row-major C = A B is column-major C^T = B^T A^T: swap the operands, keep the flags.
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int mi = int(m), ni = int(n), ki = int(k), la = int(lda), lb = int(ldb),
              lc = int(ldc);
    blas(&tb, &ta, &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
    return;
  }
  gemm_fallback<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// The BLAS (or the loop nest), as given.
inline void gemm_blas(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                      const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                      float* c, int64_t ldc) {
  blas_or_loops<float>(sgemm_, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// ---------------------------------------------------------------------------------------------
// float GEMMs on packed panels.

constexpr int64_t kPanel = 32;     // columns of B per packed panel
constexpr int64_t kChunkK = 512;   // k per micro-kernel call (a 64 KiB panel chunk)

// Panel j of a packed [k][n] matrix holds columns [j * kPanel, j * kPanel + w_j) as a dense
// [k][w_j] block (w_j = kPanel but for the last panel), at offset j * kPanel * k: the packed
// matrix takes k * n elements.
// op(B) [k][n] into panels: B[kk * ldb + c] (trans false) or B[c * ldb + kk] (trans true).
inline void pack_panels(bool trans, int64_t k, int64_t n, const float* b, int64_t ldb,
                        float* out) {
  for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
    const int64_t w = std::min(kPanel, n - j0);
    float* d = out + j0 * k;
    if (trans) {
      transpose(w, k, b + j0 * ldb, ldb, d, w);
      continue;
    }
    if (w == kPanel) {
      // Fixed-length rows: inline vector copies (a memcpy call per 128 bytes costs more).
      for (int64_t kk = 0; kk < k; ++kk) {
        const float* src = b + kk * ldb + j0;
        float* dst = d + kk * kPanel;
#pragma GCC unroll 32
        for (int64_t c = 0; c < kPanel; ++c) dst[c] = src[c];
      }
      continue;
    }
    for (int64_t kk = 0; kk < k; ++kk) {
      for (int64_t c = 0; c < w; ++c) d[kk * w + c] = b[kk * ldb + j0 + c];
    }
  }
}

// Rows of A per micro-kernel call when A's row stride is a multiple of 4 KiB (1024 floats: the
// rows of 1024 or 2048 channels), on CPUs whose L1 data cache has fewer than 12 ways. Such
// rows fall into the same L1 set, and the micro-kernel's reads of many rows at once evict each
// other: on the 2-core AMD EPYC (Zen 4, 32 KiB 8-way L1) build machine, one thread,
// P x N x 1024 GEMMs (P 49..3136, N 32..1024) ran at 50-93 GFLOP/s against 85-114 with A's
// rows 16 floats apart more; calls of 16 rows ran at 95% of the latter (8 or 32 rows did less
// well), with no copy of A (copying A to a padded buffer cost more where N is small). With a
// 48 KiB 12-way L1 (the 2-core Xeon with AMX, lscpu family 6 model 167 under KVM) the split
// costs instead: 1024->1024 7x7 B=8 backward 19% slower on one thread and 15% on two, forward 3%
// (paired A/B in one process, results bit for bit the same).
constexpr int64_t kAliasRows = 16;
constexpr long kAliasFreeL1Ways = 12;
// Whether such rows go to the micro-kernel kAliasRows at a time: L1 ways below
// kAliasFreeL1Ways (or unknown), unless BSCONV_CPU_ALIAS_SPLIT is set ("0": never, else
// always; the results do not depend on it).
inline bool alias_split_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("BSCONV_CPU_ALIAS_SPLIT");
    if (env != nullptr && env[0] != '\0') return env[0] != '0';
#ifdef _SC_LEVEL1_DCACHE_ASSOC
    const long ways = sysconf(_SC_LEVEL1_DCACHE_ASSOC);
    return ways <= 0 || ways < kAliasFreeL1Ways;
#else
    return true;
#endif
  }();
  return on;
}
inline bool split_aliased_rows(int64_t lda) { return lda % 1024 == 0 && alias_split_enabled(); }

// C[m][n] = A[m][k] B (+ C when `accumulate`): B packed by pack_panels (ldb < 0), or B[k][n]
// read in place with row stride ldb.
inline void gemm_panels(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                        const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  if (m > kAliasRows && split_aliased_rows(lda)) {
    for (int64_t i0 = 0; i0 < m; i0 += kAliasRows) {
      gemm_panels(std::min(kAliasRows, m - i0), n, k, a + i0 * lda, lda, b, ldb, c + i0 * ldc,
                  ldc, accumulate);
    }
    return;
  }
  for (int64_t k0 = 0; k0 < k; k0 += kChunkK) {
    const int64_t kc = std::min(kChunkK, k - k0);
    for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
      const int64_t w = std::min(kPanel, n - j0);
      const float* bj = ldb < 0 ? b + j0 * k + k0 * w : b + k0 * ldb + j0;
      const int64_t lb = ldb < 0 ? w : ldb;
#ifdef CPUBLAS_BRGEMM_F32F32F32
      at::native::cpublas::brgemm(m, w, kc, lda, lb, ldc, accumulate || k0 > 0, a + k0, bj,
                                  c + j0, false);
#else  // a torch without the float brgemm: the BLAS on the same panels
      gemm_blas(false, false, m, w, kc, 1.f, a + k0, lda, bj, lb,
                accumulate || k0 > 0 ? 1.f : 0.f, c + j0, ldc);
#endif
    }
  }
}

// C[m][n] = A[m][k] Bp (+ C when `accumulate`), Bp packed by pack_panels.
inline void gemm_packed(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                        const float* bp, float* c, int64_t ldc, bool accumulate) {
  gemm_panels(m, n, k, a, lda, bp, -1, c, ldc, accumulate);
}

// Per-thread, grow-only buffers for the packed operands of gemm().
class GemmScratch {
 public:
  float* get(int i, int64_t n) {
    if (size_[i] < n) {
      std::free(buf_[i]);
      buf_[i] = static_cast<float*>(std::aligned_alloc(64, size_t((n + 15) / 16 * 64)));
      TORCH_CHECK(buf_[i] != nullptr, "bsconv_fused: out of memory allocating GEMM scratch");
      size_[i] = n;
    }
    return buf_[i];
  }
  ~GemmScratch() {
    for (float* b : buf_) std::free(b);
  }

 private:
  float* buf_[3] = {nullptr, nullptr, nullptr};
  int64_t size_[3] = {0, 0, 0};
};

inline GemmScratch& gemm_scratch() {
  thread_local GemmScratch s;
  return s;
}

// The micro-kernel on operands packed for this call. Transposes are arranged so that the
// large operands are packed by plain row copies where possible; the BLAS takes what packing
// cannot pay for (a transposed A of fewer than 32 rows: the brgemm calls would be too short).
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                 int64_t ldc) {
  if (m == 0 || n == 0) return;
  const bool packed = k > 0 && alpha == 1.f && (beta == 0.f || beta == 1.f) &&
                      !(trans_a && !trans_b && m < 32);
  if (!packed) return gemm_blas(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  GemmScratch& s = gemm_scratch();
  const bool acc = beta == 1.f;
  if (!trans_a && !trans_b && m >= 64 && n >= 64) {
    // B read in place: the micro-kernel streams its rows well once they span two panels and
    // A has rows enough to reuse them, and packing cost a copy of B. Paired A/B on the 2-core
    // Xeon (AVX-512 host), two threads, NCHW x (B = x rows, k x P):
    // forward 32->64 112x112 B=8 14%, 64->128 112x112 s2 B=1 10%, BSConv-S 512->86->512
    // 14x14 4% faster; forward+backward 128->22->128 56x56 B=8 5%. 49-pixel rows (7x7
    // images, a panel and a tail) ran 2-6% slower unpacked, so they stay packed; with m < 64
    // (BSConv-S's u: 128->22 56x56 B=8) packing is 2% faster. Power-of-two row strides (the
    // Zen 2 case above) did not hurt here: 64x64 and 128x128 images packed were 11-13% slower.
    return gemm_panels(m, n, k, a, lda, b, ldb, c, ldc, acc);
  }
  if (!trans_a) {
    float* bp = s.get(0, k * n);
    pack_panels(trans_b, k, n, b, ldb, bp);
    gemm_packed(m, n, k, a, lda, bp, c, ldc, acc);
  } else if (trans_b && m < k) {
    // C^T = B A with both as stored ([n][k] x [k][m], the k-long A copied by rows), then
    // C (+)= (C^T)^T: cheaper than transposing A and B when the result is the small side.
    float* ap = s.get(0, k * m);
    pack_panels(false, k, m, a, lda, ap);
    float* ct = s.get(1, n * m);
    gemm_packed(n, m, k, b, ldb, ap, ct, m, false);
    if (!acc) {
      transpose(n, m, ct, m, c, ldc);
    } else {
      float* t = s.get(2, m * n);
      transpose(n, m, ct, m, t, n);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) c[i * ldc + j] += t[i * n + j];
      }
    }
  } else {
    float* at = s.get(1, m * k);
    transpose(k, m, a, lda, at, k);
    if (!trans_b && m >= 64 && n >= 64) {
      // B read in place, as above: backward weight gradients of channels-last x, paired A/B
      // of the backward op (two threads, the AMX host, ms): 512->86->512 14x14 B=8 3.65 ->
      // 3.43 and 3.61 -> 3.45 (one thread 7.12 -> 6.78), 256->256 28x28 B=8 8.43 -> 8.28,
      // 512->256 14x14 B=8 4.01 -> 3.94; 512->512 14x14 B=1 and 1024->1024 7x7 B=1 within
      // 2%. The same bits.
      return gemm_panels(m, n, k, at, k, b, ldb, c, ldc, acc);
    }
    float* bp = s.get(0, k * n);
    pack_panels(trans_b, k, n, b, ldb, bp);
    gemm_packed(m, n, k, at, k, bp, c, ldc, acc);
  }
}

// ---------------------------------------------------------------------------------------------
// bfloat16 GEMMs (float accumulation) on oneDNN's brgemm micro-kernel for bfloat16 operands,
// which runs on AMX tiles or AVX-512 BF16 where the CPU has them: B in VNNI panels of kPanel
// columns (pairs of k interleaved, at::native::cpublas::pack), k even (an odd k stopped the
// micro-kernel with an illegal instruction on the AMX host).

// True when the bfloat16 GEMMs run: this torch has the bfloat16 brgemm, the CPU runs it
// (AMX tiles, where cpublas::could_pack says so, or AVX-512 BF16: could_pack answers false
// there, as the micro-kernel needs no packing of its own, yet it runs on the VNNI panels
// below; on the Zen 4 build machine at 200-226 GFLOP/s per thread against 97-110 for the float
// micro-kernel, with results within float rounding of a float64 sum of the bfloat16 products)
// and BSCONV_CPU_NO_BF16_GEMM is not set to a non-zero value (which leaves the float GEMMs on
// widened operands; results agree to float rounding).
inline bool bf16_gemm_enabled() {
  static const bool on = [] {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
    if (env_switch_on("BSCONV_CPU_NO_BF16_GEMM")) return false;
    if (at::native::cpublas::could_pack(at::kBFloat16)) return true;
#if BSCONV_X86_AVX2
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
#else
    return false;
#endif
#else
    return false;
#endif
  }();
  return on;
}

// The depth a bfloat16 GEMM of depth k runs at: k padded with zero products to a multiple of
// 32, the micro-kernel's depth step on AMX tiles. Its depth tail ran another, slower kernel:
// one thread, 512 x 196 x k on the AMX host, 92 us with k = 86, 41 us with k = 96.
inline int64_t bf16_depth(int64_t k) { return round_up(k, 32); }

// w [n][k] into out [n][bf16_depth(k)], zeros past k.
inline void pad_bf16_depth(const c10::BFloat16* w, int64_t n, int64_t k, c10::BFloat16* out) {
  const int64_t kp = bf16_depth(k);
  for (int64_t r = 0; r < n; ++r) {
    std::copy(w + r * k, w + (r + 1) * k, out + r * kp);
    std::fill(out + r * kp + k, out + (r + 1) * kp, c10::BFloat16(0.f));
  }
}

// Elements of one VNNI panel of a k-row operand.
inline int64_t bf16_panel_size(int64_t k) { return round_up(k, 2) * kPanel; }

// Panel j of W^T (k x n; W [n][k] row-major, k even): columns [j * kPanel, ...) of W^T in the
// layout cpublas::pack writes (checked element for element on the AMX host), [k / 2][kPanel][2]
// with zeros past n: a transpose of the rows' bfloat16 pairs seen as 32-bit words (moved, not
// computed on, so any bit pattern goes through as it is).
inline void pack_bf16_wt_panel(const c10::BFloat16* w, int64_t n, int64_t k, int64_t j,
                               c10::BFloat16* out) {
  const int64_t j0 = j * kPanel, wd = std::min(kPanel, n - j0);
  c10::BFloat16* d = out + j * bf16_panel_size(k);
  if (wd < kPanel) std::fill_n(d, bf16_panel_size(k), c10::BFloat16(0.f));
  transpose(wd, k / 2, reinterpret_cast<const float*>(w + j0 * k), k / 2,
            reinterpret_cast<float*>(d), kPanel);
}

// C[m][0 : n) = A[m][k] B[k][0 : n) in float, A bfloat16 row-major, B one VNNI panel of ldb
// columns ([k / 2][ldb][2], n <= ldb), k even.
inline void gemm_bf16_wide(int64_t m, int64_t n, int64_t k, const c10::BFloat16* a, int64_t lda,
                           const c10::BFloat16* b, int64_t ldb, float* c, int64_t ldc) {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  TORCH_INTERNAL_ASSERT(k % 2 == 0 && n <= ldb, "bsconv_fused: bfloat16 GEMM with k = ", k);
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, false, a, b, c, true);
#else
  TORCH_INTERNAL_ASSERT(false, "bsconv_fused: no bfloat16 brgemm in this torch");
#endif
}

// C[m][0 : cols) = A[m][k] B[k][n0 : n0 + cols) in float, A bfloat16 row-major, B in VNNI
// panels (pack_bf16_wt_panel; n0 a multiple of kPanel), k even.
inline void gemm_bf16(int64_t m, int64_t n0, int64_t cols, int64_t k, const c10::BFloat16* a,
                      int64_t lda, const c10::BFloat16* panels, float* c, int64_t ldc) {
  TORCH_INTERNAL_ASSERT(n0 % kPanel == 0, "bsconv_fused: bfloat16 GEMM at ", n0);
  for (int64_t j0 = n0; j0 < n0 + cols; j0 += kPanel) {
    gemm_bf16_wide(m, std::min(kPanel, n0 + cols - j0), k, a, lda,
                   panels + j0 / kPanel * bf16_panel_size(k), kPanel, c + (j0 - n0), ldc);
  }
}

// Releases the micro-kernel's hardware context (AMX tile state) of the calling thread when the
// guard that used it goes out of scope.
class Bf16GemmScope {
 public:
  explicit Bf16GemmScope(bool used) : used_(used) {}
  ~Bf16GemmScope() {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
    if (used_) at::native::cpublas::brgemm_release(true);
#endif
  }
  Bf16GemmScope(const Bf16GemmScope&) = delete;
  Bf16GemmScope& operator=(const Bf16GemmScope&) = delete;

 private:
  bool used_;
};

inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                 const double* a, int64_t lda, const double* b, int64_t ldb, double beta,
                 double* c, int64_t ldc) {
  blas_or_loops<double>(dgemm_, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

inline void gemm_blas(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                      const double* a, int64_t lda, const double* b, int64_t ldb, double beta,
                      double* c, int64_t ldc) {
  gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace bsconv::cpu
