// The scheduler of the SIMT simulator (see runtime.h): fibers, barriers, warp exchanges, launch
// checks, and the few CUDA runtime API functions the kernels and the glue call.
#include "sim/runtime.h"

#include <signal.h>
#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace nit {
namespace sim {

ThreadState g_state;

void poison(void* p, size_t bytes) {
  auto* b = static_cast<uint8_t*>(p);
  for (size_t i = 0; i < bytes; ++i) b[i] = (i & 1) ? kPoisonHi : kPoisonLo;
}

namespace {

alignas(128) unsigned char g_dyn_smem[kMaxDynamicSmem];

// ---- context switch ----------------------------------------------------------------------------
constexpr size_t kStackBytes = 256 * 1024;

#if defined(__x86_64__)
// switch_to(save, next): pushes the callee-saved registers and the SSE/x87 control words on the
// current stack, stores its stack pointer in *save, and resumes the context saved at `next`.
extern "C" void nit_sim_switch(void** save, void* next);
asm(R"(
  .text
  .p2align 4
  .type nit_sim_switch,@function
nit_sim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size nit_sim_switch,.-nit_sim_switch
)");
#endif

enum class State : uint8_t { kReady, kBarrier, kWarp, kDone };
enum class WarpOp : uint8_t { kSync, kShfl };

struct Fiber {
  unsigned char* stack = nullptr;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  State state = State::kDone;
  uint3 tid{};
  const char* site = nullptr;
  WarpOp op = WarpOp::kSync;
  unsigned mask = 0;
  ShflKind kind = ShflKind::kIdx;
  int arg = 0, width = 32;
  uint64_t in = 0, out = 0;
};

struct Launch {
  const char* name = "";
  Body body = nullptr;
  const void* closure = nullptr;
};

std::mutex g_mutex;  // one launch at a time: shared memory and fibers are process-wide
std::vector<Fiber> g_fibers;
Launch g_launch;
int g_current = -1;  // running fiber, -1 in the scheduler
#if defined(__x86_64__)
void* g_sched_sp = nullptr;
#else
ucontext_t g_sched_ctx;
#endif
std::string g_fiber_error;  // set when a fiber raised: the block is abandoned
std::map<const void*, int> g_smem_optin;
std::mutex g_buffers_mutex;
std::map<uintptr_t, size_t> g_buffers;  // start -> bytes of the guarded buffers
int g_schedule = 0;  // 0: threads and blocks in order, 1: reversed

std::string dim_str(uint3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

std::string where() {
  std::string s = "kernel " + std::string(g_launch.name) + ", block " + dim_str(g_state.block_idx);
  if (g_current >= 0) s += ", thread " + dim_str(g_fibers[g_current].tid);
  return s;
}

void switch_to_scheduler() {
  Fiber& f = g_fibers[g_current];
#if defined(__x86_64__)
  nit_sim_switch(&f.sp, g_sched_sp);
#else
  swapcontext(&f.ctx, &g_sched_ctx);
#endif
}

void fiber_main() {
  try {
    g_launch.body(g_launch.closure);
  } catch (const std::exception& e) {
    g_fiber_error = e.what();
  } catch (...) {
    g_fiber_error = "unknown exception in a simulated thread";
  }
  g_fibers[g_current].state = State::kDone;
  switch_to_scheduler();
  std::abort();  // a finished fiber is never resumed
}

void start_fiber(Fiber& f) {
  if (f.stack == nullptr) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("cuda_sim: cannot allocate a fiber stack");
    mprotect(p, 4096, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
    f.stack = static_cast<unsigned char*>(p);
  }
#if defined(__x86_64__)
  // Initial frame as nit_sim_switch leaves it: control words, six registers, return address.
  auto* top = reinterpret_cast<uint64_t*>(f.stack + kStackBytes);
  uint64_t* sp = top - 9;
  uint32_t ctl[2] = {0x1F80u, 0x037Fu};  // default MXCSR and x87 control word
  memcpy(sp, ctl, sizeof(ctl));
  for (int i = 1; i <= 6; ++i) sp[i] = 0;
  sp[7] = reinterpret_cast<uint64_t>(&fiber_main);
  sp[8] = 0;  // fiber_main's own return address: never used
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack + 4096;
  f.ctx.uc_stack.ss_size = kStackBytes - 4096;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, &fiber_main, 0);
#endif
  f.state = State::kReady;
}

void resume(int i) {
  g_current = i;
  g_state.thread_idx = g_fibers[i].tid;
#if defined(__x86_64__)
  nit_sim_switch(&g_sched_sp, g_fibers[i].sp);
#else
  swapcontext(&g_sched_ctx, &g_fibers[i].ctx);
#endif
  g_current = -1;
}

// ---- bounds: faults of a simulated thread ----------------------------------------------------
struct sigaction g_old_segv, g_old_bus;

std::string describe_address(uintptr_t a) {
  for (const Fiber& f : g_fibers) {
    const auto s = reinterpret_cast<uintptr_t>(f.stack);
    if (s && a >= s && a < s + 4096) return "a stack overflow of the simulated thread";
  }
  auto it = g_buffers.upper_bound(a);
  if (it == g_buffers.begin()) return "outside every buffer the kernel was given";
  --it;
  if (a >= it->first + it->second) {
    return std::to_string(a - (it->first + it->second)) + " bytes past the end of a " +
           std::to_string(it->second) + "-byte buffer the kernel was given";
  }
  return "inside a buffer that cannot be accessed";
}

void on_fault(int sig, siginfo_t* info, void*) {
  if (g_current < 0) {  // not a simulated thread: let the previous handler see it
    sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, nullptr);
    return;
  }
  const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
  char buf[32];
  snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(addr));
  g_fiber_error = "cuda_sim out of bounds error (" + where() + "): access at address " + buf + ", " +
                  describe_address(addr);
  g_fibers[g_current].state = State::kDone;
  switch_to_scheduler();  // the faulting thread is abandoned with its block
}

void install_fault_handler() {
  thread_local std::vector<unsigned char> alt;  // the handler runs here, off the fiber's stack
  if (alt.empty()) {
    alt.resize(256 * 1024);
    stack_t ss{};
    ss.ss_sp = alt.data();
    ss.ss_size = alt.size();
    sigaltstack(&ss, nullptr);
  }
  static bool done = false;
  if (done) return;
  done = true;
  struct sigaction sa {};
  sa.sa_sigaction = &on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);
}

std::string hex(unsigned m) {
  char buf[16];
  snprintf(buf, sizeof(buf), "0x%08x", m);
  return buf;
}

std::string describe(const Fiber& f) {
  switch (f.state) {
    case State::kDone: return "exited";
    case State::kBarrier: return std::string("waits at __syncthreads() ") + f.site;
    case State::kWarp: return std::string("waits at a warp op ") + f.site + " with mask " + hex(f.mask);
    default: return "runnable";
  }
}

[[noreturn]] void block_error(const char* check, const std::string& what) {
  throw std::runtime_error(std::string("cuda_sim ") + check + " error in kernel " + g_launch.name +
                           ", block " + dim_str(g_state.block_idx) + ": " + what);
}

int64_t source_lane(const Fiber& f, int lane) {
  const int w = f.width;
  const int base = lane & ~(w - 1);
  switch (f.kind) {
    case ShflKind::kIdx: return base + (f.arg & (w - 1));
    case ShflKind::kXor: {
      const int src = lane ^ f.arg;
      return src >= base + w ? lane : src;
    }
    case ShflKind::kDown: return (lane - base) + f.arg < w ? lane + f.arg : lane;
    case ShflKind::kUp: return (lane - base) >= f.arg ? lane - f.arg : lane;
  }
  return lane;
}

// Release the lanes of one warp that wait at warp ops; false if none of its lanes waits.
bool resolve_warp(int first, int count) {
  std::map<unsigned, unsigned> lanes_of_mask;  // mask -> lanes that wait with it
  for (int l = 0; l < count; ++l) {
    const Fiber& f = g_fibers[first + l];
    if (f.state == State::kWarp) lanes_of_mask[f.mask] |= 1u << l;
  }
  if (lanes_of_mask.empty()) return false;
  for (const auto& [mask, lanes] : lanes_of_mask) {
    if (lanes & ~mask) {
      const int l = __builtin_ctz(lanes & ~mask);
      const Fiber& f = g_fibers[first + l];
      block_error(f.op == WarpOp::kShfl ? "shuffle" : "warp sync",
                  "warp " + std::to_string(first / 32) + ": lane " + std::to_string(l) +
                      " calls the warp op at " + f.site + " with mask " + hex(mask) +
                      ", which leaves out lanes " + hex(lanes & ~mask) + " that make the same call");
    }
    if (mask & ~lanes) {
      const int l = __builtin_ctz(mask & ~lanes);
      const Fiber& f0 = g_fibers[first + __builtin_ctz(lanes)];
      const std::string other =
          l < count ? describe(g_fibers[first + l]) : std::string("does not exist");
      block_error(f0.op == WarpOp::kShfl ? "shuffle" : "warp sync",
                  "warp " + std::to_string(first / 32) + ": the warp op at " + f0.site +
                      " has mask " + hex(mask) + " but only lanes " + hex(lanes) +
                      " reach it; lane " + std::to_string(l) + " " + other);
    }
    const Fiber& f0 = g_fibers[first + __builtin_ctz(lanes)];
    for (int l = 0; l < count; ++l) {
      if (!(lanes >> l & 1)) continue;
      const Fiber& f = g_fibers[first + l];
      if (f.site != f0.site && strcmp(f.site, f0.site) != 0) {
        block_error("warp sync", "lanes of mask " + hex(mask) + " wait at different warp ops: " +
                                     f0.site + " and " + f.site);
      }
    }
    for (int l = 0; l < count; ++l) {
      if (!(lanes >> l & 1)) continue;
      Fiber& f = g_fibers[first + l];
      if (f.op == WarpOp::kShfl) {
        const int64_t src = source_lane(f, l);
        if (!(mask >> src & 1)) {
          block_error("shuffle", "lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
                                     " at " + f.site + ", which is not in the mask " + hex(mask));
        }
        f.out = g_fibers[first + src].in;
      }
    }
    for (int l = 0; l < count; ++l)
      if (lanes >> l & 1) g_fibers[first + l].state = State::kReady;
  }
  return true;
}

void run_block(int n) {
  for (int i = 0; i < n; ++i) {
    Fiber& f = g_fibers[i];
    start_fiber(f);
    const unsigned bx = g_state.block_dim.x, by = g_state.block_dim.y;
    f.tid = make_uint3(i % bx, (i / bx) % by, i / (bx * by));
  }
  for (;;) {
    bool ran = false;
    for (int k = 0; k < n; ++k) {
      const int i = g_schedule == 0 ? k : n - 1 - k;
      if (g_fibers[i].state != State::kReady) continue;
      resume(i);
      ran = true;
      if (!g_fiber_error.empty()) {
        std::string e;
        e.swap(g_fiber_error);
        throw std::runtime_error(e);
      }
    }
    if (ran) continue;
    // No fiber can run: release a warp op, else a block barrier, else report why not.
    bool released = false;
    for (int w = 0; w < n; w += 32) released |= resolve_warp(w, n - w < 32 ? n - w : 32);
    if (released) continue;
    int waiting = -1, exited = -1;
    for (int i = 0; i < n; ++i) {
      if (g_fibers[i].state == State::kBarrier && waiting < 0) waiting = i;
      if (g_fibers[i].state == State::kDone && exited < 0) exited = i;
    }
    if (waiting < 0) return;  // every thread exited
    const char* site = g_fibers[waiting].site;
    for (int i = 0; i < n; ++i) {
      const Fiber& f = g_fibers[i];
      if (f.state != State::kBarrier || strcmp(f.site, site) != 0) {
        block_error("barrier", "thread " + dim_str(g_fibers[waiting].tid) +
                                   " waits at __syncthreads() " + site + " but thread " +
                                   dim_str(f.tid) + " " + describe(f) +
                                   " (a barrier every thread of the block must reach)");
      }
    }
    (void)exited;
    for (int i = 0; i < n; ++i) g_fibers[i].state = State::kReady;
  }
}

size_t target_limit() {
  static const size_t limit = [] {
    const char* a = getenv("NIT_CUDA_SIM_ARCH");
    std::string arch = a ? a : "80";
    if (arch.rfind("sm_", 0) == 0) arch = arch.substr(3);
    if (arch == "90") return size_t(227) * 1024;
    if (arch != "80") {
      throw std::runtime_error("NIT_CUDA_SIM_ARCH must be 80 or 90 (sm_80 or sm_90), got '" +
                               std::string(a) + "'");
    }
    return size_t(163) * 1024;
  }();
  return limit;
}

}  // namespace

size_t target_max_dynamic_smem() { return target_limit(); }

unsigned char* dynamic_smem_base() { return g_dyn_smem; }

void set_schedule(int schedule) { g_schedule = schedule; }

void note_buffer(const void* p, size_t bytes) {
  const std::lock_guard<std::mutex> lock(g_buffers_mutex);
  g_buffers[reinterpret_cast<uintptr_t>(p)] = bytes;
}

void forget_buffer(const void* p) {
  const std::lock_guard<std::mutex> lock(g_buffers_mutex);
  g_buffers.erase(reinterpret_cast<uintptr_t>(p));
}

[[noreturn]] void fail(std::string_view check, const std::string& what) {
  throw std::runtime_error("cuda_sim " + std::string(check) + " error (" + where() + "): " + what);
}

void syncthreads(const char* site) {
  Fiber& f = g_fibers[g_current];
  f.state = State::kBarrier;
  f.site = site;
  switch_to_scheduler();
}

void syncwarp(unsigned mask, const char* site) {
  Fiber& f = g_fibers[g_current];
  f.state = State::kWarp;
  f.op = WarpOp::kSync;
  f.mask = mask;
  f.site = site;
  switch_to_scheduler();
}

uint64_t shfl(unsigned mask, uint64_t bits, ShflKind kind, int arg, int width, const char* site) {
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fail("shuffle", "width must be a power of two <= 32, got " + std::to_string(width));
  }
  Fiber& f = g_fibers[g_current];
  f.state = State::kWarp;
  f.op = WarpOp::kShfl;
  f.mask = mask;
  f.site = site;
  f.kind = kind;
  f.arg = arg;
  f.width = width;
  f.in = bits;
  switch_to_scheduler();
  return g_fibers[g_current].out;
}

void run_kernel(const void* kernel, const char* name, dim3 grid, dim3 block, size_t smem,
                Body body, const void* closure) {
  const std::lock_guard<std::mutex> lock(g_mutex);
  install_fault_handler();
  g_launch = {name, body, closure};
  auto launch_error = [&](const std::string& what) {
    throw std::runtime_error("cuda_sim launch error in kernel " + std::string(name) + ": " + what);
  };
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64) {
    launch_error("block " + dim_str(make_uint3(block.x, block.y, block.z)) +
                 " must have 1..1024 threads and z <= 64 (cudaErrorInvalidConfiguration on a GPU)");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
      grid.z > 65535) {
    launch_error("grid " + dim_str(make_uint3(grid.x, grid.y, grid.z)) +
                 " must be 1..2^31-1 x 1..65535 x 1..65535 (cudaErrorInvalidConfiguration on a GPU)");
  }
  const size_t limit = target_limit();
  if (smem > limit) {
    launch_error(std::to_string(smem) + " bytes of dynamic shared memory exceed the " +
                 std::to_string(limit) + "-byte opt-in limit of the target");
  }
  const auto it = g_smem_optin.find(kernel);
  const size_t allowed = it == g_smem_optin.end() ? 48 * 1024 : size_t(it->second);
  if (smem > allowed) {
    launch_error(std::to_string(smem) + " bytes of dynamic shared memory, more than the " +
                 std::to_string(allowed) +
                 " allowed without (or by) the kernel's cudaFuncSetAttribute("
                 "cudaFuncAttributeMaxDynamicSharedMemorySize) opt-in (cudaErrorInvalidValue on a GPU)");
  }
  if (g_fibers.size() < threads) g_fibers.resize(threads);
  g_state.block_dim = block;
  g_state.grid_dim = grid;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  for (uint64_t k = 0; k < blocks; ++k) {
    const uint64_t b = g_schedule == 0 ? k : blocks - 1 - k;
    g_state.block_idx = make_uint3(b % grid.x, (b / grid.x) % grid.y, b / (uint64_t(grid.x) * grid.y));
    poison(g_dyn_smem, smem);
    try {
      run_block(static_cast<int>(threads));
    } catch (...) {
      g_fiber_error.clear();
      throw;
    }
  }
}

}  // namespace sim
}  // namespace nit

// ---- the CUDA runtime API functions the kernels and the glue use ----------------------------------
extern "C" {

cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaPeekAtLastError(void) { return cudaSuccess; }

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || size_t(value) > nit::sim::target_max_dynamic_smem()) return cudaErrorInvalidValue;
  const std::lock_guard<std::mutex> lock(nit::sim::g_mutex);
  nit::sim::g_smem_optin[func] = value;
  return cudaSuccess;
}

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    default: return "cudaError";
  }
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "CUDA error (simulated)";
  }
}

}  // extern "C"
