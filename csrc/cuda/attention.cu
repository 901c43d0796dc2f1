// Varlen attention forward (flash_attn_varlen_func semantics) for GPUs without flash-attn:
// tiled, online softmax (Milakov & Gimelshein 2018; FlashAttention-2, Dao 2023), nothing of
// size seqlen^2 in memory. Per image b and query head h:
//   S = scale * Q K^T,  P = softmax(S) (causal: bottom-right aligned mask),  O = P V
//   lse = log(sum exp(S)) per query row (natural log), -inf for a row that sees no key (O = 0);
//   NaN in q, k or v, or a row whose visible scores are all -inf, gives NaN as softmax does
//
// Grid (work-list slots, H): one CTA per (image, tile of kRows query rows) item of the list built
// from cu_seqlens on the device (attention_tile.cuh), per head; every real row is covered
// whatever max_seqlen says, and only the list's few spare slots exit at once. q, k, v may be
// strided (token and head strides; last dim contiguous). Each warp owns 16 query rows; per step of
// kFwdCols keys: S strip = Q K^T (tensor cores for fp16/bf16), online softmax on the strip
// (row max/sum by warp shuffles), P rounded to the input dtype, O = alpha * O + P V.
#include "cuda/attention_tile.cuh"

namespace nit {
namespace cuda {
namespace attn {
namespace {

template <typename T, int kDp>
struct FwdLayout {
  using Tl = Tile<T, kDp>;
  static constexpr int BM = Tl::kRows, BN = Tl::kFwdCols;
  static constexpr int LDI = Tl::kLdIn, LDS = Tl::ld_s(BN), LDP = Tl::ld_p(BN);
  static constexpr size_t q = 0;
  static constexpr size_t k = align128(q + sizeof(T) * BM * LDI);
  static constexpr size_t v = align128(k + sizeof(T) * BN * LDI);
  static constexpr size_t s = align128(v + sizeof(T) * BN * LDI);
  static constexpr size_t p = align128(s + sizeof(float) * BM * LDS);
  static constexpr size_t row = align128(p + sizeof(T) * BM * LDP);
  static constexpr size_t bytes = align128(row + sizeof(float) * 3 * BM);  // factor, m, l
};

template <typename T, int kDp>
__global__ void __launch_bounds__(Tile<T, kDp>::kThreads)
    attn_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                    AttnArgs a, const int2* __restrict__ items, bool vec, T* __restrict__ out,
                    float* __restrict__ lse) {
  using L = FwdLayout<T, kDp>;
  constexpr int BM = L::BM, BN = L::BN, LDI = L::LDI, LDS = L::LDS, LDP = L::LDP;
  constexpr int kThreads = Tile<T, kDp>::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem + L::q);
  T* sK = reinterpret_cast<T*>(smem + L::k);
  T* sV = reinterpret_cast<T*>(smem + L::v);
  float* sS = reinterpret_cast<float*>(smem + L::s);
  T* sP = reinterpret_cast<T*>(smem + L::p);
  float* sRow = reinterpret_cast<float*>(smem + L::row);  // [3][BM]: row factor, max m, sum l

  int image;
  int64_t m0;
  if (!work_item(items, BM, &image, &m0)) return;  // uniform: the CTA leaves before any barrier
  const Ranges rg = image_ranges(a, image);
  const int64_t h = blockIdx.y, hk = h / (a.H / a.Hk);
  const int64_t D = a.D;
  const int64_t o_stride = a.H * D;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rows_valid = static_cast<int>(rg.sq - m0 < BM ? rg.sq - m0 : BM);

  load_tile<T, BM, kDp, LDI, kThreads>(sQ, q + (rg.q_begin + m0) * a.q_row + h * a.q_head,
                                       a.q_row, rows_valid, static_cast<int>(D), vec);

  float* my_S = sS + warp * 16 * LDS;
  T* my_P = sP + warp * 16 * LDP;
  float* my_factor = sRow + warp * 16;
  // Online-softmax state of the strip's rows lives in shared memory (registers are needed for
  // the accumulators); every lane computes the same update, lane 0 stores it.
  float* my_m = sRow + BM + warp * 16;
  float* my_l = sRow + 2 * BM + warp * 16;
  if (lane < 16) {
    my_m[lane] = -INFINITY;
    my_l[lane] = 0.f;
  }
  StripAcc<T, kDp> acc;
  acc.zero();
  acc.init_rows(my_S, LDS);  // ends with __syncwarp

  const int64_t n_end = keys_end(a.causal, m0, BM, rg.sq, rg.sk);
  for (int64_t n0 = 0; n0 < n_end; n0 += BN) {
    __syncthreads();  // every warp is done with the previous K/V tiles
    const int keys = static_cast<int>(rg.sk - n0 < BN ? rg.sk - n0 : BN);
    load_tile<T, BN, kDp, LDI, kThreads>(sK, k + (rg.k_begin + n0) * a.k_row + hk * a.k_head,
                                         a.k_row, keys, static_cast<int>(D), vec);
    load_tile<T, BN, kDp, LDI, kThreads>(sV, v + (rg.k_begin + n0) * a.v_row + hk * a.v_head,
                                         a.v_row, keys, static_cast<int>(D), vec);
    __syncthreads();

    strip_nt<T, kDp, BN>(my_S, LDS, sQ + warp * 16 * LDI, LDI, sK, LDI);
    __syncwarp();
#pragma unroll 1
    for (int r = 0; r < 16; ++r) {
      const int64_t i = m0 + warp * 16 + r;  // query row in the image
      int64_t lim = rg.sk - n0;              // keys n0 + c with c < lim are visible to row i
      if (a.causal && i + rg.sk - rg.sq + 1 - n0 < lim) lim = i + rg.sk - rg.sq + 1 - n0;
      float s[BN / 32];
      float block_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < BN / 32; ++j) {
        const int c = lane + 32 * j;
        s[j] = c < lim ? mul_rn(my_S[r * LDS + c], a.softmax_scale) : -INFINITY;
        block_max = fmaxf(block_max, s[j]);
      }
      OnlineSoftmax st;
      st.m = my_m[r];
      st.l = my_l[r];
      const float alpha = st.rescale_to(warp_max(block_max));
      // fmaxf skips NaN, so a NaN score reaches p, l and O through expf. A row whose scores so
      // far are all -inf or NaN keeps m = -inf: subtracting 0 instead gives p = 0 for -inf (not
      // expf(-inf + inf) = NaN) and NaN for NaN.
      const float m_sub = st.m == -INFINITY ? 0.f : st.m;
      float row_sum = 0.f;
#pragma unroll
      for (int j = 0; j < BN / 32; ++j) {
        const float pj = expf(s[j] - m_sub);
        row_sum += pj;
        my_P[r * LDP + lane + 32 * j] = from_float<T>(pj);
      }
      st.l += warp_sum(row_sum);
      __syncwarp();  // every lane has read my_m[r], my_l[r]
      if (lane == 0) {
        my_m[r] = st.m;
        my_l[r] = st.l;
        my_factor[r] = alpha;
      }
    }
    __syncwarp();
    acc.scale_rows(my_factor);
    acc.template mma<BN>(my_P, LDP, sV, LDI);
  }

  // O /= l and lse per valid row. l == 0 or NaN: a row that sees no key by the mask (causal, or
  // sk = 0) gets O = 0 and lse = -inf; one with visible keys whose scores are all -inf or hold a
  // NaN gets NaN in both, as softmax does (NaN * 0 keeps an O that is already NaN).
  __syncwarp();  // every lane has applied the last step's factors
  if (lane < 16) {
    OnlineSoftmax st;
    st.m = my_m[lane];
    st.l = my_l[lane];
    const int64_t i = m0 + warp * 16 + lane;
    const bool sees = rg.sk > 0 && (!a.causal || i + rg.sk - rg.sq >= 0);
    my_factor[lane] = st.l > 0.f ? 1.f / st.l : sees ? NAN : 0.f;
    if (i < rg.sq) lse[h * a.nq + rg.q_begin + i] = st.l > 0.f ? st.lse() : sees ? NAN : -INFINITY;
  }
  __syncwarp();
  acc.scale_rows(my_factor);
  acc.for_each(my_S, LDS, [&](int r, int c, float val) {
    const int64_t i = m0 + warp * 16 + r;
    if (i < rg.sq && c < D) out[(rg.q_begin + i) * o_stride + h * D + c] = from_float<T>(val);
  });
}

}  // namespace
}  // namespace attn

int64_t varlen_attention_fwd_workspace(DType dt, const AttnArgs& a) {
  const int rows = dt == DType::kFloat32 ? attn::Tile<float, 64>::kRows : attn::Tile<__half, 64>::kRows;
  return 2 * attn::work_capacity(a.nq, a.num_seqs, rows);  // int2 items
}

cudaError_t varlen_attention_fwd(DType dt, const void* q, const void* k, const void* v,
                                 AttnArgs a, void* out, float* lse, float* workspace,
                                 cudaStream_t stream) {
  if (a.H <= 0 || a.Hk <= 0 || a.H % a.Hk != 0) return cudaErrorInvalidValue;
  if (a.H > 65535) return cudaErrorInvalidConfiguration;  // heads index grid y
  if (a.nq == 0) return cudaSuccess;
  using namespace attn;
  int2* items = reinterpret_cast<int2*>(workspace);
  NIT_DISPATCH_DTYPE(dt, T, {
    constexpr int BM = Tile<T, 64>::kRows;  // the same for every kDp
    const cudaError_t list_err = build_work_list(a.cu_q, a.num_seqs, a.nq, BM, items, stream);
    if (list_err != cudaSuccess) return list_err;
    const bool vec = can_vectorize_strided<T>(a.D, q, a.q_row, a.q_head) &&
                     can_vectorize_strided<T>(a.D, k, a.k_row, a.k_head) &&
                     can_vectorize_strided<T>(a.D, v, a.v_row, a.v_head) &&
                     can_vectorize<T>(a.D, out);
    return with_padded_head_dim(a.D, [&](auto P) -> cudaError_t {
      constexpr int kDp = decltype(P)::value;
      using L = FwdLayout<T, kDp>;
      static_assert(L::BM == BM, "one work list for every head dim");
      auto kernel = attn_fwd_kernel<T, kDp>;
      cudaError_t err = allow_smem(kernel, L::bytes);
      if (err != cudaSuccess) return err;
      const dim3 grid(static_cast<unsigned>(work_capacity(a.nq, a.num_seqs, BM)),
                      static_cast<unsigned>(a.H));
      launch<attn_fwd_kernel<T, kDp>>(
          grid, Tile<T, kDp>::kThreads, L::bytes, stream, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), a, items,
          vec, static_cast<T*>(out), lse);
      return cudaGetLastError();
    });
  })
}

}  // namespace cuda
}  // namespace nit
