// The __nv_bfloat16 kernels (forward and backward, every projection mode and kernel-shape specialization).
#include "cuda/launchers.h"

namespace bsconv::cuda {
template void launch_forward<__nv_bfloat16>(const ForwardParams<__nv_bfloat16>&, const ForwardConfig&, int,
                                 cudaStream_t);
template void launch_backward<__nv_bfloat16>(const BackwardParams<__nv_bfloat16>&, const BackwardConfig&, int,
                                  cudaStream_t);
}  // namespace bsconv::cuda
