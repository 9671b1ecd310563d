// The float kernels (forward and backward, every projection mode and kernel-shape specialization).
#include "cuda/launchers.h"

namespace bsconv::cuda {
template void launch_forward<float>(const ForwardParams<float>&, const ForwardConfig&, int,
                                 cudaStream_t);
template void launch_backward<float>(const BackwardParams<float>&, const BackwardConfig&, int,
                                  cudaStream_t);
}  // namespace bsconv::cuda
