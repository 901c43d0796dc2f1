// Varlen attention backward (FlashAttention-2, Dao 2023, algorithm 2), deterministic: no atomics.
// With P = exp(scale * Q K^T - lse) recomputed per tile from the saved lse:
//   delta = rowsum(dO * O)                     (preprocess, fp32 [H, Nq]; fp32: dP's fmaf order)
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dK = scale dS^T Q,  dQ = scale dS K
// Two kernels share the recomputation instead of accumulating dQ with atomics:
//   dkdv: grid (items of the (image, key tile) list, Hk); each warp owns 16 key rows and sweeps
//         the query tiles of all query heads of its k/v head (grouped-query heads summed in a
//         fixed order);
//   dq:   grid (items of the (image, query tile) list, H); each warp owns 16 query rows and
//         sweeps the key tiles.
// The work lists come from cu_seqlens on the device (attention_tile.cuh): every real row is
// written whatever max_seqlen says. Causal masks are bottom-right aligned; rows that saw no key
// (lse = -inf) get P = 0.
// dS is split as hi + lo, both in the input dtype (hi = round(dS), lo = round(dS - hi)), and the
// dK and dQ products take both: rounding dS once to fp16/bf16 put dK at the accuracy bound
// (fp16, head_dim 128) or past it (bf16); the split keeps dS to about 2x the dtype's precision.
// Measured in the simulator (head_dim 128, 8 seeds): worst gradient error / bound went from
// 1.01 (fp16 dk) and 1.06 (bf16 dq) to 0.74 and 0.69, where dv (no dS) is now the worst.
#include "cuda/attention_tile.cuh"

namespace nit {
namespace cuda {
namespace attn {
namespace {

constexpr int kDeltaWarps = 8;

// delta[h, i] = sum_d dO[i, h, d] * O[i, h, d].
// fp32: one thread per (token, head) row, the fmaf chain over d in order that strip_nt runs for
// dP = dO V^T. A one-hot softmax row (huge softmax_scale) has O = v_j exactly, so dP_j - delta
// is exactly 0, as the reference's rowsum(dP * P) gives, not a rounding difference times the
// scale. fp16/bf16 (dP from tensor cores, O rounded): one warp per row.
template <typename T>
__global__ void __launch_bounds__(kDeltaWarps * 32)
    attn_bwd_delta_kernel(const T* __restrict__ dout, const T* __restrict__ out, int64_t nq,
                          int64_t H, int64_t D, float* __restrict__ delta) {
  if constexpr (std::is_same<T, float>::value) {
    const int64_t row = int64_t(blockIdx.x) * (kDeltaWarps * 32) + threadIdx.x;
    if (row >= nq * H) return;
    float acc = 0.f;
    for (int64_t c = 0; c < D; ++c) acc = fmaf(dout[row * D + c], out[row * D + c], acc);
    delta[(row % H) * nq + row / H] = acc;
  } else {
    const int64_t row = int64_t(blockIdx.x) * kDeltaWarps + threadIdx.x / 32;
    if (row >= nq * H) return;
    const int lane = threadIdx.x % 32;
    float acc = 0.f;
    for (int64_t c = lane; c < D; c += 32) acc += to_float(dout[row * D + c]) * to_float(out[row * D + c]);
    acc = warp_sum(acc);
    if (lane == 0) delta[(row % H) * nq + row / H] = acc;
  }
}

struct BwdArgs {
  const void *q, *k, *v, *dout;
  const float *lse, *delta;
  void *dq, *dk, *dv;
  const int2 *q_items, *k_items;  // work lists: (image, query tile), (image, key tile)
};

// Stores round(ds) at *hi and keeps ds (fp32) at *full for split_lo.
template <typename T>
__device__ __forceinline__ void store_ds(float ds, T* hi, float* full) {
  *hi = from_float<T>(ds);
  *full = ds;
}

// After the hi product: the strip of hi values becomes lo = round(ds - hi) (one warp, in place).
// fp32 tiles multiply exactly on CUDA cores and need no lo pass (kTensorCores false).
template <typename T, int kCols, int kLdP, int kLdS>
__device__ __forceinline__ void split_lo(T* strip, const float* full) {
  const int lane = threadIdx.x % 32;
  __syncwarp();  // every lane's mma has read the hi strip
#pragma unroll 1
  for (int r = 0; r < 16; ++r)
#pragma unroll
    for (int c0 = 0; c0 < kCols; c0 += 32) {
      const int c = c0 + lane;
      strip[r * kLdP + c] = from_float<T>(full[r * kLdS + c] - to_float(strip[r * kLdP + c]));
    }
  __syncwarp();
}

// ---- dK, dV -----------------------------------------------------------------------------------
template <typename T, int kDp>
struct DkdvLayout {
  using Tl = Tile<T, kDp>;
  static constexpr int BN = Tl::kRows, BM = Tl::kBwdCols;  // keys owned, queries per step
  static constexpr int LDI = Tl::kLdIn, LDS = Tl::ld_s(BM), LDP = Tl::ld_p(BM);
  static constexpr size_t k = 0;
  static constexpr size_t v = align128(k + sizeof(T) * BN * LDI);
  static constexpr size_t q = align128(v + sizeof(T) * BN * LDI);
  static constexpr size_t dout = align128(q + sizeof(T) * BM * LDI);
  static constexpr size_t s = align128(dout + sizeof(T) * BM * LDI);
  static constexpr size_t dp = align128(s + sizeof(float) * BN * LDS);
  static constexpr size_t p = align128(dp + sizeof(float) * BN * LDS);
  static constexpr size_t ds = align128(p + sizeof(T) * BN * LDP);
  static constexpr size_t lse = align128(ds + sizeof(T) * BN * LDP);
  static constexpr size_t delta = align128(lse + sizeof(float) * BM);
  static constexpr size_t bytes = align128(delta + sizeof(float) * BM);
};

template <typename T, int kDp>
__global__ void __launch_bounds__(Tile<T, kDp>::kThreads)
    attn_bwd_dkdv_kernel(BwdArgs g, AttnArgs a, bool vec) {
  using L = DkdvLayout<T, kDp>;
  constexpr int BN = L::BN, BM = L::BM, LDI = L::LDI, LDS = L::LDS, LDP = L::LDP;
  constexpr int kThreads = Tile<T, kDp>::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem + L::k);
  T* sV = reinterpret_cast<T*>(smem + L::v);
  T* sQ = reinterpret_cast<T*>(smem + L::q);
  T* sdO = reinterpret_cast<T*>(smem + L::dout);
  float* sS = reinterpret_cast<float*>(smem + L::s);
  float* sdP = reinterpret_cast<float*>(smem + L::dp);
  T* sP = reinterpret_cast<T*>(smem + L::p);
  T* sdS = reinterpret_cast<T*>(smem + L::ds);
  float* sLse = reinterpret_cast<float*>(smem + L::lse);
  float* sDelta = reinterpret_cast<float*>(smem + L::delta);

  int image;
  int64_t n0;
  if (!work_item(g.k_items, BN, &image, &n0)) return;  // uniform for the CTA
  const Ranges rg = image_ranges(a, image);
  const int64_t hk = blockIdx.y, group = a.H / a.Hk, D = a.D;
  const int64_t o_stride = a.H * D, k_stride = a.Hk * D;  // dout; dk and dv
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* q = static_cast<const T*>(g.q);
  const T* dout = static_cast<const T*>(g.dout);

  const int keys = static_cast<int>(rg.sk - n0 < BN ? rg.sk - n0 : BN);
  load_tile<T, BN, kDp, LDI, kThreads>(
      sK, static_cast<const T*>(g.k) + (rg.k_begin + n0) * a.k_row + hk * a.k_head, a.k_row, keys,
      static_cast<int>(D), vec);
  load_tile<T, BN, kDp, LDI, kThreads>(
      sV, static_cast<const T*>(g.v) + (rg.k_begin + n0) * a.v_row + hk * a.v_head, a.v_row, keys,
      static_cast<int>(D), vec);

  float* my_S = sS + warp * 16 * LDS;
  float* my_dP = sdP + warp * 16 * LDS;
  T* my_P = sP + warp * 16 * LDP;
  T* my_dS = sdS + warp * 16 * LDP;
  StripAcc<T, kDp> dk, dv;
  dk.zero();
  dv.zero();

  // Queries before m_first see none of these keys (causal): start at its tile.
  int64_t m_first = a.causal ? n0 - (rg.sk - rg.sq) : 0;
  m_first = m_first < 0 ? 0 : (m_first / BM) * BM;

  for (int64_t hh = 0; hh < group; ++hh) {
    const int64_t h = hk * group + hh;
    for (int64_t m0 = m_first; m0 < rg.sq; m0 += BM) {
      __syncthreads();  // every warp is done with the previous Q/dO tiles (and K/V are loaded)
      const int rows = static_cast<int>(rg.sq - m0 < BM ? rg.sq - m0 : BM);
      load_tile<T, BM, kDp, LDI, kThreads>(sQ, q + (rg.q_begin + m0) * a.q_row + h * a.q_head,
                                           a.q_row, rows, static_cast<int>(D), vec);
      load_tile<T, BM, kDp, LDI, kThreads>(sdO, dout + (rg.q_begin + m0) * o_stride + h * D,
                                           o_stride, rows, static_cast<int>(D), vec);
      load_rows<kThreads>(sLse, g.lse + h * a.nq + rg.q_begin + m0, BM, rows, -INFINITY);
      load_rows<kThreads>(sDelta, g.delta + h * a.nq + rg.q_begin + m0, BM, rows, 0.f);
      __syncthreads();

      strip_nt<T, kDp, BM>(my_S, LDS, sK + warp * 16 * LDI, LDI, sQ, LDI);    // S^T strip
      strip_nt<T, kDp, BM>(my_dP, LDS, sV + warp * 16 * LDI, LDI, sdO, LDI);  // dP^T strip
      __syncwarp();
#pragma unroll 1
      for (int r = 0; r < 16; ++r) {
        const int64_t j = n0 + warp * 16 + r;  // key row in the image
#pragma unroll
        for (int c0 = 0; c0 < BM; c0 += 32) {
          const int c = c0 + lane;
          const int64_t i = m0 + c;  // query row in the image
          const float row_lse = sLse[c];
          const bool ok = j < rg.sk && i < rg.sq && row_lse != -INFINITY &&
                          visible(a.causal, i, j, rg.sq, rg.sk);
          const float p = ok ? expf(mul_rn(my_S[r * LDS + c], a.softmax_scale) - row_lse) : 0.f;
          my_P[r * LDP + c] = from_float<T>(p);
          store_ds(p * (my_dP[r * LDS + c] - sDelta[c]), &my_dS[r * LDP + c], &my_dP[r * LDS + c]);
        }
      }
      __syncwarp();
      dv.template mma<BM>(my_P, LDP, sdO, LDI);
      dk.template mma<BM>(my_dS, LDP, sQ, LDI);
      if constexpr (Tile<T, kDp>::kTensorCores) {
        split_lo<T, BM, LDP, LDS>(my_dS, my_dP);
        dk.template mma<BM>(my_dS, LDP, sQ, LDI);
      }
    }
  }

  T* dk_out = static_cast<T*>(g.dk);
  T* dv_out = static_cast<T*>(g.dv);
  const float scale = a.softmax_scale;
  dk.for_each(my_S, LDS, [&](int r, int c, float val) {
    const int64_t j = n0 + warp * 16 + r;
    if (j < rg.sk && c < D) dk_out[(rg.k_begin + j) * k_stride + hk * D + c] = from_float<T>(val * scale);
  });
  dv.for_each(my_S, LDS, [&](int r, int c, float val) {
    const int64_t j = n0 + warp * 16 + r;
    if (j < rg.sk && c < D) dv_out[(rg.k_begin + j) * k_stride + hk * D + c] = from_float<T>(val);
  });
}

// ---- dQ ---------------------------------------------------------------------------------------
template <typename T, int kDp>
struct DqLayout {
  using Tl = Tile<T, kDp>;
  static constexpr int BM = Tl::kRows, BN = Tl::kBwdCols;  // queries owned, keys per step
  static constexpr int LDI = Tl::kLdIn, LDS = Tl::ld_s(BN), LDP = Tl::ld_p(BN);
  static constexpr size_t q = 0;
  static constexpr size_t dout = align128(q + sizeof(T) * BM * LDI);
  static constexpr size_t k = align128(dout + sizeof(T) * BM * LDI);
  static constexpr size_t v = align128(k + sizeof(T) * BN * LDI);
  static constexpr size_t s = align128(v + sizeof(T) * BN * LDI);
  static constexpr size_t dp = align128(s + sizeof(float) * BM * LDS);
  static constexpr size_t ds = align128(dp + sizeof(float) * BM * LDS);
  static constexpr size_t lse = align128(ds + sizeof(T) * BM * LDP);
  static constexpr size_t delta = align128(lse + sizeof(float) * BM);
  static constexpr size_t bytes = align128(delta + sizeof(float) * BM);
};

template <typename T, int kDp>
__global__ void __launch_bounds__(Tile<T, kDp>::kThreads)
    attn_bwd_dq_kernel(BwdArgs g, AttnArgs a, bool vec) {
  using L = DqLayout<T, kDp>;
  constexpr int BM = L::BM, BN = L::BN, LDI = L::LDI, LDS = L::LDS, LDP = L::LDP;
  constexpr int kThreads = Tile<T, kDp>::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem + L::q);
  T* sdO = reinterpret_cast<T*>(smem + L::dout);
  T* sK = reinterpret_cast<T*>(smem + L::k);
  T* sV = reinterpret_cast<T*>(smem + L::v);
  float* sS = reinterpret_cast<float*>(smem + L::s);
  float* sdP = reinterpret_cast<float*>(smem + L::dp);
  T* sdS = reinterpret_cast<T*>(smem + L::ds);
  float* sLse = reinterpret_cast<float*>(smem + L::lse);
  float* sDelta = reinterpret_cast<float*>(smem + L::delta);

  int image;
  int64_t m0;
  if (!work_item(g.q_items, BM, &image, &m0)) return;  // uniform for the CTA
  const Ranges rg = image_ranges(a, image);
  const int64_t h = blockIdx.y, hk = h / (a.H / a.Hk), D = a.D;
  const int64_t o_stride = a.H * D;  // dout and dq
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* k = static_cast<const T*>(g.k);
  const T* v = static_cast<const T*>(g.v);

  const int rows = static_cast<int>(rg.sq - m0 < BM ? rg.sq - m0 : BM);
  load_tile<T, BM, kDp, LDI, kThreads>(
      sQ, static_cast<const T*>(g.q) + (rg.q_begin + m0) * a.q_row + h * a.q_head, a.q_row, rows,
      static_cast<int>(D), vec);
  load_tile<T, BM, kDp, LDI, kThreads>(
      sdO, static_cast<const T*>(g.dout) + (rg.q_begin + m0) * o_stride + h * D, o_stride, rows,
      static_cast<int>(D), vec);
  load_rows<kThreads>(sLse, g.lse + h * a.nq + rg.q_begin + m0, BM, rows, -INFINITY);
  load_rows<kThreads>(sDelta, g.delta + h * a.nq + rg.q_begin + m0, BM, rows, 0.f);

  float* my_S = sS + warp * 16 * LDS;
  float* my_dP = sdP + warp * 16 * LDS;
  T* my_dS = sdS + warp * 16 * LDP;
  StripAcc<T, kDp> dq;
  dq.zero();

  const int64_t n_end = keys_end(a.causal, m0, BM, rg.sq, rg.sk);
  for (int64_t n0 = 0; n0 < n_end; n0 += BN) {
    __syncthreads();  // every warp is done with the previous K/V tiles (and Q/dO are loaded)
    const int keys = static_cast<int>(rg.sk - n0 < BN ? rg.sk - n0 : BN);
    load_tile<T, BN, kDp, LDI, kThreads>(sK, k + (rg.k_begin + n0) * a.k_row + hk * a.k_head,
                                         a.k_row, keys, static_cast<int>(D), vec);
    load_tile<T, BN, kDp, LDI, kThreads>(sV, v + (rg.k_begin + n0) * a.v_row + hk * a.v_head,
                                         a.v_row, keys, static_cast<int>(D), vec);
    __syncthreads();

    strip_nt<T, kDp, BN>(my_S, LDS, sQ + warp * 16 * LDI, LDI, sK, LDI);
    strip_nt<T, kDp, BN>(my_dP, LDS, sdO + warp * 16 * LDI, LDI, sV, LDI);
    __syncwarp();
#pragma unroll 1
    for (int r = 0; r < 16; ++r) {
      const int64_t i = m0 + warp * 16 + r;  // query row in the image
      const float row_lse = sLse[warp * 16 + r];
      const float row_delta = sDelta[warp * 16 + r];
#pragma unroll
      for (int c0 = 0; c0 < BN; c0 += 32) {
        const int c = c0 + lane;
        const int64_t j = n0 + c;  // key row in the image
        const bool ok = i < rg.sq && j < rg.sk && row_lse != -INFINITY &&
                        visible(a.causal, i, j, rg.sq, rg.sk);
        const float p = ok ? expf(mul_rn(my_S[r * LDS + c], a.softmax_scale) - row_lse) : 0.f;
        store_ds(p * (my_dP[r * LDS + c] - row_delta), &my_dS[r * LDP + c], &my_dP[r * LDS + c]);
      }
    }
    __syncwarp();
    dq.template mma<BN>(my_dS, LDP, sK, LDI);
    if constexpr (Tile<T, kDp>::kTensorCores) {
      split_lo<T, BN, LDP, LDS>(my_dS, my_dP);
      dq.template mma<BN>(my_dS, LDP, sK, LDI);
    }
  }

  T* dq_out = static_cast<T*>(g.dq);
  const float scale = a.softmax_scale;
  dq.for_each(my_S, LDS, [&](int r, int c, float val) {
    const int64_t i = m0 + warp * 16 + r;
    if (i < rg.sq && c < D) dq_out[(rg.q_begin + i) * o_stride + h * D + c] = from_float<T>(val * scale);
  });
}

template <typename T, int kDp>
cudaError_t launch_bwd(const BwdArgs& g, const AttnArgs& a, bool vec, cudaStream_t stream) {
  constexpr int kThreads = Tile<T, kDp>::kThreads;
  if (a.nk > 0) {
    using L = DkdvLayout<T, kDp>;
    static_assert(L::BN == Tile<T, kDp>::kRows, "the key work list has tiles of kRows keys");
    auto kernel = attn_bwd_dkdv_kernel<T, kDp>;
    cudaError_t err = allow_smem(kernel, L::bytes);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(work_capacity(a.nk, a.num_seqs, L::BN)),
                    static_cast<unsigned>(a.Hk));
    launch<attn_bwd_dkdv_kernel<T, kDp>>(grid, kThreads, L::bytes, stream, g, a, vec);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (a.nq > 0) {
    using L = DqLayout<T, kDp>;
    static_assert(L::BM == Tile<T, kDp>::kRows, "the query work list has tiles of kRows rows");
    auto kernel = attn_bwd_dq_kernel<T, kDp>;
    cudaError_t err = allow_smem(kernel, L::bytes);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(work_capacity(a.nq, a.num_seqs, L::BM)),
                    static_cast<unsigned>(a.H));
    launch<attn_bwd_dq_kernel<T, kDp>>(grid, kThreads, L::bytes, stream, g, a, vec);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace attn

// The tile height of the work lists (kRows: the rows a block owns, the same for every kDp).
static int attn_rows(DType dt) {
  return dt == DType::kFloat32 ? attn::Tile<float, 64>::kRows : attn::Tile<__half, 64>::kRows;
}

// Floats of delta [H * nq], rounded up to even so that the int2 lists after it are 8-byte aligned.
static int64_t delta_floats(const AttnArgs& a) { return (a.H * a.nq + 1) / 2 * 2; }

// delta, then the (image, query tile) list, then the (image, key tile) list (int2 items).
int64_t varlen_attention_bwd_workspace(DType dt, const AttnArgs& a) {
  const int rows = attn_rows(dt);
  return delta_floats(a) + 2 * attn::work_capacity(a.nq, a.num_seqs, rows) +
         2 * attn::work_capacity(a.nk, a.num_seqs, rows);
}

// Every row of every image is written (zeros for keys no query sees and for queries that see
// no key), whatever max_seqlen_q / max_seqlen_k say.
cudaError_t varlen_attention_bwd(DType dt, const void* dout, const void* q, const void* k,
                                 const void* v, const void* out, const float* lse, AttnArgs a,
                                 void* dq, void* dk, void* dv, float* workspace,
                                 cudaStream_t stream) {
  using namespace attn;
  if (a.H <= 0 || a.Hk <= 0 || a.H % a.Hk != 0) return cudaErrorInvalidValue;
  if (a.H > 65535) return cudaErrorInvalidConfiguration;  // heads index grid y
  const int rows = attn_rows(dt);
  float* delta = workspace;
  int2* q_items = reinterpret_cast<int2*>(workspace + delta_floats(a));
  int2* k_items = q_items + work_capacity(a.nq, a.num_seqs, rows);
  if (a.nq > 0) {
    const cudaError_t err = build_work_list(a.cu_q, a.num_seqs, a.nq, rows, q_items, stream);
    if (err != cudaSuccess) return err;
  }
  if (a.nk > 0) {
    const cudaError_t err = build_work_list(a.cu_k, a.num_seqs, a.nk, rows, k_items, stream);
    if (err != cudaSuccess) return err;
  }
  NIT_DISPATCH_DTYPE(dt, T, {
    static_assert(Tile<T, 64>::kRows == Tile<T, 128>::kRows, "one work list for every head dim");
    if (a.nq > 0) {
      const int64_t nrows = a.nq * a.H;
      const int64_t rows_per_block = std::is_same<T, float>::value ? kDeltaWarps * 32 : kDeltaWarps;
      launch<attn_bwd_delta_kernel<T>>(static_cast<unsigned>(cdiv(nrows, rows_per_block)),
                                       kDeltaWarps * 32, 0, stream, static_cast<const T*>(dout),
                                       static_cast<const T*>(out), a.nq, a.H, a.D, delta);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    const BwdArgs g{q, k, v, dout, lse, delta, dq, dk, dv, q_items, k_items};
    const bool vec = can_vectorize_strided<T>(a.D, q, a.q_row, a.q_head) &&
                     can_vectorize_strided<T>(a.D, k, a.k_row, a.k_head) &&
                     can_vectorize_strided<T>(a.D, v, a.v_row, a.v_head) &&
                     can_vectorize<T>(a.D, dout);
    return with_padded_head_dim(a.D, [&](auto P) -> cudaError_t {
      return launch_bwd<T, decltype(P)::value>(g, a, vec, stream);
    });
  })
}

}  // namespace cuda
}  // namespace nit
