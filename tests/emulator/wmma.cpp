// Test 6: wmma GEMMs (half, bf16: 16x16x16; tf32: 16x16x8) against a double reference.
//
// Error bounds per output c_ij, with S = |c0_ij| + sum_k |a_ik b_kj| and u = 2^-24 (float):
//   half / bf16: the reference uses the 16-bit inputs the kernel saw, and their products are exact
//                in float, so only the float accumulation of k_total+1 terms errs: k_total*u*S.
//   tf32:        the reference uses the float inputs; rounding each input to 10 mantissa bits
//                (unit roundoff 2^-11) errs by up to 2^-11 per factor, so 2^-10 + 2^-22 per
//                product, plus the float accumulation: (2^-10 + 2^-22 + k_total*u)*S.
// Printed: ratio = max err/bound (must be <= 1), fp32_ratio = max err/(k_total*u*S) (for tf32 it
// must be > 1, showing that the inputs really were rounded to tf32).
#include <cmath>
#include <random>
#include <vector>

#include "emu_test_util.h"
#include "wmma_kernels.cuh"

namespace wmma = nvcuda::wmma;

template <class Storage>
Storage from_float(float v);
template <>
__half from_float<__half>(float v) {
  return __float2half(v);
}
template <>
__nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <>
float from_float<float>(float v) {
  return v;
}
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float to_float(float v) { return v; }

template <class Tin, int K, class LayoutB>
void run_case(const char* name, int k_total, int tiles, bool c_col_major, unsigned seed) {
  using Storage = typename wmma_storage<Tin>::type;
  constexpr bool kTf32 = std::is_same<Tin, wmma::precision::tf32>::value;
  constexpr bool kBRowMajor = std::is_same<LayoutB, wmma::row_major>::value;
  const int rows = tiles * 16;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<Storage> a(static_cast<size_t>(rows) * k_total), b(static_cast<size_t>(k_total) * 16);
  std::vector<float> c0(static_cast<size_t>(rows) * 16);
  for (auto& x : a) x = from_float<Storage>(dist(rng));
  for (auto& x : b) x = from_float<Storage>(dist(rng));
  for (auto& x : c0) x = dist(rng);
  auto a_at = [&](int i, int k) {
    return static_cast<double>(to_float(a[static_cast<size_t>(i) * k_total + k]));
  };
  auto b_at = [&](int k, int j) {
    return static_cast<double>(to_float(kBRowMajor ? b[static_cast<size_t>(k) * 16 + j]
                                                   : b[static_cast<size_t>(j) * k_total + k]));
  };
  auto c_index = [&](int i, int j) {
    return c_col_major ? static_cast<size_t>(j) * rows + i : static_cast<size_t>(i) * 16 + j;
  };

  emu::GuardedBuffer<Storage> da(a, "a"), db(b, "b");
  emu::GuardedBuffer<float> dc0(c0, "c0"), dc(c0.size(), "c");
  const int block = 64, grid = (tiles * 32 + block - 1) / block;
  BSCONV_LAUNCH((wmma_gemm_kernel<Tin, K, LayoutB>), grid, block, 0, nullptr, da.data(), db.data(),
                dc0.data(), dc.data(), k_total, tiles, c_col_major ? 1 : 0);

  const double u = std::ldexp(1.0, -24);
  const double per_product = kTf32 ? std::ldexp(1.0, -10) + std::ldexp(1.0, -22) : 0.0;
  double ratio = 0, fp32_ratio = 0;
  int nan_count = 0;
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < 16; ++j) {
      double exact = c0[c_index(i, j)], s = std::fabs(exact);
      for (int k = 0; k < k_total; ++k) {
        exact += a_at(i, k) * b_at(k, j);
        s += std::fabs(a_at(i, k) * b_at(k, j));
      }
      const double got = dc[c_index(i, j)];
      if (std::isnan(got)) ++nan_count;
      const double err = std::fabs(got - exact);
      ratio = std::max(ratio, err / ((per_product + k_total * u) * s));
      fp32_ratio = std::max(fp32_ratio, err / (k_total * u * s));
    }
  }
  std::printf("case %s ratio %.4f fp32_ratio %.2f nan %d\n", name, ratio, fp32_ratio, nan_count);
}

int main() {
  run_case<__half, 16, wmma::row_major>("half_16x16x16", 16, 1, false, 1);
  run_case<__half, 16, wmma::col_major>("half_k64_4tiles_colC", 64, 4, true, 2);
  run_case<__nv_bfloat16, 16, wmma::row_major>("bf16_16x16x16", 16, 1, false, 3);
  run_case<__nv_bfloat16, 16, wmma::col_major>("bf16_k64_4tiles_colC", 64, 4, true, 4);
  run_case<wmma::precision::tf32, 8, wmma::row_major>("tf32_16x16x8", 8, 1, false, 5);
  run_case<wmma::precision::tf32, 8, wmma::col_major>("tf32_k64_4tiles_colC", 64, 4, true, 6);
  return 0;
}
