// The __half kernels (forward and backward, every projection mode and kernel-shape specialization).
#include "cuda/launchers.h"

namespace bsconv::cuda {
template void launch_forward<__half>(const ForwardParams<__half>&, const ForwardConfig&, int,
                                 cudaStream_t);
template void launch_backward<__half>(const BackwardParams<__half>&, const BackwardConfig&, int,
                                  cudaStream_t);
}  // namespace bsconv::cuda
