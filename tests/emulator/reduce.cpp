// Tests 1 and 2: block reduction through shared memory, correct and with a missing barrier.
//   reduce correct              exact sums for several block and grid sizes
//   reduce correct_small        the same for two small configurations (for the ThreadSanitizer
//   build) reduce racy <variant> <n>   run the racy variant with seeds 1..n, report wrong blocks
//   per seed
#include <cmath>
#include <cstdlib>
#include <vector>

#include "emu_test_util.h"
#include "reduce_kernels.cuh"

template <int kVariant>
static int count_wrong_blocks(int block, int grid, int* nan_blocks) {
  const int n = grid * block - block / 3;  // partial last block
  std::vector<float> h(n);
  for (int i = 0; i < n; ++i) h[i] = static_cast<float>(1 + i % 7);  // positive: a lost term shows
  emu::GuardedBuffer<float> in(h, "in"), out(grid, "out");
  BSCONV_LAUNCH(block_sum_kernel<kVariant>, grid, block, 0, nullptr, in.data(), out.data(), n);
  int wrong = 0;
  *nan_blocks = 0;
  for (int b = 0; b < grid; ++b) {
    double exact = 0;  // small integers: the float sum is exact, so compare exactly
    for (int i = b * block; i < std::min(n, (b + 1) * block); ++i) exact += h[i];
    if (std::isnan(out[b])) ++*nan_blocks;
    if (!(out[b] == exact)) ++wrong;
  }
  return wrong;
}

int main(int argc, char** argv) {
  if (mode_is(argc, argv, "correct")) {
    for (int block : {32, 128, 256, 1024}) {
      for (int grid : {1, 3, 8}) {
        int nans = 0;
        const int wrong = count_wrong_blocks<kBlockSumCorrect>(block, grid, &nans);
        std::printf("block %d grid %d wrong %d\n", block, grid, wrong);
      }
    }
    return 0;
  }
  if (mode_is(argc, argv, "correct_small")) {
    for (int block : {32, 256}) {
      int nans = 0;
      std::printf("block %d grid 2 wrong %d\n", block,
                  count_wrong_blocks<kBlockSumCorrect>(block, 2, &nans));
    }
    return 0;
  }
  if (mode_is(argc, argv, "racy") && argc == 4) {
    const int variant = std::atoi(argv[2]), seeds = std::atoi(argv[3]);
    for (int seed = 1; seed <= seeds; ++seed) {
      emu::set_seed(static_cast<uint64_t>(seed));
      int nans = 0;
      const int wrong = variant == 1 ? count_wrong_blocks<kMissingSyncAfterStore>(256, 4, &nans)
                                     : count_wrong_blocks<kMissingSyncInLoop>(256, 4, &nans);
      std::printf("seed %d wrong %d nan %d\n", seed, wrong, nans);
    }
    return 0;
  }
  std::fprintf(stderr,
               "usage: reduce correct | reduce correct_small | reduce racy <1|2> <seeds>\n");
  return 2;
}
