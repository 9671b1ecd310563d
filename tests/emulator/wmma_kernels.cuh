// Tensor-core GEMM kernels for the emulator tests. Portable: compiled by g++ under the emulator and
// by nvcc for sm_80 (portability test).
#pragma once

#include <type_traits>

#include "cuda/emu/launch.h"

template <class T>
struct wmma_storage {
  using type = T;
};
template <>
struct wmma_storage<nvcuda::wmma::precision::tf32> {
  using type = float;
};

// Each warp computes one 16x16 tile of C = A * B + C0: A is (tiles*16) x k_total row-major,
// B is k_total x 16 (row-major, ld 16, or col-major, ld k_total), C0 and C are (tiles*16) x 16 in
// the layout `c_layout` (ld 16 for row-major, ld tiles*16 for col-major).
template <class Tin, int K, class LayoutB>
__global__ void wmma_gemm_kernel(const typename wmma_storage<Tin>::type* __restrict__ a,
                                 const typename wmma_storage<Tin>::type* __restrict__ b,
                                 const float* c0, float* c, int k_total, int tiles,
                                 int c_col_major) {
  namespace wmma = nvcuda::wmma;
  const int tile = static_cast<int>((blockIdx.x * blockDim.x + threadIdx.x) / 32);
  if (tile >= tiles) return;  // whole warps only: blockDim.x is a multiple of 32
  const wmma::layout_t c_layout = c_col_major ? wmma::mem_col_major : wmma::mem_row_major;
  const unsigned c_ld = c_col_major ? static_cast<unsigned>(tiles * 16) : 16u;
  const size_t c_offset =
      c_col_major ? static_cast<size_t>(tile) * 16 : static_cast<size_t>(tile) * 16 * 16;

  wmma::fragment<wmma::matrix_a, 16, 16, K, Tin, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, K, Tin, LayoutB> fb;
  wmma::fragment<wmma::accumulator, 16, 16, K, float> acc;
  wmma::load_matrix_sync(acc, c0 + c_offset, c_ld, c_layout);
  constexpr bool b_row_major = std::is_same<LayoutB, wmma::row_major>::value;
  for (int k0 = 0; k0 < k_total; k0 += K) {
    wmma::load_matrix_sync(fa, a + static_cast<size_t>(tile) * 16 * k_total + k0, k_total);
    wmma::load_matrix_sync(fb, b_row_major ? b + static_cast<size_t>(k0) * 16 : b + k0,
                           b_row_major ? 16u : static_cast<unsigned>(k_total));
    if constexpr (std::is_same<Tin, wmma::precision::tf32>::value) {  // the documented TF32 recipe
      for (int e = 0; e < fa.num_elements; ++e) fa.x[e] = wmma::__float_to_tf32(fa.x[e]);
      for (int e = 0; e < fb.num_elements; ++e) fb.x[e] = wmma::__float_to_tf32(fb.x[e]);
    }
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(c + c_offset, acc, c_ld, c_layout);
}
