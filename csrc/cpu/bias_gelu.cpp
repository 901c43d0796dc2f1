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
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"
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
  NIT_DISPATCH_FLOAT_TYPES(x.scalar_type(), "bias_gelu_fwd", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, kRowBlock, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * H;
        scalar_t* yr = yp + r * H;
        prefetch_ahead(r, end, H, {xr});
        for_each_vec(H, [&](int64_t j, auto tag) {
          const Vec8 z = load_v(xr, j, H, tag) + Vec8::loadu(b.data() + j * kLanes);
          store_v(yr, j, H, z * gate_of(z), tag);
        });
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
          for_each_vec(H, [&](int64_t j, auto tag) {
            const int64_t c = j * kLanes;
            const Vec8 z = load_v(xr, j, H, tag) + Vec8::loadu(b.data() + c);
            const Vec8 z2 = z * z;
            const Vec8 s = gate_of(z);
            const Vec8 d2u = fmadd(z2, Vec8(3.f * kC2), Vec8(kC1));  // d(2u)/dz
            // gelu'(z) = s + z s (1 - s) d2u
            const Vec8 zs = z * s;
            const Vec8 dg = fmadd(zs * (Vec8(1.f) - s), d2u, s);
            const Vec8 d = load_v(gr, j, H, tag) * dg;
            store_v(yp + r * H, j, H, zs, tag);
            store_v(dxp + r * H, j, H, d, tag);
            (Vec8::loadu(acc + c) + d).storeu(acc + c);
          });
        }
      }
    });
  });
  // dbias: block sums added in block order (tails of the last vector are zero: the loads pad)
  at::Tensor dbias = nblocks == 0 ? at::zeros({H}, bias.options()) : partial.sum(0).narrow(0, 0, H).to(bias.scalar_type());
  return {dx, dbias, y};
}

}  // namespace

TORCH_LIBRARY_IMPL(nit, CPU, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd_cpu);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cpu);
}

}  // namespace cpu
}  // namespace nit
