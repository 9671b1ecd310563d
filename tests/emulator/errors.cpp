// Test 9 and friends: misuse is reported as an emu::Error with a clear message, never a hang.
// Every mode runs one failing launch, then a correct launch to show the emulator is still usable.
#include <vector>

#include "emu_test_util.h"

// Threads 16.. return early; the others wait at a barrier that can never complete.
__global__ void early_exit_barrier_kernel(int* out) {
  if (threadIdx.x >= 16) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Odd and even threads wait at different __syncthreads calls.
__global__ void two_barriers_kernel(int* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Lanes 16-31 leave, lanes 0-15 then shuffle with the full mask.
__global__ void shuffle_after_exit_kernel(int* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_sync(0xFFFFFFFFu, static_cast<int>(threadIdx.x), 0);
}

// Warp 1 lanes 0-15 wait in a full-warp shuffle for lanes 16-31, which wait at the barrier with
// everybody else: nobody can proceed.
__global__ void deadlock_kernel(int* out) {
  const unsigned t = threadIdx.x;
  if (t >= 32 && t < 48) out[t] = __shfl_sync(0xFFFFFFFFu, static_cast<int>(t), 0);
  __syncthreads();
  out[t] = 1;
}

// Thread 0 spins on a flag nobody sets while the rest wait at a barrier: only a timeout ends it.
__global__ void spin_forever_kernel(volatile int* flag, int* out) {
  if (threadIdx.x == 0) {
    while (*flag == 0) __nanosleep(1000);
  }
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void bad_width_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0xFFFFFFFFu, 1, 0, 12);
}

__global__ void ok_kernel(int* out) {
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = static_cast<int>(threadIdx.x);
}

int main(int argc, char** argv) {
  emu::GuardedBuffer<int> out(std::vector<int>(1024, 0), "out");
  emu::GuardedBuffer<int> flag(std::vector<int>(1, 0), "flag");
  if (argc < 2) return 2;
  const std::string mode = argv[1];
  if (mode == "early_exit") {
    report_error(argv[1], [&] { emu::launch(2, 64, 0, early_exit_barrier_kernel, out.data()); });
  } else if (mode == "two_barriers") {
    report_error(argv[1], [&] { emu::launch(1, 64, 0, two_barriers_kernel, out.data()); });
  } else if (mode == "shuffle_after_exit") {
    report_error(argv[1], [&] { emu::launch(1, 64, 0, shuffle_after_exit_kernel, out.data()); });
  } else if (mode == "deadlock") {
    report_error(argv[1], [&] { emu::launch(1, 64, 0, deadlock_kernel, out.data()); });
  } else if (mode == "timeout") {
    emu::config().wait_timeout_s = 1.0;
    report_error(argv[1],
                 [&] { emu::launch(1, 64, 0, spin_forever_kernel, flag.data(), out.data()); });
  } else if (mode == "bad_width") {
    report_error(argv[1], [&] { emu::launch(1, 32, 0, bad_width_kernel, out.data()); });
  } else if (mode == "bad_config") {
    report_error(argv[1], [&] { emu::launch(1, 2048, 0, ok_kernel, out.data()); });
  } else if (mode == "host_call") {
    report_error(argv[1], [&] { __syncthreads(); });
  } else {
    return 2;
  }
  // The emulator must still work after the failure.
  report_error("recovery", [&] { emu::launch(4, 256, 0, ok_kernel, out.data()); });
  bool ok = true;
  for (int i = 0; i < 1024; ++i) ok = ok && out[i] == i % 256;
  std::printf("recovery result %s\n", ok ? "correct" : "wrong");
  return 0;
}
