// Scalar building blocks shared by the CPU kernels and the CUDA device code: padding remaps,
// the mid-transform activations and their derivatives. No torch types, so the file compiles
// under nvcc, the host compiler and the CUDA emulator alike. Math: shared/design/bsconv.md.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define BSCONV_HD __host__ __device__ __forceinline__
#else
#define BSCONV_HD inline
#endif

namespace bsconv {

// Codes used by the op schema (ints), in the order of the Python names.
enum PaddingMode : int { kZeros = 0, kReflect = 1, kReplicate = 2, kCircular = 3 };
enum Activation : int { kActNone = 0, kActRelu = 1, kActRelu6 = 2, kActHardswish = 3 };

// Maps a coordinate of the padded input (already shifted by the leading padding, so image
// pixels are 0..n-1) to the image pixel it reads, or -1 when it reads a zero (zeros mode).
// Preconditions checked on the host: reflect pad < n, circular pad <= n.
BSCONV_HD int64_t remap_index(int64_t i, int64_t n, int mode) {
  if (i >= 0 && i < n) return i;
  switch (mode) {
    case kReflect:
      return i < 0 ? -i : 2 * (n - 1) - i;
    case kReplicate:
      return i < 0 ? 0 : n - 1;
    case kCircular:
      return i < 0 ? i + n : i - n;
    default:
      return -1;
  }
}

// act(z). The comparisons are written so that NaN propagates like PyTorch's kernels.
template <typename T>
BSCONV_HD T activate(T z, int act) {
  switch (act) {
    case kActRelu:
      return z < T(0) ? T(0) : z;
    case kActRelu6:
      return z < T(0) ? T(0) : (z > T(6) ? T(6) : z);
    case kActHardswish: {
      if (z < T(-3)) return T(0);
      if (z > T(3)) return z;
      return z * (z + T(3)) / T(6);
    }
    default:
      return z;
  }
}

// d act / dz, with PyTorch's conventions at the kinks (relu: 0 at 0; relu6: 0 at 0 and 6;
// hardswish: x/3 + 0.5 on [-3, 3], as aten::hardswish_backward).
template <typename T>
BSCONV_HD T activate_grad(T z, int act) {
  switch (act) {
    case kActRelu:
      return z > T(0) ? T(1) : T(0);
    case kActRelu6:
      return (z > T(0) && z < T(6)) ? T(1) : T(0);
    case kActHardswish:
      if (z < T(-3)) return T(0);
      if (z <= T(3)) return z / T(3) + T(0.5);
      return T(1);
    default:
      return T(1);
  }
}

}  // namespace bsconv
