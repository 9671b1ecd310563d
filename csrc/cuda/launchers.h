// Host-side launch of the CUDA kernels on raw pointers: the specialization dispatch and the launch
// itself. Included by the real CUDA build (bsconv_cuda.cu, under nvcc) and by the emulator build
// (csrc/emu_ext, host compiler), so both run exactly this code with configurations from
// tile_config.h.
#pragma once

#include <stdexcept>
#include <string>

#include "cuda/bsconv_kernels.cuh"

namespace bsconv::cuda {

// Calls f.template operator()<KH, KW, S>() with the compile-time specialization for the
// geometry: square 3/5/7 kernels with equal strides 1 or 2; (0, 0, 0) is the general path.
template <typename F>
void dispatch_kernel_shape(const Geometry& g, F&& f) {
  if (g.Kh == g.Kw && g.sh == g.sw && (g.sh == 1 || g.sh == 2)) {
    const bool s1 = g.sh == 1;
    switch (g.Kh) {
      case 3:
        return s1 ? f.template operator()<3, 3, 1>() : f.template operator()<3, 3, 2>();
      case 5:
        return s1 ? f.template operator()<5, 5, 1>() : f.template operator()<5, 5, 2>();
      case 7:
        return s1 ? f.template operator()<7, 7, 1>() : f.template operator()<7, 7, 2>();
      default:
        break;
    }
  }
  f.template operator()<0, 0, 0>();
}

// The projection modes a dtype can run: double and float SIMT, float TF32, half / bf16 WMMA.
template <typename scalar_t>
constexpr bool proj_supported(int proj) {
  if (std::is_same<scalar_t, double>::value) return proj == kSimt;
  if (std::is_same<scalar_t, float>::value) return proj == kSimt || proj == kWmmaTf32;
  if (std::is_same<scalar_t, __half>::value) return proj == kWmmaHalf;
  return proj == kWmmaBf16;
}

template <typename scalar_t>
int default_proj(bool allow_tf32) {
  if (std::is_same<scalar_t, __half>::value) return kWmmaHalf;
  if (std::is_same<scalar_t, __nv_bfloat16>::value) return kWmmaBf16;
  if (std::is_same<scalar_t, float>::value && allow_tf32) return kWmmaTf32;
  return kSimt;
}

template <typename Kernel>
void set_smem_limit(Kernel kernel, size_t smem) {
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("bsconv_fused: cannot raise the shared-memory limit: ") +
                               cudaGetErrorString(err));
  }
}

// After every launch: a failed launch (bad configuration, no kernel image) becomes an exception.
inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("bsconv_fused: launch of ") + what +
                             " failed: " + cudaGetErrorString(err));
}

// The kernel template behind each parameter type.
template <typename Params>
struct KernelFor;
template <typename T>
struct KernelFor<ForwardParams<T>> {
  static constexpr const char* name = "bsconv_forward_kernel";
  template <int PROJ, int KH, int KW, int S>
  static auto get() {
    return bsconv_forward_kernel<T, PROJ, KH, KW, S>;
  }
};
template <typename T>
struct KernelFor<BackwardParams<T>> {
  static constexpr const char* name = "bsconv_backward_kernel";
  template <int PROJ, int KH, int KW, int S>
  static auto get() {
    return bsconv_backward_kernel<T, PROJ, KH, KW, S>;
  }
};

// Launches the kernel of Params for one projection mode and kernel-shape specialization.
template <int PROJ, typename Params, typename Config>
struct Launcher {
  const Params& p;
  const Config& c;
  cudaStream_t stream;
  template <int KH, int KW, int S>
  void operator()() const {
    auto kernel = KernelFor<Params>::template get<PROJ, KH, KW, S>();
    set_smem_limit(kernel, c.smem.total);
    BSCONV_LAUNCH(kernel, dim3(unsigned(c.grid)), dim3(unsigned(c.block)), c.smem.total, stream,
                  p);
    check_launch(KernelFor<Params>::name);
  }
};

// Launches Launcher<PROJ, ...> for the runtime projection mode (only the pairs that a dtype
// supports are instantiated).
template <typename scalar_t, typename Params, typename Config>
void launch_with_proj(const Params& p, const Config& c, int proj, cudaStream_t stream) {
  if (c.tasks == 0) return;
  switch (proj) {
    case kWmmaHalf:
      if constexpr (proj_supported<scalar_t>(kWmmaHalf))
        return dispatch_kernel_shape(p.g, Launcher<kWmmaHalf, Params, Config>{p, c, stream});
      break;
    case kWmmaBf16:
      if constexpr (proj_supported<scalar_t>(kWmmaBf16))
        return dispatch_kernel_shape(p.g, Launcher<kWmmaBf16, Params, Config>{p, c, stream});
      break;
    case kWmmaTf32:
      if constexpr (proj_supported<scalar_t>(kWmmaTf32))
        return dispatch_kernel_shape(p.g, Launcher<kWmmaTf32, Params, Config>{p, c, stream});
      break;
    default:
      if constexpr (proj_supported<scalar_t>(kSimt))
        return dispatch_kernel_shape(p.g, Launcher<kSimt, Params, Config>{p, c, stream});
      break;
  }
  throw std::invalid_argument("bsconv_fused: projection mode " + std::to_string(proj) +
                              " is not available for this dtype");
}

template <typename scalar_t>
void launch_forward(const ForwardParams<scalar_t>& p, const ForwardConfig& c, int proj,
                    cudaStream_t stream) {
  launch_with_proj<scalar_t>(p, c, proj, stream);
}

template <typename scalar_t>
void launch_backward(const BackwardParams<scalar_t>& p, const BackwardConfig& c, int proj,
                     cudaStream_t stream) {
  launch_with_proj<scalar_t>(p, c, proj, stream);
}

// Deterministic mode: out = fixed-order sum of the per-block partials.
template <typename acc_t>
void launch_reduce_partials(const acc_t* partials, int64_t blocks, int64_t size, acc_t* out,
                            cudaStream_t stream) {
  if (size == 0) return;
  const int64_t grid = std::min<int64_t>(div_up(size, kThreads), 65535);
  BSCONV_LAUNCH(reduce_partials_kernel<acc_t>, dim3(unsigned(grid)), dim3(kThreads), 0, stream,
                partials, blocks, size, out);
  check_launch("reduce_partials_kernel");
}

#if !BSCONV_EMULATOR
// The GPU build compiles the kernels of each dtype in its own translation unit
// (instantiate_*.cu) so that they build in parallel.
#define BSCONV_DECLARE_LAUNCHERS(T)                                                          \
  extern template void launch_forward<T>(const ForwardParams<T>&, const ForwardConfig&, int, \
                                         cudaStream_t);                                      \
  extern template void launch_backward<T>(const BackwardParams<T>&, const BackwardConfig&,   \
                                          int, cudaStream_t);
BSCONV_DECLARE_LAUNCHERS(float)
BSCONV_DECLARE_LAUNCHERS(double)
BSCONV_DECLARE_LAUNCHERS(__half)
BSCONV_DECLARE_LAUNCHERS(__nv_bfloat16)
#undef BSCONV_DECLARE_LAUNCHERS
#endif

}  // namespace bsconv::cuda
