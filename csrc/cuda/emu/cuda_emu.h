// CUDA emulator for host compilers: compiles the project's device code (csrc/cuda/*.cuh) with
// g++ and runs it on real OS threads, one per CUDA thread. See README.md in this folder for the
// execution model, the API and the limitations. Kernel headers do not include this file directly:
// they include "cuda/emu/launch.h", which selects the CUDA toolkit under nvcc and this emulator
// otherwise.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emu.h emulates CUDA for host compilers; under nvcc include cuda/emu/launch.h instead"
#endif

#include "emu_runtime.h"
#include "emu_types.h"
#include "emu_warp.h"
#include "emu_wmma.h"
#include "guarded_buffer.h"

#define BSCONV_EMULATOR 1

// Execution-space and storage qualifiers. Kernels and device functions become ordinary host
// functions; __shared__ becomes `static` (one instance, safe because blocks run one at a time),
// but such variables are neither poisoned nor size-checked: use BSCONV_SHARED instead.
// __noinline__ is deliberately not defined: libstdc++ headers spell __attribute__((__noinline__)).
// __restrict__ needs nothing: it is a GCC keyword.
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

// __syncthreads is a macro so that the barrier knows its call site: threads waiting at different
// __syncthreads calls are reported as a divergent barrier.
#define __syncthreads() ::emu::detail::syncthreads_impl(__FILE__, __LINE__, 1, "__syncthreads")
#define __syncthreads_count(predicate) \
  ::emu::detail::syncthreads_impl(__FILE__, __LINE__, (predicate) != 0, "__syncthreads_count")
#define __syncthreads_and(predicate)                                                             \
  (::emu::detail::syncthreads_impl(__FILE__, __LINE__, (predicate) != 0, "__syncthreads_and") == \
   static_cast<int>(blockDim.x * blockDim.y * blockDim.z))
#define __syncthreads_or(predicate) \
  (::emu::detail::syncthreads_impl(__FILE__, __LINE__, (predicate) != 0, "__syncthreads_or") != 0)

// ------------------------------------------------------------------------------------------------
// The few runtime-API pieces a kernel header's host-side helper may touch.
typedef struct CUstream_st* cudaStream_t;
enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef enum cudaError cudaError_t;
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

// Launch failures are thrown by emu::launch, so there is never a pending error to fetch.
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "invalid argument";
}

// Opt-in to more than 48 KiB of shared memory, as on sm_80/sm_90.
template <class F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attribute, int value) {
  static_assert(std::is_function<F>::value, "cudaFuncSetAttribute takes a kernel");
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || static_cast<size_t>(value) > emu::config().smem_optin_limit)
    return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lk(emu::detail::attribute_mutex());
  emu::detail::max_dynamic_smem_attribute()[reinterpret_cast<emu::detail::KernelKey>(kernel)] =
      static_cast<size_t>(value);
  return cudaSuccess;
}

// The portable macros (BSCONV_SHARED, BSCONV_DYNAMIC_SHARED, BSCONV_LAUNCH).
#include "launch.h"
