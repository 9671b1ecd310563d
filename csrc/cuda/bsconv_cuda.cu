// CUDA implementations of bsconv_fused::forward / backward: the shared host logic (host_ops.h)
// on device pointers and the current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/host_ops.h"

namespace bsconv::cuda {
namespace {

class CudaBackend {
 public:
  explicit CudaBackend(const at::Tensor& x) : guard_(x.device()) {
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    limits_.smem_bytes = int64_t(prop->sharedMemPerBlockOptin);
    limits_.num_sms = prop->multiProcessorCount;
  }
  Limits limits() const { return limits_; }
  cudaStream_t stream() const { return at::cuda::getCurrentCUDAStream(); }
  at::TensorOptions opts(const at::Tensor& x) const { return x.options(); }
  template <typename T>
  int proj() const {
    return default_proj<T>(at::globalContext().allowTF32CuDNN());
  }
  template <typename T>
  T* in(const at::Tensor& t) const {
    return static_cast<T*>(const_cast<void*>(t.data_ptr()));
  }
  template <typename T>
  T* out(at::Tensor& t) const {
    return static_cast<T*>(t.data_ptr());
  }
  void finish() const {}

 private:
  c10::cuda::CUDAGuard guard_;
  Limits limits_;
};

at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& pw1,
                        const std::optional<at::Tensor>& pw2, const at::Tensor& dw,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& scale,
                        const std::optional<at::Tensor>& shift, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t padding_mode,
                        int64_t activation) {
  CudaBackend be(x);
  return forward_impl(be, x, pw1, pw2, dw, bias, scale, shift, stride, padding, dilation,
                      padding_mode, activation, -1);
}

GradTuple backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& pw1,
                        const std::optional<at::Tensor>& pw2, const at::Tensor& dw,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& scale,
                        const std::optional<at::Tensor>& shift, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t padding_mode,
                        int64_t activation, std::array<bool, 7> output_mask) {
  CudaBackend be(x);
  return backward_impl(be, grad_y, x, pw1, pw2, dw, bias, scale, shift, stride, padding,
                       dilation, padding_mode, activation, output_mask,
                       at::globalContext().deterministicAlgorithms(), -1);
}

}  // namespace

TORCH_LIBRARY_IMPL(bsconv_fused, CUDA, m) {
  m.impl("forward", &forward_cuda);
  m.impl("backward", &backward_cuda);
}

}  // namespace bsconv::cuda
