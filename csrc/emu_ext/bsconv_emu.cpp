// The CUDA kernels compiled by the host compiler under the CUDA emulator, exposed as the ops
// bsconv_fused_emu::forward / backward on CPU tensors (tests only). Same host logic
// (cuda/host_ops.h), same launch configuration and launch code (cuda/tile_config.h,
// cuda/launchers.h) and the same kernel source (cuda/bsconv_kernels.cuh) as the GPU build; every
// buffer a kernel touches is a guarded copy, checked after each launch.
#include <Python.h>
#include <torch/library.h>

#include <map>
#include <memory>

#include "cuda/host_ops.h"

namespace bsconv::cuda {
namespace {

class EmulatorBackend {
 public:
  EmulatorBackend(int64_t smem_bytes, int64_t num_sms) {
    limits_.smem_bytes = smem_bytes;
    limits_.num_sms = num_sms;
  }
  Limits limits() const { return limits_; }
  cudaStream_t stream() const { return nullptr; }
  at::TensorOptions opts(const at::Tensor& x) const { return x.options(); }
  template <typename T>
  int proj() const {
    return default_proj<T>(false);
  }

  template <typename T>
  T* in(const at::Tensor& t) {
    return buffer<T>(t, false);
  }
  template <typename T>
  T* out(at::Tensor& t) {
    return buffer<T>(t, true);
  }

  // Copies every written buffer back into its tensor.
  void finish() {
    for (auto& e : entries_) {
      if (e.second.copy_back) e.second.copy_back();
    }
  }

 private:
  struct Entry {
    std::shared_ptr<void> buffer;
    std::function<void()> copy_back;
    void* data = nullptr;
  };

  // One guarded buffer per tensor storage span (reused when a tensor is both written and read).
  template <typename T>
  T* buffer(const at::Tensor& t, bool written) {
    TORCH_CHECK(t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast),
                "emulator buffers must be dense");
    const void* key = t.data_ptr();
    auto it = entries_.find(key);
    if (it == entries_.end()) {
      const size_t n = size_t(t.numel());
      const T* src = static_cast<const T*>(t.data_ptr());
      auto buf = std::make_shared<emu::GuardedBuffer<T>>(std::vector<T>(src, src + n), "tensor");
      Entry e;
      e.data = buf->data();
      e.buffer = buf;
      it = entries_.emplace(key, std::move(e)).first;
    }
    if (written && !it->second.copy_back) {
      auto buf = std::static_pointer_cast<emu::GuardedBuffer<T>>(it->second.buffer);
      at::Tensor target = t;
      it->second.copy_back = [buf, target]() mutable {
        std::memcpy(target.data_ptr(), buf->data(), buf->size() * sizeof(T));
      };
    }
    return static_cast<T*>(it->second.data);
  }

  Limits limits_;
  std::map<const void*, Entry> entries_;
};

at::Tensor forward_emu(const at::Tensor& x, const at::Tensor& pw1,
                       const std::optional<at::Tensor>& pw2, const at::Tensor& dw,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& scale,
                       const std::optional<at::Tensor>& shift, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t padding_mode,
                       int64_t activation, int64_t proj, int64_t smem_bytes, int64_t seed) {
  emu::set_seed(uint64_t(seed));
  EmulatorBackend be(smem_bytes, 4);
  try {
    return forward_impl(be, x, pw1, pw2, dw, bias, scale, shift, stride, padding, dilation,
                        padding_mode, activation, int(proj));
  } catch (const emu::Error& e) {
    TORCH_CHECK(false, "CUDA emulator: ", e.what());
  }
}

GradTuple backward_emu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& pw1,
                       const std::optional<at::Tensor>& pw2, const at::Tensor& dw,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& scale,
                       const std::optional<at::Tensor>& shift, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t padding_mode,
                       int64_t activation, std::array<bool, 7> output_mask, bool deterministic,
                       int64_t proj, int64_t smem_bytes, int64_t seed) {
  emu::set_seed(uint64_t(seed));
  EmulatorBackend be(smem_bytes, 4);
  try {
    return backward_impl(be, grad_y, x, pw1, pw2, dw, bias, scale, shift, stride, padding,
                         dilation, padding_mode, activation, output_mask, deterministic,
                         int(proj));
  } catch (const emu::Error& e) {
    TORCH_CHECK(false, "CUDA emulator: ", e.what());
  }
}

// The launch configuration the real launcher would use, for tests of the config function and
// the traffic model: [ok, grid, block, smem, tasks] forward, the same backward, then the forward
// tile (th, tw), channel chunk, patch (ph, pw), the backward tile (th, tw), and the forward's
// channel chunks per task.
std::vector<int64_t> config_emu(const at::Tensor& x, const at::Tensor& pw1,
                                const std::optional<at::Tensor>& pw2, const at::Tensor& dw,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, int64_t padding_mode, int64_t proj,
                                int64_t smem_bytes, bool deterministic, int64_t num_sms) {
  const Geometry g = make_geometry("config", x, pw1, pw2, dw, {}, {}, {}, stride, padding,
                                   dilation, padding_mode, 0);
  Limits lim;
  lim.smem_bytes = smem_bytes;
  lim.num_sms = num_sms;
  const int64_t es = int64_t(x.element_size());
  const ForwardConfig f = forward_config(g, int(proj), es, lim);
  const BackwardConfig b = backward_config(g, int(proj), es, deterministic, lim);
  return {f.ok, f.grid, f.block, int64_t(f.smem.total), f.tasks,
          b.ok, b.grid, b.block, int64_t(b.smem.total), b.tasks,
          f.th, f.tw, f.nc, f.ph, f.pw, b.th, b.tw, f.group};
}

}  // namespace

TORCH_LIBRARY(bsconv_fused_emu, m) {
  m.def(
      "forward(Tensor x, Tensor pw1_weight, Tensor? pw2_weight, Tensor dw_weight, "
      "Tensor? dw_bias, Tensor? mid_scale, Tensor? mid_shift, int[2] stride, int[4] padding, "
      "int[2] dilation, int padding_mode, int activation, int proj, int smem_bytes, int seed) "
      "-> Tensor");
  m.def(
      "backward(Tensor grad_y, Tensor x, Tensor pw1_weight, Tensor? pw2_weight, "
      "Tensor dw_weight, Tensor? dw_bias, Tensor? mid_scale, Tensor? mid_shift, int[2] stride, "
      "int[4] padding, int[2] dilation, int padding_mode, int activation, bool[7] output_mask, "
      "bool deterministic, int proj, int smem_bytes, int seed) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "config(Tensor x, Tensor pw1_weight, Tensor? pw2_weight, Tensor dw_weight, int[2] stride, "
      "int[4] padding, int[2] dilation, int padding_mode, int proj, int smem_bytes, "
      "bool deterministic, int num_sms=108) -> int[]");
}

TORCH_LIBRARY_IMPL(bsconv_fused_emu, CPU, m) {
  m.impl("forward", &forward_emu);
  m.impl("backward", &backward_emu);
  m.impl("config", &config_emu);
}

}  // namespace bsconv::cuda

extern "C" {
PyObject* PyInit__emu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_emu", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
