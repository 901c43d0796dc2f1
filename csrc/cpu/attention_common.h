// Shared by the CPU varlen attention kernels (attention.cpp: fp32 tiles; attention_bf16.cpp:
// bf16 tiles on the matrix units): the problem geometry, the unit of work, the tile sizes and
// the scheduler. Everything here is inline; the layouts are those documented in attention.cpp.
#pragma once

#include <ATen/Parallel.h>

#include <stdint.h>

#include <algorithm>
#include <atomic>
#include <vector>

namespace nit {

constexpr int64_t kBq = 64;          // query rows per tile
constexpr int64_t kBk = 64;          // keys per tile (a multiple of every vector width)
constexpr int64_t kFwdChunk = 256;   // query rows per forward task (fp32 tiles) ...
constexpr int64_t kFwdChunkBf16 = 1024;  // ... and on the bf16 tiles, which pack K, V per task
constexpr int64_t kBwdChunk = 512;   // query rows per backward task (fp32 tiles; bf16 tiles:
constexpr int64_t kBwdChunkBf16 = 1024;  // these) ...
constexpr int64_t kBwdMaxSplit = 4;  // ... unless that splits an image into more chunks
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Geometry {
  int64_t B, Nq, Nk, H, Hk, G, D, Dv;
  const int32_t* cq;
  const int32_t* ck;
  float scale;
  bool causal;
};

// One unit of work: query rows [r0, r1) of image b for one head (a q head in the forward, a
// k/v head and its G q heads in the backward). Backward tasks of an image split into several
// chunks write partial dK/dV at rows part + chunk*sk of the partial buffers (chunk < 0: no split).
struct Task {
  int64_t b, head, r0, r1, chunk, part;
  double cost;
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Keys visible to image-local query rows < r1: with bottom-right causal alignment query i sees
// keys j <= i + sk - sq.
inline int64_t visible_keys(bool causal, int64_t r1, int64_t sq, int64_t sk) {
  return causal ? std::min(sk, std::max<int64_t>(0, r1 + sk - sq)) : sk;
}

// The tasks run largest first, each worker pulling the next one; body(task, scratch) gets a
// scratch vector owned by its worker's thread.
template <class Body>
void run_tasks(std::vector<Task>& tasks, const Body& body) {
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.cost > b.cost; });
  const int64_t n = static_cast<int64_t>(tasks.size());
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  // Inside another parallel region at::parallel_for runs inline: one worker does every task.
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // Kept by the thread from call to call: a fresh buffer cost page faults and zero-filling on
    // every call (several percent of a bf16 backward). It holds the largest task's scratch seen.
    thread_local std::vector<float> scratch;
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) body(tasks[i], scratch);
  });
}

}  // namespace nit
