// Test 5: warp shuffles, votes, __syncwarp and __activemask against straightforward host-side
// expectations (which spell out the CUDA definitions lane by lane).
#include <cmath>
#include <functional>
#include <vector>

#include "emu_test_util.h"

constexpr int kCols = 18;
constexpr unsigned kFull = 0xFFFFFFFFu;

__global__ void warp_ops_kernel(double* out) {
  BSCONV_SHARED(int, scratch, 1024);
  const unsigned t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int gtid = static_cast<int>(blockIdx.x * blockDim.x + t);
  const int v = gtid * 10 + 1;
  double* o = out + static_cast<size_t>(gtid) * kCols;
  o[0] = __shfl_sync(kFull, v, static_cast<int>((lane * 7 + 3) % 32));
  o[1] = __shfl_sync(kFull, v, 2, 8);
  o[2] = __shfl_up_sync(kFull, v, 3);
  o[3] = __shfl_down_sync(kFull, v, 5, 16);
  o[4] = __shfl_xor_sync(kFull, v, 13);
  o[5] = __shfl_xor_sync(kFull, v, 4, 8);
  o[6] = __shfl_sync(kFull, static_cast<float>(v) * 0.5f, static_cast<int>(31 - lane));
  o[7] = __shfl_down_sync(kFull, static_cast<double>(v) * 0.25, 1);
  o[8] = __ballot_sync(kFull, lane % 3 == 0);
  o[9] = __any_sync(kFull, lane == 31 && warp == 1);
  o[10] = __all_sync(kFull, v > 0);
  o[11] = __all_sync(kFull, lane != 7);
  int sum = v;
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(kFull, sum, offset);
  o[12] = sum;
  o[13] = __activemask();
  // Two disjoint groups of lanes shuffle independently.
  o[14] = lane < 16 ? __shfl_sync(0x0000FFFFu, v, 15) : __shfl_sync(0xFFFF0000u, v, 16);
  // Lanes 0-15 read lane 20, which is not in their mask: the emulator returns poison (NaN).
  o[15] = lane < 16 ? __shfl_sync(0x0000FFFFu, static_cast<float>(v), 20)
                    : __shfl_sync(0xFFFF0000u, static_cast<float>(v), 20);
  scratch[t] = v;
  __syncwarp();
  o[16] = scratch[warp * 32 + (lane + 1) % 32];
  o[17] = __shfl_up_sync(kFull, v, 1, 4);
}

// A block of 48 threads: warp 1 has only lanes 0-15.
__global__ void partial_warp_kernel(double* out) {
  const unsigned t = threadIdx.x;
  const float v = static_cast<float>(t * 10 + 1);
  double* o = out + static_cast<size_t>(t) * 4;
  o[0] = __activemask();
  o[1] = __ballot_sync(kFull, 1);
  o[2] = __shfl_down_sync(kFull, v, 8);
  o[3] = __all_sync(kFull, 1);
}

int main() {
  int checks = 0, mismatches = 0;
  auto expect = [&](const char* what, int thread, double got, double want) {
    ++checks;
    const bool same = (std::isnan(want) && std::isnan(got)) || got == want;
    if (!same && ++mismatches <= 20)
      std::printf("MISMATCH %s thread %d: got %.17g want %.17g\n", what, thread, got, want);
  };

  const int grid = 2, block = 64, nthreads = grid * block;
  emu::GuardedBuffer<double> out(static_cast<size_t>(nthreads) * kCols, "out");
  emu::launch(grid, block, 0, warp_ops_kernel, out.data());
  auto value = [](int gtid) { return gtid * 10 + 1; };
  for (int g = 0; g < nthreads; ++g) {
    const int t = g % block, lane = t % 32, warp = t / 32,
              base = g - lane;  // base: lane 0 of the warp
    const double* o = &out[static_cast<size_t>(g) * kCols];
    expect("shfl idx", g, o[0], value(base + (lane * 7 + 3) % 32));
    expect("shfl width 8", g, o[1], value(base + (lane & ~7) + 2));
    expect("shfl_up 3", g, o[2], value(lane >= 3 ? g - 3 : g));
    expect("shfl_down 5 width 16", g, o[3], value(lane % 16 + 5 < 16 ? g + 5 : g));
    expect("shfl_xor 13", g, o[4], value(base + (lane ^ 13)));
    expect("shfl_xor 4 width 8", g, o[5], value(base + (lane ^ 4)));
    expect("shfl float", g, o[6], static_cast<float>(value(base + 31 - lane)) * 0.5f);
    expect("shfl_down double", g, o[7], value(lane < 31 ? g + 1 : g) * 0.25);
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l) ballot |= (l % 3 == 0 ? 1u : 0u) << l;
    expect("ballot", g, o[8], ballot);
    expect("any", g, o[9], warp == 1 ? 1 : 0);
    expect("all true", g, o[10], 1);
    expect("all false", g, o[11], 0);
    std::vector<int> sums(32);
    for (int l = 0; l < 32; ++l) sums[l] = value(base + l);
    for (int offset = 16; offset > 0; offset /= 2) {
      std::vector<int> next(32);
      for (int l = 0; l < 32; ++l)
        next[l] = sums[l] + (l + offset < 32 ? sums[l + offset] : sums[l]);
      sums = next;
    }
    expect("reduction", g, o[12], sums[lane]);
    expect("activemask", g, o[13], 0xFFFFFFFFu);
    expect("disjoint groups", g, o[14], value(base + (lane < 16 ? 15 : 16)));
    expect("source outside mask", g, o[15], lane < 16 ? NAN : static_cast<float>(value(base + 20)));
    expect("syncwarp orders shared memory", g, o[16], value(base + (lane + 1) % 32));
    expect("shfl_up 1 width 4", g, o[17], value(lane % 4 >= 1 ? g - 1 : g));
  }

  emu::GuardedBuffer<double> pout(48 * 4, "partial_out");
  emu::launch(1, 48, 0, partial_warp_kernel, pout.data());
  for (int t = 0; t < 48; ++t) {
    const int lane = t % 32, warp = t / 32;
    const double* o = &pout[static_cast<size_t>(t) * 4];
    const double lanes_mask = warp == 0 ? 0xFFFFFFFFu : 0x0000FFFFu;
    expect("partial activemask", t, o[0], lanes_mask);
    expect("partial ballot", t, o[1], lanes_mask);
    const bool source_exists = warp == 0 || lane + 8 < 16;  // warp 1 has no lanes 16-31
    const int src = lane + 8 < 32 ? t + 8 : t;              // past lane 31: the own value
    expect("partial shfl_down", t, o[2], source_exists ? static_cast<float>(src * 10 + 1) : NAN);
    expect("partial all", t, o[3], 1);
  }
  std::printf("checks %d mismatches %d\n", checks, mismatches);
  return mismatches == 0 ? 0 : 1;
}
