// CUDA emulator, part 3: warp-level intrinsics as real rendezvous of the lanes named in the mask.
//
// Semantics implemented (CUDA leaves the misuse cases undefined; the emulator makes them loud):
//   * every lane named in `mask` (that exists in the block) must call the same intrinsic with the
//     same mask (call sites may differ); a rendezvous forms per (intrinsic, mask), so groups of
//     lanes with different masks proceed independently. Lanes that end up waiting for each other
//     in different intrinsics are reported by the block's deadlock detection;
//   * the calling lane must be in its own mask, and no named lane may have exited;
//   * reading from a source lane that is not in the mask returns poison (0xFF bytes, NaN for
//     floats) instead of an arbitrary value;
//   * __activemask() returns the lanes of the warp that exist and have not exited (the emulator has
//     no notion of which lanes are currently converged).
// Only included through cuda_emu.h.
#pragma once

#include "emu_runtime.h"

namespace emu {
namespace detail {

enum class ShuffleKind { index, up, down, bfly };

template <class T>
inline T shuffle(const char* op, unsigned mask, T var, ShuffleKind kind, int arg, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "warp shuffles move trivially copyable values of at most 8 bytes");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    throw Error(strprintf("%s: width must be a power of two in [1, 32], got %d", op, width));
  }
  TsanHidden hidden;  // shuffles move values, they do not order memory
  const int lane = static_cast<int>(this_thread_ctx(op).lane);
  const int first = lane & ~(width - 1);  // first lane of this lane's width-sized segment
  const int in_segment = lane - first;
  int src = lane;  // reading one's own value needs no exchange but is still a rendezvous
  switch (kind) {
    case ShuffleKind::index:
      src = first + (arg & (width - 1));
      break;
    case ShuffleKind::up:
      src = in_segment >= arg ? lane - arg : lane;
      break;
    case ShuffleKind::down:
      src = in_segment + arg < width ? lane + arg : lane;
      break;
    case ShuffleKind::bfly:  // later segments are out of reach: own value
      src = (lane ^ arg) < first + width ? (lane ^ arg) : lane;
      break;
  }
  auto slot = warp_collective(
      op, mask, [&](WarpSlot& s, unsigned l) { std::memcpy(&s.value[l], &var, sizeof(T)); },
      [](WarpSlot&) {});
  if (src == lane) return var;
  T out;
  if (src < 0 || src > 31 || (slot->mask & (1u << src)) == 0) {
    std::memset(&out, 0xFF, sizeof(T));  // source lane not participating: undefined in CUDA
  } else {
    std::memcpy(&out, &slot->value[src], sizeof(T));
  }
  return out;
}

struct VoteResult {
  uint32_t ballot;  // lanes whose predicate was true
  uint32_t lanes;   // lanes that took part
};

inline VoteResult vote(const char* op, unsigned mask, int predicate) {
  TsanHidden hidden;
  auto slot = warp_collective(
      op, mask, [&](WarpSlot& s, unsigned l) { s.value[l] = predicate != 0; }, [](WarpSlot&) {});
  uint32_t ballot = 0;
  for (unsigned l = 0; l < 32; ++l) {
    if ((slot->mask >> l) & 1u) ballot |= static_cast<uint32_t>(slot->value[l]) << l;
  }
  return VoteResult{ballot, slot->mask};
}

}  // namespace detail
}  // namespace emu

// __syncwarp orders memory among the participating lanes (the other warp intrinsics do not).
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  emu::detail::ThreadCtx& t = emu::detail::this_thread_ctx("__syncwarp");
  char* sync = &t.block->tsan_block_sync[1 + t.warp];
  emu::detail::tsan_release(sync);
  emu::detail::warp_collective(
      "__syncwarp", mask, [](emu::detail::WarpSlot&, unsigned) {}, [](emu::detail::WarpSlot&) {});
  emu::detail::tsan_acquire(sync);
}

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return emu::detail::shuffle("__shfl_sync", mask, var, emu::detail::ShuffleKind::index, src_lane,
                              width);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return emu::detail::shuffle("__shfl_up_sync", mask, var, emu::detail::ShuffleKind::up,
                              static_cast<int>(delta), width);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return emu::detail::shuffle("__shfl_down_sync", mask, var, emu::detail::ShuffleKind::down,
                              static_cast<int>(delta), width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return emu::detail::shuffle("__shfl_xor_sync", mask, var, emu::detail::ShuffleKind::bfly,
                              lane_mask, width);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return emu::detail::vote("__ballot_sync", mask, predicate).ballot;
}
inline int __any_sync(unsigned mask, int predicate) {
  return emu::detail::vote("__any_sync", mask, predicate).ballot != 0;
}
inline int __all_sync(unsigned mask, int predicate) {
  const emu::detail::VoteResult r = emu::detail::vote("__all_sync", mask, predicate);
  return r.ballot == r.lanes;
}
inline unsigned __activemask() { return emu::detail::active_lanes("__activemask"); }
