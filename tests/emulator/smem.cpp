// Test 8: shared memory starts every block poisoned; shared-memory limits and overruns.
//   smem poison     static and dynamic shared memory read before written: NaN / -1 in every block
//   smem limits     static/dynamic size limits, cudaFuncSetAttribute opt-in
//   smem overrun    writing one element past a shared array is reported
#include <cmath>
#include <vector>

#include "emu_test_util.h"

// Each block records what it reads before writing, then overwrites everything so that a block
// running later would see these values if the poison were not renewed.
__global__ void read_before_write_kernel(float* f_out, int* i_out, float* dyn_out, float* half_out,
                                         float* tile_out) {
  BSCONV_SHARED(float, f, 256);
  BSCONV_SHARED(int, ints, 256);
  BSCONV_SHARED(__half, halves, 256);
  BSCONV_SHARED(float[33], tile, 8);  // float tile[8][33]
  BSCONV_DYNAMIC_SHARED(float, dyn);
  const unsigned t = threadIdx.x, b = blockIdx.x;
  const unsigned at = b * blockDim.x + t;
  f_out[at] = f[t];
  i_out[at] = ints[t];
  dyn_out[at] = dyn[t];
  half_out[at] = __half2float(halves[t]);
  tile_out[at] = tile[t % 8][t % 33];
  __syncthreads();
  f[t] = 1.0f;
  ints[t] = 1;
  dyn[t] = 1.0f;
  halves[t] = __float2half(1.0f);
  tile[t % 8][t % 33] = 1.0f;
}

template <int kFloats>
__global__ void static_smem_kernel(float* out) {
  BSCONV_SHARED(float, buffer, kFloats);
  buffer[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = buffer[threadIdx.x] + static_cast<float>(sizeof(buffer) / 1024);
}

__global__ void dynamic_smem_kernel(float* out, int floats) {
  BSCONV_DYNAMIC_SHARED(float, buffer);
  for (int i = static_cast<int>(threadIdx.x); i < floats; i += static_cast<int>(blockDim.x))
    buffer[i] = 2.0f;
  __syncthreads();
  out[threadIdx.x] = buffer[floats - 1 - static_cast<int>(threadIdx.x)];
}

__global__ void overrun_kernel(float* out, int index) {
  BSCONV_SHARED(float, a, 64);
  BSCONV_SHARED(float, b, 64);
  a[threadIdx.x] = 1.0f;
  b[threadIdx.x] = 2.0f;
  __syncthreads();
  if (threadIdx.x == 0) a[index] = 3.0f;  // index 64: one past the end of `a`
  out[threadIdx.x] = a[threadIdx.x] + b[threadIdx.x];
}

int main(int argc, char** argv) {
  if (mode_is(argc, argv, "poison")) {
    const int grid = 4, block = 256, n = grid * block;
    emu::GuardedBuffer<float> f(n, "f"), d(n, "dyn"), h(n, "half"), tile(n, "tile");
    emu::GuardedBuffer<int> i(n, "ints");
    emu::launch(grid, block, 256 * sizeof(float), read_before_write_kernel, f.data(), i.data(),
                d.data(), h.data(), tile.data());
    int f_nan = 0, d_nan = 0, h_nan = 0, tile_nan = 0, i_minus1 = 0;
    for (int k = 0; k < n; ++k) {
      f_nan += std::isnan(f[k]);
      d_nan += std::isnan(d[k]);
      h_nan += std::isnan(h[k]);
      tile_nan += std::isnan(tile[k]);
      i_minus1 += i[k] == -1;
    }
    std::printf(
        "values %d\nstatic_float_nan %d\ndynamic_float_nan %d\nstatic_half_nan %d\nstatic_2d_nan "
        "%d\n"
        "static_int_minus1 %d\n",
        n, f_nan, d_nan, h_nan, tile_nan, i_minus1);
    return 0;
  }
  if (mode_is(argc, argv, "limits")) {
    emu::GuardedBuffer<float> out(256, "out");
    // 40 KiB static is fine alone; plus 16 KiB dynamic exceeds the default 48 KiB.
    report_error("static_40k",
                 [&] { emu::launch(1, 32, 0, static_smem_kernel<10240>, out.data()); });
    std::printf("static_40k value %g\n", static_cast<double>(out[0]));
    report_error("static_40k_dynamic_16k",
                 [&] { emu::launch(1, 32, 16 * 1024, static_smem_kernel<10240>, out.data()); });
    report_error("static_52k",
                 [&] { emu::launch(1, 32, 0, static_smem_kernel<13312>, out.data()); });
    // 64 KiB dynamic needs the opt-in, and then works.
    report_error("dynamic_64k_no_optin", [&] {
      emu::launch(1, 32, 64 * 1024, dynamic_smem_kernel, out.data(), 16 * 1024);
    });
    std::printf("optin_64k %s\n", cudaFuncSetAttribute(dynamic_smem_kernel,
                                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                       64 * 1024) == cudaSuccess
                                      ? "ok"
                                      : "refused");
    report_error("dynamic_64k_optin", [&] {
      emu::launch(1, 32, 64 * 1024, dynamic_smem_kernel, out.data(), 16 * 1024);
    });
    std::printf("dynamic_64k value %g\n", static_cast<double>(out[0]));
    report_error("dynamic_80k_over_attribute", [&] {
      emu::launch(1, 32, 80 * 1024, dynamic_smem_kernel, out.data(), 20 * 1024);
    });
    std::printf("optin_228k %s\n", cudaFuncSetAttribute(dynamic_smem_kernel,
                                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                        228 * 1024) == cudaSuccess
                                       ? "ok"
                                       : "refused");
    std::printf("optin_227k %s\n", cudaFuncSetAttribute(dynamic_smem_kernel,
                                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                        227 * 1024) == cudaSuccess
                                       ? "ok"
                                       : "refused");
    report_error("dynamic_227k_optin", [&] {
      emu::launch(1, 32, 227 * 1024, dynamic_smem_kernel, out.data(), 227 * 256);
    });
    return 0;
  }
  if (mode_is(argc, argv, "overrun")) {
    emu::GuardedBuffer<float> out(64, "out");
    report_error("in_bounds", [&] { emu::launch(2, 64, 0, overrun_kernel, out.data(), 0); });
    report_error("overrun", [&] { emu::launch(2, 64, 0, overrun_kernel, out.data(), 64); });
    return 0;
  }
  std::fprintf(stderr, "usage: smem poison|limits|overrun\n");
  return 2;
}
