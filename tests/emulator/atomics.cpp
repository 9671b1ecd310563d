// Test 7: atomics from many threads and blocks give exact counts.
#include <vector>

#include "emu_test_util.h"

struct Counters {
  int i;
  unsigned u;
  unsigned long long ull;
  float f;
  double d;
  int max_seen;
  unsigned cas_winners;
};

__global__ void count_kernel(Counters* c, int* histogram, int iterations) {
  BSCONV_SHARED(int, block_hist, 16);
  const unsigned t = threadIdx.x;
  if (t < 16) block_hist[t] = 0;
  __syncthreads();
  const int gid = static_cast<int>(blockIdx.x * blockDim.x + t);
  for (int k = 0; k < iterations; ++k) {
    atomicAdd(&c->i, 1);
    atomicAdd(&c->u, 2u);
    atomicAdd(&c->ull, 3ull);
    atomicAdd(&c->f, 1.0f);
    atomicAdd(&c->d, 0.5);
    atomicAdd(&block_hist[(gid + k) % 16], 1);  // shared-memory atomics
  }
  atomicMax(&c->max_seen, gid);
  if (atomicCAS(&c->cas_winners, 0u, 1u) == 0u)
    atomicAdd(&c->cas_winners, 1u);  // exactly one winner
  __syncthreads();
  if (t < 16) atomicAdd(&histogram[t], block_hist[t]);
}

int main() {
  const int grid = 8, block = 256, iterations = 50;
  emu::GuardedBuffer<Counters> c(1, "counters");
  std::memset(c.data(), 0, sizeof(Counters));
  emu::GuardedBuffer<int> hist(std::vector<int>(16, 0), "histogram");
  emu::launch(grid, block, 0, count_kernel, c.data(), hist.data(), iterations);
  const long long total = static_cast<long long>(grid) * block * iterations;
  long long hist_sum = 0;
  for (int b = 0; b < 16; ++b) hist_sum += hist[b];
  std::printf("expected %lld\n", total);
  std::printf("int %d\nunsigned %u\null %llu\nfloat %.1f\ndouble %.1f\nhistogram %lld\n", c[0].i,
              c[0].u, c[0].ull, static_cast<double>(c[0].f), c[0].d, hist_sum);
  std::printf("max %d\ncas_winners %u\n", c[0].max_seen, c[0].cas_winners);
  return 0;
}
