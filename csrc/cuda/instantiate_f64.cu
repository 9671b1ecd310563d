// The double kernels (forward and backward, every projection mode and kernel-shape specialization).
#include "cuda/launchers.h"

namespace bsconv::cuda {
template void launch_forward<double>(const ForwardParams<double>&, const ForwardConfig&, int,
                                 cudaStream_t);
template void launch_backward<double>(const BackwardParams<double>&, const BackwardConfig&, int,
                                  cudaStream_t);
}  // namespace bsconv::cuda
