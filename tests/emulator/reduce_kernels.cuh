// Block-sum kernels for the emulator tests: one correct version and two with a planted missing
// __syncthreads. Portable: compiled by g++ under the emulator and by nvcc (portability test).
#pragma once

#include "cuda/emu/launch.h"

enum BlockSumVariant { kBlockSumCorrect = 0, kMissingSyncAfterStore = 1, kMissingSyncInLoop = 2 };

// out[blockIdx.x] = sum of in[] over the block's range; blockDim.x a power of two <= 1024.
template <int kVariant>
__global__ void block_sum_kernel(const float* __restrict__ in, float* __restrict__ out, int n) {
  BSCONV_SHARED(float, partial, 1024);
  const unsigned t = threadIdx.x;
  const unsigned i = blockIdx.x * blockDim.x + t;
  partial[t] = i < static_cast<unsigned>(n) ? in[i] : 0.0f;
  if (kVariant != kMissingSyncAfterStore) __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (t < stride) partial[t] += partial[t + stride];
    if (kVariant != kMissingSyncInLoop) __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = partial[0];
}
