// Tile kernels of the CPU varlen attention, written once for any vector width.
//
// This file is included by attention.cpp (and attention_bf16.cpp) once per instruction set,
// inside a namespace of its own, with NIT_ATTENTION_VECTOR_BYTES defined to the vector size
// (32 or 64). It has no include guard and includes nothing itself: everything it uses is
// included before, so that under `#pragma GCC target(...)` only the functions defined here are
// compiled for the wider instructions (no inline function shared with the rest of the library is).
//
// Every result depends only on the operands and the fixed tiling, never on the thread that runs
// it: the kernels are deterministic whatever the thread count.

typedef float vf __attribute__((vector_size(NIT_ATTENTION_VECTOR_BYTES)));    // vector of floats
typedef int32_t vi __attribute__((vector_size(NIT_ATTENTION_VECTOR_BYTES)));  // of int32, same size
#undef NIT_ATTENTION_VECTOR_BYTES

constexpr int kVec = sizeof(vf) / sizeof(float);  // floats per vector
constexpr int kNV = kVec == 8 ? 2 : 4;             // vectors per micro-tile row
constexpr int kMR = 6;                             // rows per micro-tile
// AVX2: 6x2 tiles hold 12 accumulators in 16 registers; AVX-512: 6x4 tiles hold 24 in 32.

__attribute__((always_inline)) inline vf vload(const float* p) {
  vf v;
  memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}
__attribute__((always_inline)) inline void vstore(float* p, const vf& v) { memcpy(p, &v, sizeof(v)); }
// x - 0 is exactly x for every x (x + 0 is not, for x = -0), so this folds to one broadcast.
__attribute__((always_inline)) inline vf vsplat(float x) { return x - vf{}; }

// Lane i + w (mod kVec) moved to lane i: one permute with GCC, a loop through memory elsewhere.
struct LaneTable {
  int32_t v[2 * kVec];
  constexpr LaneTable() : v() {
    for (int i = 0; i < 2 * kVec; ++i) v[i] = i % kVec;
  }
};
constexpr LaneTable kLanes{};
__attribute__((always_inline)) inline vf vdown(const vf& v, int w) {
#if defined(__GNUC__) && !defined(__clang__)
  vi idx;
  memcpy(&idx, kLanes.v + w, sizeof(idx));
  return __builtin_shuffle(v, idx);
#else
  vf r;
  for (int i = 0; i < kVec; ++i) r[i] = v[(i + w) % kVec];
  return r;
#endif
}
// Pairwise halving reductions, a fixed order.
__attribute__((always_inline)) inline float hmax(const vf& v0) {
  vf v = v0;
  for (int w = kVec / 2; w > 0; w /= 2) {
    const vf u = vdown(v, w);
    v = u > v ? u : v;
  }
  return v[0];
}
__attribute__((always_inline)) inline float hsum(const vf& v0) {
  vf v = v0;
  for (int w = kVec / 2; w > 0; w /= 2) v += vdown(v, w);
  return v[0];
}

// Butterfly masks of the in-register transpose: stage s (w = 2^s) swaps bit s of the row index
// with bit s of the column index, through two-input shuffles of row pairs (i, i + w).
struct TransposeMasks {
  int32_t lo[6][kVec], hi[6][kVec];
  constexpr TransposeMasks() : lo(), hi() {
    for (int st = 0, w = 1; w < kVec; ++st, w *= 2) {
      for (int j = 0; j < kVec; ++j) {
        lo[st][j] = (j & w) ? kVec + j - w : j;
        hi[st][j] = (j & w) ? kVec + j : j + w;
      }
    }
  }
};
constexpr TransposeMasks kTMasks{};

// dst[c * ldd + r] = src[r * lds + c] for r, c < kVec.
__attribute__((always_inline)) inline void transpose_block(const float* src, int64_t lds,
                                                           float* dst, int64_t ldd) {
#if defined(__GNUC__) && !defined(__clang__)
  vf r[kVec];
#pragma GCC unroll 16
  for (int i = 0; i < kVec; ++i) r[i] = vload(src + i * lds);
#pragma GCC unroll 4
  for (int st = 0, w = 1; w < kVec; ++st, w *= 2) {
    vi lo, hi;
    memcpy(&lo, kTMasks.lo[st], sizeof(lo));
    memcpy(&hi, kTMasks.hi[st], sizeof(hi));
#pragma GCC unroll 16
    for (int i = 0; i < kVec; ++i) {
      if (i & w) continue;
      const vf a = r[i], b = r[i + w];
      r[i] = __builtin_shuffle(a, b, lo);
      r[i + w] = __builtin_shuffle(a, b, hi);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kVec; ++i) vstore(dst + i * ldd, r[i]);
#else
  for (int i = 0; i < kVec; ++i)
    for (int j = 0; j < kVec; ++j) dst[j * ldd + i] = src[i * lds + j];
#endif
}

// dst[d * ldd + j] = src[j * lds + d] for j < nj, d < nd (both multiples of kVec).
inline void transpose(const float* src, int64_t lds, int64_t nj, int64_t nd, float* dst,
                      int64_t ldd) {
  for (int64_t j = 0; j < nj; j += kVec) {
    for (int64_t d = 0; d < nd; d += kVec) transpose_block(src + j * lds + d, lds, dst + d * ldd + j, ldd);
  }
}

// 2^x for x <= 0 (x = -inf gives 0, NaN gives NaN): n = round(x), f = x - n in [-1/2, 1/2], 2^f
// by the Taylor series of e^(f ln2) to degree 7 (truncation error < 6e-9 relative), times 2^n
// built in the exponent bits. The product (rather than adding n to the exponent bits of 2^f)
// keeps a NaN a NaN whatever its payload. Results below 2^-126 flush to 0: far below what a
// softmax weight contributes next to its row maximum (weight 1).
__attribute__((always_inline)) inline vf vexp2(const vf& x) {
  const vf magic = vsplat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf xc = x < vsplat(-126.f) ? vsplat(-126.f) : x;
  const vf r = xc + magic;
  const vf n = r - magic;
  const vf f = xc - n;
  vi e;
  memcpy(&e, &r, sizeof(e));
  e = (e - (0x4B400000 - 127)) << 23;  // the bits of `magic` leave n; + 127 is the exponent bias
  vf two_n;
  memcpy(&two_n, &e, sizeof(two_n));
  vf p = vsplat(1.525273380405984e-05f);       // ln2^7 / 7!
  p = p * f + vsplat(1.540353039338161e-04f);  // ln2^6 / 6!
  p = p * f + vsplat(1.333355814642844e-03f);  // ln2^5 / 5!
  p = p * f + vsplat(9.618129107628477e-03f);  // ln2^4 / 4!
  p = p * f + vsplat(5.550410866482158e-02f);  // ln2^3 / 3!
  p = p * f + vsplat(2.402265069591007e-01f);  // ln2^2 / 2!
  p = p * f + vsplat(6.931471805599453e-01f);  // ln2
  p = p * f + vsplat(1.f);
  return x < vsplat(-126.f) ? vsplat(0.f) : p * two_n;
}

// x rounded to fp32 here: the compiler may not fuse the product that made it into a later
// add (an FMA would keep the exact product, which the forward never saw).
__attribute__((always_inline)) inline vf vround(vf x) {
#if defined(__GNUC__)
  asm("" : "+v"(x));
#endif
  return x;
}

// ----------------------------------------------------------------------------------------------
// micro-GEMM: C[M, N] (+)= A[M, K] B[K, N] in fp32, N a multiple of kVec (operands are padded).
// A(m, k) = A[m*a_rs + k*a_ks] is read by scalar broadcasts, so A may be row-major (a_ks = 1)
// or transposed (a_rs = 1) at the same cost; B and C are row-major (ldb, ldc).
// ----------------------------------------------------------------------------------------------
template <int MR, int NV, bool ACC>
__attribute__((always_inline)) inline void gemm_tile(int64_t K, const float* A, int64_t a_rs,
                                                     int64_t a_ks, const float* B, int64_t ldb,
                                                     float* C, int64_t ldc) {
  vf c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[r][v] = ACC ? vload(C + r * ldc + v * kVec) : vsplat(0.f);
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    const float* a = A + k * a_ks;
    vf bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = vload(b + v * kVec);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const vf ar = vsplat(a[r * a_rs]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] += ar * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * kVec, c[r][v]);
}

// A row tail of R < MR rows: the tile of exactly R rows.
template <int R, int NV, bool ACC>
__attribute__((always_inline)) inline void gemm_row_tail(int64_t rem, int64_t K, const float* A,
                                                         int64_t a_rs, int64_t a_ks, const float* B,
                                                         int64_t ldb, float* C, int64_t ldc) {
  if constexpr (R > 0) {
    if (rem == R) return gemm_tile<R, NV, ACC>(K, A, a_rs, a_ks, B, ldb, C, ldc);
    gemm_row_tail<R - 1, NV, ACC>(rem, K, A, a_rs, a_ks, B, ldb, C, ldc);
  }
}

template <int MR, int NV, bool ACC>
inline void gemm_panel(int64_t M, int64_t K, const float* A, int64_t a_rs, int64_t a_ks,
                       const float* B, int64_t ldb, float* C, int64_t ldc) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) {
    gemm_tile<MR, NV, ACC>(K, A + m * a_rs, a_rs, a_ks, B, ldb, C + m * ldc, ldc);
  }
  gemm_row_tail<MR - 1, NV, ACC>(M - m, K, A + m * a_rs, a_rs, a_ks, B, ldb, C + m * ldc, ldc);
}

// Column panels of kNV vectors are swept over all rows, so a panel of B stays in L1. A last
// single vector joins the panel before it (kNV + 1 vectors, 4 rows): a one-vector panel would
// spend one broadcast per FMA (head_dim 72 padded to 80 with AVX-512, 72 = 9 x 8 with AVX2).
template <bool ACC>
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_ks,
                 const float* B, int64_t ldb, float* C, int64_t ldc) {
  if (M <= 0) return;
  int64_t n = 0;
  for (; N - n >= kNV * kVec; n += kNV * kVec) {
    if (N - n == (kNV + 1) * kVec) {
      return gemm_panel<4, kNV + 1, ACC>(M, K, A, a_rs, a_ks, B + n, ldb, C + n, ldc);
    }
    gemm_panel<kMR, kNV, ACC>(M, K, A, a_rs, a_ks, B + n, ldb, C + n, ldc);
  }
  switch ((N - n) / kVec) {
    case 1: gemm_panel<kMR, 1, ACC>(M, K, A, a_rs, a_ks, B + n, ldb, C + n, ldc); break;
    case 2: gemm_panel<kMR, 2, ACC>(M, K, A, a_rs, a_ks, B + n, ldb, C + n, ldc); break;
    case 3: gemm_panel<kMR, 3, ACC>(M, K, A, a_rs, a_ks, B + n, ldb, C + n, ldc); break;
    default: break;
  }
}

// ----------------------------------------------------------------------------------------------
// scratch: one buffer per worker, carved into 64-byte aligned pieces
// ----------------------------------------------------------------------------------------------
struct Carver {
  float* p;
  float* take(int64_t n) {
    float* r = p;
    p += round_up(n, 16);
    return r;
  }
};

// The buffer only grows: resizing it down and up again zero-filled the regrown part at every call
// (the largest tasks run first).
inline Carver carve(std::vector<float>& buf, int64_t total) {
  if (buf.size() < static_cast<size_t>(total + 16)) buf.resize(total + 16);
  const uintptr_t a = reinterpret_cast<uintptr_t>(buf.data());
  return Carver{buf.data() + ((64 - a % 64) % 64) / sizeof(float)};
}

inline int64_t pad(int64_t n) { return round_up(n, 16); }

// Rows of one head are D-element pieces strided by H*D: software prefetch a few rows ahead
// hides the latency the hardware prefetchers leave at each jump.
constexpr int64_t kAhead = 4;
template <typename T>
inline void prefetch_row(const T* p, int64_t n, bool write = false) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) {
    if (write) __builtin_prefetch(c + b, 1); else __builtin_prefetch(c + b, 0);
  }
}

template <typename T>
inline void load_row(float* dst, const T* src, int64_t n, int64_t padded, float mul = 1.f) {
  int64_t d = 0;
  for (; d < n; ++d) dst[d] = static_cast<float>(src[d]) * mul;
  for (; d < padded; ++d) dst[d] = 0.f;
}

template <typename T>
inline void store_row(T* dst, const float* src, int64_t n, float mul = 1.f) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<T>(src[d] * mul);
}

// Prefetches the k and v rows of key row `key` (k/v head hk) ahead of their loads.
template <typename T>
inline void prefetch_kv(const T* k, const T* v, int64_t key, int64_t Hk, int64_t hk, int64_t D,
                        int64_t Dv) {
  prefetch_row(k + (key * Hk + hk) * D, D);
  prefetch_row(v + (key * Hk + hk) * Dv, Dv);
}

// dK, dV of the keys j0 .. j0+nk-1 of an image (k0: its first key row) for k/v head hk, from
// the fp32 tile accumulators dKa [nk, ldk] and dVa [nk, ldv]: into dk, dv when the image's
// queries are one task (t.chunk < 0), else into this chunk's rows of dk_part, dv_part.
template <typename T>
inline void store_dkdv(const Task& t, int64_t sk, int64_t k0, int64_t j0, int64_t nk, int64_t Hk,
                       int64_t hk, int64_t D, int64_t Dv, const float* dKa, int64_t ldk,
                       const float* dVa, int64_t ldv, T* dk, T* dv, float* dk_part,
                       float* dv_part) {
  for (int64_t j = 0; j < nk; ++j) {
    if (t.chunk < 0) {
      store_row(dk + ((k0 + j0 + j) * Hk + hk) * D, dKa + j * ldk, D);
      store_row(dv + ((k0 + j0 + j) * Hk + hk) * Dv, dVa + j * ldv, Dv);
    } else {
      const int64_t prow = (t.part + t.chunk * sk + j0 + j) * Hk + hk;
      std::copy(dKa + j * ldk, dKa + j * ldk + D, dk_part + prow * D);
      std::copy(dVa + j * ldv, dVa + j * ldv + Dv, dv_part + prow * Dv);
    }
  }
}

// Sets S[r, c] = fill for the columns of a [rows, N] tile (leading dimension ld) that are
// padding (c >= nk) or, causal, after the last key of row i0 + r (key j0 + c > i0 + r + off).
inline void mask_tile(float* S, int64_t ld, int64_t rows, int64_t N, int64_t nk, bool causal,
                      int64_t i0, int64_t j0, int64_t off, float fill) {
  if (nk == N && (!causal || j0 + nk - 1 <= i0 + off)) return;  // nothing masked
  for (int64_t r = 0; r < rows; ++r) {
    int64_t first = nk;
    if (causal) first = std::min(first, std::max<int64_t>(0, i0 + r + off - j0 + 1));
    for (int64_t c = first; c < N; ++c) S[r * ld + c] = fill;
  }
}

// ----------------------------------------------------------------------------------------------
// forward: one task = query rows [r0, r1) of image b, head h (online softmax over key tiles)
// ----------------------------------------------------------------------------------------------
template <typename T>
void fwd_task(const Geometry& g, const T* q, const T* k, const T* v, T* out, float* lse,
              const Task& t, std::vector<float>& buf) {
  const int64_t q0 = g.cq[t.b], sq = g.cq[t.b + 1] - q0;
  const int64_t k0 = g.ck[t.b], sk = g.ck[t.b + 1] - k0;
  const int64_t off = sk - sq, h = t.head, hk = h / g.G;
  const int64_t D = g.D, Dv = g.Dv, H = g.H, Hk = g.Hk;
  const int64_t Dp = round_up(D, kVec), Dvp = round_up(Dv, kVec);
  const int64_t nvis = visible_keys(g.causal, t.r1, sq, sk);
  const int64_t nkb = (nvis + kBk - 1) / kBk;
  // K^T tiles [nkb][Dp][kBk] and V rows [nkb*kBk][Dvp], shared by all query tiles of the task
  Carver c = carve(buf, pad(nkb * Dp * kBk) + pad(nkb * kBk * Dvp) + pad(kBk * Dp) +
                            pad(kBq * D) + pad(kBq * kBk) + pad(kBq * Dvp) + 2 * pad(kBq));
  float* kt = c.take(nkb * Dp * kBk);
  float* vp = c.take(nkb * kBk * Dvp);
  float* krows = c.take(kBk * Dp);
  float* qs = c.take(kBq * D);
  float* S = c.take(kBq * kBk);
  float* O = c.take(kBq * Dvp);
  float* m = c.take(kBq);
  float* l = c.take(kBq);

  for (int64_t j0 = 0; j0 < nvis; j0 += kBk) {
    const int64_t nk = std::min(kBk, nvis - j0), N = round_up(nk, kVec);
    for (int64_t j = 0; j < N; ++j) {
      if (j + kAhead < nk) prefetch_kv(k, v, k0 + j0 + j + kAhead, Hk, hk, D, Dv);
      if (j < nk) {
        load_row(krows + j * Dp, k + ((k0 + j0 + j) * Hk + hk) * D, D, Dp);
        load_row(vp + (j0 + j) * Dvp, v + ((k0 + j0 + j) * Hk + hk) * Dv, Dv, Dvp);
      } else {
        std::fill(krows + j * Dp, krows + (j + 1) * Dp, 0.f);
      }
    }
    transpose(krows, Dp, N, Dp, kt + (j0 / kBk) * Dp * kBk, kBk);
  }

  const float qmul = g.scale * kLog2e;  // scores in base 2: exp(s) = 2^(s log2 e)
  for (int64_t i0 = t.r0; i0 < t.r1; i0 += kBq) {
    const int64_t rows = std::min(kBq, t.r1 - i0);
    for (int64_t r = 0; r < rows; ++r) {
      if (r + kAhead < rows) prefetch_row(q + ((q0 + i0 + r + kAhead) * H + h) * D, D);
      prefetch_row(out + ((q0 + i0 + r) * H + h) * Dv, Dv, true);  // written after the key loop
      load_row(qs + r * D, q + ((q0 + i0 + r) * H + h) * D, D, D, qmul);
      m[r] = -INFINITY;
      l[r] = 0.f;
    }
    std::fill(O, O + rows * Dvp, 0.f);
    const int64_t kend = visible_keys(g.causal, i0 + rows, sq, sk);
    for (int64_t j0 = 0; j0 < kend; j0 += kBk) {
      const int64_t nk = std::min(kBk, nvis - j0), N = round_up(nk, kVec);
      gemm<false>(rows, N, D, qs, D, 1, kt + (j0 / kBk) * Dp * kBk, kBk, S, kBk);
      mask_tile(S, kBk, rows, N, nk, g.causal, i0, j0, off, -INFINITY);
      for (int64_t r = 0; r < rows; ++r) {
        float* s = S + r * kBk;
        vf vmax = vsplat(-INFINITY);
        for (int64_t cc = 0; cc < N; cc += kVec) {
          const vf x = vload(s + cc);
          vmax = x > vmax ? x : vmax;
        }
        // NaN scores are skipped by the max and reach l and O through exp2 (vexp2(NaN) = NaN)
        const float m_new = std::max(m[r], hmax(vmax));
        if (m_new == -INFINITY) {  // every visible score so far -inf or NaN: weights 0, O stays 0
          for (int64_t cc = 0; cc < N; ++cc) {
            if (std::isnan(s[cc])) l[r] = NAN;  // ... but a NaN score makes the row NaN
          }
          std::fill(s, s + N, 0.f);
          continue;
        }
        const vf vm = vsplat(m_new);
        vf vsum = vsplat(0.f);
        for (int64_t cc = 0; cc < N; cc += kVec) {
          const vf p = vexp2(vload(s + cc) - vm);
          vstore(s + cc, p);
          vsum += p;
        }
        const float alpha = m[r] == -INFINITY ? 0.f : std::exp2(m[r] - m_new);
        l[r] = l[r] * alpha + hsum(vsum);
        m[r] = m_new;
        if (alpha != 1.f) {
          float* o = O + r * Dvp;
          const vf va = vsplat(alpha);
          for (int64_t cc = 0; cc < Dvp; cc += kVec) vstore(o + cc, vload(o + cc) * va);
        }
      }
      gemm<true>(rows, Dvp, nk, S, kBk, 1, vp + j0 * Dvp, Dvp, O, Dvp);
    }
    // l > 0: the row's softmax; l == 0 and no visible key (causal, or sk = 0): out 0, lse -inf;
    // l == 0 with visible keys (all scores -inf) or l NaN: out and lse NaN, as softmax gives.
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = q0 + i0 + r;
      const bool sees = visible_keys(g.causal, i0 + r + 1, sq, sk) > 0;
      const float none = sees ? NAN : 0.f;
      store_row(out + (row * H + h) * Dv, O + r * Dvp, Dv, l[r] > 0.f ? 1.f / l[r] : none);
      lse[h * g.Nq + row] = l[r] > 0.f ? (m[r] + std::log2(l[r])) * kLn2 : sees ? NAN : -INFINITY;
    }
  }
}

// ----------------------------------------------------------------------------------------------
// backward: one task = query rows [r0, r1) of image b and the G query heads of k/v head hk,
// against every key of the image. With P = exp(s - lse) recomputed per tile (s = the forward's
// base-2 score, bit for bit, taken to natural units as the forward took the max: then
// s ln2 <= lse exactly and P <= 1 however large the scores are, e.g. softmax_scale 1e30):
//   dV += P^T dO,  dP = dO V^T,  dS = P (dP - delta) scale,  dK += dS^T Q,  dQ += dS K,
// delta = rowsum(dO * O). The task owns its dQ rows; dK/dV rows go straight to the output when
// the image is one task per head (t.chunk < 0), else to this chunk's slice of dk_part/dv_part.
// ----------------------------------------------------------------------------------------------
template <typename T>
void bwd_task(const Geometry& g, const T* dout, const T* q, const T* k, const T* v, const T* out,
              const float* lse, T* dq, T* dk, T* dv, float* dk_part, float* dv_part,
              const Task& t, std::vector<float>& buf) {
  const int64_t q0 = g.cq[t.b], sq = g.cq[t.b + 1] - q0;
  const int64_t k0 = g.ck[t.b], sk = g.ck[t.b + 1] - k0;
  const int64_t off = sk - sq, hk = t.head, G = g.G, H = g.H, Hk = g.Hk;
  const int64_t D = g.D, Dv = g.Dv, Dp = round_up(D, kVec), Dvp = round_up(Dv, kVec);
  const int64_t rows = t.r1 - t.r0, nvis = visible_keys(g.causal, t.r1, sq, sk);
  const float qmul = g.scale * kLog2e;
  Carver c = carve(buf, pad(G * rows * Dp) * 3 + pad(G * rows * Dvp) + pad(G * rows) * 2 +
                            pad(kBk * Dp) * 3 + pad(kBk * Dvp) * 3 + pad(kBq * kBk) * 2 +
                            pad(Dv * kVec) + pad(kVec));
  float* Qp = c.take(G * rows * Dp);
  float* Qs = c.take(G * rows * Dp);  // q * scale * log2(e), as the forward scores it
  float* dQ = c.take(G * rows * Dp);
  float* dOp = c.take(G * rows * Dvp);
  float* lse_r = c.take(G * rows);
  float* delta = c.take(G * rows);
  float* Kr = c.take(kBk * Dp);
  float* dKa = c.take(kBk * Dp);
  float* dVa = c.take(kBk * Dvp);
  float* Vr = c.take(kBk * Dvp);
  float* Kt = c.take(Dp * kBk);
  float* Vt = c.take(Dvp * kBk);
  float* P = c.take(kBq * kBk);
  float* dS = c.take(kBq * kBk);
  float* ocol = c.take(Dv * kVec);  // one out row as column 0 of a [Dv, kVec] panel
  float* drow = c.take(kVec);
  std::fill(ocol, ocol + Dv * kVec, 0.f);

  for (int64_t gi = 0; gi < G; ++gi) {
    const int64_t h = hk * G + gi;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = q0 + t.r0 + r, e = gi * rows + r;
      if (r + kAhead < rows) {
        const int64_t ia = i + kAhead;
        prefetch_row(q + (ia * H + h) * D, D);
        prefetch_row(dout + (ia * H + h) * Dv, Dv);
        prefetch_row(out + (ia * H + h) * Dv, Dv);
      }
      load_row(Qp + e * Dp, q + (i * H + h) * D, D, Dp);
      load_row(Qs + e * Dp, q + (i * H + h) * D, D, Dp, qmul);
      load_row(dOp + e * Dvp, dout + (i * H + h) * Dv, Dv, Dvp);
      // delta by the micro-GEMM that computes dP: a one-hot row (huge softmax_scale) then has
      // dP - delta exactly 0 at its key, as the reference's rowsum(dP * P) gives, not a rounding
      // difference times the scale
      const T* o = out + (i * H + h) * Dv;
      for (int64_t d = 0; d < Dv; ++d) ocol[d * kVec] = static_cast<float>(o[d]);
      gemm<false>(1, kVec, Dv, dOp + e * Dvp, Dvp, 1, ocol, kVec, drow, kVec);
      delta[e] = drow[0];
      lse_r[e] = lse[h * g.Nq + i];
    }
  }
  std::fill(dQ, dQ + G * rows * Dp, 0.f);

  for (int64_t j0 = 0; j0 < sk; j0 += kBk) {
    const int64_t nk = std::min(kBk, sk - j0), N = round_up(nk, kVec);
    std::fill(dKa, dKa + nk * Dp, 0.f);
    std::fill(dVa, dVa + nk * Dvp, 0.f);
    for (int64_t j = 0; j < nk && t.chunk < 0; ++j) {  // written after the query loop
      prefetch_row(dk + ((k0 + j0 + j) * Hk + hk) * D, D, true);
      prefetch_row(dv + ((k0 + j0 + j) * Hk + hk) * Dv, Dv, true);
    }
    if (j0 < nvis) {
      for (int64_t j = 0; j < N; ++j) {
        if (j + kAhead < nk) prefetch_kv(k, v, k0 + j0 + j + kAhead, Hk, hk, D, Dv);
        if (j < nk) {
          load_row(Kr + j * Dp, k + ((k0 + j0 + j) * Hk + hk) * D, D, Dp);
          load_row(Vr + j * Dvp, v + ((k0 + j0 + j) * Hk + hk) * Dv, Dv, Dvp);
        } else {
          std::fill(Kr + j * Dp, Kr + (j + 1) * Dp, 0.f);
          std::fill(Vr + j * Dvp, Vr + (j + 1) * Dvp, 0.f);
        }
      }
      transpose(Kr, Dp, N, Dp, Kt, N);
      transpose(Vr, Dvp, N, Dvp, Vt, N);
      for (int64_t gi = 0; gi < G; ++gi) {
        for (int64_t i0 = t.r0; i0 < t.r1; i0 += kBq) {
          const int64_t mr = std::min(kBq, t.r1 - i0);
          if (g.causal && i0 + mr - 1 + off < j0) continue;  // no row of the tile sees a key
          const int64_t e0 = gi * rows + (i0 - t.r0);
          const float* Qb = Qp + e0 * Dp;
          const float* dOb = dOp + e0 * Dvp;
          gemm<false>(mr, N, D, Qs + e0 * Dp, Dp, 1, Kt, N, P, N);
          for (int64_t r = 0; r < mr; ++r) {
            float* p = P + r * N;
            const float lr = lse_r[e0 + r];
            if (lr == -INFINITY) {  // the row saw no key: all weights 0 (a NaN lse flows on)
              std::fill(p, p + N, 0.f);
              continue;
            }
            const vf vln2 = vsplat(kLn2), vl = vsplat(lr), vlog2e = vsplat(kLog2e);
            for (int64_t cc = 0; cc < N; cc += kVec) {
              vstore(p + cc, vexp2((vround(vload(p + cc) * vln2) - vl) * vlog2e));
            }
          }
          // masked after exp (scale may be 0, and 0 * -inf would be NaN)
          mask_tile(P, N, mr, N, nk, g.causal, i0, j0, off, 0.f);
          gemm<true>(nk, Dvp, mr, P, 1, N, dOb, Dvp, dVa, Dvp);
          gemm<false>(mr, N, Dv, dOb, Dvp, 1, Vt, N, dS, N);
          for (int64_t r = 0; r < mr; ++r) {
            const vf vd = vsplat(delta[e0 + r]), vsc = vsplat(g.scale);
            float* ds = dS + r * N;
            const float* p = P + r * N;
            for (int64_t cc = 0; cc < N; cc += kVec) {
              vstore(ds + cc, vload(p + cc) * (vload(ds + cc) - vd) * vsc);
            }
          }
          gemm<true>(nk, Dp, mr, dS, 1, N, Qb, Dp, dKa, Dp);
          gemm<true>(mr, Dp, nk, dS, N, 1, Kr, Dp, dQ + e0 * Dp, Dp);
        }
      }
    }
    store_dkdv(t, sk, k0, j0, nk, Hk, hk, D, Dv, dKa, Dp, dVa, Dvp, dk, dv, dk_part, dv_part);
  }
  for (int64_t gi = 0; gi < G; ++gi) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = q0 + t.r0 + r;
      if (r + kAhead < rows) prefetch_row(dq + ((i + kAhead) * H + hk * G + gi) * D, D, true);
      store_row(dq + (i * H + hk * G + gi) * D, dQ + (gi * rows + r) * Dp, D);
    }
  }
}
