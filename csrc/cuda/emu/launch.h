// The one CUDA include of every kernel header (csrc/cuda/*.cuh): under nvcc it pulls in the CUDA
// toolkit headers, under a host compiler the emulator (cuda_emu.h). It also defines the macros
// that let the same kernel source build both ways:
//
//   BSCONV_SHARED(type, name, count)    static shared array `type name[count]`; `type` may itself
//   be
//                                       an array type, e.g. BSCONV_SHARED(float[33], tile, 32) for
//                                       float tile[32][33]. Emulator: poisoned at every block
//                                       start, size-checked against the shared-memory limit.
//   BSCONV_DYNAMIC_SHARED(type, name)   `type* const name` pointing at the dynamic shared memory
//                                       (extern __shared__), 16-byte aligned. Emulator: poisoned.
//   BSCONV_LAUNCH(kernel, grid, block, smem, stream, args...)
//                                       kernel<<<grid, block, smem, stream>>>(args...) under nvcc,
//                                       emu::launch (synchronous, throws emu::Error) otherwise.
//                                       Wrap template kernels in parentheses:
//                                       BSCONV_LAUNCH((my_kernel<float, 3>), grid, ...).
//   BSCONV_EMULATOR                     1 in the emulator build, 0 under nvcc.
#pragma once

#if defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#define BSCONV_EMULATOR 0

namespace bsconv_emu_compat {
template <class T>
using identity_t = T;  // lets `type` be an array type in BSCONV_SHARED
}  // namespace bsconv_emu_compat

#define BSCONV_SHARED(type, name, count) __shared__ bsconv_emu_compat::identity_t<type> name[count]
// A distinct extern name per use: extern __shared__ arrays of different types may not share a name
// within one translation unit; they all alias the start of dynamic shared memory anyway.
#define BSCONV_DYNAMIC_SHARED(type, name)                                        \
  extern __shared__ __align__(16) unsigned char name##_bsconv_dynamic_shared_[]; \
  type* const name = reinterpret_cast<type*>(name##_bsconv_dynamic_shared_)
#define BSCONV_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)

#else  // host-compiler emulation

#include "cuda_emu.h"

namespace emu {
namespace detail {
template <class T, size_t N>
using array_t = T[N];
}  // namespace detail
}  // namespace emu

// The function-local static's address identifies the declaration (per template instantiation),
// so every thread of the block gets the same storage from the block's arena.
#define BSCONV_SHARED(type, name, count)                                                       \
  static char name##_bsconv_shared_key_;                                                       \
  ::emu::detail::array_t<type, (count)>& name =                                                \
      *static_cast<::emu::detail::array_t<type, (count)>*>(::emu::detail::static_shared_alloc( \
          &name##_bsconv_shared_key_, sizeof(::emu::detail::array_t<type, (count)>),           \
          alignof(::emu::detail::array_t<type, (count)>), #name))
#define BSCONV_DYNAMIC_SHARED(type, name) \
  type* const name = static_cast<type*>(::emu::detail::dynamic_shared_base())
// `, ##__VA_ARGS__` (a GNU extension g++ accepts in C++17) drops the comma for argument-less
// kernels.
#define BSCONV_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((void)(stream), ::emu::launch_named(#kernel, (grid), (block), (smem), kernel, ##__VA_ARGS__))

#endif
