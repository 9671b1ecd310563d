// Tests 3 and 4: out-of-bounds global memory accesses against GuardedBuffer.
//   guards write_after    kernel writes out[n]: the launch fails (automatic guard check)
//   guards write_before   kernel writes out[-1], auto-check off: GuardedBuffer::check() reports it
//   guards read           kernel reads in[-1] and in[n]: those outputs are NaN (float) / -1 (int)
//   guards clean          a correct kernel: no report, and check() passes
#include <cmath>
#include <vector>

#include "emu_test_util.h"

// out[i] = in[i + read_shift] for i < n; optionally one planted out-of-bounds write.
__global__ void shifted_copy_kernel(const float* in, float* out, int n, int read_shift,
                                    int bad_write_index) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) out[i] = in[i + read_shift];
  if (bad_write_index != 0 && i == 0) out[bad_write_index] = 1.0f;
}

__global__ void shifted_copy_int_kernel(const int* in, int* out, int n, int read_shift) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) out[i] = in[i + read_shift];
}

int main(int argc, char** argv) {
  const int n = 100;
  std::vector<float> h(n);
  for (int i = 0; i < n; ++i) h[i] = static_cast<float>(i);
  if (mode_is(argc, argv, "write_after")) {
    emu::GuardedBuffer<float> in(h, "in"), out(n, "out");
    report_error("write_after", [&] {
      emu::launch(4, 32, 0, shifted_copy_kernel, in.data(), out.data(), n, 0, n);
    });
    report_error("after_report_guards_restored", [&] { out.check(); });
    return 0;
  }
  if (mode_is(argc, argv, "write_before")) {
    emu::config().check_guards_after_launch = false;
    emu::GuardedBuffer<float> in(h, "in"), out(n, "out");
    report_error("launch", [&] {
      emu::launch(4, 32, 0, shifted_copy_kernel, in.data(), out.data(), n, 0, -1);
    });
    report_error("check_in", [&] { in.check(); });
    report_error("check_out", [&] { out.check(); });
    return 0;
  }
  if (mode_is(argc, argv, "read")) {
    for (int shift : {-1, 1}) {
      emu::GuardedBuffer<float> in(h, "in"), out(n, "out");
      emu::launch(4, 32, 0, shifted_copy_kernel, in.data(), out.data(), n, shift, 0);
      std::printf("float shift %d nan_at", shift);
      for (int i = 0; i < n; ++i) {
        if (std::isnan(out[i])) std::printf(" %d", i);
      }
      std::printf("\n");
    }
    std::vector<int> hi(n, 7);
    emu::GuardedBuffer<int> in(hi, "in_int"), out(n, "out_int");
    emu::launch(4, 32, 0, shifted_copy_int_kernel, in.data(), out.data(), n, 1);
    std::printf("int shift 1 last %d first %d\n", out[n - 1], out[0]);
    return 0;
  }
  if (mode_is(argc, argv, "clean")) {
    emu::GuardedBuffer<float> in(h, "in"), out(n, "out");
    report_error("clean", [&] {
      emu::launch(4, 32, 0, shifted_copy_kernel, in.data(), out.data(), n, 0, 0);
      in.check();
      out.check();
    });
    bool same = true;
    for (int i = 0; i < n; ++i) same = same && out[i] == h[i];
    std::printf("copy %s\n", same ? "exact" : "wrong");
    return 0;
  }
  std::fprintf(stderr, "usage: guards write_after|write_before|read|clean\n");
  return 2;
}
