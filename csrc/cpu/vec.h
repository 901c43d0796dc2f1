// Eight-lane fp32 vector for the CPU kernels, with loads and stores of float, Half and BFloat16
// rows (fp16/bf16 are widened to fp32 on load and rounded to nearest even on store, exactly as
// c10's scalar conversions do, so vector bodies and scalar tails agree).
//
// With AVX2 + FMA + F16C (the build's default -march=x86-64-v3) Vec8 is one __m256; otherwise it
// is a plain array whose loops the compiler vectorises for the target it has.
#pragma once
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define NIT_VEC_AVX2 1
#else
#define NIT_VEC_AVX2 0
#endif

// AT_DISPATCH over exactly the input dtypes of the kernels (fp32, fp16, bf16), as scalar_t.
#define NIT_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                         \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace nit {
namespace cpu {

constexpr int64_t kLanes = 8;

// Columns of a row rounded up to whole vectors: the length of every fp32 row buffer.
inline int64_t padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }
template <typename T>
inline T from_float(float v) { return static_cast<T>(v); }

#if NIT_VEC_AVX2

struct Vec8 {
  __m256 v;
  Vec8() = default;
  Vec8(__m256 x) : v(x) {}
  Vec8(float s) : v(_mm256_set1_ps(s)) {}  // broadcast (lets shared math templates write V(1.f))

  static Vec8 loadu(const float* p) { return _mm256_loadu_ps(p); }
  void storeu(float* p) const { _mm256_storeu_ps(p, v); }
};

inline Vec8 operator+(Vec8 a, Vec8 b) { return _mm256_add_ps(a.v, b.v); }
inline Vec8 operator-(Vec8 a, Vec8 b) { return _mm256_sub_ps(a.v, b.v); }
inline Vec8 operator*(Vec8 a, Vec8 b) { return _mm256_mul_ps(a.v, b.v); }
inline Vec8& operator+=(Vec8& a, Vec8 b) { return a = a + b; }
// a * b + c with one rounding
inline Vec8 fmadd(Vec8 a, Vec8 b, Vec8 c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
// (x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...): the partner of every interleaved pair
inline Vec8 swap_pairs(Vec8 a) { return _mm256_permute_ps(a.v, 0xB1); }

// Sum of the 8 lanes in a fixed order.
inline float hsum(Vec8 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline Vec8 load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec8 load(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline Vec8 load(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

inline void store(float* p, Vec8 a) { _mm256_storeu_ps(p, a.v); }
inline void store(c10::Half* p, Vec8 a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store(c10::BFloat16* p, Vec8 a) {
  // round to nearest even on the upper 16 bits; NaN -> 0x7FC0 (c10's rule)
  const __m256i u = _mm256_castps_si256(a.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

#else  // portable fallback

struct Vec8 {
  float v[kLanes];
  Vec8() = default;
  Vec8(float s) { for (int i = 0; i < kLanes; ++i) v[i] = s; }

  static Vec8 loadu(const float* p) { Vec8 r; std::memcpy(r.v, p, sizeof(r.v)); return r; }
  void storeu(float* p) const { std::memcpy(p, v, sizeof(v)); }
};

#define NIT_VEC_BINOP(op)                                                  \
  inline Vec8 operator op(Vec8 a, Vec8 b) {                                \
    Vec8 r;                                                                \
    for (int i = 0; i < kLanes; ++i) r.v[i] = a.v[i] op b.v[i];            \
    return r;                                                              \
  }
NIT_VEC_BINOP(+)
NIT_VEC_BINOP(-)
NIT_VEC_BINOP(*)
#undef NIT_VEC_BINOP
inline Vec8& operator+=(Vec8& a, Vec8 b) { return a = a + b; }
inline Vec8 fmadd(Vec8 a, Vec8 b, Vec8 c) { return a * b + c; }
inline Vec8 swap_pairs(Vec8 a) {
  Vec8 r;
  for (int i = 0; i < kLanes; i += 2) { r.v[i] = a.v[i + 1]; r.v[i + 1] = a.v[i]; }
  return r;
}
inline float hsum(Vec8 a) {
  float s[4];
  for (int i = 0; i < 4; ++i) s[i] = a.v[i] + a.v[i + 4];
  return (s[0] + s[2]) + (s[1] + s[3]);
}

template <typename T>
inline Vec8 load(const T* p) {
  Vec8 r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = to_float(p[i]);
  return r;
}
template <typename T>
inline void store(T* p, Vec8 a) {
  for (int i = 0; i < kLanes; ++i) p[i] = from_float<T>(a.v[i]);
}

#endif

// The first n < 8 elements of p, zeros in the other lanes.
template <typename T>
inline Vec8 load_partial(const T* p, int64_t n) {
  float tmp[kLanes] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t i = 0; i < n; ++i) tmp[i] = to_float(p[i]);
  return Vec8::loadu(tmp);
}
template <typename T>
inline void store_partial(T* p, Vec8 a, int64_t n) {
  float tmp[kLanes];
  a.storeu(tmp);
  for (int64_t i = 0; i < n; ++i) p[i] = from_float<T>(tmp[i]);
}

// Vector j of a row of n columns is either Full (8 columns) or the Tail (the last n % 8 columns,
// zero-padded on load, the padding dropped on store). Loops dispatch on the tag at compile time,
// so the body over whole vectors carries no per-vector branch.
using Full = std::true_type;
using Tail = std::false_type;

template <typename T>
inline Vec8 load_v(const T* row, int64_t j, int64_t, Full) { return load(row + j * kLanes); }
template <typename T>
inline Vec8 load_v(const T* row, int64_t j, int64_t n, Tail) {
  return load_partial(row + j * kLanes, n - j * kLanes);
}
template <typename T>
inline void store_v(T* row, int64_t j, int64_t, Vec8 a, Full) { store(row + j * kLanes, a); }
template <typename T>
inline void store_v(T* row, int64_t j, int64_t n, Vec8 a, Tail) {
  store_partial(row + j * kLanes, a, n - j * kLanes);
}

// f(j, tag) for every vector j of a row of n columns.
template <class F>
inline void for_each_vec(int64_t n, F&& f) {
  const int64_t nf = n / kLanes;
  for (int64_t j = 0; j < nf; ++j) f(j, Full{});
  if (nf * kLanes < n) f(nf, Tail{});
}

// sum over the vectors of a row of n columns of f(j, tag), with four accumulators combined in
// a fixed order (independent dependency chains for the adder, the same result on every call).
template <class F>
inline float reduce_sum(int64_t n, F&& f) {
  const int64_t nf = n / kLanes;
  Vec8 a0(0.f), a1(0.f), a2(0.f), a3(0.f);
  int64_t j = 0;
  for (; j + 4 <= nf; j += 4) {
    a0 += f(j, Full{});
    a1 += f(j + 1, Full{});
    a2 += f(j + 2, Full{});
    a3 += f(j + 3, Full{});
  }
  for (; j < nf; ++j) a0 += f(j, Full{});
  if (nf * kLanes < n) a1 += f(nf, Tail{});
  return hsum((a0 + a1) + (a2 + a3));
}

// Two sums at once: f(j, tag, a, b) adds its terms of vector j to the accumulators a and b (two
// accumulators per sum, fixed combination order).
template <class F>
inline void reduce_sum2(int64_t n, F&& f, float* sum_a, float* sum_b) {
  const int64_t nf = n / kLanes;
  Vec8 a0(0.f), a1(0.f), b0(0.f), b1(0.f);
  int64_t j = 0;
  for (; j + 2 <= nf; j += 2) {
    f(j, Full{}, a0, b0);
    f(j + 1, Full{}, a1, b1);
  }
  if (j < nf) f(j, Full{}, a0, b0);
  if (nf * kLanes < n) f(nf, Tail{}, a1, b1);
  *sum_a = hsum(a0 + a1);
  *sum_b = hsum(b0 + b1);
}

// Ask for the cache lines of bytes [p, p + n_bytes) ahead of use; rows stream through the
// kernels faster than the hardware prefetcher ramps up within each row.
inline void prefetch(const void* p, int64_t n_bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < n_bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
}

}  // namespace cpu
}  // namespace nit
