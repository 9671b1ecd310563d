// Launch configuration of the CUDA kernels: tile sizes, grid, block and the shared-memory layout,
// chosen by one function per kernel from the geometry. The real launcher (bsconv_cuda.cu) and the
// emulator tests (csrc/emu_ext) both call these, so there is one copy of the launch logic.
// Plain C++ (no torch, no CUDA types): testable on its own.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/geometry.h"

namespace bsconv::cuda {

// How the projection GEMMs run: exact SIMT in the accumulation type, or tensor cores (WMMA).
enum Proj : int { kSimt = 0, kWmmaHalf = 1, kWmmaBf16 = 2, kWmmaTf32 = 3 };

constexpr int kThreads = 256;           // threads per block, both kernels
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = 16;          // reduction chunk of the projection GEMMs (WMMA k = 16 / 2x8)
constexpr int64_t kMaxGrid = 2147483647;  // grid.x limit; larger problems loop (grid-stride)

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t align_bytes(size_t a) { return (a + 127) / 128 * 128; }  // keeps WMMA pointers aligned

struct Limits {
  int64_t smem_bytes = 48 * 1024;  // per block, without the opt-in unless raised by the caller
  int64_t num_sms = 108;
};

// Byte offsets of the dynamic shared-memory buffers (0-sized ones may share an offset).
struct SmemLayout {
  size_t v = 0, b = 0, u = 0, gu = 0, aw = 0, rows = 0, cols = 0, total = 0;
};

// The parts of a configuration the kernels read: plain data, passed by value.
struct ForwardTiles {
  int64_t th = 1, tw = 1;        // output tile
  int64_t ph = 1, pw = 1;        // patch of v read by the tile
  int64_t ld = 16;               // row stride of patch buffers (>= ph * pw, multiple of 16)
  int64_t nc = 1, nc_pad = 16;   // output channels per chunk
  int64_t mid_pad = 0;           // BSConv-S: rows of the subspace buffer (all M')
  int64_t tiles_h = 0, tiles_w = 0, chunks = 0;
  int64_t group = 1, groups = 1; // channel chunks per task (BSConv-S shares u across them)
  int64_t tasks = 0;             // B * groups * tiles
  SmemLayout smem;
};

struct BackwardTiles {
  int64_t th = 1, tw = 1;        // v-space tile
  int64_t q = 1, ld = 16;        // pixels per tile; padded row stride
  int64_t n_pad = 16, mid_pad = 0;
  int64_t tiles_h = 0, tiles_w = 0, tasks = 0;
  int64_t max_row_entries = 0, max_col_entries = 0;
  bool deterministic = false;
  int64_t partial_size = 0;      // accumulators of weight-gradient partials per block
  SmemLayout smem;
};

struct ForwardConfig : ForwardTiles {
  int64_t grid = 0;
  int block = kThreads;
  bool ok = false;
  std::string error;
};

struct BackwardConfig : BackwardTiles {
  int64_t grid = 0;
  int block = kThreads;
  bool ok = false;
  std::string error;
};

inline int64_t acc_size(int64_t elem_size) { return elem_size == 8 ? 8 : 4; }
// Element size of the GEMM B operand staged in shared memory.
inline int64_t operand_size(int proj, int64_t elem_size) {
  return proj == kWmmaHalf || proj == kWmmaBf16 ? 2 : acc_size(elem_size);
}

// Hands out consecutive 128-byte-aligned slices of the dynamic shared memory.
struct SmemArena {
  size_t used = 0;
  size_t take(size_t bytes) {
    const size_t at = used;
    used += align_bytes(bytes);
    return at;
  }
};

inline SmemLayout forward_layout(const Geometry& g, int proj, int64_t elem_size, int64_t nc_pad,
                                 int64_t mid_pad, int64_t ph, int64_t pw, int64_t ld) {
  const size_t acc = size_t(acc_size(elem_size)), op = size_t(operand_size(proj, elem_size));
  SmemLayout s;
  SmemArena arena;
  s.v = arena.take(size_t(nc_pad * ld) * acc);
  s.b = arena.take(size_t(kChunk * ld) * op);
  s.u = arena.take(size_t(mid_pad * ld) * acc);
  s.aw = arena.take(proj == kSimt ? 0 : size_t(kWarps * 16 * kChunk) * op);
  s.rows = arena.take(size_t(ph) * sizeof(int));
  s.cols = arena.take(size_t(pw) * sizeof(int));
  s.total = arena.used;
  return s;
}

// Output tile and channel chunk: the largest that fits the shared memory, starting from a
// 16 x 16 tile and 32 channels, shrinking the channels, then the tile. BSConv-S keeps the whole
// M'-channel subspace of the patch in shared memory, computed once per task and shared by the
// task's group of channel chunks; groups are split only as far as needed to give every SM work
// (each split recomputes the subspace once more). BSConv-U tasks take one chunk each (nothing
// is shared between chunks but the L2-resident input).
inline ForwardConfig forward_config(const Geometry& g, int proj, int64_t elem_size,
                                    const Limits& lim) {
  ForwardConfig c;
  const int64_t align_n = proj == kSimt ? 1 : 16;
  c.th = std::max<int64_t>(1, std::min<int64_t>(g.Ho, 16));
  c.tw = std::max<int64_t>(1, std::min<int64_t>(g.Wo, 16));
  c.nc = std::min<int64_t>(g.N, 32);
  c.mid_pad = g.subspace() ? round_up(g.Mmid, align_n) : 0;
  for (;;) {
    c.ph = (c.th - 1) * g.sh + (g.Kh - 1) * g.dh + 1;
    c.pw = (c.tw - 1) * g.sw + (g.Kw - 1) * g.dw + 1;
    c.ld = round_up(c.ph * c.pw, 16);
    c.nc_pad = round_up(c.nc, align_n);
    c.smem = forward_layout(g, proj, elem_size, c.nc_pad, c.mid_pad, c.ph, c.pw, c.ld);
    if (int64_t(c.smem.total) <= lim.smem_bytes) break;
    if (c.nc > 16) {
      c.nc = std::max<int64_t>(16, c.nc / 2);
    } else if (c.th > 1 || c.tw > 1) {
      if (c.th >= c.tw) c.th = div_up(c.th, 2); else c.tw = div_up(c.tw, 2);
    } else if (c.nc > 1 && proj == kSimt) {
      c.nc = div_up(c.nc, 2);
    } else {
      c.error = "the patch of a single output pixel (kernel " + std::to_string(g.Kh) + "x" +
                std::to_string(g.Kw) + ", dilation " + std::to_string(g.dh) + "x" +
                std::to_string(g.dw) + ") needs " + std::to_string(c.smem.total) +
                " bytes of shared memory, more than the " + std::to_string(lim.smem_bytes) +
                " available";
      return c;
    }
  }
  // Small images: smaller tiles until there is a task for every SM (down to 4 x 4 outputs).
  const int64_t per_tile = g.subspace() ? 1 : div_up(g.N, c.nc);
  while (g.B * div_up(g.Ho, c.th) * div_up(g.Wo, c.tw) * per_tile < lim.num_sms &&
         (c.th > 4 || c.tw > 4)) {
    if (c.th >= c.tw) c.th = div_up(c.th, 2); else c.tw = div_up(c.tw, 2);
    c.ph = (c.th - 1) * g.sh + (g.Kh - 1) * g.dh + 1;
    c.pw = (c.tw - 1) * g.sw + (g.Kw - 1) * g.dw + 1;
    c.ld = round_up(c.ph * c.pw, 16);
    c.smem = forward_layout(g, proj, elem_size, c.nc_pad, c.mid_pad, c.ph, c.pw, c.ld);
  }
  c.tiles_h = div_up(g.Ho, c.th);
  c.tiles_w = div_up(g.Wo, c.tw);
  c.chunks = div_up(g.N, c.nc);
  c.group = 1;
  if (g.subspace()) {
    const int64_t tiles = g.B * c.tiles_h * c.tiles_w;
    const int64_t wanted = lim.num_sms;  // tasks that keep every SM busy
    const int64_t splits = std::min<int64_t>(c.chunks, std::max<int64_t>(1, div_up(wanted, tiles)));
    c.group = div_up(c.chunks, splits);
  }
  c.groups = div_up(c.chunks, c.group);
  c.tasks = g.B * c.groups * c.tiles_h * c.tiles_w;
  c.grid = std::min<int64_t>(std::max<int64_t>(c.tasks, 1), kMaxGrid);
  c.ok = true;
  return c;
}

// Entries of one axis of a backward tile: (output, tap) pairs whose padded read position remaps
// into the tile. Bounded by (tile + both paddings) positions times K taps.
inline int64_t max_axis_entries(int64_t tile, int64_t pad_lo, int64_t pad_hi, int64_t k) {
  return (tile + pad_lo + pad_hi) * k;
}

inline SmemLayout backward_layout(const Geometry& g, int proj, int64_t elem_size, int64_t n_pad,
                                  int64_t mid_pad, int64_t ld, int64_t th, int64_t tw,
                                  int64_t row_entries, int64_t col_entries) {
  const size_t acc = size_t(acc_size(elem_size)), op = size_t(operand_size(proj, elem_size));
  SmemLayout s;
  SmemArena arena;
  s.v = arena.take(size_t(n_pad * ld) * acc);
  s.b = arena.take(size_t(kChunk * ld) * op);
  s.u = arena.take(size_t(mid_pad * ld) * acc);
  s.gu = arena.take(size_t(mid_pad * ld) * acc);
  s.aw = arena.take(proj == kSimt ? 0 : size_t(kWarps * 16 * kChunk) * op);
  // Per axis: the (output, tap) lists of build_axis_lists (bsconv_kernels.cuh).
  s.rows = arena.take(size_t((th + 1) + (g.Kh + 1) + (th + g.Kh) + 4 * row_entries) * sizeof(int));
  s.cols = arena.take(size_t((tw + 1) + (g.Kw + 1) + (tw + g.Kw) + 4 * col_entries) * sizeof(int));
  s.total = arena.used;
  return s;
}

inline BackwardConfig backward_config(const Geometry& g, int proj, int64_t elem_size,
                                      bool deterministic, const Limits& lim) {
  BackwardConfig c;
  c.deterministic = deterministic;
  const int64_t align_n = proj == kSimt ? 1 : 16;
  c.n_pad = round_up(g.N, align_n);
  c.mid_pad = g.subspace() ? round_up(g.Mmid, align_n) : 0;
  c.th = std::max<int64_t>(1, std::min<int64_t>(g.H, 4));
  c.tw = std::max<int64_t>(1, std::min<int64_t>(g.W, 16));
  for (;;) {
    c.q = c.th * c.tw;
    c.ld = round_up(c.q, 16);
    c.max_row_entries = max_axis_entries(c.th, g.pt, g.pb, g.Kh);
    c.max_col_entries = max_axis_entries(c.tw, g.pl, g.pr, g.Kw);
    c.smem = backward_layout(g, proj, elem_size, c.n_pad, c.mid_pad, c.ld, c.th, c.tw,
                             c.max_row_entries, c.max_col_entries);
    if (int64_t(c.smem.total) <= lim.smem_bytes) break;
    if (c.th > 1 || c.tw > 1) {
      if (c.th >= c.tw) c.th = div_up(c.th, 2); else c.tw = div_up(c.tw, 2);
    } else {
      c.error = "the backward keeps all " + std::to_string(g.N) + " projected channels" +
                (g.subspace() ? " and " + std::to_string(g.Mmid) + " subspace channels" : "") +
                " of a tile in shared memory and needs " + std::to_string(c.smem.total) +
                " bytes, more than the " + std::to_string(lim.smem_bytes) + " available";
      return c;
    }
  }
  // Small images: smaller tiles until there is a task for every SM (down to 2 x 2 pixels).
  while (g.B * div_up(g.H, c.th) * div_up(g.W, c.tw) < lim.num_sms && (c.th > 2 || c.tw > 2)) {
    if (c.th >= c.tw) c.th = div_up(c.th, 2); else c.tw = div_up(c.tw, 2);
    c.q = c.th * c.tw;
    c.ld = round_up(c.q, 16);
    c.max_row_entries = max_axis_entries(c.th, g.pt, g.pb, g.Kh);
    c.max_col_entries = max_axis_entries(c.tw, g.pl, g.pr, g.Kw);
    c.smem = backward_layout(g, proj, elem_size, c.n_pad, c.mid_pad, c.ld, c.th, c.tw,
                             c.max_row_entries, c.max_col_entries);
  }
  c.tiles_h = g.H > 0 ? div_up(g.H, c.th) : 0;
  c.tiles_w = g.W > 0 ? div_up(g.W, c.tw) : 0;
  c.tasks = g.B * c.tiles_h * c.tiles_w;
  // Weight-gradient partial layout (see BackwardPartials in the kernel header).
  c.partial_size = g.proj1_rows() * g.M + g.N * g.Mmid + g.N * g.taps() + 3 * g.N;
  int64_t grid = std::max<int64_t>(c.tasks, 1);
  if (deterministic) {
    // One partial per block, bounded to 256 MiB; a fixed grid (independent of the device) keeps
    // the reduction order, and hence the bits, the same on every GPU.
    const int64_t cap = std::max<int64_t>(1, (int64_t(256) << 20) / (c.partial_size * acc_size(elem_size)));
    grid = std::min<int64_t>(grid, std::min<int64_t>(cap, 512));
  } else {
    grid = std::min<int64_t>(grid, lim.num_sms * 8);
  }
  c.grid = grid;
  c.ok = true;
  return c;
}

}  // namespace bsconv::cuda
