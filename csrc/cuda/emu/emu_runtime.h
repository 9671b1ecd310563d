// CUDA emulator, part 2: the execution model.
//
//   * One real OS thread per CUDA thread. Threads come from a pool of persistent workers (created
//     on demand, never destroyed), so a block of 1024 threads is 1024 truly concurrent threads.
//   * Blocks run one at a time, in a seeded shuffled order. Running blocks sequentially is what
//     lets static __shared__ storage be a single per-launch arena that is re-poisoned (0xFF bytes,
//     a NaN for every floating-point type) at the start of every block.
//   * __syncthreads is a real barrier; warp intrinsics are real rendezvous of the named lanes.
//     Misuse is detected deterministically and fails the launch with an emu::Error:
//       - a thread exits while others wait at a barrier, or threads wait at different
//         __syncthreads call sites ("divergent barrier");
//       - every thread of the block is waiting and none can proceed ("deadlock");
//       - a warp collective names a lane that has exited (or a named lane exits while others wait).
//     Threads blocked without any progress for Config::wait_timeout_s also fail the block (a
//     backstop, enforced by the host thread, for spin-waits that can never succeed).
//   * Hold-back scheduling makes missing-barrier races reproducible: at the start of the block and
//     after every barrier, a seeded random subset of threads (Config::hold_fraction) is held back
//     until every other thread has reached its next barrier, exited, or blocked in a warp
//     collective. A thread that reads shared data without the barrier that should order it after
//     the writer then sees the poison or a stale value instead of winning the race by luck. The
//     hold ends after Config::hold_timeout_s anyway, so spin-waits on flags still make progress.
//
// Barrier semantics (documented choice): every thread of the block must reach every
// __syncthreads, at the same call site. Threads that have exited do NOT count as arrived, which is
// stricter than some hardware but is what the CUDA programming guide requires of correct code.
//
// Only included through cuda_emu.h.
#pragma once

#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "emu_types.h"

// ------------------------------------------------------------------------------------------------
// CUDA built-in variables. Thread-local: every emulated thread sees its own indices.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace emu {

// Every failure the emulator detects (in a kernel, at launch, in a guard check) is thrown as this.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Config {
  uint64_t seed = 0x5EED;          // block order and hold-back sets; env BSCONV_EMU_SEED
  double hold_fraction = 0.5;      // share of threads held back per segment; env BSCONV_EMU_HOLD
  double hold_timeout_s = 0.2;     // a held thread starts anyway after this long
  double wait_timeout_s = 10.0;    // any barrier/collective wait longer than this fails the block;
                                   // env BSCONV_EMU_TIMEOUT
  double block_timeout_s = 120.0;  // host-side: a block still running after this is declared hung
  size_t smem_static_limit = 48 * 1024;   // CUDA's limit for static __shared__ per kernel
  size_t smem_default_limit = 48 * 1024;  // static + dynamic without opt-in
  size_t smem_optin_limit =
      227 * 1024;  // max with cudaFuncAttributeMaxDynamicSharedMemorySize (sm_90)
  bool shuffle_blocks = true;
  bool check_guards_after_launch = true;  // run GuardedBuffer checks after every launch

  static Config from_env() {
    Config c;
    if (const char* s = std::getenv("BSCONV_EMU_SEED")) c.seed = std::strtoull(s, nullptr, 0);
    if (const char* s = std::getenv("BSCONV_EMU_HOLD")) c.hold_fraction = std::strtod(s, nullptr);
    if (const char* s = std::getenv("BSCONV_EMU_TIMEOUT"))
      c.wait_timeout_s = std::strtod(s, nullptr);
    return c;
  }
};

// Process-wide settings; change them between launches, not during one.
inline Config& config() {
  static Config c = Config::from_env();
  return c;
}
inline void set_seed(uint64_t seed) { config().seed = seed; }

namespace detail {

__attribute__((format(printf, 1, 2))) inline std::string strprintf(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  return buf;
}

inline uint64_t mix64(uint64_t x) {  // splitmix64 finalizer: cheap, well-distributed, portable
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

inline double seconds_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Futex waits on 32-bit atomic words: waiters sleep without holding any lock, and a wake-up
// costs one syscall, which matters with up to 1024 threads on two cores.
static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "futex word must be 32 bits");
// Untimed waits (timeout_s < 0) avoid arming a kernel timer per wait; timeouts of kernel threads
// are enforced by the host thread instead (see Pool::run_block).
inline void futex_wait(std::atomic<uint32_t>* word, uint32_t expected, double timeout_s = -1.0) {
  timespec ts;
  timespec* timeout = nullptr;
  if (timeout_s >= 0) {
    ts.tv_sec = static_cast<time_t>(timeout_s);
    ts.tv_nsec = static_cast<long>((timeout_s - static_cast<double>(ts.tv_sec)) * 1e9);
    timeout = &ts;
  }
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected, timeout,
          nullptr, 0);
}
inline void futex_wake_all(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
          nullptr, 0);
}
inline void bump_and_wake(std::atomic<uint32_t>& word) {
  word.fetch_add(1, std::memory_order_acq_rel);
  futex_wake_all(&word);
}

// glibc's adaptive mutex spins briefly before sleeping. Critical sections here are a few dozen
// instructions, so on two cores spinning beats a futex sleep + wake-up (measured: std::mutex
// convoys when a thousand threads arrive at a barrier).
class SpinThenSleepMutex {
 public:
  SpinThenSleepMutex() {
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ADAPTIVE_NP);
    pthread_mutex_init(&m_, &attr);
    pthread_mutexattr_destroy(&attr);
  }
  ~SpinThenSleepMutex() { pthread_mutex_destroy(&m_); }
  SpinThenSleepMutex(const SpinThenSleepMutex&) = delete;
  SpinThenSleepMutex& operator=(const SpinThenSleepMutex&) = delete;
  void lock() { pthread_mutex_lock(&m_); }
  void unlock() { pthread_mutex_unlock(&m_); }

 private:
  pthread_mutex_t m_;
};

// Thrown inside kernel threads to unwind them after their block failed; never leaves a worker.
struct BlockAborted {};

// ---- ThreadSanitizer support --------------------------------------------------------------------
// Built with -fsanitize=thread, the emulator hides its own synchronization and bookkeeping from
// TSan: the block mutex and the hold-back order threads in ways CUDA does not, and would hide
// exactly the races the hold-back exposes. It declares only CUDA's happens-before edges instead:
// launch -> every thread -> end of launch, __syncthreads within a block, __syncwarp within a warp.
// A missing barrier then is a data race TSan reports whatever the schedule.
#if defined(__SANITIZE_THREAD__)
#define EMU_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define EMU_TSAN 1
#endif
#endif

#ifdef EMU_TSAN
}  // namespace detail
}  // namespace emu
extern "C" {
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_ignore_thread_begin(void);
void __tsan_ignore_thread_end(void);
void AnnotateIgnoreSyncBegin(const char* file, int line);
void AnnotateIgnoreSyncEnd(const char* file, int line);
}
namespace emu {
namespace detail {
// Emulator-internal work: neither its memory accesses nor its synchronization reach TSan.
struct TsanHidden {
  TsanHidden() {
    __tsan_ignore_thread_begin();
    AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
  }
  ~TsanHidden() {
    AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
    __tsan_ignore_thread_end();
  }
};
// Kernel code inside a worker thread (which is hidden otherwise).
struct TsanVisible {
  TsanVisible() {
    AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
    __tsan_ignore_thread_end();
  }
  ~TsanVisible() {
    __tsan_ignore_thread_begin();
    AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
  }
};
inline void tsan_release(void* sync) { __tsan_release(sync); }
inline void tsan_acquire(void* sync) { __tsan_acquire(sync); }
// Every block gets freshly allocated shared memory: TSan forgets the accesses to memory that is
// allocated while accesses are ignored, so blocks reusing the arena are not reported as racing.
// (AnnotateNewMemory would say this directly, but the TSan runtime implements it as a no-op.)
constexpr bool kFreshArenaPerBlock = true;
#else
struct TsanHidden {
  TsanHidden() {}  // user-provided: no unused-variable warnings
};
struct TsanVisible {
  TsanVisible() {}
};
inline void tsan_release(void*) {}
inline void tsan_acquire(void*) {}
constexpr bool kFreshArenaPerBlock = false;
#endif

// One rendezvous of a warp collective (shuffle, ballot, __syncwarp, wmma op). Lanes deposit
// their inputs under the block mutex; the last arriving lane completes it; every lane then reads
// the results. A fresh slot per rendezvous means no lane can overwrite data another lane has not
// read yet.
struct WarpSlot {
  const char* op = nullptr;  // which collective; all lanes of the rendezvous must agree
  uint32_t mask = 0;         // participating lanes (member mask restricted to existing lanes)
  uint32_t arrived = 0;
  std::atomic<bool> done{false};
  uint64_t value[32] = {};            // per-lane payload
  const void* uniform_ptr = nullptr;  // warp-uniform arguments, checked across lanes (wmma)
  uint64_t uniform_arg = 0;
  std::vector<float> tiles;  // wmma operands and result
};

struct WarpState {
  uint32_t existing = 0;  // lanes that exist (the last warp of a block may be partial)
  uint32_t exited = 0;
  std::vector<std::shared_ptr<WarpSlot>> open;
  std::atomic<uint32_t> word{0};  // bumped whenever a collective of this warp completes
};

struct SharedArray {
  const void* key;
  const char* name;
  size_t offset, bytes;
};

constexpr size_t kSharedRedzone = 64;            // poisoned gap after every shared region
constexpr size_t kSharedArenaSlack = 64 * 1024;  // room for redzones and alignment padding

// State of the block being executed. One instance, reused for every block.
struct BlockState {
  SpinThenSleepMutex m;  // guards everything below that is not atomic

  // Per launch.
  const char* kernel_name = "";
  dim3 grid_dim, block_dim;
  unsigned nthreads = 0, nwarps = 0;
  void (*invoke)(const void*) = nullptr;
  const void* closure = nullptr;
  uint64_t launch_seed = 0;
  uint64_t hold_threshold = 0;  // thread held iff hash < threshold
  double hold_timeout_s = 0, wait_timeout_s = 0;
  unsigned char* arena = nullptr;
  size_t arena_capacity = 0;
  size_t dynamic_bytes = 0, static_limit = 0, total_limit = 0;
  bool total_limit_opted_in = false;

  // Per block.
  uint3 block_idx{0, 0, 0};
  uint64_t hold_seed = 0;
  unsigned bar_arrived = 0;
  const char* bar_file = "";
  int bar_line = 0;
  const char* bar_name = "";
  uint3 bar_first{0, 0, 0};
  int bar_count = 0, bar_result = 0;
  std::atomic<uint32_t> bar_gen{0};
  unsigned blocked = 0;  // threads waiting in a barrier or collective that has not completed
  unsigned exited = 0;
  std::atomic<bool> aborted{false};
  std::string error;
  uint32_t segment = 0;      // number of barriers completed in this block
  double segment_start = 0;  // when the current segment began (for the hold timeout)
  double last_progress = 0;  // last barrier/collective completion or thread exit (for timeouts)
  unsigned nonheld_running = 0;
  std::atomic<uint32_t> hold_released_segment{0};
  std::atomic<uint32_t> hold_word{0};
  WarpState warps[32];
  std::vector<SharedArray> shared_arrays;
  size_t static_bytes = 0, arena_end = 0;
  std::atomic<uint32_t> remaining{0};
  std::atomic<uint32_t> finished{0};
  uint64_t pending_wakes = 0;  // futex words to wake once the mutex is released (see BlockLock)
  // ThreadSanitizer sync addresses: per launch, and per block ([0] barrier, [1 + w] warp w; fresh
  // memory for every block, so blocks do not synchronize with each other through them).
  char tsan_launch_begin = 0, tsan_launch_end = 0;
  std::unique_ptr<char[]> tsan_block_sync;
};

constexpr uint64_t kWakeBarrier = 1, kWakeHold = 2;
constexpr uint64_t wake_warp(unsigned w) { return 4ull << w; }

// Changes a futex word under the block mutex; the matching wake-up happens when the BlockLock is
// released. Waking after unlocking matters: woken threads immediately contend for the mutex.
inline void signal_locked(BlockState& b, std::atomic<uint32_t>& word, uint64_t wake_bit) {
  word.fetch_add(1, std::memory_order_acq_rel);
  b.pending_wakes |= wake_bit;
}

// The block mutex, plus the deferred wake-ups recorded by signal_locked.
class BlockLock {
 public:
  explicit BlockLock(BlockState& b) : b_(b) { b_.m.lock(); }
  ~BlockLock() {
    if (locked_) unlock();
  }
  BlockLock(const BlockLock&) = delete;
  BlockLock& operator=(const BlockLock&) = delete;
  void unlock() {
    const uint64_t wakes = b_.pending_wakes;
    b_.pending_wakes = 0;
    b_.m.unlock();
    locked_ = false;
    if (wakes & kWakeBarrier) futex_wake_all(&b_.bar_gen);
    if (wakes & kWakeHold) futex_wake_all(&b_.hold_word);
    for (unsigned w = 0; w < 32; ++w) {
      if (wakes & wake_warp(w)) futex_wake_all(&b_.warps[w].word);
    }
  }

 private:
  BlockState& b_;
  bool locked_ = true;
};

struct ThreadCtx {
  BlockState* block = nullptr;
  unsigned tid = 0, warp = 0, lane = 0;
  uint3 idx{0, 0, 0};
  uint32_t segment = 0;
  bool held = false;     // held back in the current segment
  bool stopped = false;  // already counted as stopped for the hold-back in this segment
};

inline thread_local ThreadCtx* current_thread = nullptr;

inline ThreadCtx& this_thread_ctx(const char* what) {
  if (current_thread == nullptr)
    throw Error(std::string(what) + " called outside an emulated kernel");
  return *current_thread;
}

inline std::string describe_thread(uint3 t) {
  return strprintf("thread (%u,%u,%u)", t.x, t.y, t.z);
}

inline std::string state_report_locked(const BlockState& b) {
  std::string r;
  if (b.bar_arrived > 0) {
    r += strprintf("\n  %u of %u threads wait at %s (%s:%d)", b.bar_arrived, b.nthreads, b.bar_name,
                   b.bar_file, b.bar_line);
  }
  for (unsigned w = 0; w < b.nwarps; ++w) {
    for (const auto& s : b.warps[w].open) {
      r += strprintf("\n  warp %u: lanes 0x%08x of mask 0x%08x wait in %s", w, s->arrived, s->mask,
                     s->op);
    }
  }
  r += strprintf("\n  %u of %u threads have exited", b.exited, b.nthreads);
  return r;
}

// Records the first error of the block and wakes every waiter so that all threads unwind.
inline void fail_locked(BlockState& b, const std::string& message) {
  if (!b.aborted.load()) {
    b.error = message;
    b.aborted.store(true);
  }
  signal_locked(b, b.bar_gen, kWakeBarrier);
  signal_locked(b, b.hold_word, kWakeHold);
  for (unsigned w = 0; w < b.nwarps; ++w) signal_locked(b, b.warps[w].word, wake_warp(w));
}

// ---- hold-back scheduling ----------------------------------------------------------------------
inline bool is_held(const BlockState& b, uint32_t segment, unsigned tid) {
  if (b.hold_threshold == 0) return false;
  return mix64(b.hold_seed ^ mix64((static_cast<uint64_t>(segment) << 32) | tid)) <
         b.hold_threshold;
}

inline void release_hold_locked(BlockState& b) {
  b.hold_released_segment.store(b.segment);
  signal_locked(b, b.hold_word, kWakeHold);
}

inline void begin_segment_locked(BlockState& b, uint32_t segment) {
  b.segment = segment;
  b.segment_start = b.last_progress = seconds_now();
  unsigned nonheld = 0;
  for (unsigned tid = 0; tid < b.nthreads; ++tid) nonheld += is_held(b, segment, tid) ? 0u : 1u;
  b.nonheld_running = nonheld;
  if (nonheld == 0 || nonheld == b.nthreads) release_hold_locked(b);  // nobody to wait for
}

inline void enter_segment(ThreadCtx& t, uint32_t segment) {
  t.segment = segment;
  t.held = is_held(*t.block, segment, t.tid);
  t.stopped = false;
}

// A non-held thread reached a barrier, blocked in a collective or exited: once all of them have,
// the held threads may go.
inline void note_stop_locked(BlockState& b, ThreadCtx& t) {
  if (t.stopped) return;
  t.stopped = true;
  if (!t.held) {
    if (--b.nonheld_running == 0) release_hold_locked(b);
  }
}

// A held thread waits here until the non-held threads of its segment have stopped. The host
// thread lifts the hold after Config::hold_timeout_s (not an error: the others may be spinning on
// something a held thread sets).
inline void hold_gate(ThreadCtx& t) {
  if (!t.held) return;
  BlockState& b = *t.block;
  for (;;) {
    const uint32_t w = b.hold_word.load(std::memory_order_acquire);
    if (b.aborted.load()) throw BlockAborted{};
    if (b.hold_released_segment.load(std::memory_order_acquire) == t.segment) return;
    futex_wait(&b.hold_word, w);
  }
}

// ---- blocking and deadlock detection ------------------------------------------------------------
inline void note_blocking_locked(BlockState& b, ThreadCtx& t) {
  note_stop_locked(b, t);
  ++b.blocked;
  if (b.blocked + b.exited == b.nthreads) {
    fail_locked(b, "deadlock: every thread of the block is waiting and none can proceed" +
                       state_report_locked(b));
  }
}

// Sleeps until done() holds. Throws BlockAborted if the block failed meanwhile (also when done()
// became true only because the abort bumped the word). Timeouts are the host thread's job.
template <class Done>
inline void wait_until(BlockState& b, std::atomic<uint32_t>& word, Done done) {
  for (;;) {
    const uint32_t w = word.load(std::memory_order_acquire);
    if (b.aborted.load()) throw BlockAborted{};
    if (done()) {
      if (b.aborted.load()) throw BlockAborted{};
      return;
    }
    futex_wait(&word, w);
  }
}

// ---- __syncthreads ------------------------------------------------------------------------------
inline int syncthreads_body(ThreadCtx& t, const char* file, int line, int predicate,
                            const char* name) {
  BlockState& b = *t.block;
  BlockLock lk(b);
  if (b.aborted.load()) throw BlockAborted{};
  // The barrier can never complete. (The exit-side check reports the opposite order.)
  if (b.exited > 0) {
    fail_locked(
        b,
        strprintf("__syncthreads: divergent barrier: %s reached %s at %s:%d but %u of %u threads "
                  "have already exited; every thread of the block must reach every barrier",
                  describe_thread(t.idx).c_str(), name, file, line, b.exited, b.nthreads));
    throw BlockAborted{};
  }
  if (b.bar_arrived == 0) {
    b.bar_file = file;
    b.bar_line = line;
    b.bar_name = name;
    b.bar_first = t.idx;
    b.bar_count = 0;
  } else if (b.bar_line != line || std::strcmp(b.bar_file, file) != 0 ||
             std::strcmp(b.bar_name, name) != 0) {
    fail_locked(
        b, strprintf("__syncthreads: divergent barrier: %s reached %s at %s:%d while %u "
                     "thread(s), first %s, wait at %s at %s:%d; every thread of the block must "
                     "reach the same barrier",
                     describe_thread(t.idx).c_str(), name, file, line, b.bar_arrived,
                     describe_thread(b.bar_first).c_str(), b.bar_name, b.bar_file, b.bar_line));
    throw BlockAborted{};
  }
  ++b.bar_arrived;
  if (predicate) ++b.bar_count;
  const uint32_t next_segment = t.segment + 1;
  if (b.bar_arrived == b.nthreads) {  // last to arrive: release everyone into the next segment
    b.bar_result = b.bar_count;
    b.bar_arrived = 0;
    b.blocked -= b.nthreads - 1;
    begin_segment_locked(b, next_segment);
    const int result = b.bar_result;
    signal_locked(b, b.bar_gen, kWakeBarrier);
    lk.unlock();
    enter_segment(t, next_segment);
    hold_gate(t);
    return result;
  }
  const uint32_t gen = b.bar_gen.load();
  note_blocking_locked(b, t);
  if (b.aborted.load()) throw BlockAborted{};
  lk.unlock();
  // A thread that will be held back in the next segment waits only for the hold to end (which
  // implies the barrier completed): one sleep per barrier instead of two.
  enter_segment(t, next_segment);
  if (t.held) {
    hold_gate(t);
  } else {
    wait_until(b, b.bar_gen, [&] { return b.bar_gen.load(std::memory_order_acquire) != gen; });
  }
  // Written by the releaser before it bumped bar_gen / released the hold; not written again
  // until this thread arrives at the next barrier.
  return b.bar_result;
}

inline int syncthreads_impl(const char* file, int line, int predicate, const char* name) {
  ThreadCtx& t = this_thread_ctx(name);
  char* sync = &t.block->tsan_block_sync[0];
  tsan_release(sync);
  int result;
  {
    TsanHidden hidden;
    result = syncthreads_body(t, file, line, predicate, name);
  }
  tsan_acquire(sync);
  return result;
}

// ---- warp collectives ---------------------------------------------------------------------------
// Rendezvous of the lanes in `mask` (restricted to lanes that exist). deposit(slot, lane) stores
// this lane's input under the block mutex; complete(slot) runs once, in the last lane to arrive.
template <class Deposit, class Complete>
inline std::shared_ptr<WarpSlot> warp_collective(const char* op, uint32_t mask, Deposit deposit,
                                                 Complete complete) {
  TsanHidden hidden;
  ThreadCtx& t = this_thread_ctx(op);
  BlockState& b = *t.block;
  WarpState& w = b.warps[t.warp];
  const uint32_t me = 1u << t.lane;
  if ((mask & me) == 0) {
    throw Error(
        strprintf("%s: the calling lane %u is not in the member mask 0x%08x", op, t.lane, mask));
  }
  const uint32_t eff = mask & w.existing;
  BlockLock lk(b);
  if (b.aborted.load()) throw BlockAborted{};
  if (eff & w.exited) {
    fail_locked(
        b, strprintf("%s: %s (warp %u, lane %u) names lanes 0x%08x in mask 0x%08x that have "
                     "already exited",
                     op, describe_thread(t.idx).c_str(), t.warp, t.lane, eff & w.exited, mask));
    throw BlockAborted{};
  }
  // Join the open rendezvous of the same intrinsic and mask. Rendezvous with other masks may be
  // open at the same time (a lane may wait in __syncwarp() for lanes still finishing a shuffle
  // among themselves); lanes that wait for each other in different ones end in the deadlock check.
  std::shared_ptr<WarpSlot> slot;
  for (const auto& s : w.open) {
    if (s->mask == eff && (s->arrived & me) == 0 && std::strcmp(s->op, op) == 0) {
      slot = s;
      break;
    }
  }
  if (!slot) {
    slot = std::make_shared<WarpSlot>();
    slot->op = op;
    slot->mask = eff;
    w.open.push_back(slot);
  }
  deposit(*slot, t.lane);
  slot->arrived |= me;
  if (slot->arrived == eff) {
    complete(*slot);
    slot->done.store(true, std::memory_order_release);
    w.open.erase(std::find(w.open.begin(), w.open.end(), slot));
    b.blocked -= static_cast<unsigned>(__builtin_popcount(eff)) - 1u;
    b.last_progress = seconds_now();
    if (eff != me) signal_locked(b, w.word, wake_warp(t.warp));
    return slot;
  }
  note_blocking_locked(b, t);
  if (b.aborted.load()) throw BlockAborted{};
  lk.unlock();
  wait_until(b, w.word, [&] { return slot->done.load(std::memory_order_acquire); });
  return slot;
}

// Spin-wait loops should call __nanosleep (good practice on GPUs too): it is where a spinning
// thread notices that its block failed (e.g. timed out) and unwinds instead of spinning forever.
inline void nanosleep_impl(unsigned ns) {
  TsanHidden hidden;
  if (current_thread != nullptr && current_thread->block->aborted.load()) throw BlockAborted{};
  std::this_thread::sleep_for(std::chrono::nanoseconds(ns));
}

inline uint32_t active_lanes(const char* what) {
  TsanHidden hidden;
  ThreadCtx& t = this_thread_ctx(what);
  BlockLock lk(*t.block);
  const WarpState& w = t.block->warps[t.warp];
  return w.existing & ~w.exited;
}

// ---- shared memory ------------------------------------------------------------------------------
inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Storage of one static shared array for the current block: the first thread to execute the
// declaration allocates it (already poisoned), later threads get the same address.
inline void* static_shared_alloc(const void* key, size_t bytes, size_t align, const char* name) {
  TsanHidden hidden;
  ThreadCtx& t = this_thread_ctx("BSCONV_SHARED");
  BlockState& b = *t.block;
  BlockLock lk(b);
  for (const SharedArray& a : b.shared_arrays) {
    if (a.key == key) return b.arena + a.offset;
  }
  const size_t new_static = b.static_bytes + bytes;
  if (new_static > b.static_limit) {
    throw Error(
        strprintf("BSCONV_SHARED(%s): static shared memory of %s would be %zu bytes, over "
                  "the %zu-byte limit for static __shared__ arrays (use dynamic shared memory "
                  "with cudaFuncSetAttribute opt-in for more)",
                  name, b.kernel_name, new_static, b.static_limit));
  }
  if (new_static + b.dynamic_bytes > b.total_limit) {
    throw Error(
        strprintf("BSCONV_SHARED(%s): %s uses %zu bytes of static + %zu bytes of dynamic "
                  "shared memory = %zu, over the per-block limit of %zu bytes%s",
                  name, b.kernel_name, new_static, b.dynamic_bytes, new_static + b.dynamic_bytes,
                  b.total_limit,
                  b.total_limit_opted_in ? ""
                                         : " (raise it with cudaFuncSetAttribute(kernel, "
                                           "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes))"));
  }
  const size_t offset = align_up(b.arena_end + kSharedRedzone, std::max<size_t>(align, 16));
  if (offset + bytes + kSharedRedzone > b.arena_capacity) {
    throw Error(
        strprintf("BSCONV_SHARED(%s): too many shared arrays for the emulator's arena", name));
  }
  b.shared_arrays.push_back(SharedArray{key, name, offset, bytes});
  b.arena_end = offset + bytes;
  b.static_bytes = new_static;
  return b.arena + offset;
}

inline void* dynamic_shared_base() {
  TsanHidden hidden;
  ThreadCtx& t = this_thread_ctx("BSCONV_DYNAMIC_SHARED");
  return t.block->arena;
}

// After a block: every byte between and after the shared regions must still be poison.
inline std::string shared_redzone_violation(const BlockState& b) {
  std::vector<SharedArray> regions = b.shared_arrays;
  regions.insert(regions.begin(),
                 SharedArray{nullptr, "dynamic shared memory", 0, b.dynamic_bytes});
  for (size_t i = 0; i < regions.size(); ++i) {
    const size_t begin = regions[i].offset + regions[i].bytes;
    const size_t end = i + 1 < regions.size() ? regions[i + 1].offset : begin + kSharedRedzone;
    for (size_t p = begin; p < end; ++p) {
      if (b.arena[p] != 0xFF) {
        return strprintf(
            "shared memory out-of-bounds write: the byte %zu past the end of '%s' (%zu bytes) "
            "was modified",
            p - begin, regions[i].name, regions[i].bytes);
      }
    }
  }
  return "";
}

// ---- guarded global buffers (see guarded_buffer.h) ---------------------------------------------
struct GuardCheckable {
  virtual std::string guard_violations() const = 0;
  virtual void restore_guards() = 0;

 protected:
  ~GuardCheckable() = default;
};
inline std::mutex& guard_registry_mutex() {
  static std::mutex m;
  return m;
}
inline std::vector<GuardCheckable*>& guard_registry() {
  static std::vector<GuardCheckable*> r;
  return r;
}

// ---- the worker pool ----------------------------------------------------------------------------
inline void run_emulated_thread(BlockState& b, unsigned tid) {
  ThreadCtx t;
  t.block = &b;
  t.tid = tid;
  t.warp = tid / 32;
  t.lane = tid % 32;
  t.idx = uint3{tid % b.block_dim.x, (tid / b.block_dim.x) % b.block_dim.y,
                tid / (b.block_dim.x * b.block_dim.y)};
  threadIdx = t.idx;
  blockIdx = b.block_idx;
  blockDim = b.block_dim;
  gridDim = b.grid_dim;
  current_thread = &t;
  enter_segment(t, 0);
  bool normal_exit = false;
  try {
    hold_gate(t);
    TsanVisible visible;
    tsan_acquire(&b.tsan_launch_begin);
    b.invoke(b.closure);
    normal_exit = true;
  } catch (const BlockAborted&) {
  } catch (const std::exception& e) {
    BlockLock lk(b);
    fail_locked(b, describe_thread(t.idx) + ": " + e.what());
  } catch (...) {
    BlockLock lk(b);
    fail_locked(b, describe_thread(t.idx) + ": unknown exception");
  }
  {
    BlockLock lk(b);
    note_stop_locked(b, t);
    ++b.exited;
    b.last_progress = seconds_now();
    WarpState& w = b.warps[t.warp];
    w.exited |= 1u << t.lane;
    if (normal_exit && !b.aborted.load()) {
      if (b.bar_arrived > 0) {
        fail_locked(
            b, strprintf("__syncthreads: divergent barrier: %s exited while %u of %u threads, "
                         "first %s, wait at %s (%s:%d); every thread of the block must reach "
                         "every barrier",
                         describe_thread(t.idx).c_str(), b.bar_arrived, b.nthreads,
                         describe_thread(b.bar_first).c_str(), b.bar_name, b.bar_file, b.bar_line));
      } else {
        for (const auto& s : w.open) {
          if (s->mask & (1u << t.lane)) {
            fail_locked(
                b, strprintf("%s: %s (lane %u) exited while lanes 0x%08x wait for it in %s with "
                             "mask 0x%08x",
                             s->op, describe_thread(t.idx).c_str(), t.lane, s->arrived, s->op,
                             s->mask));
            break;
          }
        }
        if (!b.aborted.load() && b.blocked > 0 && b.blocked + b.exited == b.nthreads) {
          fail_locked(b,
                      "deadlock: every remaining thread of the block waits and none can proceed" +
                          state_report_locked(b));
        }
      }
    }
  }
  {
    TsanVisible visible;  // also for threads that unwound: the host continues after the launch
    tsan_release(&b.tsan_launch_end);
  }
  current_thread = nullptr;
  if (b.remaining.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    b.finished.store(1, std::memory_order_release);
    futex_wake_all(&b.finished);
  }
}

class Pool {
 public:
  // Leaked on purpose: the workers sleep forever in futex waits, and joining them at exit would
  // only add a shutdown path that can hang.
  static Pool& instance() {
    static Pool* pool = new Pool();
    return *pool;
  }

  BlockState block;
  std::mutex launch_mutex;  // one launch at a time
  bool broken = false;      // a block hung; its threads cannot be reclaimed

  void ensure_workers(unsigned n) {
    while (workers_.size() < n) {
      Worker* w = new Worker();
      w->pool = this;
      w->tid = static_cast<unsigned>(workers_.size());
      pthread_attr_t attr;
      pthread_attr_init(&attr);
      pthread_attr_setstacksize(&attr, 4u << 20);  // virtual; only touched pages cost memory
      pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
      pthread_t th;
      const int rc = pthread_create(&th, &attr, &Pool::worker_main, w);
      pthread_attr_destroy(&attr);
      if (rc != 0) {
        delete w;
        throw Error(strprintf("emu: cannot create emulated thread %zu (pthread_create error %d)",
                              workers_.size(), rc));
      }
      workers_.push_back(w);
    }
  }

  // Runs one block on workers 0..nthreads-1 and waits for all of them. While waiting, the host
  // thread is the watchdog: it lifts hold-backs that last too long and fails the block when
  // threads are blocked with no progress for Config::wait_timeout_s.
  void run_block(double timeout_s) {
    BlockState& b = block;
    b.remaining.store(b.nthreads);
    b.finished.store(0);
    for (unsigned i = 0; i < b.nthreads; ++i) bump_and_wake(workers_[i]->seq);
    const double deadline = seconds_now() + timeout_s;
    while (b.finished.load(std::memory_order_acquire) == 0) {
      const double now = seconds_now();
      {
        BlockLock lk(b);
        if (!b.aborted.load()) {
          if (b.hold_released_segment.load() != b.segment &&
              now - b.segment_start > b.hold_timeout_s) {
            release_hold_locked(b);
          }
          if (b.blocked > 0 && now - b.last_progress > b.wait_timeout_s) {
            fail_locked(b, strprintf("timeout: threads waited more than %.1f s at barriers or warp "
                                     "collectives without progress; some thread never arrives (an "
                                     "endless loop, or a spin-wait on a thread that is waiting)",
                                     b.wait_timeout_s) +
                               state_report_locked(b));
          }
        }
      }
      const double left = deadline - now;
      if (left <= 0) {
        broken = true;
        throw Error(strprintf(
            "block (%u,%u,%u) of kernel %s did not finish within %.0f s: a thread is stuck "
            "in a loop the emulator cannot interrupt; the emulator is unusable for the "
            "rest of this process",
            b.block_idx.x, b.block_idx.y, b.block_idx.z, b.kernel_name, timeout_s));
      }
      futex_wait(&b.finished, 0, std::min(left, 0.01));
    }
  }

 private:
  struct Worker {
    Pool* pool = nullptr;
    unsigned tid = 0;
    std::atomic<uint32_t> seq{0};
  };
  std::vector<Worker*> workers_;

  static void* worker_main(void* arg) {
    TsanHidden hidden;  // for the thread's whole life, except while it runs kernel code
    Worker* w = static_cast<Worker*>(arg);
    uint32_t seen = 0;
    for (;;) {
      const uint32_t s = w->seq.load(std::memory_order_acquire);
      if (s == seen) {
        futex_wait(&w->seq, s);
        continue;
      }
      seen = s;
      run_emulated_thread(w->pool->block, w->tid);
    }
    return nullptr;
  }
};

// ---- kernel attributes (cudaFuncSetAttribute) ---------------------------------------------------
using KernelKey = void (*)();
inline std::mutex& attribute_mutex() {
  static std::mutex m;
  return m;
}
inline std::map<KernelKey, size_t>& max_dynamic_smem_attribute() {
  static std::map<KernelKey, size_t> m;
  return m;
}

// ---- launch -------------------------------------------------------------------------------------
struct LaunchRequest {
  const char* kernel_name;
  dim3 grid, block;
  size_t dynamic_smem;
  KernelKey kernel;
  void (*invoke)(const void*);
  const void* closure;
};

template <class F>
inline void invoke_closure(const void* f) {
  (*static_cast<const F*>(f))();
}

inline uint64_t next_launch_seed() {
  static std::atomic<uint64_t> counter{0};
  return mix64(config().seed ^ mix64(counter.fetch_add(1)));
}

inline std::string launch_description(const LaunchRequest& r) {
  return strprintf("emu::launch(%s, grid=(%u,%u,%u), block=(%u,%u,%u), dynamic_smem=%zu)",
                   r.kernel_name, r.grid.x, r.grid.y, r.grid.z, r.block.x, r.block.y, r.block.z,
                   r.dynamic_smem);
}

inline void check_launch_config(const LaunchRequest& r, size_t max_dynamic) {
  const std::string where = launch_description(r) + ": ";
  const dim3 g = r.grid, k = r.block;
  if (g.x == 0 || g.y == 0 || g.z == 0 || k.x == 0 || k.y == 0 || k.z == 0) {
    throw Error(where + "invalid configuration: grid and block dimensions must be at least 1");
  }
  if (k.x > 1024 || k.y > 1024 || k.z > 64 || static_cast<uint64_t>(k.x) * k.y * k.z > 1024) {
    throw Error(where +
                "invalid configuration: at most 1024 threads per block (x,y <= 1024, z <= 64)");
  }
  if (g.x > 2147483647u || g.y > 65535u || g.z > 65535u) {
    throw Error(where + "invalid configuration: grid dimensions over CUDA's limits");
  }
  if (r.dynamic_smem > max_dynamic) {
    throw Error(where +
                strprintf("dynamic shared memory of %zu bytes exceeds the kernel's maximum of %zu "
                          "bytes (cudaFuncSetAttribute(kernel, "
                          "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) raises it)",
                          r.dynamic_smem, max_dynamic));
  }
}

inline void run_launch_hidden(const LaunchRequest& r);

inline void run_launch(const LaunchRequest& r) {
  if (current_thread != nullptr) {
    throw Error(
        "emu::launch: launching a kernel from device code (dynamic parallelism) is not supported");
  }
  BlockState& b = Pool::instance().block;
  tsan_release(&b.tsan_launch_begin);  // host writes before the launch -> every kernel thread
  try {
    TsanHidden hidden;
    run_launch_hidden(r);
  } catch (...) {
    tsan_acquire(&b.tsan_launch_end);  // also after a failed launch: the host goes on
    throw;
  }
  tsan_acquire(&b.tsan_launch_end);  // every kernel thread -> host code after the launch
}

inline void run_launch_hidden(const LaunchRequest& r) {
  Pool& pool = Pool::instance();
  std::lock_guard<std::mutex> launch_lock(pool.launch_mutex);
  if (pool.broken)
    throw Error(launch_description(r) + ": a previous launch hung; the emulator is unusable");
  const Config cfg = config();

  size_t max_dynamic = cfg.smem_default_limit;
  bool opted_in = false;
  {
    std::lock_guard<std::mutex> lk(attribute_mutex());
    auto it = max_dynamic_smem_attribute().find(r.kernel);
    if (it != max_dynamic_smem_attribute().end()) {
      max_dynamic = it->second;
      opted_in = true;
    }
  }
  check_launch_config(r, max_dynamic);

  BlockState& b = pool.block;
  b.kernel_name = r.kernel_name;
  b.grid_dim = r.grid;
  b.block_dim = r.block;
  b.nthreads = r.block.x * r.block.y * r.block.z;
  b.nwarps = (b.nthreads + 31) / 32;
  b.invoke = r.invoke;
  b.closure = r.closure;
  b.launch_seed = next_launch_seed();
  const double fraction = std::min(std::max(cfg.hold_fraction, 0.0), 0.999);
  b.hold_threshold = static_cast<uint64_t>(fraction * 18446744073709549568.0);
  b.hold_timeout_s = cfg.hold_timeout_s;
  b.wait_timeout_s = cfg.wait_timeout_s;
  b.dynamic_bytes = r.dynamic_smem;
  b.static_limit = cfg.smem_static_limit;
  b.total_limit_opted_in = opted_in;
  b.total_limit = opted_in ? std::max(cfg.smem_optin_limit, max_dynamic) : cfg.smem_default_limit;
  const size_t capacity =
      align_up(std::max(b.total_limit, r.dynamic_smem) + kSharedArenaSlack, 4096);
  auto allocate_arena = [&b](size_t bytes) {
    std::free(b.arena);
    b.arena = static_cast<unsigned char*>(std::aligned_alloc(4096, bytes));
    if (b.arena == nullptr) throw Error("emu::launch: out of memory for the shared-memory arena");
    b.arena_capacity = bytes;
  };
  if (b.arena_capacity < capacity) allocate_arena(capacity);
  pool.ensure_workers(b.nthreads);

  // Seeded Fisher-Yates over the linear block indices (own RNG: identical on every platform).
  const uint64_t nblocks = static_cast<uint64_t>(r.grid.x) * r.grid.y * r.grid.z;
  std::vector<uint64_t> order(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) order[i] = i;
  if (cfg.shuffle_blocks) {
    uint64_t state = b.launch_seed;
    for (uint64_t i = nblocks; i > 1; --i) {
      state = mix64(state);
      std::swap(order[i - 1], order[state % i]);
    }
  }

  const size_t poison_bytes = std::min(capacity, b.arena_capacity);
  for (uint64_t linear : order) {
    {
      BlockLock lk(b);
      b.block_idx =
          uint3{static_cast<unsigned>(linear % r.grid.x),
                static_cast<unsigned>((linear / r.grid.x) % r.grid.y),
                static_cast<unsigned>(linear / (static_cast<uint64_t>(r.grid.x) * r.grid.y))};
      b.hold_seed = mix64(b.launch_seed ^ mix64(linear));
      b.bar_arrived = 0;
      b.blocked = 0;
      b.exited = 0;
      b.aborted.store(false);
      b.error.clear();
      for (unsigned w = 0; w < b.nwarps; ++w) {
        const unsigned lanes = std::min(32u, b.nthreads - 32 * w);
        b.warps[w].existing = lanes == 32 ? 0xFFFFFFFFu : ((1u << lanes) - 1u);
        b.warps[w].exited = 0;
        b.warps[w].open.clear();
      }
      b.shared_arrays.clear();
      b.static_bytes = 0;
      b.arena_end = b.dynamic_bytes;
      if (kFreshArenaPerBlock) allocate_arena(b.arena_capacity);
      std::memset(b.arena, 0xFF, poison_bytes);  // NaN in every float format, -1 in every int
      b.tsan_block_sync.reset(new char[64]);
      b.hold_released_segment.store(UINT32_MAX);
      begin_segment_locked(b, 0);
    }
    pool.run_block(cfg.block_timeout_s);
    std::string error = b.aborted.load() ? b.error : shared_redzone_violation(b);
    if (!error.empty()) {
      throw Error(launch_description(r) +
                  strprintf(": block (%u,%u,%u): ", b.block_idx.x, b.block_idx.y, b.block_idx.z) +
                  error);
    }
  }

  if (cfg.check_guards_after_launch) {
    std::string report;
    std::lock_guard<std::mutex> lk(guard_registry_mutex());
    for (GuardCheckable* g : guard_registry()) {
      const std::string v = g->guard_violations();
      if (!v.empty()) {
        report += "\n  " + v;
        g->restore_guards();  // report each bad write once
      }
    }
    if (!report.empty())
      throw Error(launch_description(r) + ": out-of-bounds global memory write:" + report);
  }
}

}  // namespace detail
}  // namespace emu

inline void __nanosleep(unsigned ns) { emu::detail::nanosleep_impl(ns); }

namespace emu {

// Launches `kernel` on a grid of blocks, like kernel<<<grid, block, dynamic_smem>>>(args...), and
// returns when it has finished. Throws emu::Error on any detected failure.
template <class... Params, class... Args>
void launch_named(const char* name, dim3 grid, dim3 block, size_t dynamic_smem,
                  void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args),
                "emu::launch: wrong number of kernel arguments");
  static_assert(!std::disjunction<std::is_reference<Params>...>::value,
                "CUDA kernels take their parameters by value");
  // Converted once, like CUDA's parameter buffer; each thread gets its own copy when called.
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  auto body = [&params, kernel]() { std::apply(kernel, params); };
  detail::LaunchRequest request{name,
                                grid,
                                block,
                                dynamic_smem,
                                reinterpret_cast<detail::KernelKey>(kernel),
                                &detail::invoke_closure<decltype(body)>,
                                &body};
  detail::run_launch(request);
}

template <class... Params, class... Args>
void launch(dim3 grid, dim3 block, size_t dynamic_smem, void (*kernel)(Params...), Args&&... args) {
  launch_named("kernel", grid, block, dynamic_smem, kernel, std::forward<Args>(args)...);
}

}  // namespace emu
