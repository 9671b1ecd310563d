// Runs the real forward kernel (csrc/cuda/bsconv_kernels.cuh, built with -DBSCONV_PLANT=k) under
// the CUDA emulator on guarded buffers and compares with a direct float64 BSConv-U. Prints
// "maxerr=<e> nan=<count> error=<0|1> <message>".
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/launchers.h"

using namespace bsconv;
using namespace bsconv::cuda;

int main(int argc, char** argv) {
  emu::set_seed(argc > 1 ? std::strtoull(argv[1], nullptr, 0) : 1);
  Geometry g;
  g.B = 2, g.M = 5, g.N = 8, g.H = 9, g.W = 7, g.Kh = 3, g.Kw = 3;
  g.pt = g.pb = g.pl = g.pr = 1;
  g.has_bias = true;
  g.Ho = conv_out_size(g.H, 1, 1, 3, 1, 1);
  g.Wo = conv_out_size(g.W, 1, 1, 3, 1, 1);
  std::mt19937 rng(7);
  std::normal_distribution<double> nd;
  auto rnd = [&](size_t n) {
    std::vector<double> v(n);
    for (auto& e : v) e = nd(rng);
    return v;
  };
  const auto xv = rnd(g.B * g.M * g.H * g.W), wv = rnd(g.N * g.M), dv = rnd(g.N * 9),
             bv = rnd(g.N);
  emu::GuardedBuffer<double> x(xv, "x"), w(wv, "w1"), d(dv, "dw"), b(bv, "bias");
  emu::GuardedBuffer<double> y(size_t(g.B * g.N * g.Ho * g.Wo), "y");
  Limits lim;
  lim.smem_bytes = 48 * 1024;
  lim.num_sms = 4;
  const ForwardConfig c = forward_config(g, kSimt, 8, lim);
  ForwardParams<double> p{};
  p.in.x = x.data();
  p.in.xs[0] = g.M * g.H * g.W, p.in.xs[1] = g.H * g.W, p.in.xs[2] = g.W, p.in.xs[3] = 1;
  p.in.w1 = w.data();
  p.in.dw = d.data();
  p.in.bias = b.data();
  p.y = y.data();
  p.ys[0] = g.N * g.Ho * g.Wo, p.ys[1] = g.Ho * g.Wo, p.ys[2] = g.Wo, p.ys[3] = 1;
  p.g = g;
  p.t = c;
  int error = 0;
  std::string message;
  try {
    launch_forward(p, c, kSimt, nullptr);
  } catch (const std::exception& e) {
    error = 1;
    message = e.what();
  }
  double maxerr = 0;
  long nan = 0;
  for (int64_t bi = 0; bi < g.B; ++bi)
    for (int64_t n = 0; n < g.N; ++n)
      for (int64_t i = 0; i < g.Ho; ++i)
        for (int64_t j = 0; j < g.Wo; ++j) {
          double acc = bv[n];
          for (int64_t kh = 0; kh < 3; ++kh)
            for (int64_t kw = 0; kw < 3; ++kw) {
              const int64_t r = i + kh - 1, s = j + kw - 1;
              if (r < 0 || r >= g.H || s < 0 || s >= g.W) continue;
              double v = 0;
              for (int64_t m = 0; m < g.M; ++m)
                v += wv[n * g.M + m] * xv[((bi * g.M + m) * g.H + r) * g.W + s];
              acc += dv[n * 9 + kh * 3 + kw] * v;
            }
          const double got = y[size_t(((bi * g.N + n) * g.Ho + i) * g.Wo + j)];
          if (std::isnan(got)) ++nan;
          else maxerr = std::max(maxerr, std::fabs(got - acc));
        }
  for (char& ch : message) if (ch == '\n') ch = ' ';
  std::printf("maxerr=%.3g nan=%ld error=%d %s\n", maxerr, nan, error, message.c_str());
  return 0;
}
