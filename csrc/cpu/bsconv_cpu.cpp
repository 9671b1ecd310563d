// CPU implementations of bsconv_fused::forward / bsconv_fused::backward. The structure of the
// kernels is described in cpu/kernels.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "host_checks.h"

namespace bsconv::cpu {
namespace {

// Forward calls (this process) whose depthwise ran on the channels-last B16 loops: the tests'
// evidence that a case took them (cpu_depthwise_cl_forwards).
std::atomic<int64_t> dw_cl_forwards{0};
// Backward calls (this process) that ran the B16 loops (gv_rows_cl, gb_rows_cl).
std::atomic<int64_t> dw_cl_backwards{0};
// Backward calls (this process) that ran backward_channel_split.
std::atomic<int64_t> cs_backwards{0};
// Backward calls (this process) that computed the weight gradient as its transpose (wgrad_t).
std::atomic<int64_t> wgrad_t_backwards{0};
// bfloat16 forward calls (this process) that ran forward_bf16_cm.
std::atomic<int64_t> bf16_cm_forwards{0};

// ---------------------------------------------------------------------------------------------
// The v rows a block of output rows reads, kept in a ring of S slots: a row computed for one
// block stays for the next blocks while they read it (a band recomputes no halo inside itself).
struct RowRing {
  int64_t S = 1;
  std::vector<int64_t> slot_row;  // image row held by each slot, -1 if none
  std::vector<int64_t> L;         // image rows the current block reads, sorted
  std::vector<int64_t> row2slot;  // slot of each row of L

  RowRing(int64_t slots, int64_t H) : S(slots), slot_row(slots, -1), row2slot(H, 0) {}
  void reset() { std::fill(slot_row.begin(), slot_row.end(), int64_t(-1)); }

  // For output rows [i0, i1): fills L and row2slot and calls project(ra, rb) for each run
  // [ra, rb) of consecutive rows that must be computed (row r goes to slot row2slot[r]).
  template <typename F>
  void block(const Geometry& g, int64_t i0, int64_t i1, F project) {
    L.clear();
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t kh = 0; kh < g.Kh; ++kh) {
        const int64_t r = remap_index(i * g.sh - g.pt + kh * g.dh, g.H, g.mode);
        if (r >= 0) L.push_back(r);
      }
    }
    std::sort(L.begin(), L.end());
    L.erase(std::unique(L.begin(), L.end()), L.end());
    const int64_t n = int64_t(L.size());
    if (n == 0) return;
    if (L.back() - L.front() < S) {
      // Rows at slot r % S: distinct within the block, and rows of the previous block that
      // this one reads again are still there.
      for (int64_t r : L) row2slot[r] = r % S;
      for (int64_t k = 0; k < n;) {
        if (slot_row[L[k] % S] == L[k]) {
          ++k;
          continue;
        }
        int64_t e = k + 1;
        while (e < n && L[e] == L[e - 1] + 1 && slot_row[L[e] % S] != L[e]) ++e;
        project(L[k], L[e - 1] + 1);
        for (int64_t q = k; q < e; ++q) slot_row[L[q] % S] = L[q];
        k = e;
      }
      return;
    }
    // Rows far apart (circular padding at the borders): slots in order, nothing reused.
    reset();
    for (int64_t k = 0; k < n; ++k) row2slot[L[k]] = k;
    for (int64_t k = 0; k < n;) {
      int64_t e = k + 1;
      while (e < n && L[e] == L[e - 1] + 1) ++e;
      project(L[k], L[e - 1] + 1);
      k = e;
    }
    for (int64_t k = 0; k < n; ++k) slot_row[k] = L[k];
  }
};

// Padded rows of the forward depthwise: image column c sits at padded column c + pl; padded
// column pc reads image column colmap[pc] (-1: zero). Output column j, tap kw reads padded
// column j*sw + kw*dw < Wp.
struct PaddedCols {
  std::vector<int64_t> colmap;
  int64_t Wp = 0, Wp_alloc = 0;
  explicit PaddedCols(const Geometry& g) : colmap((g.Wo - 1) * g.sw + (g.Kw - 1) * g.dw + 1) {
    for (int64_t pc = 0; pc < int64_t(colmap.size()); ++pc) {
      colmap[pc] = remap_index(pc - g.pl, g.W, g.mode);
    }
    Wp = std::max<int64_t>(g.pl + g.W, int64_t(colmap.size()));
    // Room for whole 8-column blocks past the last output column (their outputs are dropped).
    Wp_alloc = std::max(Wp, (round_up(g.Wo, kLanes) - 1) * g.sw + (g.Kw - 1) * g.dw + 1);
  }
  // After the image pixels of a B8 row were written: the padding pixels that remap into the
  // image get copies (zero padding leaves them zero).
  template <typename T>
  void fill(const Geometry& g, T* row, int64_t cbs, int64_t lanes) const {
    if (g.mode == kZeros) return;
    for (int64_t pc = 0; pc < int64_t(colmap.size()); ++pc) {
      if (pc >= g.pl && pc < g.pl + g.W) continue;
      const int64_t src = colmap[pc] + g.pl;
      for (int64_t cb = 0; cb * kLanes < lanes; ++cb) {
        std::memcpy(row + cb * cbs + pc * kLanes, row + cb * cbs + src * kLanes,
                    kLanes * sizeof(T));
      }
    }
  }
};

// BSConv-S: u = W1 x for P pixels into `u` (P * Mmid elements): channels-last from
// channels-last x with the packed W1^T, else channel-major (MKL runs such narrow outputs much
// faster with the pixels in the leading dimension).
template <typename acc_t>
Operand<acc_t> project_u(const Geometry& g, const Operand<acc_t>& X, int64_t P,
                         const Weights<acc_t>& w, acc_t* u) {
  if (w.w1p != nullptr && !X.cm) {
    proj_gemm(X, P, 0, g.Mmid, g.M, w.w1, w.w1p, u, g.Mmid);
    return {u, g.Mmid, false};
  }
  proj_gemm(X, P, g.Mmid, g.M, w.w1, u, P, true);
  return {u, P, true};
}

// Forward: one task per (image, channel chunk, band of output rows). BSConv-U projects x rows
// with w1; BSConv-S first projects them to u rows with w1 (project_u, only the rows of the
// current block) and those with w2. The GEMM writes v rows channels-last (channel-major for
// BSConv-U's NCHW x read in place), they move to B8 slots (with the mid transform), the
// depthwise writes CL rows or B8 rows that are transposed into NCHW y rows. With `stream_y`
// (float channels-last y) the depthwise writes a block's output rows to scratch, from which
// they go to y by streaming stores (stream_output). Written in place, a block's rows of a CL y
// are filled one 8-channel block of every pixel at a time: half a cache line per store, the
// other half one sweep later, each line read for ownership and written back (32->64 112x112
// B=8: 5.5 ms against 3.7 ms for the NCHW y, whose rows the depthwise writes whole). NCHW y
// rows stay plain stores: streamed through scratch they were 4-5% slower on 112-, 28- and
// 14-pixel rows. bfloat16 y stays on plain stores too. Channels-last, streamed through
// scratch: up to 7% slower (128->22->128 56x56 B=8). NCHW, rounded straight into streaming
// stores per channel run of the block's rows: 12-16% faster in a loop of one layer whose y
// stays in the (large) L3, but 12-16% slower in the benchmark's round-robin (32->64 112x112
// B=8 3.9 -> 4.4 ms, 128->22->128 56x56 B=8 2.7 -> 3.2 ms).
template <typename scalar_t, typename acc_t>
void forward_kernel(const Geometry& g, const scalar_t* x, bool x_cl, bool y_cl,
                    const Weights<acc_t>& w, scalar_t* y, bool stream_y) {
  // x and y: channels-last when x_cl / y_cl, else NCHW.
  const Image<scalar_t> src{x, g.M, !x_cl, g.M * g.H * g.W, g.H * g.W};
  const bool S = g.subspace();
  const acc_t* wp = S ? w.w2 : w.w1;
  const int64_t C = S ? g.Mmid : g.M;  // input channels of the projection into v
  // proj_b8 (register tiles) takes small projections of channel-major x when the weights are
  // not packed for the GEMM (calls of few pixels); GEMMs the others.
  const bool gemm_proj = w.wpt == nullptr || x_cl || !small_proj_enabled<acc_t>();
  const int64_t threads = useful_threads(forward_flops(g));
  const ForwardPlan plan = forward_plan(g, sizeof(acc_t), threads, gemm_proj);
  const PaddedCols cols(g);
  const int64_t H = g.H, W = g.W, Ho = g.Ho, Wo = g.Wo, N = g.N, HoWo = Ho * Wo;
  const int64_t ncp_max = round_up(plan.nc, kLanes), S_ = plan.slots, Wp = cols.Wp_alloc;
  constexpr bool same_out = std::is_same_v<scalar_t, acc_t>;
  constexpr bool bf16_in = std::is_same_v<scalar_t, c10::BFloat16>;
  stream_y = stream_y && y_cl && same_out;
  TORCH_INTERNAL_ASSERT(w.wbp == nullptr || !S || w.wbp2 != nullptr,
                        "bsconv_fused: bfloat16 GEMM operands");
  const int64_t cbs = S_ * Wp * kLanes;  // channel-block stride of the v slots (B8)
  const int64_t cbs16 = Wp * 16;         // channel-block stride of a B16 slot
  // B16 v slots read by the channels-last depthwise (depthwise_rows_cl, AVX-512; simd.h):
  // stride 1 or 2, dilation 1, zero padding, no mid transform, every chunk in whole 16-channel
  // vectors, projections by GEMM (not proj_b8's B8 register tiles). A slot then holds blocks
  // of 16 channels, each Wp padded pixels of 16 lanes (B16), the padding columns zero.
  constexpr bool cl_out_type =
      std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;
  const bool dw_cl = std::is_same_v<acc_t, float> && depthwise_cl_enabled() &&
                     dw_cl_shape(g.sh, g.sw, g.dh, g.dw, g.Kh, g.Kw) && g.mode == kZeros &&
                     !g.has_mid() && N % 16 == 0 && plan.nc % 16 == 0 && w.wpt == nullptr &&
                     (y_cl || cl_out_type);
  // Its outputs straight into y (float or bfloat16; NCHW y by register transposes), else
  // into obuf (streamed or converted channels-last y).
  const bool dw_cl_direct = dw_cl && cl_out_type && !(y_cl && stream_y);
  if (dw_cl) dw_cl_forwards.fetch_add(1, std::memory_order_relaxed);

  // Tasks of whole images (plan.nb each): grouped small images, or channel-major float x that
  // each task transposes once for all chunks (forward_image_tasks_cm).
  constexpr bool is_float = std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>;
  const bool cl_gather = is_float && !x_cl && w.wvp != nullptr &&
                         forward_image_tasks_cm(g, plan, threads);
  const bool images = plan.nb > 1 || cl_gather;
  TORCH_INTERNAL_ASSERT(w.wbp == nullptr || x_cl || !images,
                        "bsconv_fused: bfloat16 GEMM of NCHW x in image tasks");
  const int64_t tasks = images ? ceil_div(g.B, plan.nb) : plan.tasks(g.B);
  run_workers(tasks, threads, [&](auto next) {
    const Bf16GemmScope bf16_scope(w.wbp != nullptr);
    Scratch<acc_t> Vt(kSlotFwdVt, S_ * W * ncp_max, false), V(kSlotFwdV, S_ * Wp * ncp_max);
    // Rows of zero padding are read with a channel-block stride of 0: one block of zeros.
    Scratch<acc_t> zero_row(kSlotFwdZero, Wp * (dw_cl ? 16 : kLanes));
    Scratch<acc_t> obuf(kSlotFwdOut, plan.ob * Wo * ncp_max, false);
    // Tasks of whole images project them at once: x gathered unless in place, u and v for all
    // pixels of the task.
    const int64_t P_group = plan.nb * H * W, rows_x = images ? P_group : S_ * W;
    const bool x_gather = (!std::is_same_v<scalar_t, acc_t> && w.wbp == nullptr) ||
                          (images && !x_cl);
    Scratch<acc_t> Xs(kSlotFwdX, x_gather ? rows_x * g.M : 0, false);
    // (bfloat16 GEMMs: u rows of bf16_depth(C) channels, zeros past C)
    const int64_t Cp = S && w.wbp != nullptr ? bf16_depth(C) : C;
    Scratch<acc_t> Us(kSlotFwdU, S ? rows_x * Cp : 0, false);
    Scratch<scalar_t> Ub(kSlotFwdUb, S && w.wbp != nullptr ? rows_x * Cp : 0, false);
    // (the GEMM into Us writes columns [0, C) only: the zero columns stay for the worker)
    for (int64_t p = 0; p < rows_x && Cp != C; ++p) std::fill_n(Us.get() + p * Cp + C, Cp - C, 0);
    // bfloat16 GEMM of NCHW x: a block's x rows transposed channels-last (at most S_ rows).
    Scratch<scalar_t> Xb(kSlotFwdXb, w.wbp != nullptr && !x_cl ? S_ * W * g.M : 0, false);
    // bfloat16 GEMMs: channels-last x rows (P pixels from xa) into v [P][ncp] channels
    // [n0, n0 + ncur), BSConv-S through u rounded to bfloat16.
    auto bf16_project = [&](const scalar_t* xa, int64_t P, int64_t n0, int64_t ncur,
                            acc_t* v, int64_t ldv) {
      if constexpr (bf16_in) {
        if (!S) return gemm_bf16(P, n0, ncur, g.M, xa, g.M, w.wbp, v, ldv);
        gemm_bf16(P, 0, C, g.M, xa, g.M, w.wbp, Us.get(), Cp);
        convert_n(Us.get(), Ub.get(), P * Cp);
        gemm_bf16(P, n0, ncur, Cp, Ub.get(), Cp, w.wbp2, v, ldv);
      }
    };
    Scratch<acc_t> Vg(kSlotFwdVg, images ? P_group * ncp_max : 0, false);
    RowRing ring(S_, H);
    std::vector<int64_t> rcbs(plan.ob * g.Kh);
    std::vector<const acc_t*> rowp(plan.ob * g.Kh);
    std::vector<acc_t*> outs(plan.ob);
    std::vector<scalar_t*> outs_y(plan.ob);
    // One image, one chunk, one band. vpre: the image's v (CL rows of ncp channels) when the
    // group's GEMM computed it already.
    auto run_band = [&](int64_t b, int64_t chunk, int64_t band, const acc_t* vpre) {
      const int64_t n0 = chunk * plan.nc, ncur = std::min(plan.nc, N - n0);
      const int64_t ncp = round_up(ncur, kLanes);
      const int64_t o_begin = band * plan.band, o_end = std::min(Ho, o_begin + plan.band);
      const bool direct = y_cl && same_out && ncur == ncp && !stream_y;
      ring.reset();
      for (int64_t i0 = o_begin; i0 < o_end; i0 += plan.ob) {
        const int64_t i1 = std::min(o_end, i0 + plan.ob), nrow = i1 - i0;
        // Slot of image row r: B16 (dw_cl) or B8.
        auto slot = [&](int64_t r) {
          return V.get() + ring.row2slot[r] * Wp * (dw_cl ? ncp : kLanes);
        };
        // dw_cl: a slot's zero padding columns around its image pixels.
        auto pad_slot = [&](acc_t* row) {
          for (int64_t c = 0; c < ncp; c += 16) {
            acc_t* blk = row + (c / 16) * cbs16;
            std::memset(blk, 0, size_t(g.pl * 16) * sizeof(acc_t));
            std::memset(blk + (g.pl + W) * 16, 0,
                        size_t((cols.Wp - g.pl - W) * 16) * sizeof(acc_t));
          }
        };
        // CL v rows [ra, rb) (v: row ra) into their B16 slots, or their B8 slots through the
        // mid transform.
        auto to_slots = [&](const acc_t* v, int64_t ra, int64_t rb) {
          if (dw_cl) {
            for (int64_t r = ra; r < rb; ++r) {
              acc_t* row = slot(r);
              pad_slot(row);
              cl_to_b16(v + (r - ra) * W * ncp, ncp, W, ncp, row + g.pl * 16, cbs16);
            }
            return;
          }
          for (int64_t r = ra; r < rb; ++r) {
            acc_t* row = V.get() + ring.row2slot[r] * Wp * kLanes;
            cl_to_b8(v + (r - ra) * W * ncp, ncp, W, ncp, row + g.pl * kLanes, cbs,
                     g.has_mid(), w.scale + n0, w.shift + n0, g.act);
            cols.fill(g, row, cbs, ncp);
          }
        };
        ring.block(g, i0, i1, [&](int64_t ra, int64_t rb) {
          if (vpre != nullptr) return to_slots(vpre + ra * W * ncp, ra, rb);
          const int64_t P = (rb - ra) * W;
          if constexpr (bf16_in) {
            if (w.wbp != nullptr) {
              const scalar_t* xa = x + (b * H + ra) * W * g.M;
              if (!x_cl) {
                // NCHW x: the block's rows to channels-last scratch (cache-resident) rather
                // than a channels-last copy of all of x made before the kernel.
                xa = Xb.get();
                transpose(g.M, P, reinterpret_cast<const uint16_t*>(x + (b * g.M * H + ra) * W),
                          H * W, reinterpret_cast<uint16_t*>(Xb.get()), g.M);
              }
              bf16_project(xa, P, n0, ncur, Vt.get(), ncp);
              return to_slots(Vt.get(), ra, rb);
            }
          }
          Operand<acc_t> X = image_operand<acc_t>(src, H, W, b, 1, ra, rb, Xs.get());
          if (S && X.cm) {
            // BSConv-S reading NCHW x in place: the next block's x rows prefetched, one short
            // run per channel (the M runs of a block defeat the hardware prefetchers, where
            // channels-last x is one stream). Benchmark subset of the MobileNet S layers (36
            // cases, B = 1 and 8), forward, two alternating pairs: 1.28x / 1.28x -> 1.33x /
            // 1.33x (vs NCHW 2.04x / 2.07x -> 2.18x / 2.24x); in a loop of one warm layer 3%
            // slower. BSConv-U's in-place projection of NCHW x was slower with it (36 U
            // cases: 1.21x -> 1.17x).
            const int64_t n1 = std::min(H, rb + (rb - ra));
            const int64_t bytes = (n1 - rb) * W * int64_t(sizeof(scalar_t));
            const char* base = reinterpret_cast<const char*>(x + (b * g.M * H + rb) * W);
            for (int64_t m = 0; m < g.M; ++m) {
              const char* row = base + m * H * W * int64_t(sizeof(scalar_t));
              for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(row + o, 0, 2);
            }
          }
          if (S) X = project_u(g, X, P, w, Us.get());
          if (w.wpt != nullptr) {
            // Small projection: straight into the B8 rows.
            bool done = true;
            for (int64_t r = ra; r < rb && done; ++r) {
              acc_t* row = V.get() + ring.row2slot[r] * Wp * kLanes;
              const acc_t* xr = X.ptr + (r - ra) * W * (X.cm ? 1 : X.ld);
              done = proj_b8(xr, X.ld, X.cm, W, C, w.wpt + n0, w.Np, ncp, row + g.pl * kLanes,
                             cbs, g.has_mid(), w.scale + n0, w.shift + n0, g.act);
              if (done) cols.fill(g, row, cbs, ncp);
            }
            if (done) return;
          }
          if constexpr (std::is_same_v<acc_t, float>) {
            // BSConv-U, x rows read in place from NCHW x (or widened from bfloat16):
            // v^T = W x with the x rows packed by row copies, then the channel-major v rows
            // into the B8 slots by register transposes, instead of transposing the cold x
            // rows for a channels-last GEMM. Paired A/B on the Xeon host, one thread:
            // 1024->1024 7x7 B=1 forward 24% faster, 128->128 56x56 B=1 5%, 512->512 14x14
            // and 512->1024 14x14 s2 B=1 1-2%.
            if (!S && X.cm) {
              // Fewer than two panels of pixels (a 7x7 image): the BLAS, as the micro-kernel
              // wastes most of a second, partial panel (1024->1024 7x7 B=1, paired A/B on
              // the Zen 4 build machine: 20-24% faster, one and two threads).
              if (P < 2 * kPanel) {
                gemm_blas(false, false, ncur, P, C, 1.f, wp + n0 * C, C, X.ptr, X.ld, 0.f,
                          Vt.get(), P);
              } else {
                gemm(false, false, ncur, P, C, 1.f, wp + n0 * C, C, X.ptr, X.ld, 0.f, Vt.get(),
                     P);
              }
              for (int64_t r = ra; r < rb; ++r) {
                acc_t* row = slot(r);
                if (dw_cl) {
                  pad_slot(row);
                  for (int64_t c = 0; c < ncp; c += 16) {
                    transpose(int64_t(16), W, Vt.get() + c * P + (r - ra) * W, P,
                              row + (c / 16) * cbs16 + g.pl * 16, int64_t(16));
                  }
                  continue;
                }
                cm_to_b8(Vt.get() + (r - ra) * W, P, W, ncur, row + g.pl * kLanes, cbs,
                         g.has_mid(), w.scale + n0, w.shift + n0, g.act);
                cols.fill(g, row, cbs, ncp);
              }
              return;
            }
          }
          proj_gemm(X, P, n0, ncur, C, wp, w.wvp, Vt.get(), ncp);
          to_slots(Vt.get(), ra, rb);
        });
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t kh = 0; kh < g.Kh; ++kh) {
            const int64_t r = remap_index(i * g.sh - g.pt + kh * g.dh, H, g.mode);
            const int64_t at = (i - i0) * g.Kh + kh;
            rowp[at] = r < 0 ? zero_row.get() : slot(r);
            rcbs[at] = r < 0 ? 0 : dw_cl ? cbs16 : cbs;
          }
          if (dw_cl_direct) {
            outs_y[i - i0] = y_cl ? y + (b * HoWo + i * Wo) * N + n0
                                  : y + ((b * N + n0) * Ho + i) * Wo;
          } else if (dw_cl) {
            outs[i - i0] = obuf.get() + (i - i0) * Wo * ncp;
          } else if (direct) {
            outs[i - i0] = reinterpret_cast<acc_t*>(y + (b * HoWo + i * Wo) * N + n0);
          } else if (!y_cl && same_out) {
            outs[i - i0] = reinterpret_cast<acc_t*>(y + ((b * N + n0) * Ho + i) * Wo);
          } else {
            outs[i - i0] = obuf.get() + (i - i0) * Wo * ncp;
          }
        }
        bool stored = false;  // the block's outputs are in y
        if (dw_cl) {
          if constexpr (std::is_same_v<acc_t, float>) {
            if constexpr (cl_out_type) {
              if (dw_cl_direct) {
                depthwise_rows_cl(DwClArgs<scalar_t>{nrow, rowp.data(), rcbs.data(), g.Kh, g.Kw,
                                                     g.sw, Wo, ncp, w.taps + n0, w.Np, w.bias + n0,
                                                     outs_y.data(), N, !y_cl, HoWo});
                stored = true;
              }
            }
            if (!stored) {
              // Channels-last y through obuf: streamed or converted below.
              depthwise_rows_cl(DwClArgs<acc_t>{nrow, rowp.data(), rcbs.data(), g.Kh, g.Kw, g.sw,
                                                Wo, ncp, w.taps + n0, w.Np, w.bias + n0,
                                                outs.data(), ncp, false, 0});
            }
          }
        } else {
          // Output rows: CL (y itself, or a CL buffer), or NCHW rows (y itself, or a buffer).
          const int64_t ops = direct ? N : ncp;
          const int64_t ocs = same_out ? HoWo : Wo;
          const DwArgs<acc_t> a{nrow,   rowp.data(), rcbs.data(), g.Kh, g.Kw, g.sw, g.dw, Wo,
                                ncp,    w.taps + n0, w.Np,        w.bias + n0, outs.data(),
                                kLanes, ops,         !y_cl,       ocs,  ncur};
          depthwise_rows(a);
        }
        if (stored) continue;
        if constexpr (same_out) {
          if (stream_y) {
            if (ncur == N && ncp == N) {
              // All channels: the block's rows are one run of y.
              stream_copy(obuf.get(), y + (b * HoWo + i0 * Wo) * N, nrow * Wo * N);
            } else {
              for (int64_t p = 0; p < nrow * Wo; ++p) {
                stream_copy(obuf.get() + p * ncp, y + (b * HoWo + i0 * Wo + p) * N + n0, ncur);
              }
            }
            stream_fence();
            continue;
          }
        }
        if (same_out && (direct || !y_cl)) continue;
        if (y_cl && ncur == N && ncp == N) {
          // All channels: the block's rows are one run of y, converted in one call.
          convert_n(obuf.get(), y + (b * HoWo + i0 * Wo) * N, nrow * Wo * N);
          continue;
        }
        for (int64_t i = i0; i < i1; ++i) {
          const acc_t* o = outs[i - i0];
          if (y_cl) {
            for (int64_t j = 0; j < Wo; ++j) {
              convert_n(o + j * ncp, y + (b * HoWo + i * Wo + j) * N + n0, ncur);
            }
          } else {
            // All channels of the row in one call (a call per channel row of 14 pixels was
            // 14% of a bfloat16 512->512 14x14 forward).
            convert_rows(o, Wo, y + ((b * N + n0) * Ho + i) * Wo, HoWo, ncur, Wo);
          }
        }
      }
    };
    for (int64_t task; (task = next()) >= 0;) {
      if (!images) {
        const int64_t chunk = task % plan.chunks, rest = task / plan.chunks;
        run_band(rest / plan.bands, chunk, rest % plan.bands, nullptr);
        continue;
      }
      const int64_t b0 = task * plan.nb, nb = std::min(plan.nb, g.B - b0), P = nb * H * W;
      Operand<acc_t> X{nullptr, 0, false};
      if (w.wbp == nullptr) {
        X = image_operand<acc_t>(src, H, W, b0, nb, 0, H, Xs.get(), cl_gather);
        if (S) X = project_u(g, X, P, w, Us.get());
      }
      for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
        const int64_t n0 = chunk * plan.nc, ncur = std::min(plan.nc, N - n0);
        const int64_t ncp = round_up(ncur, kLanes);
        if constexpr (bf16_in) {
          if (w.wbp != nullptr) bf16_project(x + b0 * H * W * g.M, P, n0, ncur, Vg.get(), ncp);
        }
        if (w.wbp == nullptr) proj_gemm(X, P, n0, ncur, C, wp, w.wvp, Vg.get(), ncp);
        for (int64_t i = 0; i < nb; ++i) run_band(b0 + i, chunk, 0, Vg.get() + i * H * W * ncp);
      }
    }
  });
}


// ---------------------------------------------------------------------------------------------
// Backward.

enum GradIndex { kGx = 0, kGw1, kGw2, kGdw, kGbias, kGscale, kGshift };
using Mask = std::array<bool, 7>;

// One (output, tap) pair along an axis whose padded read position remaps to tile-local
// position `local`; `id` when the read position is inside the image (no remap).
struct TapEntry {
  int64_t local, k, o;
  bool id;
};

// The (local, tap, output) triples of one axis for the v-space tile [lo, lo + count).
inline void axis_entries(int64_t lo, int64_t count, int64_t size, int64_t pad_lo,
                         int64_t pad_hi, int64_t K, int64_t s, int64_t d, int64_t out_size,
                         int mode, std::vector<TapEntry>& out) {
  out.clear();
  const int64_t padded = size + pad_lo + pad_hi;
  const int64_t last_read = (out_size - 1) * s + (K - 1) * d;
  for (int64_t rp = 0; rp < padded && rp <= last_read; ++rp) {
    const int64_t i = rp - pad_lo;
    const int64_t src = remap_index(i, size, mode);
    if (src < lo || src >= lo + count) continue;
    for (int64_t k = 0; k < K && rp - k * d >= 0; ++k) {
      const int64_t q = rp - k * d;
      if (q % s == 0 && q / s < out_size) out.push_back({src - lo, k, q / s, i >= 0 && i < size});
    }
  }
}

// Layout of one group's weight-gradient partials (the bias gradient's too when the backward
// kernel sums it, `bias`).
struct PartialLayout {
  int64_t w1 = 0, w2 = 0, dw = 0, scale = 0, shift = 0, bias = 0, size = 0;
  PartialLayout(const Geometry& g, const Mask& mask, bool with_bias) {
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
    bias = take(with_bias, g.N);
  }
};

// The sum of p[0, count), in a fixed order (eight interleaved partial sums).
template <typename scalar_t, typename acc_t>
acc_t sum8(const scalar_t* p, int64_t count) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    for (int k = 0; k < 8; ++k) s[k] += acc_t(p[i + k]);
  }
  for (; i < count; ++i) s[0] += acc_t(p[i]);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// acc[n] += p[q * N + n] over the channels-last pixels q < count, in pixel order.
template <typename scalar_t, typename acc_t>
void add_cl_pixels(const scalar_t* p, int64_t count, int64_t N, acc_t* acc) {
  for (int64_t q = 0; q < count; ++q, p += N) {
    for (int64_t n = 0; n < N; ++n) acc[n] += acc_t(p[n]);
  }
}

// acc[n] += the sum of gy over output rows [o0, o1) of image b, per channel n (fixed order).
template <typename scalar_t, typename acc_t>
void add_gy_rows(const Geometry& g, const scalar_t* gy, bool cl, int64_t b, int64_t o0,
                 int64_t o1, acc_t* acc) {
  const int64_t N = g.N, HoWo = g.Ho * g.Wo, count = (o1 - o0) * g.Wo;
  if (count <= 0) return;
  if (cl) return add_cl_pixels(gy + (b * HoWo + o0 * g.Wo) * N, count, N, acc);
  for (int64_t n = 0; n < N; ++n) {
    acc[n] += sum8<scalar_t, acc_t>(gy + (b * N + n) * HoWo + o0 * g.Wo, count);
  }
}

// Destinations of the weight gradients (nullptr: not asked for), dense, in the dtype of x.
template <typename scalar_t>
struct GradOut {
  scalar_t* w1 = nullptr;
  scalar_t* w2 = nullptr;
  scalar_t* dw = nullptr;
  scalar_t* scale = nullptr;
  scalar_t* shift = nullptr;
  scalar_t* bias = nullptr;  // set: the backward kernel sums the bias gradient too
};

// gy rows padded with zeros for the transposed depthwise: gy column ow at GL + ow, GWp columns;
// per phase of v columns (c = phase + sw * t) its taps kw and the padded gy column offsets they
// read (including GL), as GvArgs / GvClArgs take them.
struct GyCols {
  std::vector<int64_t> ph_n, ph_kw, ph_off;
  int64_t GL = 0, GWp = 0;
  explicit GyCols(const Geometry& g)
      : ph_n(g.sw, 0), ph_kw(g.sw * g.Kw, 0), ph_off(g.sw * g.Kw, 0) {
    int64_t off_lo = 0, off_hi = 0, T_max = 0;
    for (int64_t phi = 0; phi < std::min(g.sw, g.W); ++phi) {
      T_max = std::max(T_max, ceil_div(g.W - phi, g.sw));
      for (int64_t kw = 0; kw < g.Kw; ++kw) {
        const int64_t d = phi + g.pl - kw * g.dw;
        if (((d % g.sw) + g.sw) % g.sw != 0) continue;
        ph_kw[phi * g.Kw + ph_n[phi]] = kw;
        ph_off[phi * g.Kw + ph_n[phi]++] = d / g.sw;
        off_lo = std::min(off_lo, d / g.sw);
        off_hi = std::max(off_hi, d / g.sw);
      }
    }
    GL = -off_lo;
    GWp = GL + std::max(g.Wo, T_max + off_hi);
    for (auto& o : ph_off) o += GL;
  }
};

// Whether backward_kernel may compute projection weight gradients as their transposes (see
// wgrad_t there): BSCONV_CPU_NO_WGRAD_T set to a non-zero value keeps gW = gv^T x (a switch for
// paired A/B runs and the tests; read once per process).
inline bool wgrad_t_enabled() {
  static const bool on = !env_switch_on("BSCONV_CPU_NO_WGRAD_T");
  return on;
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const Geometry& g, const scalar_t* gy, const scalar_t* x, bool x_cl,
                     bool cl, const Weights<acc_t>& w, const Mask& mask, scalar_t* gx,
                     const GradOut<scalar_t>& out) {
  // x: channels-last when x_cl; gy and gx: channels-last when cl, else NCHW.
  const PartialLayout lay(g, mask, out.bias != nullptr);
  const bool need_gv = mask[kGx] || mask[kGw1] || mask[kGw2] || mask[kGscale] || mask[kGshift];
  const bool need_gb = mask[kGdw];
  const bool S = g.subspace(), mid = g.has_mid();
  const int64_t M = g.M, N = g.N, Mm = g.Mmid, H = g.H, W = g.W, Ho = g.Ho, Wo = g.Wo;
  const int64_t HW = H * W, HoWo = Ho * Wo, KK = g.taps(), Np = w.Np;
  constexpr bool same = std::is_same_v<scalar_t, acc_t>;
  const Image<scalar_t> xi{x, M, !x_cl, M * HW, HW};

  // act(v), gy and gv in B16 rows for the AVX-512 sliding-window loops (GvClArgs in simd.h),
  // else B8 rows for the B8 loops. The same sums in the same order either way.
  constexpr bool is_float = std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>;
  const bool b16 = is_float && depthwise_cl_enabled() &&
                   dw_cl_shape(g.sh, g.sw, g.dh, g.dw, g.Kh, g.Kw) && g.mode == kZeros && !mid &&
                   N % 16 == 0 && Np == N;
  if (b16) dw_cl_backwards.fetch_add(1, std::memory_order_relaxed);
  const int64_t lb = b16 ? 16 : kLanes;  // lanes of a channel block

  const int64_t bpp = int64_t(sizeof(acc_t)) *
                      (Np * 3 + (S ? 2 * Mm : 0) + M + (mask[kGx] ? M : 0));
  const BackwardPlan plan = backward_plan(g, bpp, lay.size * int64_t(sizeof(acc_t)));
  // The regions of the partial layout and where their sums go.
  constexpr int kRegions = 6;
  const std::array<std::pair<int64_t, scalar_t*>, kRegions> regions = {
      std::pair<int64_t, scalar_t*>{lay.w1, out.w1}, {lay.w2, out.w2}, {lay.dw, out.dw},
      {lay.scale, out.scale}, {lay.shift, out.shift}, {lay.bias, out.bias}};
  const std::array<int64_t, kRegions + 1> bounds = {lay.w1,    lay.w2,    lay.dw,  lay.scale,
                                                    lay.shift, lay.bias, lay.size};
  if (plan.tasks == 0) {
    for (int r = 0; r < kRegions; ++r) {
      if (regions[r].second) std::fill_n(regions[r].second, bounds[r + 1] - bounds[r], scalar_t(0));
    }
    return;
  }
  const int64_t tasks = plan.tasks, groups = plan.groups;
  Scratch<acc_t> partials(kSlotBwdPartials, groups * lay.size, false);
  // With a single group the projection weight gradients go straight to their outputs (no
  // partial to sum: a weight-sized copy through memory saved).
  const bool direct_w = groups == 1 && same;
  acc_t* const out_w1 = direct_w ? reinterpret_cast<acc_t*>(out.w1) : nullptr;
  acc_t* const out_w2 = direct_w ? reinterpret_cast<acc_t*>(out.w2) : nullptr;
  const int64_t P_max = plan.nb * plan.nr * W;
  // Output rows one band of v rows is read by, at most.
  const int64_t orows_max = std::min(Ho, (plan.nr - 1 + (g.Kh - 1) * g.dh) / g.sh + 2);
  // Corrections for padded taps that remap into the image: the column entries once per call.
  const bool remapped = g.mode != kZeros;
  std::vector<TapEntry> cols_all, cols_nid;
  if (remapped) {
    axis_entries(0, W, W, g.pl, g.pr, g.Kw, g.sw, g.dw, Wo, g.mode, cols_all);
    for (const TapEntry& e : cols_all) {
      if (!e.id) cols_nid.push_back(e);
    }
  }
  // NCHW float x with packed weights: each task transposes its x rows once into channels-last
  // scratch, which the recompute reads (the packed-panel GEMM takes row-major pixels: a
  // channel-major x would be transposed there all the same, after a copy when a task holds
  // several images). Until 2026-12-08 only above kSmallProjK channels; with fewer, the paired
  // A/B of the backward op (two threads, the 2-core AMX host, ms) gave 32->64 112x112 B=8
  // 7.85 -> 7.65, 64->128 112x112 s2 B=1 2.62 -> 2.49, 64->64 8x8 B=8 0.093 -> 0.086, no
  // layer slower.
  const bool x_gather_cl = is_float && !x_cl && !S && w.wvp != nullptr;
  // The weight gradient as its transpose, gW^T[M][N] = x^T gv (`wgrad_t`), where gW = gv^T x
  // transposed gv (P x N) for the GEMM and copied x (P x M) into panels on every task:
  // - NCHW x gathered channels-last: x^T is x's NCHW rows, read in place (one GEMM per image),
  //   and gv's channels-last rows are read as they are;
  // - channels-last x with fewer input than output channels: x (the smaller side) is
  //   transposed and gv copied.
  // The group partials hold gW^T; their sum is transposed once into gW. BSCONV_CPU_NO_WGRAD_T=1
  // turns it off. Paired A/B of the backward op (two threads, the 2-core AMX host, ms):
  // NCHW 128->128 56x56 B=8 12.06 -> 10.98, B=1 1.52 -> 1.44, 256->256 28x28 B=8 10.28 ->
  // 9.90, 256->512 28x28 s2 B=8 20.60 -> 20.04; channels-last 16->32 32x32 B=8 0.247 ->
  // 0.190, 32->64 112x112 B=8 7.17 -> 6.92; 256->512 28x28 s2 B=1, 512->512 14x14 B=1 and
  // 1024->1024 7x7 B=1 within 1%.
  const bool wgrad_t = is_float && !S && mask[kGw1] && wgrad_t_enabled() &&
                       (x_gather_cl || (x_cl && w.wvp != nullptr && M < N));
  // BSConv-S: its second projection's weight gradient as gW2^T = u^T gv the same way, u
  // channel-major from NCHW x read in place, channels-last u transposed (Mmid < N). Paired
  // A/B as above: 512->86->512 14x14 B=8 NCHW 3.87 -> 3.65, channels-last 3.77 -> 3.63;
  // 128->22->128 56x56 channels-last B=8 6.60 -> 5.72, B=1 0.87 -> 0.76; none slower.
  const bool wgrad_t2 = is_float && S && mask[kGw2] && wgrad_t_enabled() && w.wvp != nullptr;
  if (wgrad_t || wgrad_t2) wgrad_t_backwards.fetch_add(1, std::memory_order_relaxed);
  // x and gx in place (else gathered / scattered through scratch).
  const bool x_inplace = same && (x_cl || plan.nb == 1) && !x_gather_cl;
  // gx straight from the GEMM into its rows (else through the gxs scratch): channels-last,
  // or channel-major unless the input-gradient GEMM reads packed weights or more than
  // kSmallProjK input channels (`gx_via_cl`): then a GEMM into channels-last scratch and one
  // transpose do better than a GEMM with transposed operands, which packs W with strided
  // reads on every call (1024->1024 7x7 B=1 NCHW backward, no packed weights, two threads:
  // ~4.9 -> 3.2-3.4 ms, against 3.1-3.2 ms channels-last).
  const bool gx_panels = w.w1n != nullptr;
  const bool gx_via_cl = !cl && (gx_panels || M > kSmallProjK);
  const bool gx_inplace = same && (cl || (plan.nb == 1 && !gx_via_cl));
  // act(v) rows padded like the forward's v rows (zeros: remapped taps are corrections).
  const PaddedCols acols(g);
  const int64_t Wa = acols.Wp_alloc, rows_max = plan.nb * plan.nr;
  const GyCols gcols(g);
  const std::vector<int64_t>&ph_n = gcols.ph_n, &ph_kw = gcols.ph_kw, &ph_off = gcols.ph_off;
  const int64_t GL = gcols.GL, GWp = gcols.GWp;
  const int64_t gcbs = orows_max * GWp * lb;  // channel-block stride of the gy rows
  // The bias gradient: band k sums the gy rows [orow(k), orow(k + 1)), a partition of [0, Ho)
  // (orow(k): the first output row that reads band k's first v row; rows no v row is read by
  // belong to a neighbour). Those rows were just read into the B8 / B16 gy rows: cache-warm.
  auto orow = [&](int64_t band) -> int64_t {
    if (band <= 0) return 0;
    if (band >= plan.bands) return Ho;
    const int64_t r = band * plan.nr + g.pt - (g.Kh - 1) * g.dh;
    return std::clamp<int64_t>(-floor_div(-r, g.sh), 0, Ho);
  };
  // About three forwards of work (the recompute and the two adjoints of each projection, the
  // transposed depthwise and the blueprint correlation).
  const int64_t threads = useful_threads(3 * forward_flops(g));
  run_workers(groups, threads, [&](auto next) {
    // V: pre-activation v (CL); AG: act(v) (padded B8 or B16 rows); gvb: gv (B8; unused with
    // b16); GC: gv (CL).
    Scratch<acc_t> V(kSlotBwdV, P_max * Np, false), AG(kSlotBwdA, need_gb ? rows_max * Wa * Np : 0);
    Scratch<acc_t> gvb(kSlotBwdGvb, need_gv && !b16 ? P_max * Np : 0, false);
    Scratch<acc_t> GC(kSlotBwdGc, need_gv ? P_max * Np : 0, false);
    Scratch<acc_t> gU(kSlotBwdGu, S ? P_max * Mm : 0, false);
    // gy rows (B8 or B16), a ring: output row oh in slot oh % orows_max. A band shares its
    // first gy rows with the previous band of the image; when this worker ran that band, they
    // are still in place (image gy_b, rows [gy_lo, gy_hi]) and only the rest is read.
    Scratch<acc_t> Gy(kSlotBwdGy, orows_max * GWp * Np);  // zero: padding, lanes beyond N
    int64_t gy_b = -1, gy_lo = 0, gy_hi = -1;
    Scratch<acc_t> Xs(kSlotBwdX, !x_inplace ? P_max * M : 0, false);
    Scratch<acc_t> Us(kSlotBwdU, S ? P_max * Mm : 0, false);
    Scratch<acc_t> gxs(kSlotBwdGx, mask[kGx] && !gx_inplace ? P_max * M : 0, false);
    Scratch<acc_t> gbt(kSlotBwdGb, need_gb ? KK * Np : 0, false);
    Scratch<double> dsc(kSlotBwdDsc, Np, false), dsh(kSlotBwdDsh, Np, false);
    std::vector<const acc_t*> grows(g.Kh);
    // B16: per v row of an image its gy rows and tap rows; the (gy row, act row) pairs.
    const int64_t pairs_max = b16 ? orows_max * g.Kh : 0;
    std::vector<const float*> g16(b16 ? plan.nr * g.Kh : 0), gb_g(pairs_max), gb_a(pairs_max);
    std::vector<int64_t> n16(b16 ? plan.nr : 0), k16(b16 ? plan.nr * g.Kh : 0), gb_k(pairs_max);
    std::vector<const float*> bias_rows(b16 ? orows_max : 0);
    std::vector<int64_t> khs(g.Kh);
    std::vector<TapEntry> rows_e;
    std::vector<acc_t> gtmp(N);
    for (int64_t grp; (grp = next()) >= 0;) {
      acc_t* part = partials.get() + grp * lay.size;
      std::fill(part + lay.dw, part + lay.size, acc_t(0));  // dw, scale, shift, bias
      const int64_t tb = grp * tasks / groups, te = (grp + 1) * tasks / groups;
      for (int64_t task = tb; task < te; ++task) {
        const acc_t beta = task == tb ? acc_t(0) : acc_t(1);  // first GEMM of a group sets
        const int64_t ig = task / plan.bands, band = task % plan.bands;
        const int64_t b0 = ig * plan.nb, nbt = std::min(plan.nb, g.B - b0);
        const int64_t r0 = band * plan.nr, r1 = std::min(H, r0 + plan.nr), rows = r1 - r0;
        const int64_t P = nbt * rows * W, pcbs = P * kLanes;  // B8 stride of task buffers

        // 1. Recompute the patch: v (pre-activation) and act(v).
        const Operand<acc_t> X =
            image_operand<acc_t>(xi, H, W, b0, nbt, r0, r1, Xs.get(), x_gather_cl);
        // BSConv-S: u = W1 x for the task's pixels.
        Operand<acc_t> Ut{nullptr, 0, true};
        if (S) Ut = project_u(g, X, P, w, Us.get());
        const Operand<acc_t>& Xv = S ? Ut : X;  // the input of the projection into v
        const int64_t Kv = S ? Mm : M;
        const acc_t* act = AG.get();
        const int64_t acbs = nbt * rows * Wa * lb;  // channel-block stride of act rows
        // Without a mid transform, v itself is needed only as act(v) = v (B8 rows): small
        // channel-major projections go straight there.
        bool direct_act = false;
        if (!b16 && !mid && need_gb && w.wpt != nullptr && Xv.cm) {
          direct_act = true;
          for (int64_t k = 0; k < nbt * rows && direct_act; ++k) {
            direct_act = proj_b8(Xv.ptr + k * W, Xv.ld, true, W, Kv, w.wpt, Np, Np,
                                 AG.get() + (k * Wa + g.pl) * kLanes, acbs, false, w.scale,
                                 w.shift, g.act);
          }
        }
        if (!direct_act && (need_gb || mid)) {
          const acc_t* wv = S ? w.w2 : w.w1;
          if (tasks == 1 && N >= 2 * kPanel) {
            // One task: the two halves of the channels on two threads (the same two GEMMs
            // on one thread, so the split does not depend on the thread count).
            const int64_t N1 = round_up(N / 2, kPanel);
            run_pair(threads > 1, [&] { proj_gemm(Xv, P, 0, N1, Kv, wv, w.wvp, V.get(), Np); },
                     [&] { proj_gemm(Xv, P, N1, N - N1, Kv, wv, w.wvp, V.get() + N1, Np); });
          } else {
            proj_gemm(Xv, P, 0, N, Kv, wv, w.wvp, V.get(), Np);
          }
          if (need_gb && b16) {
            for (int64_t k = 0; k < nbt * rows; ++k) {
              cl_to_b16(V.get() + k * W * Np, Np, W, Np, AG.get() + (k * Wa + g.pl) * 16, acbs);
            }
          } else if (need_gb) {
            for (int64_t k = 0; k < nbt * rows; ++k) {
              cl_to_b8(V.get() + k * W * Np, Np, W, Np, AG.get() + (k * Wa + g.pl) * kLanes,
                       acbs, mid, w.scale, w.shift, g.act);
            }
          }
        }

        // 2-3. Transposed depthwise into gv and the blueprint gradient, per image.
        if (need_gb) std::memset(gbt.get(), 0, size_t(KK * Np) * sizeof(acc_t));
        for (int64_t img = 0; img < nbt; ++img) {
          const int64_t b = b0 + img, off = img * rows * W;
          const int64_t oh_lo =
              std::max<int64_t>(0, -floor_div(-(r0 + g.pt - (g.Kh - 1) * g.dh), g.sh));
          const int64_t oh_hi = std::min(Ho - 1, floor_div(r1 - 1 + g.pt, g.sh));
          // Padded column 0 of a gy row.
          auto grow = [&](int64_t oh) { return Gy.get() + (oh % orows_max) * GWp * lb; };
          // f(oh, kh) for the gy rows that read v row lr of the band, tap rows ascending.
          auto for_gy_rows = [&](int64_t lr, auto f) {
            for (int64_t kh = 0; kh < g.Kh; ++kh) {
              const int64_t t = r0 + lr + g.pt - kh * g.dh;
              if (t >= 0 && t % g.sh == 0 && t / g.sh < Ho) f(t / g.sh, kh);
            }
          };
          // f(oh, kh, r) for the (gy row oh, v row r) pairs joined by tap row kh, r in the band,
          // in output-row order.
          auto for_pairs = [&](auto f) {
            for (int64_t oh = oh_lo; oh <= oh_hi; ++oh) {
              for (int64_t kh = 0; kh < g.Kh; ++kh) {
                const int64_t r = oh * g.sh - g.pt + kh * g.dh;
                if (r >= r0 && r < r1) f(oh, kh, r);
              }
            }
          };
          const bool kept = gy_b == b && oh_lo >= gy_lo && oh_lo <= gy_hi + 1;
          for (int64_t oh = kept ? std::max(oh_lo, gy_hi + 1) : oh_lo; oh <= oh_hi; ++oh) {
            acc_t* d = grow(oh) + GL * lb;
            const acc_t* none = nullptr;
            if constexpr (is_float) {
              if (b16) {
                if (cl) {
                  cl_to_b16(gy + (b * HoWo + oh * Wo) * N, N, Wo, N, d, gcbs);
                } else {
                  cm_to_b16(gy + b * N * HoWo + oh * Wo, HoWo, Wo, N, d, gcbs);
                }
                continue;
              }
            }
            if (cl) {
              cl_to_b8(gy + (b * HoWo + oh * Wo) * N, N, Wo, N, d, gcbs, false, none, none, 0);
            } else {
              cm_to_b8(gy + b * N * HoWo + oh * Wo, HoWo, Wo, N, d, gcbs, false, none, none, 0);
            }
          }
          if (oh_lo <= oh_hi) {
            gy_b = b;
            gy_lo = oh_lo;
            gy_hi = oh_hi;
          }
          if (out.bias != nullptr) {
            const int64_t o0 = orow(band), o1 = orow(band + 1);
            bool summed = false;
            if constexpr (is_float) {
              // B16: from the gy rows just loaded (the same sums, see bias_b16_rows), when
              // they hold all of the band's rows (large bottom or top padding may leave output
              // rows no v row of the band is read by).
              if (b16 && o0 < o1 && o0 >= oh_lo && o1 - 1 <= oh_hi) {
                for (int64_t oh = o0; oh < o1; ++oh) bias_rows[oh - o0] = grow(oh) + GL * 16;
                bias_b16_rows(bias_rows.data(), o1 - o0, Wo, gcbs, N, !cl, part + lay.bias);
                summed = true;
              }
            }
            if (!summed) add_gy_rows(g, gy, cl, b, o0, o1, part + lay.bias);
          }
          bool b16_done = false;
          if constexpr (is_float) {
            if (b16) {
              if (need_gv) {
                for (int64_t lr = 0; lr < rows; ++lr) {
                  int64_t nk = 0;
                  for_gy_rows(lr, [&](int64_t oh, int64_t kh) {
                    g16[lr * g.Kh + nk] = grow(oh);
                    k16[lr * g.Kh + nk++] = kh;
                  });
                  n16[lr] = nk;
                }
                gv_rows_cl(GvClArgs{rows, g16.data(), n16.data(), k16.data(), g.Kh, g.Kw, g.sw,
                                    W, gcbs, ph_n.data(), ph_kw.data(), ph_off.data(), Np,
                                    w.taps, Np, GC.get() + off * Np, Np});
              }
              if (need_gb) {
                int64_t np = 0;
                for_pairs([&](int64_t oh, int64_t kh, int64_t r) {
                  gb_g[np] = grow(oh) + GL * 16;
                  gb_a[np] = act + (img * rows + r - r0) * Wa * 16;
                  gb_k[np++] = kh;
                });
                gb_rows_cl(GbClArgs{np, gb_g.data(), gb_a.data(), gb_k.data(), gcbs, acbs, g.Kw,
                                    g.sw, Wo, Np, gbt.get(), Np});
              }
              b16_done = true;
            }
          }
          if (need_gv && !b16_done) {
            for (int64_t lr = 0; lr < rows; ++lr) {
              int64_t nk = 0;
              for_gy_rows(lr, [&](int64_t oh, int64_t kh) {
                grows[nk] = grow(oh);
                khs[nk++] = kh;
              });
              const GvArgs<acc_t> a{grows.data(), khs.data(),  nk,     gcbs,
                                    g.Kw,         g.sw,        W,      ph_n.data(),
                                    ph_kw.data(), ph_off.data(), Np,   w.taps,
                                    Np,           gvb.get() + (off + lr * W) * kLanes, pcbs};
              transposed_depthwise_row(a);
            }
          }
          if (need_gb && !b16_done) {
            for_pairs([&](int64_t oh, int64_t kh, int64_t r) {
              const GbArgs<acc_t> a{grow(oh) + GL * kLanes,
                                    gcbs,
                                    act + (img * rows + r - r0) * Wa * kLanes,
                                    acbs,
                                    g.Kw,
                                    g.sw,
                                    g.dw,
                                    Wo,
                                    Np,
                                    gbt.get() + kh * g.Kw * Np,
                                    Np};
              blueprint_grad_row(a);
            });
          }
          if (remapped) {
            // Pairs with at least one remapped axis (the in-image ones were done above).
            axis_entries(r0, rows, H, g.pt, g.pb, g.Kh, g.sh, g.dh, Ho, g.mode, rows_e);
            auto pair = [&](const TapEntry& er, const TapEntry& ec) {
              for (int64_t n = 0; n < N; ++n) {
                gtmp[n] = cl ? acc_t(gy[((b * Ho + er.o) * Wo + ec.o) * N + n])
                             : acc_t(gy[((b * N + n) * Ho + er.o) * Wo + ec.o]);
              }
              const int64_t k = er.k * g.Kw + ec.k, q = off + er.local * W + ec.local;
              const acc_t* tap = w.taps + k * Np;
              if (need_gv) {
                acc_t* gq = gvb.get();
                for (int64_t n = 0; n < N; ++n) gq[b8(q, n, pcbs)] += tap[n] * gtmp[n];
              }
              if (need_gb) {
                acc_t* gk = gbt.get() + k * Np;
                const int64_t pa = (img * rows + er.local) * Wa + g.pl + ec.local;
                for (int64_t n = 0; n < N; ++n) gk[n] += gtmp[n] * act[b8(pa, n, acbs)];
              }
            };
            for (const TapEntry& er : rows_e) {
              if (!er.id) {
                for (const TapEntry& ec : cols_all) pair(er, ec);
              } else {
                for (const TapEntry& ec : cols_nid) pair(er, ec);
              }
            }
          }
        }
        if (need_gb) {
          for (int64_t n = 0; n < N; ++n) {
            for (int64_t k = 0; k < KK; ++k) part[lay.dw + n * KK + k] += gbt.get()[k * Np + n];
          }
        }
        if (!need_gv) continue;

        // 4. Back to the layout of x for the GEMMs, through the mid transform:
        // gv <- act'(z) * scale * gv with z = scale * v + shift, and the scale / shift grads.
        acc_t* gvc = GC.get();
        if (mid) {
          std::memset(dsc.get(), 0, size_t(Np) * sizeof(double));
          std::memset(dsh.get(), 0, size_t(Np) * sizeof(double));
        }
        if (!b16) {  // (B16: gv_rows_cl wrote gv channels-last)
          gv_to_cl(gvb.get(), pcbs, V.get(), gvc, Np, P, Np, mid, w.scale, w.shift, g.act,
                   dsc.get(), dsh.get());
        }
        if (mid) {
          for (int64_t n = 0; n < N; ++n) {
            if (mask[kGscale]) part[lay.scale + n] += acc_t(dsc.get()[n]);
            if (mask[kGshift]) part[lay.shift + n] += acc_t(dsh.get()[n]);
          }
        }

        // 5. Projection adjoints: weight-gradient partials and gx for this task's pixels.
        // The weight gradient and the input gradient of a projection are independent GEMMs:
        // run_pair puts them on two threads when this is the only task (one small image).
        Operand<acc_t> G{gvc, Np, false};  // gradient at the output of the projection of x
        int64_t K = N;
        if (S) {
          const bool gu = mask[kGw1] || mask[kGx];
          run_pair(
              threads > 1,
              [&] {
                if (!mask[kGw2]) return;
                if constexpr (is_float) {
                  if (wgrad_t2) {
                    gemm(!Ut.cm, false, Mm, N, P, 1.f, Ut.ptr, Ut.ld, G.ptr, G.ld, beta,
                         part + lay.w2, N);
                    return;
                  }
                }
                wgrad_gemm(P, N, Mm, G, Ut, beta, direct_w ? out_w2 : part + lay.w2);
              },
              [&] {
                if (!gu) return;
                if (w.w2n != nullptr) {
                  igrad_gemm(G, P, N, Mm, w.w2, w.w2n, gU.get(), Mm);  // gu, channels-last
                } else {
                  igrad_gemm(G, P, N, Mm, w.w2, gU.get(), P, true);  // gu, channel-major
                }
              });
          if (!gu) continue;
          G = w.w2n != nullptr ? Operand<acc_t>{gU.get(), Mm, false}
                               : Operand<acc_t>{gU.get(), P, true};
          K = Mm;
        }
        auto gw1 = [&] {
          if (!mask[kGw1]) return;
          if constexpr (is_float) {
            if (wgrad_t) {
              // One GEMM per image (its rows of x are HW apart), accumulated into gW^T.
              if (x_cl) {
                gemm(true, false, M, N, P, 1.f, X.ptr, X.ld, G.ptr, G.ld, beta, part + lay.w1, N);
                return;
              }
              const int64_t run = rows * W;
              for (int64_t i = 0; i < nbt; ++i) {
                gemm(false, false, M, N, run, 1.f, x + (b0 + i) * M * HW + r0 * W, HW,
                     G.ptr + i * run * G.ld, G.ld, i > 0 ? 1.f : beta, part + lay.w1, N);
              }
              return;
            }
          }
          wgrad_gemm(P, K, M, G, X, beta, direct_w ? out_w1 : part + lay.w1);
        };
        auto gxf = [&] {
          if (!mask[kGx]) return;
          if (gx_inplace) {
            acc_t* dst = reinterpret_cast<acc_t*>(cl ? gx + (b0 * HW + r0 * W) * M
                                                     : gx + b0 * M * HW + r0 * W);
            if (cl) {
              igrad_gemm(G, P, K, M, w.w1, w.w1n, dst, M);
            } else {
              igrad_gemm(G, P, K, M, w.w1, dst, HW, true);
            }
          } else if (cl) {
            igrad_gemm(G, P, K, M, w.w1, w.w1n, gxs.get(), M);
            convert_n(gxs.get(), gx + (b0 * HW + r0 * W) * M, P * M);
          } else if (gx_via_cl && !G.cm) {
            // Channels-last scratch, then each image's rows transposed into gx.
            igrad_gemm(G, P, K, M, w.w1, w.w1n, gxs.get(), M);
            const int64_t run = rows * W;
            for (int64_t i = 0; i < nbt; ++i) {
              scalar_t* d = gx + (b0 + i) * M * HW + r0 * W;
              const acc_t* src = gxs.get() + i * run * M;
              if constexpr (same) {
                transpose(run, M, src, M, reinterpret_cast<acc_t*>(d), HW);
              } else {
                for (int64_t m = 0; m < M; ++m) {
                  for (int64_t k = 0; k < run; ++k) d[m * HW + k] = scalar_t(src[k * M + m]);
                }
              }
            }
          } else {
            igrad_gemm(G, P, K, M, w.w1, gxs.get(), P, true);
            const int64_t run = rows * W;
            for (int64_t m = 0; m < M; ++m) {
              for (int64_t i = 0; i < nbt; ++i) {
                const acc_t* s = gxs.get() + m * P + i * run;
                convert_n(s, gx + ((b0 + i) * M + m) * HW + r0 * W, run);
              }
            }
          }
        };
        run_pair(threads > 1, gw1, gxf);
      }
    }
  });

  // Fixed-order sum of the group partials, into the gradients: blocks that stay in L1, summed
  // group by group (the loops vectorize; each element is still summed in group order).
  // parallel_for hands each thread one range of ~lay.size / threads elements; summed whole,
  // 1024->1024 7x7 B=8 (two 4 MB partials) streamed ~7 weight-sized passes through memory.
  at::parallel_for(0, lay.size, 16384, [&](int64_t begin, int64_t end) {
    constexpr int64_t kBlock = 1024;
    acc_t sum[kBlock];
    for (int r = 0; r < kRegions; ++r) {
      scalar_t* dst = regions[r].second;
      const int64_t lo = std::max(begin, bounds[r]), hi = std::min(end, bounds[r + 1]);
      // gW^T (wgrad_t, wgrad_t2): summed into group 0's partial, transposed into gW below.
      // (A single group, direct_w: gW^T is in group 0's partial already.)
      const bool in_p0 = (wgrad_t && r == 0) || (wgrad_t2 && r == 1);
      if (dst == nullptr || lo >= hi || (direct_w && r < 2)) continue;
      for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
        const int64_t n = std::min(kBlock, hi - b0);
        acc_t* p0 = partials.get() + b0;
        std::copy(p0, p0 + n, sum);
        for (int64_t grp = 1; grp < groups; ++grp) {
          const acc_t* pg = p0 + grp * lay.size;
          for (int64_t i = 0; i < n; ++i) sum[i] += pg[i];
        }
        if (in_p0) {
          std::copy(sum, sum + n, p0);
        } else {
          for (int64_t i = 0; i < n; ++i) dst[b0 - bounds[r] + i] = scalar_t(sum[i]);
        }
      }
    }
  });
  if constexpr (is_float) {
    // gW[N][K] = (gW^T)^T, by blocks of 64 rows of gW^T on the threads.
    auto untranspose = [&](const acc_t* gt, int64_t K, scalar_t* dst) {
      at::parallel_for(0, ceil_div(K, 64), ceil_div(int64_t(16384), 64 * N),
                       [&](int64_t begin, int64_t end) {
                         const int64_t k0 = begin * 64, k1 = std::min(K, end * 64);
                         transpose(k1 - k0, N, gt + k0 * N, N, dst + k0, K);
                       });
    };
    if (wgrad_t) untranspose(partials.get() + lay.w1, M, out.w1);
    if (wgrad_t2) untranspose(partials.get() + lay.w2, Mm, out.w2);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward by channel chunks, for BSConv-U layers whose projection weights outweigh the pixels
// of a backward_kernel task (large M x N on small images: 1024->1024 7x7, 512->1024 14x14). Each
// of backward_kernel's pixel tasks reads W twice (the recompute and the input gradient) and adds
// a weight-sized partial of the weight gradient, summed at the end: 1024->1024 7x7 B=8 moves
// ~16 MB of weights per task of two images. Here a group of whole images goes through two
// passes, the groups one after another:
// 1. per chunk of output channels (a task): the recompute of v, the gy rows, the transposed
//    depthwise into gv (channels-last, shared by the tasks), the blueprint and bias gradients
//    (the depthwise is per channel) and the chunk's rows of the weight gradient, on packed x
//    panels shared by the tasks (gW rows set by the first group, accumulated by the next);
// 2. per chunk of input channels: gx = gv W over the group's pixels.
// No partials, every weight element read or written once per group and pass. float32 only,
// with the B16 loops' shapes (cs_plan). Every sum runs in an order fixed by the geometry.
struct CsPlan {
  int64_t nb = 0;  // images per group; 0: not taken
  int64_t nc = 0;  // output channels per task of pass 1 (a multiple of kPanel, or N)
  int64_t mc = 0;  // input channels per task of pass 2 (a multiple of kPanel, or M)
};

// A group's shared buffers (gv, x channels-last, packed x) are kept within this (layers with
// larger images stay on backward_kernel, whose scratch is bounded by bands). Paired A/B
// runs (two threads, the 2-core AMX host, NCHW x) found 4, 8 and 16 MiB within noise of each
// other; 1-2 MiB (groups of one or two images) were up to 20% slower on 1024->1024 7x7 B=8.
constexpr int64_t kCsGroupBudget = 8 << 20;
// Channels per task of either pass: 64, 128 and 256 within noise at 7x7 and 14x14.
constexpr int64_t kCsChunk = 128;

// Which layers take backward_channel_split. BSCONV_CPU_BWD_CS="0": none; else set: every layer
// its loops run (the tests' switch); unset: BSConv-U with M x N >= 512 x 512 (1 MiB of float
// weights) and at least two images. Paired A/B of the backward op (two threads, the 2-core AMX
// host, NCHW x, ms, backward_kernel -> this): 1024->1024 7x7 B=8 11.8 -> 9.6 (channels-last
// 12.9 -> 11.0; one thread 23.7 -> 21.0), 512->1024 14x14 s2 B=8 30.3 -> 19.3, 512->512 7x7
// B=8 3.5 -> 2.5, 1024->1024 7x7 B=32 47.0 -> 41-42; 512->512 14x14 B=8 and 1024->1024 7x7
// B=2 and B=4 within noise; B=1 (one image, whose tasks backward_kernel already splits
// by channels) 2-4% slower; 256->512 28x28 s2 B=8 (M x N = 512 x 256) within noise.
inline bool cs_wanted(const Geometry& g) {
  static const int forced = [] {
    const char* env = std::getenv("BSCONV_CPU_BWD_CS");
    if (env == nullptr || env[0] == '\0') return -1;
    return env[0] == '0' ? 0 : 1;
  }();
  if (forced >= 0) return forced == 1;
  return g.M * g.N >= 512 * 512 && g.B >= 2;
}

CsPlan cs_plan(const Geometry& g, const Weights<float>& w, const Mask& mask) {
  CsPlan p;
  if (!cs_wanted(g) || g.subspace() || g.has_mid() || g.mode != kZeros ||
      !depthwise_cl_enabled() || !dw_cl_shape(g.sh, g.sw, g.dh, g.dw, g.Kh, g.Kw) ||
      g.N % 16 != 0 || w.Np != g.N || w.wvp == nullptr || (mask[kGx] && w.w1n == nullptr)) {
    return p;
  }
  const int64_t HW = g.H * g.W;
  const int64_t bpp = int64_t(sizeof(float)) * (g.N + 2 * g.M);
  // Images too large for a group: backward_kernel (bounded scratch; bands of rows).
  if (HW * bpp > kCsGroupBudget) return p;
  p.nb = std::min<int64_t>(kCsGroupBudget / (HW * bpp), g.B);
  p.nb = ceil_div(g.B, ceil_div(g.B, p.nb));  // balanced groups
  p.nc = g.N <= kCsChunk ? g.N : kCsChunk;
  p.mc = g.M <= kCsChunk ? g.M : kCsChunk;
  return p;
}

void backward_channel_split(const Geometry& g, const CsPlan& plan, const float* gy,
                            const float* x, bool cl, const Weights<float>& w, const Mask& mask,
                            float* gx, const GradOut<float>& out) {
  // x, gy and gx: channels-last when cl, else NCHW.
  const bool need_gv = mask[kGx] || mask[kGw1];
  const bool need_gb = mask[kGdw];
  const int64_t M = g.M, N = g.N, H = g.H, W = g.W, Ho = g.Ho, Wo = g.Wo, HW = H * W;
  const int64_t HoWo = Ho * Wo, KK = g.taps(), Np = w.Np;
  dw_cl_backwards.fetch_add(1, std::memory_order_relaxed);
  cs_backwards.fetch_add(1, std::memory_order_relaxed);
  const GyCols gcols(g);
  const int64_t GL = gcols.GL, GWp = gcols.GWp;
  const PaddedCols acols(g);
  const int64_t Wa = acols.Wp_alloc, nb = plan.nb, Pmax = nb * HW;
  const int64_t chunks = ceil_div(N, plan.nc), mchunks = ceil_div(M, plan.mc);
  const int64_t panels = ceil_div(M, kPanel);
  const int64_t threads = useful_threads(3 * forward_flops(g));
  if (out.dw != nullptr) std::fill_n(out.dw, N * KK, 0.f);
  if (out.bias != nullptr) std::fill_n(out.bias, N, 0.f);
  // Shared by the tasks (the calling thread's scratch): gv [P][N]; x channels-last (NCHW x
  // read by the recompute or the weight gradient); x in the panels of the weight gradient's B
  // operand.
  const bool x_rows = need_gb || mask[kGw1];
  Scratch<float> GV(kSlotCsGv, need_gv ? Pmax * N : 0, false);
  Scratch<float> XC(kSlotCsX, !cl && x_rows ? Pmax * M : 0, false);
  Scratch<float> XP(kSlotCsXp, mask[kGw1] ? Pmax * M : 0, false);
  for (int64_t b0 = 0; b0 < g.B; b0 += nb) {
    const int64_t nbt = std::min(nb, g.B - b0), P = nbt * HW;
    const float* X = cl ? x + b0 * HW * M : XC.get();
    // 0. x channels-last (NCHW x: transposed per image), then packed into panels of kPanel
    // channels ([P][w] each, as pack_panels lays out B = X).
    if (!cl && x_rows) {
      run_workers(nbt, threads, [&](auto next) {
        for (int64_t i; (i = next()) >= 0;) {
          transpose(M, HW, x + (b0 + i) * M * HW, HW, XC.get() + i * HW * M, M);
        }
      });
    }
    if (mask[kGw1]) {
      run_workers(panels, threads, [&](auto next) {
        for (int64_t j; (j = next()) >= 0;) {
          const int64_t c0 = j * kPanel;  // panel j of pack_panels(false, P, M, X, M, XP)
          pack_panels(false, P, std::min(kPanel, M - c0), X + c0, M, XP.get() + c0 * P);
        }
      });
    }
    // 1. Per chunk of output channels.
    run_workers(chunks, threads, [&](auto next) {
      Scratch<float> V(kSlotBwdV, need_gb ? Pmax * plan.nc : 0, false);
      Scratch<float> AG(kSlotBwdA, need_gb ? nb * H * Wa * plan.nc : 0);  // zero: padding
      Scratch<float> Gy(kSlotBwdGy, Ho * GWp * plan.nc);                  // zero: padding
      Scratch<float> gbt(kSlotBwdGb, need_gb ? KK * plan.nc : 0, false);
      Scratch<float> T(kSlotBwdX, mask[kGw1] ? plan.nc * Pmax : 0, false);
      std::vector<const float*> g16(H * g.Kh), gb_g(Ho * g.Kh), gb_a(Ho * g.Kh), rows(Ho);
      std::vector<int64_t> n16(H), k16(H * g.Kh), gb_k(Ho * g.Kh);
      for (int64_t c; (c = next()) >= 0;) {
        const int64_t n0 = c * plan.nc, nc = std::min(plan.nc, N - n0);
        const int64_t acbs = nbt * H * Wa * 16, gcbs = Ho * GWp * 16;
        if (need_gb) {
          const Operand<float> Xo{X, M, false};
          proj_gemm(Xo, P, n0, nc, M, w.w1, w.wvp, V.get(), nc);
          for (int64_t k = 0; k < nbt * H; ++k) {
            cl_to_b16(V.get() + k * W * nc, nc, W, nc, AG.get() + (k * Wa + g.pl) * 16, acbs);
          }
          std::memset(gbt.get(), 0, size_t(KK * nc) * sizeof(float));
        }
        for (int64_t img = 0; img < nbt; ++img) {
          const int64_t b = b0 + img;
          auto grow = [&](int64_t oh) { return Gy.get() + oh * GWp * 16; };
          for (int64_t oh = 0; oh < Ho; ++oh) {
            float* d = grow(oh) + GL * 16;
            if (cl) {
              cl_to_b16(gy + (b * HoWo + oh * Wo) * N + n0, N, Wo, nc, d, gcbs);
            } else {
              cm_to_b16(gy + (b * N + n0) * HoWo + oh * Wo, HoWo, Wo, nc, d, gcbs);
            }
            rows[oh] = d;
          }
          if (out.bias != nullptr) {
            bias_b16_rows(rows.data(), Ho, Wo, gcbs, nc, !cl, out.bias + n0);
          }
          if (need_gv) {
            for (int64_t r = 0; r < H; ++r) {
              int64_t nk = 0;
              for (int64_t kh = 0; kh < g.Kh; ++kh) {
                const int64_t t = r + g.pt - kh * g.dh;
                if (t < 0 || t % g.sh != 0 || t / g.sh >= Ho) continue;
                g16[r * g.Kh + nk] = grow(t / g.sh);
                k16[r * g.Kh + nk++] = kh;
              }
              n16[r] = nk;
            }
            gv_rows_cl(GvClArgs{H, g16.data(), n16.data(), k16.data(), g.Kh, g.Kw, g.sw, W,
                                gcbs, gcols.ph_n.data(), gcols.ph_kw.data(),
                                gcols.ph_off.data(), nc, w.taps + n0, Np,
                                GV.get() + img * HW * N + n0, N});
          }
          if (need_gb) {
            int64_t np = 0;
            for (int64_t oh = 0; oh < Ho; ++oh) {
              for (int64_t kh = 0; kh < g.Kh; ++kh) {
                const int64_t r = oh * g.sh - g.pt + kh * g.dh;
                if (r < 0 || r >= H) continue;
                gb_g[np] = rows[oh];
                gb_a[np] = AG.get() + (img * H + r) * Wa * 16;
                gb_k[np++] = kh;
              }
            }
            gb_rows_cl(GbClArgs{np, gb_g.data(), gb_a.data(), gb_k.data(), gcbs, acbs, g.Kw,
                                g.sw, Wo, nc, gbt.get(), nc});
          }
        }
        if (need_gb) {
          for (int64_t n = 0; n < nc; ++n) {
            for (int64_t k = 0; k < KK; ++k) out.dw[(n0 + n) * KK + k] += gbt.get()[k * nc + n];
          }
        }
        if (mask[kGw1]) {
          // gW rows [n0, n0 + nc) (+)= gv[:, chunk]^T X.
          transpose(P, nc, GV.get() + n0, N, T.get(), P);
          gemm_packed(nc, M, P, T.get(), P, XP.get(), out.w1 + n0 * M, M, b0 > 0);
        }
      }
    });
    if (!mask[kGx]) continue;
    // 2. gx = gv W per chunk of input channels, on W packed as the input-gradient GEMMs read it.
    run_workers(mchunks, threads, [&](auto next) {
      Scratch<float> Z(kSlotBwdGx, cl ? 0 : Pmax * plan.mc, false);
      for (int64_t j; (j = next()) >= 0;) {
        const int64_t m0 = j * plan.mc, mc = std::min(plan.mc, M - m0);
        if (cl) {
          gemm_packed(P, mc, N, GV.get(), N, w.w1n + m0 * N, gx + b0 * HW * M + m0, M, false);
          continue;
        }
        gemm_packed(P, mc, N, GV.get(), N, w.w1n + m0 * N, Z.get(), mc, false);
        for (int64_t i = 0; i < nbt; ++i) {
          transpose(HW, mc, Z.get() + i * HW * mc, mc, gx + ((b0 + i) * M + m0) * HW, HW);
        }
      }
    });
  }
}

// backward_channel_split where cs_plan takes the layer (float32 only); false: not taken.
template <typename scalar_t, typename acc_t>
bool channel_split(const Geometry& g, const scalar_t* gy, const scalar_t* x, bool cl,
                   const Weights<acc_t>& w, const Mask& mask, scalar_t* gx,
                   const GradOut<scalar_t>& out) {
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    const CsPlan plan = cs_plan(g, w, mask);
    if (plan.nb == 0) return false;
    backward_channel_split(g, plan, gy, x, cl, w, mask, gx, out);
    return true;
  } else {
    return false;
  }
}

// Depthwise bias gradient: the sum of gy over batch and space, per channel, in a fixed order
// (independent of the thread count).
template <typename scalar_t, typename acc_t>
void bias_grad_kernel(const Geometry& g, const scalar_t* gy, bool cl, scalar_t* out) {
  const int64_t N = g.N, HoWo = g.Ho * g.Wo;
  constexpr int64_t kGrain = 32768;  // elements of gy per parallel piece, at least
  if (!cl) {
    at::parallel_for(0, N, ceil_div(kGrain, g.B * HoWo), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        acc_t s = 0;
        for (int64_t b = 0; b < g.B; ++b) s += sum8<scalar_t, acc_t>(gy + (b * N + n) * HoWo, HoWo);
        out[n] = scalar_t(s);
      }
    });
    return;
  }
  const int64_t pixels = g.B * HoWo;
  const int64_t parts = std::clamp<int64_t>(pixels / 256, 1, 16);
  std::vector<acc_t> partial(parts * N, acc_t(0));
  at::parallel_for(0, parts, ceil_div(kGrain * parts, pixels * N), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t p0 = q * pixels / parts, p1 = (q + 1) * pixels / parts;
      add_cl_pixels(gy + p0 * N, p1 - p0, N, partial.data() + q * N);
    }
  });
  for (int64_t n = 0; n < N; ++n) {
    acc_t s = partial[n];
    for (int64_t q = 1; q < parts; ++q) s += partial[q * N + n];
    out[n] = scalar_t(s);
  }
}

// ---------------------------------------------------------------------------------------------
// Host entry points.

// Copies up to this size go to the calling thread's scratch (`slot`), not to a fresh tensor:
// a fresh multi-MB buffer has its pages faulted in and zeroed by the kernel on every call,
// which costs about as much as the copy itself. Larger ones are allocated per call, so that
// the scratch a thread keeps stays bounded.
constexpr int64_t kScratchCopyMaxBytes = 32 << 20;

// t with the standard strides of `fmt` (a copy only when t has other strides). A copy in
// scratch (slot >= 0) is valid until the next call on this thread: for operands the op reads
// only while it runs.
at::Tensor standard_layout(const at::Tensor& t, at::MemoryFormat fmt, int slot) {
  const int64_t B = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  const std::array<int64_t, 4> want =
      fmt == at::MemoryFormat::ChannelsLast ? std::array<int64_t, 4>{H * W * C, 1, W * C, C}
                                            : std::array<int64_t, 4>{C * H * W, H * W, W, 1};
  bool ok = true, nchw = true;
  for (int i = 0; i < 4; ++i) ok = ok && t.stride(i) == want[i];
  if (ok) return t;
  const std::array<int64_t, 4> nchw_strides = {C * H * W, H * W, W, 1};
  for (int i = 0; i < 4; ++i) nchw = nchw && (t.size(i) == 1 || t.stride(i) == nchw_strides[i]);
  const int64_t bytes = t.numel() * int64_t(t.element_size());
  at::Tensor c;
  if (slot >= 0 && bytes <= kScratchCopyMaxBytes) {
    void* mem = thread_scratch().get(slot, size_t(std::max<int64_t>(bytes, 64)));
    c = at::from_blob(mem, t.sizes(), want, t.options());
  } else {
    c = at::empty(t.sizes(), t.options().memory_format(fmt));
  }
  const bool half_width = t.element_size() == 2;  // bfloat16 and half, moved as 16-bit words
  if (nchw && fmt == at::MemoryFormat::ChannelsLast &&
      (t.scalar_type() == at::kFloat || half_width)) {
    // NCHW to channels-last (the copy of x the GEMMs read): blocks of 64 pixels of one image
    // transposed in 8 x 8 tiles, about 1.3-2x faster than the generic strided copy_ for float
    // (16-bit types: transpose_u16).
    const int64_t bp = 64, HW = H * W, blocks = ceil_div(HW, bp);  // pixels per block
    auto run = [&](const auto* src, auto* dst) {
      at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t q = begin; q < end; ++q) {
          const int64_t b = q / blocks, p0 = (q % blocks) * bp;
          const int64_t np = std::min<int64_t>(bp, HW - p0);
          transpose(C, np, src + b * C * HW + p0, HW, dst + (b * HW + p0) * C, C);
        }
      });
    };
    if (half_width) {
      run(static_cast<const uint16_t*>(t.const_data_ptr()), static_cast<uint16_t*>(c.data_ptr()));
    } else {
      run(t.const_data_ptr<float>(), c.data_ptr<float>());
    }
    return c;
  }
  c.copy_(t);
  return c;
}

// Whether a bfloat16 forward projects with the bfloat16 GEMM (even input channel counts of
// its projections, a CPU the micro-kernel supports): it reads channels-last x in place (an
// NCHW x is copied channels-last first, see nchw_x_read_channels_last). 512->512 14x14 B=8 on
// the AMX host, two threads: the GEMM alone 4-5x faster than the float GEMM on widened x.
// BSConv-S rounds u to bfloat16 for its second GEMM, as the unfused bfloat16 path rounds its
// first convolution's output.
inline bool bf16_forward_gemm(const Geometry& g) {
  return g.M % 2 == 0 && (!g.subspace() || g.Mmid % 2 == 0) && bf16_gemm_enabled();
}

// The weights in the kernels' layouts and in the accumulation type, packed by plain loops into
// one buffer: the dozen small ATen ops this takes otherwise cost more than a small layer's whole
// kernel. The projection weights are used in place when they are dense and of the accumulation
// type already.
template <typename scalar_t, typename acc_t>
class PackedWeights {
 public:
  // `backward`: also the operands of the input-gradient GEMMs.
  PackedWeights(const Geometry& g, const at::Tensor& pw1, const std::optional<at::Tensor>& pw2,
                const at::Tensor& dwt, const std::optional<at::Tensor>& b,
                const std::optional<at::Tensor>& s, const std::optional<at::Tensor>& t,
                bool backward, bool bf16_panels = true)
      : p1_(pw1.contiguous()), p2_(pw2 ? pw2->contiguous() : at::Tensor()) {
    constexpr bool convert = !std::is_same_v<scalar_t, acc_t>;
    const int64_t N = g.N, Np = round_up(N, kLanes), KK = g.taps();
    const int64_t K = pw2 ? g.Mmid : g.M;  // inputs of the projection into v
    int64_t total = 0;
    auto take = [&](bool need, int64_t n) {
      const int64_t at = need ? total : -1;
      total += need ? round_up(n, 16) : 0;  // 64-byte aligned pieces
      return at;
    };
    // The bfloat16 GEMM reads w1 itself (no float copy).
    const bool bf16_w1 = std::is_same_v<scalar_t, c10::BFloat16> && !backward &&
                         bf16_forward_gemm(g);
    const int64_t o_w1 = take(convert && !bf16_w1, g.proj1_rows() * g.M);
    const int64_t o_w2 = take(convert && pw2.has_value() && !bf16_w1, N * g.Mmid);
    const int64_t o_taps = take(true, KK * Np), o_bias = take(true, Np);
    const int64_t o_scale = take(true, Np), o_shift = take(true, Np);
    const bool panels = use_panels(g, std::is_same_v<acc_t, float>) && !bf16_w1;
    // The register-tile projection runs only without panels: with them, a channel-major x
    // block transposed for the GEMM is faster (64->128 112x112 forward: ~20% less time; the
    // tiles' strided broadcasts of x cost more than the transpose).
    const int64_t o_wpt = take(K <= kSmallProjK && !panels && !bf16_w1, K * Np);
    const int64_t o_wvp = take(panels, K * N);
    const int64_t o_w1p = take(panels && pw2.has_value(), g.M * g.Mmid);
    const int64_t o_w1n = take(panels && backward, g.proj1_rows() * g.M);
    const int64_t o_w2n = take(panels && backward && pw2.has_value(), N * g.Mmid);
    // A grow-only buffer of the calling thread (one PackedWeights lives at a time per thread):
    // packed weights of a large layer are megabytes, which a fresh allocation would fault in
    // page by page on every call.
    acc_t* B = Scratch<acc_t>(kSlotWeights, total, false).get();

    auto dense = [&](const at::Tensor& src, int64_t off) -> const acc_t* {
      const scalar_t* p = src.const_data_ptr<scalar_t>();
      if constexpr (convert) {
        convert_n(p, B + off, src.numel());
        return B + off;
      } else {
        return p;
      }
    };
    w_.w1 = bf16_w1 ? nullptr : dense(p1_, o_w1);
    w_.w2 = pw2 && !bf16_w1 ? dense(p2_, o_w2) : nullptr;
    // Per-channel vectors padded to Np (zero beyond N; scale 1 without a scale).
    auto vec = [&](const std::optional<at::Tensor>& v, int64_t off, acc_t absent) {
      acc_t* d = B + off;
      std::fill(d, d + Np, acc_t(0));
      if (v) {
        const at::Tensor c = v->contiguous();
        const scalar_t* p = c.const_data_ptr<scalar_t>();
        for (int64_t n = 0; n < N; ++n) d[n] = acc_t(p[n]);
      } else {
        std::fill(d, d + N, absent);
      }
      return d;
    };
    w_.bias = vec(b, o_bias, acc_t(0));
    w_.scale = vec(s, o_scale, acc_t(1));
    w_.shift = vec(t, o_shift, acc_t(0));
    // taps[k][n] = dw[n][k]; wpt[k][n] = Wv[n][k] (small projections).
    auto transposed_padded = [&](const scalar_t* src, int64_t rows_k, int64_t off) {
      acc_t* d = B + off;
      if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
        // The vector transpose: the element loop below writes a cache line per element
        // (stride Np), 10% of the perf samples of a 64->64 8x8 B=1 forward (32.1 -> 30.6 us).
        transpose(N, rows_k, src, rows_k, d, Np);
        for (int64_t k = 0; k < rows_k; ++k) std::fill(d + k * Np + N, d + (k + 1) * Np, 0.f);
        return d;
      }
      std::fill(d, d + rows_k * Np, acc_t(0));
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t k = 0; k < rows_k; ++k) d[k * Np + n] = acc_t(src[n * rows_k + k]);
      }
      return d;
    };
    const at::Tensor dc = dwt.contiguous();
    w_.taps = transposed_padded(dc.const_data_ptr<scalar_t>(), KK, o_taps);
    w_.Np = Np;
    w_.wpt = o_wpt >= 0
                 ? transposed_padded((pw2 ? p2_ : p1_).const_data_ptr<scalar_t>(), K, o_wpt)
                 : nullptr;
    // GEMM panels of W [rows][cols] (op(B) = W, k = rows) or of W^T (k = cols), panel groups
    // packed in parallel.
    auto panels_of = [&](const acc_t* src, int64_t rows, int64_t cols, bool trans,
                         int64_t off) -> acc_t* {
      if (off < 0) return nullptr;
      acc_t* d = B + off;
      if constexpr (std::is_same_v<acc_t, float>) {
        const int64_t k = trans ? cols : rows, n = trans ? rows : cols;
        at::parallel_for(0, ceil_div(n, kPanel), 16384 / std::max<int64_t>(k, 1) + 1,
                         [&](int64_t p0, int64_t p1) {
                           const int64_t j0 = p0 * kPanel, j1 = std::min(n, p1 * kPanel);
                           pack_panels(trans, k, j1 - j0, src + j0 * (trans ? cols : 1), cols,
                                       d + j0 * k);
                         });
      }
      return d;
    };
    w_.wvp = panels_of(pw2 ? w_.w2 : w_.w1, N, K, true, o_wvp);
    w_.w1p = panels_of(w_.w1, g.Mmid, g.M, true, o_w1p);
    w_.w1n = panels_of(w_.w1, g.proj1_rows(), g.M, false, o_w1n);
    w_.w2n = panels_of(w_.w2, N, g.Mmid, false, o_w2n);
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      // BSConv-S's W2 [N][Mmid] for the bfloat16 GEMMs, zero columns to bf16_depth(Mmid).
      if (bf16_w1 && pw2 && bf16_depth(g.Mmid) != g.Mmid) {
        w2_pad_.resize(size_t(N * bf16_depth(g.Mmid)));
        pad_bf16_depth(p2_.const_data_ptr<c10::BFloat16>(), N, g.Mmid, w2_pad_.data());
      }
      if (bf16_w1 && bf16_panels) {
        // W1^T (M x rows) and BSConv-S's W2^T (Mmid x N, zero rows to a depth of
        // bf16_depth(Mmid)) into VNNI panels, in parallel.
        const int64_t R = g.proj1_rows(), p1 = ceil_div(R, kPanel), s1 = bf16_panel_size(g.M);
        const int64_t Cp = bf16_depth(g.Mmid);
        const int64_t p2 = pw2 ? ceil_div(N, kPanel) : 0, s2 = bf16_panel_size(Cp);
        c10::BFloat16* d =
            Scratch<c10::BFloat16>(kSlotWeightsBf16, p1 * s1 + p2 * s2, false).get();
        const c10::BFloat16* src1 = p1_.const_data_ptr<c10::BFloat16>();
        const c10::BFloat16* src2 = pw2_depth_padded();
        at::parallel_for(0, p1 + p2, 16384 / s1 + 1, [&](int64_t j0, int64_t j1) {
          for (int64_t j = j0; j < j1; ++j) {
            if (j < p1) {
              pack_bf16_wt_panel(src1, R, g.M, j, d);
            } else {
              pack_bf16_wt_panel(src2, N, Cp, j - p1, d + p1 * s1);
            }
          }
        });
        w_.wbp = d;
        w_.wbp2 = pw2 ? d + p1 * s1 : nullptr;
      }
    }
  }
  const Weights<acc_t>& get() const { return w_; }
  // The projection weights (dense; BSConv-S's W2 [N][bf16_depth(Mmid)] in bfloat16, zero
  // columns past Mmid): forward_bf16_cm's A operands.
  const scalar_t* pw1() const { return p1_.const_data_ptr<scalar_t>(); }
  const scalar_t* pw2_depth_padded() const {
    if (!p2_.defined()) return nullptr;
    return w2_pad_.empty() ? p2_.const_data_ptr<scalar_t>() : w2_pad_.data();
  }

 private:
  at::Tensor p1_, p2_;
  std::vector<scalar_t> w2_pad_;
  Weights<acc_t> w_{};
};

// BSConv-U with an NCHW float x whose projection runs as a GEMM on packed weights: whether the
// forward reads a channels-last copy of x, made once per call (y stays NCHW), rather than
// transpose x inside the kernel. The in-kernel transposes pay for fewer passes over memory:
// - forward: per task of whole images, once for all chunks, where forward_image_tasks_cm
//   takes them (grouped small images; two or more chunks with an image per thread: 256->512
//   28x28 B=8 and 512->512 14x14 B=8, four chunks, 3-12% faster than the copy, ~ the
//   channels-last x's time); else x rows read in place by each chunk's GEMM where at most two
//   chunks read them (256->256 28x28 B=8, two chunks, ~8% faster than the copy on the 2-core
//   build machine, before image tasks took it); else the copy (per-block transposes repeated
//   by four chunks were ~6% slower).
// The backward never copies: a task transposes its x rows once for both of its GEMMs (more
// than kSmallProjK channels; as fast as the copy was, within 1-2%, without its x-sized
// temporary), or its GEMMs read the channel-major rows (fewer channels: 3-10% faster than the
// copy).
// bfloat16 NCHW x on the bfloat16 GEMM (BSConv-U and -S) where forward_bf16_cm does not take
// it (stride 2, other paddings, a mid transform): each block transposes its own x
// rows into channels-last scratch where at most this many chunks repeat that, in tasks of
// single images; else the copy. Paired A/B on the Xeon (AMX) host, one thread, 32->64 112x112
// B=8 (one chunk): 6.0 -> 5.6 ms; 512->512 14x14 B=8 (more chunks) with block transposes:
// 1.22 -> 1.61 ms on two threads, so it keeps the copy.
constexpr int64_t kBf16BlockTransposeChunks = 2;

bool nchw_x_read_channels_last(const Geometry& g, const at::Tensor& x) {
  const int64_t threads = useful_threads(forward_flops(g));
  const ForwardPlan plan = forward_plan(g, sizeof(float), threads, true);
  if (x.scalar_type() == at::kBFloat16) {
    return bf16_forward_gemm(g) && (plan.nb > 1 || plan.chunks > kBf16BlockTransposeChunks);
  }
  if (x.scalar_type() != at::kFloat || g.subspace() || !use_panels(g, true)) return false;
  return (plan.chunks > 2 || plan.nb > 1) && !forward_image_tasks_cm(g, plan, threads);
}

// ---------------------------------------------------------------------------------------------
// bfloat16 forward of NCHW x into NCHW y on channel-major rows (simd.h): per task (an image, a
// band of output rows, a chunk of channels) the band's x rows with their halo go into VNNI
// panels (vnni_pack), the bfloat16 micro-kernel computes v^T = W x (BSConv-S: u^T = W1 x,
// rounded to bfloat16 into panels, then v^T = W2 u) with the weights as given as its A operand,
// and the depthwise runs channel plane by channel plane into the NCHW y rows. The channels-last
// path transposes x channels-last first (a copy of x, or per-block transposes) and writes NCHW y
// by 16 x 16 register transposes. The results are the same bit for bit (the micro-kernel gives
// each v value the same float sum with A and B swapped, and the depthwise sums in the B16 loops'
// order; the tests compare the two paths, BSCONV_CPU_NO_BF16_CM=1 switching this one off).

// True unless BSCONV_CPU_NO_BF16_CM is set to a non-zero value (which keeps the channels-last
// path for NCHW bfloat16 x), on a CPU that runs the AVX-512 loops.
inline bool bf16_cm_enabled() {
  static const bool on = [] {
    if (env_switch_on("BSCONV_CPU_NO_BF16_CM")) return false;
    return avx512_enabled();
  }();
  return on;
}

// Whether a bfloat16 forward of NCHW x (and so NCHW y) runs forward_bf16_cm: the bfloat16 GEMM
// projects (bf16_forward_gemm), stride 1 (or 2 along both axes with a square kernel),
// dilation 1, zero padding, Kw 3, 5 or 7, no mid transform.
bool bf16_cm_forward(const Geometry& g) {
  const bool stride = (g.sh == 1 && g.sw == 1) || (g.sh == 2 && g.sw == 2 && g.Kh == g.Kw);
  return bf16_cm_enabled() && bf16_forward_gemm(g) && stride && g.dh == 1 && g.dw == 1 &&
         g.mode == kZeros && !g.has_mid() && g.Kh <= kMaxK &&
         (g.Kw == 3 || g.Kw == 5 || g.Kw == 7);
}

// Image rows (padding included) that a band of `rows` output rows reads.
inline int64_t cm_rows_in(const Geometry& g, int64_t rows) { return (rows - 1) * g.sh + g.Kh; }

// A task's scratch (packed x rows, BSConv-S's u rows in float and packed, v rows) is kept within
// this, half the 2 MiB L2 of a core of the AMX host, so that the depthwise reads v from L2.
// bfloat16 NCHW, two threads, loops of one layer, 512 KiB / 1 MiB / 2 MiB (two runs each):
// 32->64 112x112 B=8 1.98-2.00 / 1.77-1.88 / 2.42-2.69 ms, B=1 0.29 / 0.28-0.29 / 0.35-0.37 ms,
// 128->22->128 56x56 B=8 1.40-1.48 / 1.41-1.45 / 1.34-1.38 ms.
constexpr int64_t kCmTaskBytes = 1 << 20;

struct CmPlan {
  int64_t nc, chunks, band, bands;
};

CmPlan cm_plan(const Geometry& g, int64_t threads) {
  auto row_bytes = [&](int64_t nc) {
    return std::max<int64_t>(1, g.W * (2 * g.M + (g.subspace() ? 6 * g.Mmid : 0) + 4 * nc));
  };
  auto set_bands = [&](CmPlan& p, int64_t bands) {
    p.bands = std::clamp<int64_t>(bands, 1, g.Ho);
    p.band = ceil_div(g.Ho, p.bands);
    p.bands = ceil_div(g.Ho, p.band);
  };
  CmPlan p{g.N, 1, g.Ho, 1};
  // Fewer channels per task where even 8 output rows and their halo would not fit.
  while (p.nc > 16 &&
         row_bytes(p.nc) * cm_rows_in(g, std::min<int64_t>(8, g.Ho)) > kCmTaskBytes) {
    p.nc = round_up(ceil_div(p.nc, 2), 16);
  }
  const int64_t fit = (kCmTaskBytes / row_bytes(p.nc) - g.Kh) / g.sh + 1;  // output rows
  set_bands(p, ceil_div(g.Ho, std::max<int64_t>(1, fit)));
  // Work for every thread: chunks of channels first (they recompute no halo rows), then bands;
  // a small number of tasks made a multiple of the threads.
  auto tasks = [&] { return g.B * p.bands * ceil_div(g.N, p.nc); };
  while (tasks() < threads && p.nc > 16) p.nc = round_up(ceil_div(p.nc, 2), 16);
  if (tasks() < 4 * threads && tasks() % threads != 0) {
    const int64_t per_band = g.B * ceil_div(g.N, p.nc);
    set_bands(p, ceil_div(round_up(tasks(), threads), per_band));
  }
  p.chunks = ceil_div(g.N, p.nc);
  return p;
}

// w2: BSConv-S's W2 [N][bf16_depth(Mmid)] (PackedWeights::pw2_depth_padded).
void forward_bf16_cm(const Geometry& g, const c10::BFloat16* x, const c10::BFloat16* w1,
                     const c10::BFloat16* w2, const Weights<float>& w, c10::BFloat16* y) {
  const bool S = g.subspace();
  const int64_t threads = useful_threads(forward_flops(g));
  const CmPlan plan = cm_plan(g, threads);
  const int64_t H = g.H, W = g.W, Ho = g.Ho, Wo = g.Wo, M = g.M, N = g.N, C = g.Mmid;
  const int64_t sh = g.sh;
  const int64_t rows_max = std::min(H, cm_rows_in(g, plan.band));
  const int64_t P_max = round_up(rows_max * W, 16);
  // The depthwise's zero-padded plane: the rows a band's outputs read, padding included, plus
  // those of a last block of 8 rows (read, not used), of whole 16-column vectors (stride times)
  // plus the kernel's width (dw_plane_bf16).
  const int64_t ldz = round_up(g.sw * round_up(Wo, 16) + g.Kw - 1, 16);
  const int64_t zrows_max = cm_rows_in(g, round_up(plan.band, 8));
  // BSConv-S: u padded with zero rows to bf16_depth(C) (w2 has the zero columns to match).
  const int64_t Cp = S ? bf16_depth(C) : 0;
  bf16_cm_forwards.fetch_add(1, std::memory_order_relaxed);
  run_workers(g.B * plan.bands * plan.chunks, threads, [&](auto next) {
    const Bf16GemmScope bf16_scope(true);
    Scratch<c10::BFloat16> Xp(kSlotFwdXb, P_max * M, false);
    Scratch<float> Ut(kSlotFwdU, S ? Cp * P_max : 0, false);
    Scratch<c10::BFloat16> Up(kSlotFwdUb, S ? P_max * Cp : 0, false);
    Scratch<float> Vt(kSlotFwdVt, plan.nc * P_max, false);
    float taps[kMaxK * 7];
    Scratch<float> Z(kSlotFwdZero, zrows_max * ldz, false);
    for (int64_t task; (task = next()) >= 0;) {
      const int64_t chunk = task % plan.chunks, rest = task / plan.chunks;
      const int64_t b = rest / plan.bands, o0 = (rest % plan.bands) * plan.band;
      const int64_t o1 = std::min(Ho, o0 + plan.band);
      const int64_t n0 = chunk * plan.nc, ncur = std::min(plan.nc, N - n0);
      // Image rows the band's outputs read (the rest is padding).
      const int64_t z0 = o0 * sh - g.pt;  // the image row of the plane's first row
      const int64_t r0 = std::clamp<int64_t>(z0, 0, H);
      const int64_t r1 = std::clamp<int64_t>(z0 + cm_rows_in(g, o1 - o0), r0, H);
      const int64_t R = r1 - r0, P = R * W;
      if (P > 0) {
        // One VNNI panel as wide as the block (ldb = Pp): the micro-kernel loops over its
        // columns itself, where a call per kPanel columns costs more than its work.
        const int64_t Pp = round_up(P, 16);
        vnni_pack(reinterpret_cast<const uint16_t*>(x + (b * M * H + r0) * W), H * W, M, P, Pp,
                  reinterpret_cast<uint16_t*>(Xp.get()));
        if (S) {
          gemm_bf16_wide(C, P, M, w1, M, Xp.get(), Pp, Ut.get(), P);
          std::fill(Ut.get() + C * P, Ut.get() + Cp * P, 0.f);
          vnni_pack(Ut.get(), P, Cp, P, Pp, reinterpret_cast<uint16_t*>(Up.get()));
          gemm_bf16_wide(ncur, P, Cp, w2 + n0 * Cp, Cp, Up.get(), Pp, Vt.get(), P);
        } else {
          gemm_bf16_wide(ncur, P, M, w1 + n0 * M, M, Xp.get(), Pp, Vt.get(), P);
        }
      }
      // Each channel's rows into the padded plane, whose zeros (padding rows and columns) stay
      // from one channel to the next.
      const int64_t zrows = cm_rows_in(g, round_up(o1 - o0, 8));
      std::memset(Z.get(), 0, size_t(zrows * ldz) * sizeof(float));
      float* z_img = Z.get() + (r0 - z0) * ldz + g.pl;  // image row r0, column 0
      for (int64_t n = 0; n < ncur; ++n) {
        for (int64_t k = 0; k < g.taps(); ++k) taps[k] = w.taps[k * w.Np + n0 + n];
        copy_rows(Vt.get() + n * P, W, R, W, z_img, ldz);
        dw_plane_bf16(DwPlaneArgs{Z.get(), ldz, g.Kh, sh, taps, w.bias[n0 + n], o1 - o0, Wo,
                                  y + ((b * N + n0 + n) * Ho + o0) * Wo},
                      g.Kw);
      }
    }
  });
}

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
  at::Tensor y = at::empty({g.B, g.N, g.Ho, g.Wo}, x.options().memory_format(fmt));
  if (y.numel() == 0) return y;
  if (g.H == 0 || g.W == 0) {
    // Every tap reads zero padding: y is the bias.
    if (bias) {
      y.copy_(bias->view({1, g.N, 1, 1}).expand_as(y));
    } else {
      y.zero_();
    }
    return y;
  }
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  // Stride 2 where the channels-last path would copy x (nchw_x_read_channels_last): 256->512
  // 28x28 s2 B=8, two threads, 1.68 -> 1.32 ms; where it transposes per block instead,
  // the channels-last path stays (64->128 112x112 s2 B=1: 0.41-0.45 ms against 0.50-0.51; the
  // planes of a stride-2 layer hold four v values per output, which the copies into the padded
  // planes and the loads then pass over).
  if (!cl && x.scalar_type() == at::kBFloat16 && bf16_cm_forward(g) &&
      (g.sh == 1 || nchw_x_read_channels_last(g, x))) {
    const at::Tensor xc = standard_layout(x, fmt, kSlotInput);
    const PackedWeights<c10::BFloat16, float> wt(g, pw1, pw2, dw, bias, scale, shift, false,
                                                 false);
    forward_bf16_cm(g, xc.const_data_ptr<c10::BFloat16>(), wt.pw1(), wt.pw2_depth_padded(),
                    wt.get(), y.data_ptr<c10::BFloat16>());
    return y;
  }
  const bool x_cl = cl || nchw_x_read_channels_last(g, x);
  const at::Tensor xc =
      standard_layout(x, x_cl ? at::MemoryFormat::ChannelsLast : fmt, kSlotInput);
  const bool stream_y = cl && x.scalar_type() == at::kFloat &&
                        stream_output(y.data_ptr(), int64_t(y.nbytes()));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bsconv_forward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const PackedWeights<scalar_t, acc_t> wt(g, pw1, pw2, dw, bias, scale, shift, false);
        forward_kernel<scalar_t, acc_t>(g, xc.const_data_ptr<scalar_t>(), x_cl, cl, wt.get(),
                                        y.data_ptr<scalar_t>(), stream_y);
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
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  // Fresh outputs (they must not alias), written by the kernels.
  auto out_like = [&](int i, const at::Tensor& t) {
    return mask[i] ? at::empty(t.sizes(), x.options()) : x.new_empty({0});
  };
  at::Tensor gx = mask[kGx] ? at::empty(x.sizes(), x.options().memory_format(fmt))
                            : x.new_empty({0});
  at::Tensor gw1 = out_like(kGw1, pw1);
  at::Tensor gw2 = pw2 ? out_like(kGw2, *pw2) : x.new_empty({0});
  at::Tensor gdw = out_like(kGdw, dw);
  at::Tensor gbias = bias ? out_like(kGbias, *bias) : x.new_empty({0});
  at::Tensor gscale = scale ? out_like(kGscale, *scale) : x.new_empty({0});
  at::Tensor gshift = shift ? out_like(kGshift, *shift) : x.new_empty({0});
  const bool work = g.B > 0 && g.H > 0 && g.W > 0 && g.Ho > 0 && g.Wo > 0;
  if (mask[kGx] && !work) gx.zero_();
  if (mask[kGbias] && g.B == 0) gbias.zero_();

  {
    const bool x_cl = cl;  // NCHW x: transposed per task where that pays (backward_kernel)
    const at::Tensor xc =
        work ? standard_layout(x, x_cl ? at::MemoryFormat::ChannelsLast : fmt, kSlotInput) : x;
    const at::Tensor gyc = g.B > 0 ? standard_layout(grad_y, fmt, kSlotGradOut) : grad_y;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(), "bsconv_backward", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const PackedWeights<scalar_t, acc_t> wt(g, pw1, pw2, dw, bias, scale, shift, true);
          auto ptr = [&](int i, at::Tensor& t) {
            return mask[i] ? t.data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr);
          };
          GradOut<scalar_t> out;
          out.w1 = ptr(kGw1, gw1);
          out.w2 = ptr(kGw2, gw2);
          out.dw = ptr(kGdw, gdw);
          out.scale = ptr(kGscale, gscale);
          out.shift = ptr(kGshift, gshift);
          // The backward kernel sums the bias gradient too when it runs anyway (it reads gy);
          // a bias gradient alone, or one without pixels, is a pass of its own.
          bool bias_done = false;
          if (work) {
            if (PartialLayout(g, mask, false).size > 0 || mask[kGx]) {
              out.bias = ptr(kGbias, gbias);
              bias_done = out.bias != nullptr;
              if (!channel_split<scalar_t, acc_t>(g, gyc.const_data_ptr<scalar_t>(),
                                                  xc.const_data_ptr<scalar_t>(), cl, wt.get(),
                                                  mask,
                                                  mask[kGx] ? gx.data_ptr<scalar_t>() : nullptr,
                                                  out)) {
                backward_kernel<scalar_t, acc_t>(g, gyc.const_data_ptr<scalar_t>(),
                                                 xc.const_data_ptr<scalar_t>(), x_cl, cl,
                                                 wt.get(), mask,
                                                 mask[kGx] ? gx.data_ptr<scalar_t>() : nullptr,
                                                 out);
              }
            }
          } else {
            // No pixels: the weight gradients are zero.
            for (at::Tensor* t : {&gw1, &gw2, &gdw, &gscale, &gshift}) {
              if (t->numel() > 0) t->zero_();
            }
          }
          if (mask[kGbias] && g.B > 0 && !bias_done) {
            bias_grad_kernel<scalar_t, acc_t>(g, gyc.const_data_ptr<scalar_t>(), cl,
                                              gbias.data_ptr<scalar_t>());
          }
        });
  }
  return {gx, gw1, gw2, gdw, gbias, gscale, gshift};
}

}  // namespace

TORCH_LIBRARY_IMPL(bsconv_fused, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
}

}  // namespace bsconv::cpu

namespace bsconv::cpu {
// Which inner loops the CPU kernels run on this machine: "avx512" (the stride-1 AVX-512 loops
// beside the AVX2 ones; BSCONV_CPU_NO_AVX512=1 turns them off), "avx2" (AVX2 + FMA float loops)
// or "generic" (no AVX2, or BSCONV_CPU_GENERIC=1 set before the first call, as the tests do).
TORCH_LIBRARY_FRAGMENT(bsconv_fused, m) {
  m.def("cpu_isa() -> str", [] {
    return std::string(avx512_enabled() ? "avx512" : avx2_enabled() ? "avx2" : "generic");
  });
  // Whether bfloat16 forwards (even channel counts into the projections) project with the
  // bfloat16 GEMM (bf16_gemm_enabled; BSCONV_CPU_NO_BF16_GEMM=1 turns it off).
  m.def("cpu_bf16_gemm() -> bool", [] { return bf16_gemm_enabled(); });
  // Whether GEMM operands with rows 4 KiB apart go to the micro-kernel 16 rows at a time
  // (alias_split_enabled: L1 data caches of fewer than 12 ways; BSCONV_CPU_ALIAS_SPLIT=0/1).
  m.def("cpu_alias_split() -> bool", [] { return alias_split_enabled(); });
  // Forward calls so far whose depthwise ran on channels-last (B16) v rows (depthwise_rows_cl:
  // AVX-512, stride 1 or 2, dilation 1, zero padding, 16-channel multiples, no mid transform;
  // BSCONV_CPU_NO_DW_CL=1 turns it off).
  m.def("cpu_depthwise_cl_forwards() -> int", [] { return dw_cl_forwards.load(); });
  // Backward calls so far that ran the B16 loops (gv_rows_cl, gb_rows_cl: AVX-512, float32,
  // stride 1 or 2, dilation 1, zero padding, 16-channel multiples, no mid transform; also off
  // with BSCONV_CPU_NO_DW_CL=1).
  m.def("cpu_depthwise_cl_backwards() -> int", [] { return dw_cl_backwards.load(); });
  // Backward calls so far that ran backward_channel_split (cs_plan: float32 BSConv-U with
  // M x N >= 512 x 512 and two or more images of at most 8 MiB of buffers each, where the B16
  // loops run; BSCONV_CPU_BWD_CS=0 never, =1 regardless of M x N and B).
  m.def("cpu_channel_split_backwards() -> int", [] { return cs_backwards.load(); });
  // Backward calls so far of backward_kernel that computed a projection's weight gradient as
  // its transpose (float32 with packed weights: BSConv-U with NCHW x, or channels-last x with
  // M < N; BSConv-S's second projection; BSCONV_CPU_NO_WGRAD_T=1 never).
  m.def("cpu_wgrad_t_backwards() -> int", [] { return wgrad_t_backwards.load(); });
  // bfloat16 forward calls so far that projected NCHW x as it lies and wrote NCHW y by channel
  // planes (forward_bf16_cm: AVX-512, the bfloat16 GEMM, stride 1, dilation 1, zero padding, no
  // mid transform; BSCONV_CPU_NO_BF16_CM=1 turns it off).
  m.def("cpu_bf16_cm_forwards() -> int", [] { return bf16_cm_forwards.load(); });
  // Output bytes from which a float forward writes its channels-last output by streaming stores
  // (stream_output: a core's L2 size; -1: never, BSCONV_CPU_STREAM_STORES=0; 0: always, =1).
  m.def("cpu_stream_threshold() -> int", [] { return stream_store_threshold(); });
  // Whether t's memory is backed by resident pages (pages_resident: a streamed output must be).
  m.def("cpu_pages_resident(Tensor t) -> bool", [](const at::Tensor& t) {
    return pages_resident(t.const_data_ptr(), int64_t(t.nbytes()));
  });
}
}  // namespace bsconv::cpu
