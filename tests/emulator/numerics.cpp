// Conversions: float -> half / bf16 (round to nearest even), float -> tf32 (nearest, ties away),
// and half / bf16 -> float for all 65536 bit patterns. Reads float32 values from argv[1] and writes
//   n x uint16 half bits, n x uint16 bf16 bits, n x float32 tf32 values,
//   65536 x float32 half->float, 65536 x float32 bf16->float
// to argv[2]; the Python test compares them with numpy and an independent reference.
#include <cstdio>
#include <vector>

#include "emu_test_util.h"

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  std::FILE* in = std::fopen(argv[1], "rb");
  if (in == nullptr) return 3;
  std::vector<float> values;
  float v;
  while (std::fread(&v, sizeof(v), 1, in) == 1) values.push_back(v);
  std::fclose(in);
  std::vector<unsigned short> half_bits, bf16_bits;
  std::vector<float> tf32, half_to_float, bf16_to_float;
  for (float x : values) {
    half_bits.push_back(__half_as_ushort(__float2half(x)));
    bf16_bits.push_back(__bfloat16_as_ushort(__float2bfloat16(x)));
    tf32.push_back(nvcuda::wmma::__float_to_tf32(x));
  }
  for (unsigned b = 0; b < 65536; ++b) {
    half_to_float.push_back(__half2float(__ushort_as_half(static_cast<unsigned short>(b))));
    bf16_to_float.push_back(__bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(b))));
  }
  std::FILE* out = std::fopen(argv[2], "wb");
  if (out == nullptr) return 3;
  std::fwrite(half_bits.data(), 2, half_bits.size(), out);
  std::fwrite(bf16_bits.data(), 2, bf16_bits.size(), out);
  std::fwrite(tf32.data(), 4, tf32.size(), out);
  std::fwrite(half_to_float.data(), 4, half_to_float.size(), out);
  std::fwrite(bf16_to_float.data(), 4, bf16_to_float.size(), out);
  std::fclose(out);
  std::printf("converted %zu\n", values.size());
  return 0;
}
