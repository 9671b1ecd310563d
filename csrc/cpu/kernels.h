// Fused BSConv CPU kernels: shared pieces (scratch, operands of the projection GEMMs, tiling).
//
// Structure (shared/design/bsconv.md, "A structure that keeps the options from multiplying"):
//   patch stage     the projection GEMM writes v for whole image rows into a channels-last
//                   scratch ([pixel][channel]); padding is a row map (rows that read zeros
//                   point at a zero row) and a column map, the mid transform runs on the rows
//                   just computed;
//   depthwise stage dw_row (simd.h): a depthwise conv over those rows, vectorized over
//                   channels, with a dense interior and mapped border columns.
// The forward walks a band of output rows in blocks and keeps the v rows that the next block
// reads again, so a band recomputes no halo inside itself. The backward runs over disjoint
// bands of v rows (several whole images when images are small): gather-form transposed
// depthwise and blueprint correlation on the in-image taps, a correction pass for the padded
// taps that remap into the image (reflect / replicate / circular), then the adjoint of the
// projection: gx for the band's own pixels (no atomics) and weight-gradient partials per fixed
// group of tasks, summed in group order (deterministic, independent of the thread count).
//
// Both x and y / gx / gy have standard NCHW or channels-last strides (the host makes sure).
// The projection GEMMs read x in place when its dtype is the accumulation type, except an
// NCHW float x of a BSConv-U projection that runs on packed weights (use_panels) and would
// be transposed block by block too often (nchw_x_read_channels_last): the host copies it to
// channels-last once, and y / gx stay NCHW. The float GEMMs run on oneDNN's
// brgemm micro-kernel with B packed into panels (gemm.h); bfloat16 forwards, where the CPU
// supports it, on its bfloat16 micro-kernel (gemm_bf16, channels-last x only).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/bsconv_math.h"
#include "common/geometry.h"
#include "cpu/gemm.h"
#include "cpu/simd.h"

namespace bsconv::cpu {

// Scratch memory: per-thread, grow-only buffers, one per role (`slot`), kept across calls so
// that a call does not page-fault fresh memory in (the OpenMP pool threads persist). 64-byte
// aligned; zero-filled when asked. Buffers that are live at the same time on one thread must
// use different slots (the slot ids below).
enum ScratchSlot : int {
  kSlotFwdVt = 0, kSlotFwdV, kSlotFwdZero, kSlotFwdOut, kSlotFwdX, kSlotFwdU, kSlotFwdVg,
  kSlotBwdU, kSlotBwdPartials, kSlotBwdV, kSlotBwdA, kSlotBwdGvb, kSlotBwdGc, kSlotBwdGu,
  kSlotBwdGy, kSlotBwdX, kSlotBwdGx, kSlotBwdGb, kSlotBwdDsc, kSlotBwdDsh, kSlotWeights,
  kSlotWeightsBf16, kSlotFwdUb, kSlotFwdXb,
  kSlotCsGv, kSlotCsX, kSlotCsXp,  // backward_channel_split's buffers shared by its tasks
  kSlotInput, kSlotGradOut,  // the calling thread's standard-layout copies of x and grad_y
  kNumSlots
};

struct ScratchBuffers {
  struct Buf {
    void* ptr = nullptr;
    size_t bytes = 0;
  };
  Buf bufs[kNumSlots];
  ~ScratchBuffers() {
    for (Buf& b : bufs) std::free(b.ptr);
  }
  void* get(int slot, size_t bytes) {
    Buf& b = bufs[slot];
    if (b.bytes < bytes) {
      std::free(b.ptr);
      b.ptr = std::aligned_alloc(64, bytes);
      b.bytes = b.ptr ? bytes : 0;
      TORCH_CHECK(b.ptr != nullptr, "bsconv_fused: out of memory allocating ", bytes,
                  " bytes of scratch");
    }
    return b.ptr;
  }
};

inline ScratchBuffers& thread_scratch() {
  thread_local ScratchBuffers buffers;
  return buffers;
}

template <typename T>
class Scratch {
 public:
  Scratch() = default;
  Scratch(int slot, int64_t n, bool zero = true) { reset(slot, n, zero); }
  void reset(int slot, int64_t n, bool zero = true) {
    const size_t bytes = ((size_t(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64) * 64;
    ptr_ = static_cast<T*>(thread_scratch().get(slot, bytes));
    if (zero) std::memset(static_cast<void*>(ptr_), 0, bytes);
  }
  T* get() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
};

// Whether the projection weights are packed into GEMM panels once per call (float only): the
// packing costs about as much as the micro-kernel gains over the BLAS on ~100-250 pixels, so
// it pays from this many pixels per call.
constexpr int64_t kPanelMinPixels = 256;
inline bool use_panels(const Geometry& g, bool is_float) {
  return is_float && g.B * g.H * g.W >= kPanelMinPixels;
}

// Weights in the accumulation type, in the layouts the kernels read.
template <typename acc_t>
struct Weights {
  const acc_t* w1;     // [proj1_rows, M]
  const acc_t* w2;     // [N, Mmid] or nullptr
  const acc_t* taps;   // [Kh*Kw, Np]: taps[k * Np + n] = dw[n, k], zero beyond N
  const acc_t* bias;   // [Np], zero without a bias
  const acc_t* scale;  // [Np], 1 without a scale (0 beyond N)
  const acc_t* shift;  // [Np], 0 without a shift
  int64_t Np;          // N rounded up to kLanes
  const acc_t* wpt;    // [K][Np]: the projection into v (w1, or w2 for BSConv-S) transposed,
                       // when K <= kSmallProjK and the GEMM operands are not packed (small
                       // projections run proj_b8); else nullptr
  // float only (else nullptr): the GEMM operands packed once per call (pack_panels, gemm.h).
  const acc_t* wvp;    // the projection into v transposed, [K][N]
  const acc_t* w1p;    // BSConv-S: w1 transposed, [M][Mmid]
  const acc_t* w1n;    // w1 as it is, [proj1_rows][M] (input gradients)
  const acc_t* w2n;    // BSConv-S: w2 as it is, [N][Mmid]
  // bfloat16 forward on channels-last x (bf16_forward_gemm), else nullptr: w1^T and
  // BSConv-S's w2^T in the bfloat16 GEMM's VNNI panels (gemm_bf16).
  const c10::BFloat16* wbp = nullptr;
  const c10::BFloat16* wbp2 = nullptr;
};

// Threads worth using for `flops` of work: a thread of the intra-op pool costs ~10 us to wake
// and join, and the work split for it (bands that recompute their halo rows, partial sums)
// more; below ~2 MFLOP per thread the second thread made the CIFAR layers slower, not faster
// (16->16 32x32 B=1 forward: 62 us on one thread, 73 us on two, on the 2-core build machine).
constexpr double kFlopsPerThread = 2e6;
inline int64_t useful_threads(double flops) {
  return std::clamp<int64_t>(int64_t(flops / kFlopsPerThread), 1,
                             std::max(1, at::get_num_threads()));
}

// The forward's multiply-adds times two: the projection(s) on the input pixels, the depthwise
// on the output pixels.
inline double forward_flops(const Geometry& g) {
  const double proj = g.subspace() ? double(g.Mmid) * (g.M + g.N) : double(g.M) * g.N;
  return 2.0 * g.B * (double(g.H) * g.W * proj + double(g.Ho) * g.Wo * g.N * g.taps());
}

// Runs `body(worker)` on up to `max_workers` threads of the intra-op pool; tasks are claimed
// from a shared counter, so a thread slowed down by other load takes fewer of them. (Results
// never depend on which thread ran a task.) The BLAS stays single-threaded inside.
template <typename F>
void run_workers(int64_t tasks, int64_t max_workers, F body) {
  if (tasks <= 0) return;
  const int64_t workers =
      std::max<int64_t>(1, std::min<int64_t>({int64_t(at::get_num_threads()), tasks, max_workers}));
  std::atomic<int64_t> next{0};
  if (workers == 1) {
    // On the calling thread, outside any parallel region: the body may fork (run_pair).
    SingleThreadedBlas blas_guard;
    body([&next, tasks]() -> int64_t {
      const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
      return t < tasks ? t : -1;
    });
    return;
  }
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    SingleThreadedBlas blas_guard;
    body([&next, tasks]() -> int64_t {
      const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
      return t < tasks ? t : -1;
    });
  });
}

// Runs two independent pieces of work, on two threads of the pool when `parallel` and called
// outside a parallel region with more than one thread (each piece single-threaded inside, so
// the results do not depend on whether they ran in parallel).
template <typename F, typename G>
void run_pair(bool parallel, F f, G g) {
  if (!parallel || at::get_num_threads() < 2 || at::in_parallel_region()) {
    f();
    g();
    return;
  }
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas blas_guard;
    for (int64_t i = begin; i < end; ++i) {
      if (i == 0) {
        f();
      } else {
        g();
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Per-pixel matrices. A [pixel][channel] matrix is stored channels-last (CL: element (p, c) at
// ptr[p * ld + c]) or channel-major (CM: at ptr[c * ld + p]; an NCHW image). v and gv are kept
// channels-last, so that moving them to and from the depthwise's B8 layout is a copy; x and
// gx keep the tensor's layout (the GEMMs take transposed operands).
template <typename T>
struct Operand {
  const T* ptr;
  int64_t ld;
  bool cm;
};

// An image batch [B, C, H, W] seen as per-pixel matrices: CL: element (b, c, pixel p) at
// p_[(b * H * W + p) * C + c]; CM: at p_[b * bstride + c * cstride + p] (NCHW: bstride = C*H*W,
// cstride = H*W; a batch-major CM buffer: bstride = H*W, cstride = B*H*W).
template <typename S>
struct Image {
  const S* p;
  int64_t C;
  bool cm;
  int64_t bstride, cstride;
};

// Pixels [r0 * W, r1 * W) of images [b0, b0 + nb) of `img` as an Operand of type T. In place
// when the types match and the pixels are evenly strided (one image, or images adjacent in
// memory); otherwise gathered (and converted) into `scratch` (P * C elements). `to_cl`: a
// channel-major float image is transposed into channels-last scratch instead (one pass for all
// the GEMMs that read the pixels).
template <typename T, typename S>
Operand<T> image_operand(const Image<S>& img, int64_t H, int64_t W, int64_t b0, int64_t nb,
                         int64_t r0, int64_t r1, T* scratch, bool to_cl = false) {
  const int64_t HW = H * W, run = (r1 - r0) * W, P = nb * run, C = img.C;
  if constexpr (std::is_same_v<S, float> && std::is_same_v<T, float>) {
    if (to_cl && img.cm) {
      for (int64_t i = 0; i < nb; ++i) {
        transpose(C, run, img.p + (b0 + i) * img.bstride + r0 * W, img.cstride,
                  scratch + i * run * C, C);
      }
      return {scratch, C, false};
    }
  }
  if (!img.cm) {
    const S* p = img.p + (b0 * HW + r0 * W) * C;  // nb > 1 only with whole images: contiguous
    if constexpr (std::is_same_v<S, T>) {
      return {p, C, false};
    } else {
      convert_n(p, scratch, P * C);
      return {scratch, C, false};
    }
  }
  if constexpr (std::is_same_v<S, T>) {
    if (nb == 1 || img.bstride == HW) return {img.p + b0 * img.bstride + r0 * W, img.cstride, true};
  }
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < nb; ++i) {
      const S* s = img.p + (b0 + i) * img.bstride + c * img.cstride + r0 * W;
      T* d = scratch + c * P + i * run;
      convert_n(s, d, run);
    }
  }
  return {scratch, P, true};
}

// The GEMMs of the projections, on per-pixel matrices of either layout (MKL runs narrow
// outputs - few channels - much faster with the pixels in the leading dimension, so without
// packed weights u and its gradient are kept channel-major; v and gv are channels-last for the
// B8 copies).
// Z[P][C] = A[P][R] op(W), W row-major; op(W) = W^T (W: [C][R], `w_t`) or W (W: [R][C]).
// `blas`: the BLAS as given, without packing W for this call (gemm.h).
template <typename T>
void pixel_gemm(const Operand<T>& A, int64_t P, int64_t C, int64_t R, const T* W, bool w_t,
                T* Z, int64_t ldz, bool z_cm, bool blas = false) {
  const int64_t ldw = w_t ? R : C;
  auto run = [blas](bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                    int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
    if (blas) return gemm_blas(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  };
  if (z_cm) {
    run(!w_t, !A.cm, C, P, R, T(1), W, ldw, A.ptr, A.ld, T(0), Z, ldz);
  } else {
    run(A.cm, w_t, P, C, R, T(1), A.ptr, A.ld, W, ldw, T(0), Z, ldz);
  }
}
// Projection: Y[P][N] = X[P][K] W^T (W: [N][K]).
template <typename T>
void proj_gemm(const Operand<T>& X, int64_t P, int64_t N, int64_t K, const T* W, T* Y,
               int64_t ldy, bool y_cm) {
  pixel_gemm(X, P, N, K, W, true, Y, ldy, y_cm);
}
// Output channels [n0, n0 + N) of the projection into channels-last Y:
// Y[P][N] = X[P][K] W[n0 : n0 + N]^T, on the W^T packed once per call (`panels`, pack_panels;
// n0 a multiple of kPanel) when there is one, else by the BLAS (packing the weights for every
// tile would cost more than the micro-kernel gains; see use_panels).
template <typename T>
void proj_gemm(const Operand<T>& X, int64_t P, int64_t n0, int64_t N, int64_t K, const T* W,
               const T* panels, T* Y, int64_t ldy) {
  if constexpr (std::is_same_v<T, float>) {
    if (panels != nullptr) {
      TORCH_INTERNAL_ASSERT(n0 % kPanel == 0, "bsconv_fused: channel chunk at ", n0,
                            " does not start a packed panel");
      const float* a = X.ptr;
      int64_t lda = X.ld;
      if (X.cm) {
        // Channel-major X (BSConv-S's u from NCHW x): its few channels transposed to rows.
        float* t = gemm_scratch().get(1, P * K);
        transpose(K, P, X.ptr, X.ld, t, K);
        a = t;
        lda = K;
      }
      gemm_packed(P, N, K, a, lda, panels + n0 * K, Y, ldy, false);
      return;
    }
  }
  pixel_gemm(X, P, N, K, W + n0 * K, true, Y, ldy, false, panels == nullptr);
}
// Its input gradient: Z[P][K] = Y[P][N] W (W: [N][K]).
template <typename T>
void igrad_gemm(const Operand<T>& Y, int64_t P, int64_t N, int64_t K, const T* W, T* Z,
                int64_t ldz, bool z_cm) {
  pixel_gemm(Y, P, K, N, W, false, Z, ldz, z_cm);
}
// The same from channels-last Y into channels-last Z with W packed by pack_panels (`panels`,
// nullptr if not packed).
template <typename T>
void igrad_gemm(const Operand<T>& Y, int64_t P, int64_t N, int64_t K, const T* W,
                const T* panels, T* Z, int64_t ldz) {
  if constexpr (std::is_same_v<T, float>) {
    if (panels != nullptr && !Y.cm) {
      gemm_packed(P, K, N, Y.ptr, Y.ld, panels, Z, ldz, false);
      return;
    }
  }
  pixel_gemm(Y, P, K, N, W, false, Z, ldz, false, panels == nullptr);
}
// Its weight gradient: G[N][K] = beta G + Y^T X (Y: [P][N], X: [P][K]; G row-major).
template <typename T>
void wgrad_gemm(int64_t P, int64_t N, int64_t K, const Operand<T>& Y, const Operand<T>& X,
                T beta, T* G) {
  gemm(!Y.cm, X.cm, N, K, P, T(1), Y.ptr, Y.ld, X.ptr, X.ld, beta, G, K);
}

// ---------------------------------------------------------------------------------------------
// Tiling. Decided from the geometry only (never from the thread count), so that the results,
// in particular the backward's summation order, do not depend on the number of threads.

// Forward: tasks are (image, channel chunk, band of output rows); a band is walked in blocks of
// `ob` output rows whose v rows (at most `slots`) stay in a cache-sized scratch.
struct ForwardPlan {
  int64_t nc = 1, chunks = 1;  // channels per chunk (a multiple of kLanes, of kPanel for GEMM
                               // projections, unless nc == N)
  int64_t band = 1, bands = 1;  // output rows per band
  int64_t ob = 1, slots = 1;
  // Images per task (> 1: small images; a task projects its images in one GEMM, all chunks,
  // one band).
  int64_t nb = 1;
  int64_t tasks(int64_t B) const { return nb > 1 ? ceil_div(B, nb) : B * chunks * bands; }
};

constexpr int64_t kForwardVBudget = 384 * 1024;  // bytes of v rows per block
// A projection GEMM over fewer pixels than this runs well below the BLAS's peak (one 7x7 image:
// 49 rows, ~2/3 of the rate at 196 rows, measured with MKL sgemm on the build machine), so small
// images are projected several at a time.
constexpr int64_t kGroupPixels = 196;

// Tasks wanted for load balance: none extra on one thread; else two per thread (tasks are
// claimed dynamically, so a thread slowed by other load takes fewer), but only one per thread
// for BSConv-S, whose extra tasks are bands that recompute their shared rows.
inline int64_t forward_min_tasks(const Geometry& g, int64_t threads) {
  if (threads <= 1) return 1;
  return g.subspace() ? threads : 2 * threads;
}

// min_tasks: tasks wanted for load balance (the forward's results do not depend on the tiling
// beyond rounding, and nothing requires them to be independent of the thread count).
// gemm_proj: the projection into v runs as a BLAS GEMM (not the small-K register tiles).
inline ForwardPlan forward_plan(const Geometry& g, int64_t acc_size, int64_t threads,
                                bool gemm_proj) {
  const int64_t min_tasks = forward_min_tasks(g, threads);
  ForwardPlan p;
  // A chunk's channels start at a multiple of kPanel when the projection may run on packed
  // panels (proj_gemm reads the panels from channel n0 on), else of kLanes.
  auto set_nc = [&](int64_t nc) {
    p.nc = nc >= g.N ? g.N : round_up(nc, gemm_proj ? kPanel : kLanes);
    p.chunks = ceil_div(g.N, p.nc);
  };
  // BSConv-S keeps all channels in one chunk: every chunk would recompute the u rows.
  set_nc(g.subspace() ? g.N : std::min<int64_t>(g.N, 128));
  p.band = g.Ho;
  p.bands = 1;
  const int64_t HW = g.H * g.W;
  const int64_t span = (g.Kh - 1) * g.dh + 1;  // v rows an output row reads
  if (gemm_proj && g.B > 1 && HW < kGroupPixels) {
    // Several small images per task, as long as every thread still gets a task.
    p.nb = std::min(g.B, ceil_div(kGroupPixels, HW));
    while (p.nb > 1 && ceil_div(g.B, p.nb) < threads) --p.nb;
  }
  // Parallelism for small batches: narrower channel chunks (no extra multiply-adds for
  // BSConv-U) or bands of output rows (each band recomputes the v rows it shares with its
  // neighbour).
  while (p.nb == 1 && p.tasks(g.B) < min_tasks) {
    // Bands first where twice as many would recompute at most 1/16 of the v rows: a narrower
    // chunk repeats the x rows' packing (NCHW x) and gives the GEMM fewer rows. Paired A/B on
    // the 2-core Xeon, B=1 forward: 64->128 112x112 s2 6% (NCHW x) and 5% (channels-last)
    // faster, 256->512 28x28 s2 2-3%; 256->256 28x28 k5 (4 of 28 rows again) 3-10% slower.
    const int64_t again = (span - g.sh) * (p.bands * 2 - 1);
    const bool bands_first = again * 16 <= g.H && ceil_div(g.Ho, p.bands * 2) >= 4;
    if (p.nc > 64 && !g.subspace() && !bands_first) {
      set_nc(p.nc / 2);
    } else if (ceil_div(g.Ho, p.bands * 2) >= 4) {
      p.bands *= 2;
      p.band = ceil_div(g.Ho, p.bands);  // balanced bands
      p.bands = ceil_div(g.Ho, p.band);
    } else {
      break;
    }
  }
  // A v row is held twice: as the GEMM wrote it and in the depthwise's B8 layout.
  const int64_t row_bytes = 2 * g.W * round_up(p.nc, kLanes) * acc_size;
  int64_t budget_rows = std::max<int64_t>(1, kForwardVBudget / std::max<int64_t>(row_bytes, 1));
  if (gemm_proj) {
    // Narrow images: blocks of enough rows that the BLAS sees kGroupPixels pixels per call
    // (a few rows of a 14-pixel image would leave it at a fraction of its rate).
    budget_rows = std::max(budget_rows, ceil_div(kGroupPixels, g.W) + span - 1);
  }
  p.ob = std::clamp<int64_t>((budget_rows - span) / g.sh + 1, 1, std::max<int64_t>(p.band, 1));
  p.slots = (p.ob - 1) * g.sh + span;
  return p;
}

// Channel-major float x (NCHW) projected by GEMMs on packed panels, BSConv-U: tasks of whole
// images that transpose their x once into channels-last scratch and run every channel chunk on
// it. For grouped small images (nb > 1) always; for one image per task when two or more chunks
// would each read its rows again, as long as every thread gets an image and the image's x fits
// kImageGatherBytes (else, with more than two chunks, x is copied channels-last before the
// kernel, see nchw_x_read_channels_last). That copy writes and re-reads a tensor the size of
// x: in a 256->512 28x28 B=8 forward on two threads, 5.7% of the perf samples were its
// transpose, and the NCHW forward took 12% longer than the channels-last one in the benchmark.
// Two chunks: against each chunk's GEMM reading the x rows in place (paired A/B on the 2-core
// Xeon (AMX), bit for bit the same), 256->256 28x28 k3/k5 B=8 and 128->256 28x28 B=8 3-7%
// faster on two threads, 9-11% on one (128->256: the same); one chunk (x read once either
// way) was 5-29% slower, so it stays in place.
constexpr int64_t kImageGatherBytes = 2 << 20;
inline bool forward_image_tasks_cm(const Geometry& g, const ForwardPlan& p, int64_t threads) {
  if (g.subspace()) return false;
  if (p.nb > 1) return true;
  return p.chunks >= 2 && p.bands == 1 && g.B >= threads &&
         g.H * g.W * g.M * int64_t(sizeof(float)) <= kImageGatherBytes;
}

// Backward: tasks are bands of `nr` v rows of one image, or `nb` whole images.
struct BackwardPlan {
  int64_t nb = 1, nr = 1;
  int64_t bands = 1, image_groups = 1;
  int64_t tasks = 0;
  int64_t groups = 1;  // weight-gradient partials
};

// Per-pixel scratch of one task, in bytes: the task's stages (recompute, gy rows, transposed
// depthwise, layout change, GEMMs) each stream over all of its buffers, which stay in a core's
// L2 at this size (with 4 MB they spilled to L3, and large images ran their backward ~25%
// slower). At least kBackwardMinPixels pixels per task all the same, so that the GEMMs keep
// enough rows and the gy halo rows stay a small part of a band.
constexpr int64_t kBackwardBudget = 512 << 10;
constexpr int64_t kBackwardMinPixels = 256;
constexpr int64_t kPartialBudget = 8 << 20;   // bytes of weight-gradient partials

// The split depends on the geometry only: the tasks and their groups fix the summation order
// of the weight gradients, which must not depend on the thread count.
inline BackwardPlan backward_plan(const Geometry& g, int64_t bytes_per_pixel,
                                  int64_t partial_bytes) {
  BackwardPlan p;
  if (g.B == 0 || g.H == 0 || g.W == 0) return p;
  const int64_t HW = g.H * g.W;
  const int64_t budget_px = kBackwardBudget / std::max<int64_t>(bytes_per_pixel, 1);
  const int64_t max_px = std::max({g.W, kBackwardMinPixels, budget_px});
  int64_t bands = ceil_div(HW, max_px), groups_of_images = g.B;
  auto count = [&] {
    bands = std::min(bands, g.H);
    p.nr = ceil_div(g.H, bands);  // balanced bands of rows
    p.bands = ceil_div(g.H, p.nr);
    p.nb = p.bands == 1 ? ceil_div(g.B, groups_of_images) : 1;
    p.image_groups = ceil_div(g.B, p.nb);
    p.tasks = p.image_groups * p.bands;
  };
  if (bands <= 1) {
    bands = 1;
    // Whole images per task: as many as the budget holds; when not even one image fits, at
    // least kBackwardMinPixels pixels, rounded up (512->512 14x14 images go two to a task, not
    // one of 196 pixels: its B=8 backward on two threads 11-13% faster in five of six A/B
    // runs; 128->128, whose image fits, was 6-15% slower in pairs).
    const int64_t fit = budget_px / HW;
    const int64_t per_task = fit > 0 ? fit : ceil_div(kBackwardMinPixels, HW);
    groups_of_images = ceil_div(g.B, std::clamp<int64_t>(per_task, 1, g.B));
  }
  count();
  // Parallelism for small batches, up to four tasks while each keeps 64 pixels: below that the
  // weight-gradient partials (a weight-sized buffer per group, summed at the end) and the
  // short GEMMs cost more than a second thread gains, and on one thread they are pure loss.
  auto split = [&](int64_t want, int64_t min_px) {
    while (p.tasks < want) {
      if (p.nb > 1) {
        groups_of_images = std::min(g.B, groups_of_images * 2);
      } else if (ceil_div(g.H, p.bands * 2) * g.W >= min_px && p.bands < g.H) {
        bands = p.bands * 2;
      } else {
        break;
      }
      count();
    }
  };
  split(4, 64);
  p.groups = std::min<int64_t>(
      p.tasks, std::clamp<int64_t>(kPartialBudget / std::max<int64_t>(partial_bytes, 1), 2, 16));
  return p;
}

}  // namespace bsconv::cpu
