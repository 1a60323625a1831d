// A CPU emulation of the CUDA built-ins that csrc/cuda/attention_kernel.cuh uses, so that the
// kernel's logic (fragment layouts, masking, online softmax, synchronisation) runs under test
// without a GPU.
//
// Every CUDA thread of a block is a fiber (ucontext) on the calling OS thread. A fiber runs until it
// reaches a barrier (__syncthreads for the block; the warp-collective __shfl_xor_sync and
// mma.sync for its warp) and then yields; the last to arrive releases the others. The order in
// which runnable threads resume is shuffled with a seed, so that a missing __syncthreads shows up
// as a read of shared memory that another thread has not written yet, and shared memory starts
// each block filled with 0xff bytes (NaN in bf16 and fp16). A warp collective that not all 32
// lanes reach, or that lanes reach with different operations, and a barrier no thread can pass,
// are errors.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n)  // the emulated shared memory (smem_raw) is aligned where it is defined

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  uint32_t x, y, z, w;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }
inline int min(int a, int b) { return a < b ? a : b; }

// 16-bit floats: c10's types round to nearest even, as the CUDA conversions ending in _rn do.
using __nv_bfloat16 = c10::BFloat16;
using __half = c10::Half;
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
struct __half2 {
  __half x, y;
};
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__nv_bfloat16(lo), __nv_bfloat16(hi)}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__half(lo), __half(hi)}; }

namespace simt {

constexpr int kWarpSize = 32;
constexpr size_t kSharedBytes = 227 * 1024;  // the most an sm_90 block can ask for
constexpr size_t kStackBytes = 256 * 1024;

enum class Collective { kNone, kShuffle, kMma16, kMma8 };

// What a lane brings to a warp collective.
struct LaneSlot {
  Collective op = Collective::kNone;
  float value = 0.f;
  uint32_t a[4] = {}, b[2] = {};
  float c[4] = {};
};

struct Barrier {
  int expected = 0, arrived = 0;
  std::vector<int> waiting;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  dim3 index;
  bool done = false;
};

struct Block {
  dim3 grid, block_index, block_dim;
  std::vector<Fiber> fibers;
  std::vector<int> runnable;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<std::array<LaneSlot, kWarpSize>> warp_slots;
  ucontext_t scheduler;
  int current = -1;
  std::mt19937 order;
  std::string error;
  void (*entry)() = nullptr;
};

inline Block*& active_block() {
  static Block* block = nullptr;
  return block;
}

inline Fiber& current_fiber() { return active_block()->fibers[active_block()->current]; }

// Leaves the current fiber for good, recording why; the launch raises it.
[[noreturn]] inline void fail(const std::string& why) {
  Block& b = *active_block();
  if (b.error.empty()) b.error = why;
  setcontext(&b.scheduler);
  std::abort();  // not reached
}

inline void release(Barrier& barrier) {
  Block& b = *active_block();
  std::shuffle(barrier.waiting.begin(), barrier.waiting.end(), b.order);
  b.runnable.insert(b.runnable.end(), barrier.waiting.begin(), barrier.waiting.end());
  barrier.waiting.clear();
  barrier.arrived = 0;
}

// The current fiber waits until `expected` threads have arrived.
inline void wait(Barrier& barrier) {
  Block& b = *active_block();
  const int me = b.current;
  barrier.waiting.push_back(me);
  if (++barrier.arrived == barrier.expected) release(barrier);
  swapcontext(&b.fibers[me].context, &b.scheduler);
}

inline int lane() { return static_cast<int>(current_fiber().index.x) % kWarpSize; }
inline int warp() { return static_cast<int>(current_fiber().index.x) / kWarpSize; }

// The warp's slots once every lane has arrived with `mine` (checked to be one operation); the
// caller reads them, then calls warp_done() before the slots are reused.
inline const std::array<LaneSlot, kWarpSize>& warp_exchange(const LaneSlot& mine) {
  Block& b = *active_block();
  auto& slots = b.warp_slots[warp()];
  slots[lane()] = mine;
  wait(b.warp_barriers[warp()]);
  for (const LaneSlot& s : slots) {
    if (s.op != mine.op) fail("warp " + std::to_string(warp()) + ": lanes reached different warp collectives");
  }
  return slots;
}

inline void warp_done() { wait(active_block()->warp_barriers[warp()]); }

template <typename T>
float unpack(uint32_t word, int half) {
  T value;
  const uint16_t bits = static_cast<uint16_t>(word >> (16 * half));
  std::memcpy(&value, &bits, sizeof(bits));
  return static_cast<float>(value);
}

// Element (row, col) of the m16 x kK A operand and (k, n) of the kK x n8 B operand, from the
// lanes' registers in the fragment layouts of mma.m16n8k16 / m16n8k8 (row.col) with .f16 / .bf16
// operands, as the PTX ISA's "Matrix Fragments for mma.m16n8k16 with floating point type" gives them.
template <typename T>
float a_element(const std::array<LaneSlot, kWarpSize>& s, int row, int col) {
  const int reg = (row >= 8) + 2 * (col >= 8), group = row % 8, quad = col % 8 / 2;
  return unpack<T>(s[4 * group + quad].a[reg], col % 2);
}
template <typename T>
float b_element(const std::array<LaneSlot, kWarpSize>& s, int k, int n) {
  return unpack<T>(s[4 * n + k % 8 / 2].b[k >= 8], k % 2);
}

// c += A·B for this lane's four accumulators (rows group, group + 8; columns 2 quad, 2 quad + 1).
template <typename T, int kK>
void mma(float (&c)[4], const LaneSlot& mine, Collective op) {
  LaneSlot in = mine;
  in.op = op;
  const auto& s = warp_exchange(in);
  const int group = lane() / 4, quad = lane() % 4;
  float result[4];
  for (int e = 0; e < 4; ++e) {
    const int row = group + 8 * (e / 2), col = 2 * quad + e % 2;
    float acc = c[e];
    for (int k = 0; k < kK; ++k) acc += a_element<T>(s, row, k) * b_element<T>(s, k, col);
    result[e] = acc;
  }
  warp_done();
  std::copy(result, result + 4, c);
}

// Runs kernel(args) for every thread of every block of `grid`, blocks one after another.
template <typename Args>
void launch(void (*kernel)(Args), dim3 grid, int threads, int shared_bytes, const Args& args, uint32_t seed,
            unsigned char* shared) {
  if (shared_bytes > static_cast<int>(kSharedBytes)) {
    throw std::runtime_error("launch asks for " + std::to_string(shared_bytes) + " bytes of shared memory, more than " +
                             std::to_string(kSharedBytes));
  }
  if (threads % kWarpSize != 0 || threads > 1024) {
    throw std::runtime_error("launch: threads per block must be a multiple of 32 up to 1024, got " + std::to_string(threads));
  }
  static const Args* pending_args;
  static void (*pending_kernel)(Args);
  pending_args = &args;
  pending_kernel = kernel;
  const int warps = threads / kWarpSize;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b;
        b.grid = grid;
        b.block_index = dim3(x, y, z);
        b.block_dim = dim3(threads);
        b.order.seed(seed + x + 7919 * y + 104729 * z);
        b.block_barrier.expected = threads;
        b.warp_barriers.resize(warps);
        for (Barrier& w : b.warp_barriers) w.expected = kWarpSize;
        b.warp_slots.resize(warps);
        b.fibers.resize(threads);
        std::memset(shared, 0xff, kSharedBytes);
        active_block() = &b;
        for (int t = 0; t < threads; ++t) {
          Fiber& f = b.fibers[t];
          f.index = dim3(t);
          f.stack.reset(new char[kStackBytes]);
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.get();
          f.context.uc_stack.ss_size = kStackBytes;
          f.context.uc_link = &b.scheduler;
          makecontext(&f.context, [] { pending_kernel(*pending_args); current_fiber().done = true; }, 0);
          b.runnable.push_back(t);
        }
        std::shuffle(b.runnable.begin(), b.runnable.end(), b.order);
        int finished = 0;
        while (b.error.empty() && finished < threads) {
          if (b.runnable.empty()) {
            b.error = "deadlock: no thread of block (" + std::to_string(x) + ", " + std::to_string(y) + ", " +
                      std::to_string(z) + ") can pass its barrier";
            break;
          }
          b.current = b.runnable.front();
          b.runnable.erase(b.runnable.begin());
          swapcontext(&b.scheduler, &b.fibers[b.current].context);
          if (b.fibers[b.current].done) {
            ++finished;
            // A thread that has returned no longer holds up __syncthreads.
            if (--b.block_barrier.expected > 0 && b.block_barrier.arrived == b.block_barrier.expected)
              release(b.block_barrier);
          }
        }
        active_block() = nullptr;
        if (!b.error.empty()) throw std::runtime_error(b.error);
        // Past the launch's dynamic shared memory the poison must be intact: a GPU block writing
        // there corrupts its neighbour's shared memory or faults.
        if (std::any_of(shared + shared_bytes, shared + kSharedBytes, [](unsigned char c) { return c != 0xff; }))
          throw std::runtime_error("block wrote past the " + std::to_string(shared_bytes) +
                                   " bytes of shared memory it was launched with");
      }
}

}  // namespace simt

#define threadIdx (::simt::current_fiber().index)
#define blockIdx (::simt::active_block()->block_index)
#define blockDim (::simt::active_block()->block_dim)
#define gridDim (::simt::active_block()->grid)

inline void __syncthreads() { simt::wait(simt::active_block()->block_barrier); }

inline float __shfl_xor_sync(unsigned mask, float value, int offset) {
  if (mask != 0xffffffffu) simt::fail("__shfl_xor_sync: the emulation takes the full-warp mask only");
  simt::LaneSlot in;
  in.op = simt::Collective::kShuffle;
  in.value = value;
  const float got = simt::warp_exchange(in)[simt::lane() ^ offset].value;
  simt::warp_done();
  return got;
}
