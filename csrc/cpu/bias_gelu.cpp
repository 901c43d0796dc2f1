// CPU kernels of bias_gelu: y = gelu_tanh(x + bias), and its backward, which also returns the
// recomputed y (a caller that keeps x instead of y, e.g. for the weight gradient of the next
// Linear, gets it in the same pass).
//
// gelu_tanh(z) = 0.5 z (1 + tanh(u)), u = sqrt(2/pi) (z + 0.044715 z^3), is evaluated as
// z * s with s = 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)) (the same function; this form has no
// cancellation in 1 + tanh(u) for negative z). Its derivative is s + z s (1 - s) d(2u)/dz, so the
// backward needs one exp per element for both y and dx. exp is 2^t = 2^n * p(t - n), n = round(t),
// with the degree-7 Taylor polynomial of 2^f on [-1/2, 1/2] (truncation error < 1e-8 relative)
// and t clamped to [-126, 126] (exp(-2u) then saturates where s is 0 or 1 to fp32 precision
// anyway). NaN propagates. Math is fp32 for every input dtype; each element is read and
// written once; dbias sums fixed blocks of rows in block order (independent of the thread count).
// Rows run on 512-bit vectors where the CPU has AVX-512F/BW (chosen at run time; the build's
// baseline is AVX2), else on the 256-bit vectors of vec.h; NIT_CPU_GELU_VECTOR_BITS=256|512
// forces one (tests run both). On the 512-bit rows, 16-bit outputs (bf16, fp16) take a degree-4
// minimax polynomial of 2^f (relative error < 3e-6, far below their rounding of 2^-9 or 2^-12;
// dx and dbias keep that error before rounding) instead of the degree-7 one, and bf16 is rounded
// by the CPU's own conversion (VCVTNEPS2BF16, round to nearest even, where the CPU has
// AVX512-BF16; NIT_CPU_GELU_NATIVE_BF16=0|1 forces the choice) instead of integer arithmetic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/isa.h"
#include "cpu/rows.h"
#include "cpu/vec.h"

namespace nit {
namespace cpu {
namespace {

constexpr float kC1 = 1.5957691216057308f;      // 2 sqrt(2 / pi): 2u = z (kC1 + kC2 z^2)
constexpr float kC2 = 0.07135481627260025f;     // 2 sqrt(2 / pi) 0.044715
constexpr float kLog2e = 1.4426950408889634f;
constexpr int64_t kRowBlock = 32;               // rows per task and per dbias partial sum

#if NIT_VEC_AVX2
// 2^t for t in fp32 lanes (clamped to [-126, 126]; NaN stays NaN)
inline Vec8 exp2v(Vec8 t) {
  // max/min return their second operand when one is NaN: t goes second
  __m256 c = _mm256_min_ps(_mm256_set1_ps(126.f), _mm256_max_ps(_mm256_set1_ps(-126.f), t.v));
  const __m256 n = _mm256_round_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec8 f = Vec8(_mm256_sub_ps(c, n));
  Vec8 p(1.525273380405984e-05f);
  p = fmadd(p, f, Vec8(1.5403530393381606e-04f));
  p = fmadd(p, f, Vec8(1.3333558146428443e-03f));
  p = fmadd(p, f, Vec8(9.618129107628477e-03f));
  p = fmadd(p, f, Vec8(5.550410866482158e-02f));
  p = fmadd(p, f, Vec8(0.2402265069591007f));
  p = fmadd(p, f, Vec8(0.6931471805599453f));
  p = fmadd(p, f, Vec8(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return p * Vec8(_mm256_castsi256_ps(e));
}
inline Vec8 recip(Vec8 a) { return _mm256_div_ps(_mm256_set1_ps(1.f), a.v); }
#else
inline Vec8 exp2v(Vec8 t) {
  Vec8 r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = std::exp2(std::fmin(126.f, std::fmax(-126.f, t.v[i])) + 0.f * t.v[i]);
  return r;
}
inline Vec8 recip(Vec8 a) {
  Vec8 r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = 1.f / a.v[i];
  return r;
}
#endif

// s = 1 / (1 + exp(-2u)) of z
inline Vec8 gate_of(Vec8 z) {
  const Vec8 z2 = z * z;
  const Vec8 two_u = z * fmadd(z2, Vec8(kC2), Vec8(kC1));
  return recip(Vec8(1.f) + exp2v(two_u * Vec8(-kLog2e)));
}

// one row of the forward / backward on the 256-bit (or portable) vectors
template <typename T>
void fwd_row8(const T* xr, const float* b, T* yr, int64_t H) {
  for_each_vec(H, [&](int64_t j, auto tag) {
    const Vec8 z = load_v(xr, j, H, tag) + Vec8::loadu(b + j * kLanes);
    store_v(yr, j, H, z * gate_of(z), tag);
  });
}

template <typename T>
void bwd_row8(const T* gr, const T* xr, const float* b, T* dxr, T* yr, float* acc, int64_t H) {
  for_each_vec(H, [&](int64_t j, auto tag) {
    const int64_t c = j * kLanes;
    const Vec8 z = load_v(xr, j, H, tag) + Vec8::loadu(b + c);
    const Vec8 s = gate_of(z);
    const Vec8 d2u = fmadd(z * z, Vec8(3.f * kC2), Vec8(kC1));  // d(2u)/dz
    const Vec8 zs = z * s;
    const Vec8 d = load_v(gr, j, H, tag) * fmadd(zs * (Vec8(1.f) - s), d2u, s);  // gelu' = s + z s (1-s) d2u
    store_v(yr, j, H, zs, tag);
    store_v(dxr, j, H, d, tag);
    (Vec8::loadu(acc + c) + d).storeu(acc + c);
  });
}

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12 flags the deliberately undefined source of its own AVX-512 intrinsics (_mm512_undefined)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define NIT_GELU_AVX512 1
#define NIT_T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), always_inline)) inline
#define NIT_F512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
// the row kernels: also AVX512-BF16, whose conversion only their kNativeBf16 instances execute
#define NIT_T512BF \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"), always_inline)) inline
#define NIT_F512BF __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
// the same math on 16 lanes; tails by masked loads and stores (masked-off lanes load 0)
namespace v512 {
NIT_T512 __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
NIT_T512 __m512 load(const c10::BFloat16* p, __mmask16 m) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
NIT_T512 __m512 load(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
NIT_T512 void store(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
NIT_T512 void store(c10::BFloat16* p, __m512 v, __mmask16 m) {
  // round to nearest even; NaN -> the quiet NaN 0x7FC0
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}
NIT_T512 void store(c10::Half* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// stores of the row kernels: with kNative, bf16 by VCVTNEPS2BF16 (round to nearest even, NaN
// stays NaN; denormal results flush to zero)
template <bool kNative, typename T>
NIT_T512BF void store_out(T* p, __m512 v, __mmask16 m) {
  if constexpr (kNative && std::is_same_v<T, c10::BFloat16>) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
  } else {
    store(p, v, m);
  }
}
// kLow: the 16-bit outputs' polynomial (see the header)
template <bool kLow = false>
NIT_T512 __m512 gate_of(__m512 z) {
  const __m512 two_u = _mm512_mul_ps(z, _mm512_fmadd_ps(_mm512_mul_ps(z, z), _mm512_set1_ps(kC2), _mm512_set1_ps(kC1)));
  const __m512 t = _mm512_mul_ps(two_u, _mm512_set1_ps(-kLog2e));
  const __m512 c = _mm512_min_ps(_mm512_set1_ps(126.f), _mm512_max_ps(_mm512_set1_ps(-126.f), t));  // NaN kept
  const __m512 n = _mm512_roundscale_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(c, n);
  __m512 p;
  if constexpr (kLow) {
    // minimax fit of 2^f on [-1/2, 1/2] (relative error 2.6e-6, 2.7e-6 evaluated in fp32)
    p = _mm512_set1_ps(0.009570068679749966f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.055917806923389435f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.240247443318367f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931218504905701f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999992847442627f));
  } else {
    p = _mm512_set1_ps(1.525273380405984e-05f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402265069591007f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471805599453f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  }
  const __m512 a = _mm512_add_ps(_mm512_set1_ps(1.f), _mm512_scalef_ps(p, n));  // 1 + p * 2^n
  // 1 / a: the 14-bit reciprocal and one Newton step (relative error ~2^-28; a division is
  // several times slower on 512-bit vectors)
  const __m512 r = _mm512_rcp14_ps(a);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(a, r, _mm512_set1_ps(2.f)));
}
NIT_T512 __mmask16 mask_at(int64_t c, int64_t H) {
  const int64_t left = H - c;
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
}

template <bool kNative, typename T>
NIT_F512BF void fwd_row(const T* xr, const float* b, T* yr, int64_t H) {
  constexpr bool kLow = sizeof(T) == 2;
  for (int64_t c = 0; c < H; c += 16) {
    const __mmask16 m = mask_at(c, H);
    const __m512 z = _mm512_add_ps(load(xr + c, m), _mm512_maskz_loadu_ps(m, b + c));
    store_out<kNative>(yr + c, _mm512_mul_ps(z, gate_of<kLow>(z)), m);
  }
}

template <bool kNative, typename T>
NIT_F512BF void bwd_row(const T* gr, const T* xr, const float* b, T* dxr, T* yr, float* acc, int64_t H) {
  constexpr bool kLow = sizeof(T) == 2;
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t c = 0; c < H; c += 16) {
    const __mmask16 m = mask_at(c, H);
    const __m512 z = _mm512_add_ps(load(xr + c, m), _mm512_maskz_loadu_ps(m, b + c));
    const __m512 s = gate_of<kLow>(z);
    const __m512 d2u = _mm512_fmadd_ps(_mm512_mul_ps(z, z), _mm512_set1_ps(3.f * kC2), _mm512_set1_ps(kC1));
    const __m512 zs = _mm512_mul_ps(z, s);
    const __m512 dg = _mm512_fmadd_ps(_mm512_mul_ps(zs, _mm512_sub_ps(one, s)), d2u, s);
    const __m512 d = _mm512_mul_ps(load(gr + c, m), dg);
    store_out<kNative>(yr + c, zs, m);
    store_out<kNative>(dxr + c, d, m);
    _mm512_mask_storeu_ps(acc + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc + c), d));
  }
}
}  // namespace v512
#else
#define NIT_GELU_AVX512 0
#endif

// whether the 512-bit rows round bf16 with the CPU's conversion (AVX512-BF16);
// NIT_CPU_GELU_NATIVE_BF16=0 forces the integer rounding (tests run both)
bool native_bf16() {
#if NIT_GELU_AVX512
  static const bool has = __builtin_cpu_supports("avx512bf16");
  const char* env = std::getenv("NIT_CPU_GELU_NATIVE_BF16");
  const std::string want = env ? env : "";
  TORCH_CHECK(want.empty() || want == "0" || want == "1", "NIT_CPU_GELU_NATIVE_BF16 must be 0 or 1, got '", want,
              "'");
  TORCH_CHECK(want != "1" || has, "NIT_CPU_GELU_NATIVE_BF16=1 needs a CPU with AVX512-BF16, this one lacks it");
  return want.empty() ? has : want == "1";
#else
  return false;
#endif
}

bool use_avx512() {
#if NIT_GELU_AVX512
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return cpu::choose_512_bits("NIT_CPU_GELU_VECTOR_BITS", true, has, "AVX-512F/BW/VL/DQ");
#else
  return cpu::choose_512_bits("NIT_CPU_GELU_VECTOR_BITS", false, false, "AVX-512F/BW/VL/DQ");
#endif
}

void check_args(const at::Tensor& x, const at::Tensor& bias, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  check_float_input(x, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [N, H], got shape ", x.sizes());
  check_float_input(bias, "bias");
  TORCH_CHECK(bias.device() == x.device(), op, ": bias is on ", bias.device(), " but x is on ", x.device());
  check_shape(bias, {x.size(1)}, "bias");
}

std::vector<float> widened_bias(const at::Tensor& bias) {
  const int64_t H = bias.size(0);
  std::vector<float> b(padded(H), 0.f);
  const at::Tensor bf = bias.to(at::kFloat).contiguous();
  std::copy(bf.data_ptr<float>(), bf.data_ptr<float>() + H, b.begin());
  return b;
}

at::Tensor bias_gelu_fwd_cpu(const at::Tensor& x, const at::Tensor& bias) {
  check_args(x, bias, "bias_gelu_fwd");
  auto y = at::empty_like(x);
  const int64_t N = x.size(0), H = x.size(1);
  const std::vector<float> b = widened_bias(bias);
  const bool wide = use_avx512();
  const bool native = wide && native_bf16();
  (void)wide;
  (void)native;
  NIT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "bias_gelu_fwd", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, kRowBlock, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * H;
        prefetch_ahead(r, end, H, {xr});
#if NIT_GELU_AVX512
        if (wide) {
          if (native) {
            v512::fwd_row<true>(xr, b.data(), yp + r * H, H);
          } else {
            v512::fwd_row<false>(xr, b.data(), yp + r * H, H);
          }
          continue;
        }
#endif
        fwd_row8(xr, b.data(), yp + r * H, H);
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bias_gelu_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                                 const at::Tensor& bias) {
  check_args(x, bias, "bias_gelu_bwd");
  check_float_input(dy, "dy");
  check_like(dy, x, "dy", "x");
  check_shape(dy, x.sizes(), "dy");
  const int64_t N = x.size(0), H = x.size(1), Hp = padded(H);
  const std::vector<float> b = widened_bias(bias);
  const bool wide = use_avx512();
  const bool native = wide && native_bf16();
  (void)wide;
  (void)native;
  auto dx = at::empty_like(x);
  auto y = at::empty_like(x);
  const int64_t nblocks = (N + kRowBlock - 1) / kRowBlock;
  auto partial = at::zeros({std::max<int64_t>(nblocks, 1), Hp}, x.options().dtype(at::kFloat));
  float* pp = partial.data_ptr<float>();
  NIT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "bias_gelu_bwd", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = dy.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, nblocks, 1, [&](int64_t kb, int64_t ke) {
      for (int64_t k = kb; k < ke; ++k) {
        float* acc = pp + k * Hp;
        const int64_t r1 = std::min(N, (k + 1) * kRowBlock);
        for (int64_t r = k * kRowBlock; r < r1; ++r) {
          const scalar_t* xr = xp + r * H;
          const scalar_t* gr = gp + r * H;
          prefetch_ahead(r, r1, H, {xr, gr});
#if NIT_GELU_AVX512
          if (wide) {
            if (native) {
              v512::bwd_row<true>(gr, xr, b.data(), dxp + r * H, yp + r * H, acc, H);
            } else {
              v512::bwd_row<false>(gr, xr, b.data(), dxp + r * H, yp + r * H, acc, H);
            }
            continue;
          }
#endif
          bwd_row8(gr, xr, b.data(), dxp + r * H, yp + r * H, acc, H);
        }
      }
    });
  });
  // dbias: the block sums added in block order, whatever the thread count
  auto db = at::zeros({H}, x.options().dtype(at::kFloat));
  float* dbp = db.data_ptr<float>();
  for (int64_t k = 0; k < nblocks; ++k) {
    for (int64_t h = 0; h < H; ++h) dbp[h] += pp[k * Hp + h];
  }
  return {dx, db.to(bias.scalar_type()), y};
}

}  // namespace

TORCH_LIBRARY_IMPL(nit, CPU, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd_cpu);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cpu);
}

}  // namespace cpu
}  // namespace nit
