// CUDA emulator, part 4: the nvcuda::wmma (tensor core) API subset the project uses.
//
// Fragments: half/bf16 inputs with shapes 16x16x16, 32x8x16 and 8x32x16; TF32 inputs
// (precision::tf32, float storage) with shape 16x16x8; float or half accumulators.
//
// Element-to-lane mapping (unspecified by CUDA, chosen here): a fragment holds an R x C tile
// (A: M x K, B: K x N, accumulator: M x N); lane l owns the row-major tile elements
// l*num_elements ... l*num_elements + num_elements-1, so num_elements = R*C/32. Element-wise code
// on x[] is mapping-agnostic and behaves as on a GPU; code that assumes a hardware mapping is wrong
// on both.
//
// load_matrix_sync, store_matrix_sync and mma_sync are warp collectives: all 32 lanes must call
// them (with warp-uniform pointer, ldm and layout), and each one synchronizes the warp on entry.
// mma_sync gathers the tiles of all lanes, computes D = A*B + C in float (k ascending; products
// of half/bf16/tf32 values are exact in float), and hands every lane its part of D. TF32 inputs
// are rounded to 10 mantissa bits (round to nearest, ties away, like __float_to_tf32) at mma time,
// so forgetting __float_to_tf32 on the inputs does not change the result.
// Only included through cuda_emu.h.
#pragma once

#include <limits>

#include "emu_warp.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

inline float __float_to_tf32(float in) {
  uint32_t u = emu::detail::bit_cast<uint32_t>(in);
  if ((u & 0x7F800000u) == 0x7F800000u) return in;  // inf and NaN pass through
  u = (u + 0x1000u) & 0xFFFFE000u;                  // nearest, ties away from zero (magnitude)
  return emu::detail::bit_cast<float>(u);
}

namespace detail {

template <class Use, int M, int N, int K>
struct tile_shape;
template <int M, int N, int K>
struct tile_shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct tile_shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct tile_shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <class T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};

template <class Use, int M, int N, int K, class T, class Layout>
constexpr bool valid_fragment() {
  constexpr bool half_shape = (M == 16 && N == 16 && K == 16) || (M == 32 && N == 8 && K == 16) ||
                              (M == 8 && N == 32 && K == 16);
  constexpr bool tf32_shape = M == 16 && N == 16 && K == 8;
  constexpr bool input_layout =
      std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value;
  if (std::is_same<Use, accumulator>::value) {
    return std::is_void<Layout>::value && (half_shape || tf32_shape) &&
           (std::is_same<T, float>::value || std::is_same<T, __half>::value);
  }
  if (std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value)
    return input_layout && half_shape;
  if (std::is_same<T, precision::tf32>::value) return input_layout && tf32_shape;
  return false;
}

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) {
  return v;
}
template <>
inline __half from_float<__half>(float v) {
  return __float2half(v);
}

// Value an input element contributes to the product: TF32 keeps 10 mantissa bits.
template <class T, class S>
inline float mma_input(S v) {
  // Qualified calls throughout: __half lives in the global namespace, so ADL would also find a
  // user's global to_float.
  return std::is_same<T, precision::tf32>::value ? wmma::__float_to_tf32(detail::to_float(v))
                                                 : detail::to_float(v);
}

inline void check_memory_operand(const char* op, const void* p, unsigned ldm,
                                 size_t element_bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    throw emu::Error(
        emu::detail::strprintf("%s: the pointer %p must be 256-bit (32-byte) aligned", op, p));
  }
  if ((static_cast<size_t>(ldm) * element_bytes) % 16 != 0) {
    throw emu::Error(emu::detail::strprintf(
        "%s: ldm=%u must be a multiple of 16 bytes (%zu elements of %zu bytes)", op, ldm,
        16 / element_bytes, element_bytes));
  }
}

inline void require_full_warp(const char* op) {
  emu::detail::TsanHidden hidden;
  emu::detail::ThreadCtx& t = emu::detail::this_thread_ctx(op);
  const uint32_t existing = t.block->warps[t.warp].existing;
  if (existing != 0xFFFFFFFFu) {
    throw emu::Error(
        emu::detail::strprintf("%s needs a full warp of 32 threads; warp %u of this block has %d",
                               op, t.warp, __builtin_popcount(existing)));
  }
}

// Full-warp rendezvous that also checks that all lanes passed the same pointer and arguments.
inline std::shared_ptr<emu::detail::WarpSlot> warp_op(const char* op, const void* p,
                                                      uint64_t args) {
  wmma::detail::require_full_warp(op);
  return emu::detail::warp_collective(
      op, 0xFFFFFFFFu,
      [&](emu::detail::WarpSlot& s, unsigned lane) {
        if (s.arrived == 0) {
          s.uniform_ptr = p;
          s.uniform_arg = args;
        } else if (s.uniform_ptr != p || s.uniform_arg != args) {
          throw emu::Error(emu::detail::strprintf(
              "%s: arguments must be warp-uniform; lane %u passed (%p, 0x%llx), other lanes (%p, "
              "0x%llx)",
              op, lane, p, static_cast<unsigned long long>(args), s.uniform_ptr,
              static_cast<unsigned long long>(s.uniform_arg)));
        }
      },
      [](emu::detail::WarpSlot&) {});
}

}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
  static_assert(detail::valid_fragment<Use, M, N, K, T, Layout>(),
                "wmma::fragment: unsupported combination of use, shape, element type and layout");

 public:
  using element_type = T;
  using storage_element_type = typename detail::storage<T>::type;
  static constexpr int num_rows = detail::tile_shape<Use, M, N, K>::rows;
  static constexpr int num_cols = detail::tile_shape<Use, M, N, K>::cols;
  static constexpr int num_elements = num_rows * num_cols / 32;
  storage_element_type x[num_elements];
};

template <class Use, int M, int N, int K, class T, class Layout>
inline void fill_fragment(
    fragment<Use, M, N, K, T, Layout>& f,
    const typename fragment<Use, M, N, K, T, Layout>::storage_element_type& v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

namespace detail {
// Element e of this lane's fragment sits at row-major tile index lane*E + e; (row, col) -> memory.
template <class Frag, class Elem>
inline void load_own_elements(Frag& f, const Elem* p, unsigned ldm, bool row_major_memory) {
  const int lane = static_cast<int>(emu::detail::this_thread_ctx("wmma::load_matrix_sync").lane);
  for (int e = 0; e < Frag::num_elements; ++e) {
    const int idx = lane * Frag::num_elements + e;
    const int r = idx / Frag::num_cols, c = idx % Frag::num_cols;
    f.x[e] = row_major_memory ? p[static_cast<size_t>(r) * ldm + c]
                              : p[static_cast<size_t>(c) * ldm + r];
  }
}
}  // namespace detail

template <int M, int N, int K, class T, class Layout>
inline void load_matrix_sync(
    fragment<matrix_a, M, N, K, T, Layout>& a,
    const typename fragment<matrix_a, M, N, K, T, Layout>::storage_element_type* p, unsigned ldm) {
  wmma::detail::check_memory_operand("wmma::load_matrix_sync", p, ldm, sizeof(*p));
  wmma::detail::warp_op("wmma::load_matrix_sync", p, ldm);
  wmma::detail::load_own_elements(a, p, ldm, std::is_same<Layout, row_major>::value);
}

template <int M, int N, int K, class T, class Layout>
inline void load_matrix_sync(
    fragment<matrix_b, M, N, K, T, Layout>& b,
    const typename fragment<matrix_b, M, N, K, T, Layout>::storage_element_type* p, unsigned ldm) {
  wmma::detail::check_memory_operand("wmma::load_matrix_sync", p, ldm, sizeof(*p));
  wmma::detail::warp_op("wmma::load_matrix_sync", p, ldm);
  wmma::detail::load_own_elements(b, p, ldm, std::is_same<Layout, row_major>::value);
}

template <int M, int N, int K, class T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& c, const T* p, unsigned ldm,
                             layout_t layout) {
  wmma::detail::check_memory_operand("wmma::load_matrix_sync", p, ldm, sizeof(T));
  wmma::detail::warp_op("wmma::load_matrix_sync", p, (static_cast<uint64_t>(layout) << 32) | ldm);
  wmma::detail::load_own_elements(c, p, ldm, layout == mem_row_major);
}

template <int M, int N, int K, class T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& c, unsigned ldm,
                              layout_t layout) {
  using Frag = fragment<accumulator, M, N, K, T>;
  wmma::detail::check_memory_operand("wmma::store_matrix_sync", p, ldm, sizeof(T));
  wmma::detail::warp_op("wmma::store_matrix_sync", p, (static_cast<uint64_t>(layout) << 32) | ldm);
  const int lane = static_cast<int>(emu::detail::this_thread_ctx("wmma::store_matrix_sync").lane);
  for (int e = 0; e < Frag::num_elements; ++e) {
    const int idx = lane * Frag::num_elements + e;
    const int r = idx / N, col = idx % N;
    const size_t at = layout == mem_row_major ? static_cast<size_t>(r) * ldm + col
                                              : static_cast<size_t>(col) * ldm + r;
    p[at] = c.x[e];
  }
}

template <int M, int N, int K, class Tin, class LayoutA, class LayoutB, class Td, class Tc>
inline void mma_sync(fragment<accumulator, M, N, K, Td>& d,
                     const fragment<matrix_a, M, N, K, Tin, LayoutA>& a,
                     const fragment<matrix_b, M, N, K, Tin, LayoutB>& b,
                     const fragment<accumulator, M, N, K, Tc>& c, bool satf = false) {
  constexpr int kA = 0, kB = M * K, kC = kB + K * N, kD = kC + M * N;
  constexpr int ea = M * K / 32, eb = K * N / 32, ec = M * N / 32;
  emu::detail::TsanHidden hidden;  // operands travel through the emulator's exchange buffer
  wmma::detail::require_full_warp("wmma::mma_sync");
  auto slot = emu::detail::warp_collective(
      "wmma::mma_sync", 0xFFFFFFFFu,
      [&](emu::detail::WarpSlot& s, unsigned lane) {
        // Copy this lane's operands in now: d may alias c, and every lane's inputs are needed.
        if (s.tiles.empty()) s.tiles.assign(kD + M * N, 0.0f);
        for (int e = 0; e < ea; ++e)
          s.tiles[kA + lane * ea + e] = wmma::detail::mma_input<Tin>(a.x[e]);
        for (int e = 0; e < eb; ++e)
          s.tiles[kB + lane * eb + e] = wmma::detail::mma_input<Tin>(b.x[e]);
        for (int e = 0; e < ec; ++e) s.tiles[kC + lane * ec + e] = wmma::detail::to_float(c.x[e]);
      },
      [&](emu::detail::WarpSlot& s) {
        for (int i = 0; i < M; ++i) {
          for (int j = 0; j < N; ++j) {
            float acc = s.tiles[kC + i * N + j];
            for (int k = 0; k < K; ++k) acc += s.tiles[kA + i * K + k] * s.tiles[kB + k * N + j];
            if (satf) {  // saturate to finite, NaN to zero (the deprecated satf mode)
              const float big = std::numeric_limits<float>::max();
              acc = std::isnan(acc) ? 0.0f : std::fmax(-big, std::fmin(big, acc));
            }
            s.tiles[kD + i * N + j] = acc;
          }
        }
      });
  const int lane = static_cast<int>(emu::detail::this_thread_ctx("wmma::mma_sync").lane);
  for (int e = 0; e < ec; ++e)
    d.x[e] = wmma::detail::from_float<Td>(slot->tiles[kD + lane * ec + e]);
}

}  // namespace wmma
}  // namespace nvcuda
