// CUDA emulator, part 1: vector types, 16-bit floats, math and bit intrinsics, atomics.
//
// Everything here is plain host C++; nothing depends on the thread machinery, so these pieces
// behave identically whether they run inside an emulated kernel or in host test code.
// Only included through cuda_emu.h.
#pragma once

#include <math.h>  // CUDA code calls expf/fmaf/fminf... unqualified, in the global namespace

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>

// ------------------------------------------------------------------------------------------------
// Vector types (the subset kernels use for indexing and vectorized loads). Alignments match CUDA's
// so that reinterpret_cast<const float4*> on an under-aligned pointer is as wrong here as there.
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }

namespace emu {
namespace detail {

template <class To, class From>
inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// IEEE binary32 -> binary16, round to nearest, ties to even (what __float2half does).
inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) {  // inf stays inf; NaN stays a quiet NaN
    return static_cast<uint16_t>(sign |
                                 (ax > 0x7F800000u ? 0x7E00u | ((ax >> 13) & 0x3FFu) : 0x7C00u));
  }
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {               // below 2^-14: half subnormal (units of 2^-24) or zero
    if (ax < 0x33000000u) return sign;  // < 2^-25 rounds to zero (2^-25 itself ties to even 0)
    const uint32_t exp = ax >> 23;
    const uint32_t mant = (ax & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // value / 2^-24 = mant * 2^(exp-126)
    uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;  // may carry into the smallest normal
    return static_cast<uint16_t>(sign | q);
  }
  uint32_t r = ax - 0x38000000u;   // rebias exponent 127 -> 15
  r += 0xFFFu + ((r >> 13) & 1u);  // round to nearest even on the 13 dropped bits
  return static_cast<uint16_t>(sign | (r >> 13));
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24 is exact in float
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return bit_cast<float>(sign | 0x7F800000u | (mant << 13));
  return bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
}

// binary32 -> bfloat16, round to nearest even (what __float2bfloat16 does).
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = bit_cast<uint32_t>(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u)
    return static_cast<uint16_t>((x >> 16) | 0x0040u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_float(uint16_t b) {
  return bit_cast<float>(static_cast<uint32_t>(b) << 16);
}

}  // namespace detail
}  // namespace emu

// ------------------------------------------------------------------------------------------------
// __half and __nv_bfloat16: 16-bit storage, arithmetic through float. Like cuda_fp16.h, the
// implicit conversions and operators disappear when torch's build flags
// (__CUDA_NO_HALF_CONVERSIONS__ etc.) are defined, so kernel code that compiles here also compiles
// in the torch extension build.
struct __half_raw {
  unsigned short x;
};
struct __nv_bfloat16_raw {
  unsigned short x;
};

struct __half {
  unsigned short __x;  // CUDA's name for the storage
  __half() = default;  // trivial, so __half can live in shared memory
  constexpr __half(__half_raw r) : __x(r.x) {}
  constexpr operator __half_raw() const { return __half_raw{__x}; }
#if !defined(__CUDA_NO_HALF_CONVERSIONS__)
  __half(float f) : __x(emu::detail::float_to_half_bits(f)) {}
  __half(double d) : __x(emu::detail::float_to_half_bits(static_cast<float>(d))) {}
  operator float() const { return emu::detail::half_bits_to_float(__x); }
#endif
};

struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(__nv_bfloat16_raw r) : __x(r.x) {}
  constexpr operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
#if !defined(__CUDA_NO_BFLOAT16_CONVERSIONS__)
  __nv_bfloat16(float f) : __x(emu::detail::float_to_bf16_bits(f)) {}
  __nv_bfloat16(double d) : __x(emu::detail::float_to_bf16_bits(static_cast<float>(d))) {}
  operator float() const { return emu::detail::bf16_bits_to_float(__x); }
#endif
};
static_assert(sizeof(__half) == 2 && std::is_trivial<__half>::value, "__half must be 16-bit POD");
static_assert(sizeof(__nv_bfloat16) == 2 && std::is_trivial<__nv_bfloat16>::value,
              "__nv_bfloat16 must be 16-bit POD");

struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline __half __float2half(float f) { return __half_raw{emu::detail::float_to_half_bits(f)}; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __half2float(__half h) { return emu::detail::half_bits_to_float(h.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) {
  return __nv_bfloat16_raw{emu::detail::float_to_bf16_bits(f)};
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return emu::detail::bf16_bits_to_float(b.__x); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half_raw{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16_raw{u}; }
inline __half2 __floats2half2_rn(float a, float b) {
  return __half2{__float2half(a), __float2half(b)};
}
inline __half2 __float2half2_rn(float a) { return __floats2half2_rn(a, a); }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16(a), __float2bfloat16(b)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 b) {
  return float2{__bfloat162float(b.x), __bfloat162float(b.y)};
}

// Named arithmetic intrinsics exist regardless of __CUDA_NO_HALF_OPERATORS__ (as in CUDA).
#define EMU_DEFINE_16BIT_INTRINSICS(T, TO_F, FROM_F)                                     \
  inline T __hadd(T a, T b) { return FROM_F(TO_F(a) + TO_F(b)); }                        \
  inline T __hsub(T a, T b) { return FROM_F(TO_F(a) - TO_F(b)); }                        \
  inline T __hmul(T a, T b) { return FROM_F(TO_F(a) * TO_F(b)); }                        \
  inline T __hdiv(T a, T b) { return FROM_F(TO_F(a) / TO_F(b)); }                        \
  inline T __hfma(T a, T b, T c) { return FROM_F(std::fma(TO_F(a), TO_F(b), TO_F(c))); } \
  inline T __hneg(T a) { return FROM_F(-TO_F(a)); }                                      \
  inline T __habs(T a) { return FROM_F(std::fabs(TO_F(a))); }                            \
  inline T __hmax(T a, T b) { return FROM_F(std::fmax(TO_F(a), TO_F(b))); }              \
  inline T __hmin(T a, T b) { return FROM_F(std::fmin(TO_F(a), TO_F(b))); }              \
  inline bool __heq(T a, T b) { return TO_F(a) == TO_F(b); }                             \
  inline bool __hne(T a, T b) { return TO_F(a) != TO_F(b); }                             \
  inline bool __hlt(T a, T b) { return TO_F(a) < TO_F(b); }                              \
  inline bool __hle(T a, T b) { return TO_F(a) <= TO_F(b); }                             \
  inline bool __hgt(T a, T b) { return TO_F(a) > TO_F(b); }                              \
  inline bool __hge(T a, T b) { return TO_F(a) >= TO_F(b); }                             \
  inline bool __hisnan(T a) { return std::isnan(TO_F(a)); }
EMU_DEFINE_16BIT_INTRINSICS(__half, __half2float, __float2half)
EMU_DEFINE_16BIT_INTRINSICS(__nv_bfloat16, __bfloat162float, __float2bfloat16)
#undef EMU_DEFINE_16BIT_INTRINSICS

#define EMU_DEFINE_16BIT_OPERATORS(T, TO_F, FROM_F)                  \
  inline T operator+(T a, T b) { return FROM_F(TO_F(a) + TO_F(b)); } \
  inline T operator-(T a, T b) { return FROM_F(TO_F(a) - TO_F(b)); } \
  inline T operator*(T a, T b) { return FROM_F(TO_F(a) * TO_F(b)); } \
  inline T operator/(T a, T b) { return FROM_F(TO_F(a) / TO_F(b)); } \
  inline T operator-(T a) { return FROM_F(-TO_F(a)); }               \
  inline T& operator+=(T& a, T b) { return a = a + b; }              \
  inline T& operator-=(T& a, T b) { return a = a - b; }              \
  inline T& operator*=(T& a, T b) { return a = a * b; }              \
  inline T& operator/=(T& a, T b) { return a = a / b; }              \
  inline bool operator==(T a, T b) { return TO_F(a) == TO_F(b); }    \
  inline bool operator!=(T a, T b) { return TO_F(a) != TO_F(b); }    \
  inline bool operator<(T a, T b) { return TO_F(a) < TO_F(b); }      \
  inline bool operator<=(T a, T b) { return TO_F(a) <= TO_F(b); }    \
  inline bool operator>(T a, T b) { return TO_F(a) > TO_F(b); }      \
  inline bool operator>=(T a, T b) { return TO_F(a) >= TO_F(b); }
#if !defined(__CUDA_NO_HALF_OPERATORS__)
EMU_DEFINE_16BIT_OPERATORS(__half, __half2float, __float2half)
#endif
#if !defined(__CUDA_NO_BFLOAT16_OPERATORS__)
EMU_DEFINE_16BIT_OPERATORS(__nv_bfloat16, __bfloat162float, __float2bfloat16)
#endif
#undef EMU_DEFINE_16BIT_OPERATORS

// ------------------------------------------------------------------------------------------------
// Math intrinsics. The fast-math variants (__expf, __fdividef, ...) are computed exactly here;
// on a GPU they carry a few ulp of extra error, so tolerances must not be tuned to the emulator.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x > 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }  // NaN -> 0

// CUDA's overloaded min/max (device code calls them unqualified). Mixed signed/unsigned
// overloads promote to unsigned, as CUDA's math_functions.hpp does.
#define EMU_DEFINE_MINMAX(T)                       \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
EMU_DEFINE_MINMAX(int)
EMU_DEFINE_MINMAX(unsigned int)
EMU_DEFINE_MINMAX(long)
EMU_DEFINE_MINMAX(unsigned long)
EMU_DEFINE_MINMAX(long long)
EMU_DEFINE_MINMAX(unsigned long long)
#undef EMU_DEFINE_MINMAX
inline unsigned int min(int a, unsigned int b) { return min(static_cast<unsigned int>(a), b); }
inline unsigned int min(unsigned int a, int b) { return min(a, static_cast<unsigned int>(b)); }
inline unsigned int max(int a, unsigned int b) { return max(static_cast<unsigned int>(a), b); }
inline unsigned int max(unsigned int a, int b) { return max(a, static_cast<unsigned int>(b)); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(float a, double b) { return std::fmin(static_cast<double>(a), b); }
inline double min(double a, float b) { return std::fmin(a, static_cast<double>(b)); }
inline double max(float a, double b) { return std::fmax(static_cast<double>(a), b); }
inline double max(double a, float b) { return std::fmax(a, static_cast<double>(b)); }

// ------------------------------------------------------------------------------------------------
// Bit reinterpretation and bit counting.
inline float __int_as_float(int i) { return emu::detail::bit_cast<float>(i); }
inline int __float_as_int(float f) { return emu::detail::bit_cast<int>(f); }
inline float __uint_as_float(unsigned u) { return emu::detail::bit_cast<float>(u); }
inline unsigned __float_as_uint(float f) { return emu::detail::bit_cast<unsigned>(f); }
inline double __longlong_as_double(long long i) { return emu::detail::bit_cast<double>(i); }
inline long long __double_as_longlong(double d) { return emu::detail::bit_cast<long long>(d); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}

// ------------------------------------------------------------------------------------------------
// Memory access helpers.
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline long long clock64() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// ------------------------------------------------------------------------------------------------
// Atomics: real hardware atomics through the GCC __atomic builtins (sequentially consistent,
// stronger than CUDA's relaxed device atomics, which only hides nothing that matters for counts).
// Floating-point adds are compare-and-swap loops over the bit pattern, like CUDA's own fallback.
namespace emu {
namespace detail {
template <class T, class Op>
inline T atomic_update(T* address, Op op) {
  T old;
  __atomic_load(address, &old, __ATOMIC_SEQ_CST);
  T desired = op(old);
  while (!__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST)) {
    desired = op(old);  // `old` was refreshed by the failed exchange
  }
  return old;
}
}  // namespace detail
}  // namespace emu

#define EMU_DEFINE_INT_ATOMICS(T)                                                           \
  inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }      \
  inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }      \
  inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }      \
  inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }        \
  inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }      \
  inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }    \
  inline T atomicMin(T* p, T v) {                                                           \
    return emu::detail::atomic_update(p, [v](T old) { return v < old ? v : old; });         \
  }                                                                                         \
  inline T atomicMax(T* p, T v) {                                                           \
    return emu::detail::atomic_update(p, [v](T old) { return old < v ? v : old; });         \
  }                                                                                         \
  inline T atomicCAS(T* p, T compare, T v) {                                                \
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
    return compare; /* holds the old value whether or not the swap happened */              \
  }
EMU_DEFINE_INT_ATOMICS(int)
EMU_DEFINE_INT_ATOMICS(unsigned int)
EMU_DEFINE_INT_ATOMICS(unsigned long long)
#undef EMU_DEFINE_INT_ATOMICS
inline long long atomicMin(long long* p, long long v) {
  return emu::detail::atomic_update(p, [v](long long old) { return v < old ? v : old; });
}
inline long long atomicMax(long long* p, long long v) {
  return emu::detail::atomic_update(p, [v](long long old) { return old < v ? v : old; });
}
inline float atomicAdd(float* p, float v) {
  return emu::detail::atomic_update(p, [v](float old) { return old + v; });
}
inline double atomicAdd(double* p, double v) {
  return emu::detail::atomic_update(p, [v](double old) { return old + v; });
}
inline float atomicExch(float* p, float v) {
  return emu::detail::atomic_update(p, [v](float) { return v; });
}
inline __half atomicAdd(__half* p, __half v) {
  return emu::detail::atomic_update(p, [v](__half old) { return __hadd(old, v); });
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* p, __nv_bfloat16 v) {
  return emu::detail::atomic_update(p, [v](__nv_bfloat16 old) { return __hadd(old, v); });
}
