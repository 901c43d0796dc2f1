// The CUDA glue (csrc/cuda/*_glue.cpp) in the simulator build: the same argument checks and
// launcher calls, on CPU tensors, registered as nit_sim::<op> for the CPU key, and every call
// run under the sanitizer's checks (included by csrc/cuda/glue.h when NIT_CUDA_SIM is defined):
//
//   initcheck: while the glue runs, every CPU allocation (the outputs and workspaces it makes
//     with at::empty*) is filled with the poison of runtime.h (a NaN payload in fp32, fp16, bf16);
//     an element of a returned tensor that still holds it was written by no thread: error
//     "uninitialised" with the output's name and the element's index.
//   bounds: those allocations, and copies of the input tensors made in the same way, end right
//     before an inaccessible page: a kernel access past the end of any buffer it was given faults
//     and raises "out of bounds" with the kernel, block, thread and distance (runtime.cpp). An
//     access before the start, or within the 16-byte alignment slack after the end, is not seen.
//   racecheck: the call runs twice, threads (and blocks) resumed in order and then in reverse
//     order at every synchronisation point, dynamic shared memory poisoned before every block; any bit
//     that differs between the two runs' outputs is an error "race". This catches a missing
//     barrier or warp sync whenever the two interleavings it allows give different values (a
//     thread reading shared memory that another thread writes, or writes later, in the same
//     barrier interval; two threads or blocks writing the same output element differently). It
//     does not see conflicts that happen to produce equal bits under both orders. Kernels must be
//     deterministic for this (ours are: no atomics, fixed-order reductions).
// NIT_CUDA_SIM_RACECHECK=0 runs each call once (no race check).
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>

#include "sim/runtime.h"

namespace nit {
namespace cuda_glue {

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline cudaStream_t current_stream() { return nullptr; }
inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name,
              " must be a CPU tensor (the cuda_sim backend runs the CUDA kernels on the CPU), got one on ",
              t.device());
}

namespace sim_checks {

// The CPU allocator while the glue runs: fresh memory comes back poisoned, and ends (16-byte
// aligned) right before an inaccessible page, so a read or write past the end faults (bounds).
class PoisonAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    constexpr size_t kPage = 4096;
    const size_t data = (n + 15) / 16 * 16;
    const size_t body = (data + kPage - 1) / kPage * kPage;
    void* base = mmap(nullptr, body + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "cuda_sim: cannot allocate ", n, " bytes");
    mprotect(static_cast<char*>(base) + body, kPage, PROT_NONE);
    char* p = static_cast<char*>(base) + body - data;
    ::nit::sim::poison(p, data);
    ::nit::sim::note_buffer(p, n);
    return {p, new Mapping{base, body + kPage, p}, &release, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Mapping {
    void* base;
    size_t bytes;
    void* data;
  };
  static void release(void* ctx) {
    auto* m = static_cast<Mapping*>(ctx);
    ::nit::sim::forget_buffer(m->data);
    munmap(m->base, m->bytes);
    delete m;
  }
};

class PoisonScope {
 public:
  PoisonScope() : base_(c10::GetCPUAllocator()) {
    c10::SetCPUAllocator(&poison_, /*priority=*/255);
  }
  ~PoisonScope() { c10::SetCPUAllocator(base_, /*priority=*/255); }

 private:
  c10::Allocator* base_;
  PoisonAllocator poison_;
};

template <typename F>
void for_each_tensor(const at::Tensor& t, F&& f, size_t& i) {
  f(t, i++);
}
template <typename... Ts, typename F>
void for_each_tensor(const std::tuple<Ts...>& r, F&& f, size_t& i) {
  std::apply([&](const auto&... t) { (for_each_tensor(t, f, i), ...); }, r);
}
template <typename R, typename F>
void for_each_output(const R& r, F&& f) {
  size_t i = 0;
  for_each_tensor(r, f, i);
}

inline std::string output_name(const char* op, size_t i) {
  const auto schema = c10::Dispatcher::singleton().findSchema({std::string("nit_sim::") + op, ""});
  if (schema.has_value() && i < schema->schema().returns().size() &&
      !schema->schema().returns()[i].name().empty()) {
    return schema->schema().returns()[i].name();
  }
  return "output " + std::to_string(i);
}

inline std::string index_str(const at::Tensor& t, int64_t flat) {
  std::string s = "[";
  std::vector<int64_t> idx(t.dim());
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    idx[d] = t.size(d) ? flat % t.size(d) : 0;
    flat = t.size(d) ? flat / t.size(d) : 0;
  }
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(idx[d]);
  return s + "]";
}

// First element holding the poison pattern, or -1.
inline int64_t first_poisoned(const at::Tensor& t) {
  const auto* p = static_cast<const unsigned char*>(t.data_ptr());
  const size_t es = t.element_size();
  unsigned char pattern[8];
  for (size_t b = 0; b < es; ++b) pattern[b] = (b & 1) ? ::nit::sim::kPoisonHi : ::nit::sim::kPoisonLo;
  for (int64_t i = 0; i < t.numel(); ++i)
    if (memcmp(p + i * es, pattern, es) == 0) return i;
  return -1;
}

inline void check_initialised(const char* op, const at::Tensor& t, size_t i) {
  if (!t.defined() || !t.is_contiguous() || t.numel() == 0) return;
  const int64_t bad = first_poisoned(t);
  TORCH_CHECK(bad < 0, "cuda_sim initcheck: uninitialised output '", output_name(op, i), "' of nit_sim::",
              op, ": element ", index_str(t, bad), " (of shape ", t.sizes(),
              ") was written by no thread (it still holds the poison written before the launch)");
}

inline void check_same(const char* op, const at::Tensor& a, const at::Tensor& b, size_t i) {
  if (!a.defined() || a.numel() == 0) return;
  const size_t es = a.element_size();
  const auto* pa = static_cast<const unsigned char*>(a.data_ptr());
  const auto* pb = static_cast<const unsigned char*>(b.data_ptr());
  if (memcmp(pa, pb, a.nbytes()) == 0) return;
  int64_t e = 0;
  while (memcmp(pa + e * es, pb + e * es, es) == 0) ++e;
  TORCH_CHECK(false, "cuda_sim racecheck: race in nit_sim::", op, ": output '", output_name(op, i),
              "' element ", index_str(a, e), " differs between two schedules of the threads (",
              a.flatten()[e].item<double>(), " in thread order, ", b.flatten()[e].item<double>(),
              " in reverse order): threads of a block, or blocks, touch the same memory "
              "without a barrier between them");
}

inline bool racecheck_enabled() {
  const char* e = std::getenv("NIT_CUDA_SIM_RACECHECK");
  return e == nullptr || std::string(e) != "0";
}

// Runs glue function `fn` under the checks above.
template <typename R, typename Call>
R run_checked(const char* op, Call&& call) {
  R first;
  {
    const PoisonScope poison;
    ::nit::sim::set_schedule(0);
    first = call();
  }
  for_each_output(first, [&](const at::Tensor& t, size_t i) { check_initialised(op, t, i); });
  if (racecheck_enabled()) {
    R second;
    {
      const PoisonScope poison;
      ::nit::sim::set_schedule(1);
      second = call();
      ::nit::sim::set_schedule(0);
    }
    size_t i = 0;
    auto outs2 = std::vector<at::Tensor>();
    for_each_output(second, [&](const at::Tensor& t, size_t) { outs2.push_back(t); });
    for_each_output(first, [&](const at::Tensor& t, size_t k) { check_same(op, t, outs2[k], k); });
    (void)i;
  }
  return first;
}

// A copy of an input tensor in guarded memory (same sizes and strides), made inside the poison
// scope, so that reads past its end fault too; other arguments pass through.
inline at::Tensor guarded(const at::Tensor& t) {
  if (!t.defined()) return t;
  return at::empty_strided(t.sizes(), t.strides(), t.options()).copy_(t);
}
template <typename A>
inline const A& guarded(const A& a) {
  return a;
}

// One checked call at a time: the poisoning allocator is process-wide while a call runs.
inline std::mutex& call_mutex() {
  static std::mutex m;
  return m;
}

// Stands in for the torch::Library of TORCH_LIBRARY_IMPL: m.impl(name, &fn) registers fn
// wrapped in run_checked.
class Registrar {
 public:
  explicit Registrar(torch::Library& lib) : lib_(lib) {}
  template <typename R, typename... Args>
  void impl(const char* name, R (*fn)(Args...)) {
    lib_.impl(name, [fn, name](Args... args) -> R {
      const std::lock_guard<std::mutex> lock(call_mutex());
      return run_checked<R>(name, [&] { return fn(guarded(args)...); });
    });
  }

 private:
  torch::Library& lib_;
};

}  // namespace sim_checks
}  // namespace cuda_glue
}  // namespace nit

#define NIT_SIM_CONCAT2(a, b) a##b
#define NIT_SIM_CONCAT(a, b) NIT_SIM_CONCAT2(a, b)
#define NIT_CUDA_GLUE_IMPL(m) NIT_SIM_GLUE_IMPL(m, NIT_SIM_CONCAT(nit_sim_glue_, __COUNTER__))
#define NIT_SIM_GLUE_IMPL(m, fn)                                         \
  static void fn(::nit::cuda_glue::sim_checks::Registrar& m);            \
  TORCH_LIBRARY_IMPL(nit_sim, CPU, lib) {                                \
    ::nit::cuda_glue::sim_checks::Registrar registrar(lib);              \
    fn(registrar);                                                       \
  }                                                                      \
  static void fn(::nit::cuda_glue::sim_checks::Registrar& m)

// nit_sim::limits, the head-dim limits of the kernel sources this simulator was built from
// (csrc/cuda/launchers.h). The simulator's glue is one translation unit, so this header, and
// with it this registration, is compiled once.
TORCH_LIBRARY_IMPL(nit_sim, CompositeExplicitAutograd, m) { m.impl("limits", &::nit::cuda::limits); }
