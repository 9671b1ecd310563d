// Compiled by nvcc in the test suite (compile only; there is no GPU): the kernel headers the
// emulator tests run must also build as real CUDA, with torch's half/bf16 restrictions.
#include "reduce_kernels.cuh"
#include "wmma_kernels.cuh"

void launch_portable_kernels(const float* in, float* out, int n, const void* a, const void* b,
                             const float* c0, float* c, cudaStream_t stream) {
  BSCONV_LAUNCH(block_sum_kernel<kBlockSumCorrect>, n / 256, 256, 0, stream, in, out, n);
  BSCONV_LAUNCH((wmma_gemm_kernel<__half, 16, nvcuda::wmma::col_major>), 1, 64, 0, stream,
                static_cast<const __half*>(a), static_cast<const __half*>(b), c0, c, 64, 2, 1);
  BSCONV_LAUNCH((wmma_gemm_kernel<__nv_bfloat16, 16, nvcuda::wmma::row_major>), 1, 64, 0, stream,
                static_cast<const __nv_bfloat16*>(a), static_cast<const __nv_bfloat16*>(b), c0, c,
                64, 2, 0);
  BSCONV_LAUNCH((wmma_gemm_kernel<nvcuda::wmma::precision::tf32, 8, nvcuda::wmma::row_major>), 1,
                64, 0, stream, static_cast<const float*>(a), static_cast<const float*>(b), c0, c,
                64, 2, 0);
}
