// nvcuda::wmma for the SIMT simulator (csrc/sim/runtime.h): the 16x16x16 shapes with fp16/bf16
// inputs and fp32 accumulators, as exact reference GEMMs (fp32 products of the inputs, summed in
// fp32). This header shadows the toolkit's <mma.h> in the simulator build (-I csrc/sim/include).
//
// Fragment layouts are opaque on a GPU; here:
//   - matrix_a / matrix_b: every lane holds the whole 16x16 tile (x[r * 16 + c]), so mma_sync
//     needs no exchange between lanes;
//   - accumulator: lane l holds 8 elements in the layout of the sm_80 mma.m16n8k16 accumulator
//     (rows l/4 and l/4 + 8, column pairs 2*(l%4) and 8 + 2*(l%4)), so element-wise code that
//     learns the element -> (row, col) map at run time (as the attention kernels do) is exercised.
// load/store are warp-collective: all 32 lanes must reach them (a warp sync, checked like
// __syncwarp), then each lane moves its elements. Pointers must be 32-byte aligned; ldm must be a
// multiple of 8 elements for 16-bit types and of 4 for float (the WMMA rules).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

#include "sim/runtime.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

// (row, col) of accumulator element i of lane l.
inline int acc_row(int l, int i) { return l / 4 + ((i / 2) % 2) * 8; }
inline int acc_col(int l, int i) { return 2 * (l % 4) + (i % 2) + (i / 4) * 8; }

inline void check_ptr(const void* p, unsigned ldm, size_t elem, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    ::nit::sim::fail("wmma", std::string(what) + ": pointer is not 32-byte aligned");
  }
  const unsigned step = elem == 2 ? 8 : 4;
  if (ldm % step != 0) {
    ::nit::sim::fail("wmma", std::string(what) + ": ldm " + std::to_string(ldm) +
                                 " is not a multiple of " + std::to_string(step) + " elements");
  }
}
inline int lane() { return static_cast<int>(threadIdx.x % 32); }
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment;

// matrix_a / matrix_b: the whole tile in every lane; Layout says how the tile sits in memory.
template <typename Use, typename T, typename Layout>
struct fragment<Use, 16, 16, 16, T, Layout> {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulators are float fragments");
  static constexpr int num_elements = 256;
  T x[256];
};

template <>
struct fragment<accumulator, 16, 16, 16, float, void> {
  static constexpr int num_elements = 8;
  float x[8];
};

template <typename Use, typename T, typename Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, T v) {
  for (auto& e : f.x) e = v;
}
inline void fill_fragment(fragment<accumulator, 16, 16, 16, float, void>& f, float v) {
  for (auto& e : f.x) e = v;
}

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  detail::check_ptr(p, ldm, sizeof(T), "load_matrix_sync");
  __syncwarp();
  constexpr bool kRowMajor = std::is_same<Layout, row_major>::value;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = kRowMajor ? p[r * ldm + c] : p[c * ldm + r];
}

namespace detail {
// The offset in a 16x16 fp32 tile (leading dimension ldm) of accumulator element i of lane l.
inline unsigned acc_offset(int l, int i, unsigned ldm, layout_t layout) {
  const unsigned r = acc_row(l, i), c = acc_col(l, i);
  return layout == mem_row_major ? r * ldm + c : c * ldm + r;
}
}  // namespace detail

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float, void>& f, const float* p,
                             unsigned ldm, layout_t layout) {
  detail::check_ptr(p, ldm, sizeof(float), "load_matrix_sync");
  __syncwarp();
  for (int i = 0; i < 8; ++i) f.x[i] = p[detail::acc_offset(detail::lane(), i, ldm, layout)];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float, void>& f,
                              unsigned ldm, layout_t layout) {
  detail::check_ptr(p, ldm, sizeof(float), "store_matrix_sync");
  __syncwarp();
  for (int i = 0; i < 8; ++i) p[detail::acc_offset(detail::lane(), i, ldm, layout)] = f.x[i];
}

// d = a * b + c: each lane computes its own accumulator elements from its copies of a and b.
template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float, void>& d,
                     const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float, void>& c) {
  const int l = detail::lane();
  float out[8];
  for (int i = 0; i < 8; ++i) {
    const int r = detail::acc_row(l, i), col = detail::acc_col(l, i);
    float s = c.x[i];
    for (int k = 0; k < 16; ++k) s = fmaf(detail::to_f(a.x[r * 16 + k]), detail::to_f(b.x[k * 16 + col]), s);
    out[i] = s;
  }
  for (int i = 0; i < 8; ++i) d.x[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda
