// Problem geometry of one BSConv call, as plain integers (no torch types), shared by the CPU
// kernels, the CUDA launchers and the emulator tests.
#pragma once

#include <cstdint>

#include "common/bsconv_math.h"

namespace bsconv {

struct Geometry {
  int64_t B = 0, M = 0, N = 0;
  int64_t Mmid = 0;  // BSConv-S subspace width M'; 0 for BSConv-U
  int64_t H = 0, W = 0, Ho = 0, Wo = 0;
  int64_t Kh = 1, Kw = 1;
  int64_t sh = 1, sw = 1, dh = 1, dw = 1;
  int64_t pt = 0, pb = 0, pl = 0, pr = 0;  // padding top, bottom, left, right
  int mode = 0;                            // PaddingMode
  int act = 0;                             // Activation
  bool has_scale = false, has_shift = false, has_bias = false;

  BSCONV_HD bool subspace() const { return Mmid > 0; }
  BSCONV_HD bool has_mid() const { return has_scale || has_shift || act != 0; }
  // Rows of the first projection: M' for BSConv-S, N for BSConv-U.
  BSCONV_HD int64_t proj1_rows() const { return subspace() ? Mmid : N; }
  BSCONV_HD int64_t taps() const { return Kh * Kw; }
};

// Output extent of a padded, strided, dilated convolution along one axis.
BSCONV_HD int64_t conv_out_size(int64_t in, int64_t pad_lo, int64_t pad_hi, int64_t k, int64_t s,
                             int64_t d) {
  return (in + pad_lo + pad_hi - d * (k - 1) - 1) / s + 1;
}

}  // namespace bsconv
