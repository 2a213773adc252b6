// emu/runtime.cpp — the emulated CUDA device: runs kernels/*.cu, compiled as host C++ with
// emu/cuda_emu.h force-included, on the CPU (DESIGN.md section 6).
//
// Design
// ------
// * A launch is a Job. Its blocks are handed out, one at a time, to a pool of OS threads (one per
//   core, PATCHBAY_EMU_THREADS overrides). Blocks are independent, as on a GPU.
// * A block runs on one OS thread: each CUDA thread is a fiber with its own stack (mmap'd, with a
//   guard page below it; stacks are pooled per worker). A scheduler loop on the worker's own stack
//   resumes the ready fibers in the launch's order (fwd, rev, or rand:SEED, reshuffled at every
//   barrier); a fiber runs until it reaches a sync point or exits. Switching is the ~20
//   instruction patchbay_emu_switch (emu/switch_x86_64.S).
// * `__shared__` is `static thread_local` (cuda_emu.h): the fibers of a block share the OS
//   thread's copy. threadIdx & co read *patchbay_emu_current, which the scheduler points at the
//   running fiber's ThreadState before every switch. Dynamic shared memory is a per-worker buffer
//   (patchbay_emu_dynamic_smem) with a guard page right after the bytes the launch asked for;
//   it is poisoned with 0xFF at the start of every block.
// * __syncthreads: the fiber records where it waits and yields. When no fiber is ready, the
//   scheduler checks the block: all remaining threads at the same barrier -> release them; some
//   exited or waiting elsewhere -> the launch fails with file:line (a divergent barrier hangs or
//   misbehaves on a GPU; here it is an error).
// * Warp collectives (__shfl*_sync, __ballot_sync, __syncwarp, ...) meet per warp on a pending
//   collective keyed by mask; the last lane to arrive computes every lane's result and readies
//   the others. A lane of the mask that has exited, does not exist, or waits elsewhere is an
//   error, never a hang.
// * A memory fault inside a fiber (a stack overflow into the guard page, an access past the
//   dynamic shared memory, a wild pointer) is caught by a SIGSEGV/SIGBUS handler on an alternate
//   stack, which abandons the fiber and turns the fault into a launch error; faults elsewhere go
//   to the handler that was installed before (Rust's).
// * Errors are reported once per launch (the first block that failed) as text:
//   "kernel `name`, block (x,y,z): <what> at <file>:<line> ...".
// Not emulated: inline PTX, wmma/mma, cp.async, clusters, texture/surface objects.

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cuda_emu.h"

extern "C" void patchbay_emu_switch(void** save_sp, void* load_sp);
extern "C" void patchbay_emu_trampoline();

__thread emu::ThreadState* patchbay_emu_current = nullptr;
__thread unsigned char* patchbay_emu_dynamic_smem = nullptr;

namespace {

constexpr size_t kStackBytes = 256 << 10;  // usable bytes per fiber stack (only touched pages cost)
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxSharedBytes = 227 << 10;  // sm_90's opt-in maximum per block

size_t page_size() {
    static const size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

enum class St : uint8_t { Ready, Barrier, Collective, Exited };

struct Worker;

struct Fiber {
    emu::ThreadState ts;
    void* sp = nullptr;
    char* stack_base = nullptr;  // lowest address of the mapping (the guard page)
    Worker* w = nullptr;
    unsigned tid = 0;  // linear thread index in the block
    St state = St::Exited;
    // Where the fiber waits (barrier or collective), and the barrier's operands/result.
    const char* file = nullptr;
    int line = 0;
    int bar_op = 0;
    int pred = 0;
    uint64_t result = 0;
};

/// A warp collective some lanes have reached: completes when every lane of `mask` has.
struct Collective {
    unsigned mask = 0, arrived = 0;
    int op = 0;
    const char* file = nullptr;
    int line = 0;
    uint64_t value[32];
    int arg[32];
    int width[32];
};

struct Job {
    const patchbay_emu_entry* entry = nullptr;
    void** args = nullptr;
    dim3 grid, block;
    unsigned shared_bytes = 0;
    int order = 0;  // 0 fwd, 1 rev, 2 rand
    uint64_t seed = 0;
    uint64_t nblocks = 0;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex m;
    std::string error;
    uint64_t error_block = ~0ull;
};

/// One OS thread of the pool and everything its blocks need.
struct Worker {
    std::vector<Fiber> fibers;
    std::vector<char*> stacks;  // mappings of guard + kStackBytes, reused by every block
    std::vector<unsigned> order;
    std::vector<std::vector<Collective>> warps;  // pending collectives per warp
    std::vector<unsigned> exited;                // per warp: lanes that have exited
    void* sched_sp = nullptr;
    Fiber* cur = nullptr;  // the fiber running now, null while the scheduler runs
    Job* job = nullptr;
    uint3 block_idx{0, 0, 0};
    unsigned nthreads = 0;
    std::string error;  // set by a failing fiber, read by the scheduler
    uint64_t rng = 0;
    // Dynamic shared memory: [smem_map, smem_map + smem_len) with the last page PROT_NONE.
    char* smem_map = nullptr;
    size_t smem_len = 0;
    char fault_msg[512];
    bool faulted = false;
};

__thread Worker* tls_worker = nullptr;

// --- Small helpers --------------------------------------------------------------------------

uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

std::string thread_str(const Fiber& f) {
    const uint3& t = f.ts.thread_idx;
    return fmt("thread (%u,%u,%u)", t.x, t.y, t.z);
}

const char* op_name(int op) {
    switch (op) {
        case emu::OP_SHFL_IDX: return "__shfl_sync";
        case emu::OP_SHFL_UP: return "__shfl_up_sync";
        case emu::OP_SHFL_DOWN: return "__shfl_down_sync";
        case emu::OP_SHFL_XOR: return "__shfl_xor_sync";
        case emu::OP_BALLOT: return "__ballot_sync";
        case emu::OP_ANY: return "__any_sync";
        case emu::OP_ALL: return "__all_sync";
        case emu::OP_MATCH_ANY: return "__match_any_sync";
        case emu::OP_REDUCE_ADD: return "__reduce_add_sync";
        case emu::OP_REDUCE_MIN_U: case emu::OP_REDUCE_MIN_I: return "__reduce_min_sync";
        case emu::OP_REDUCE_MAX_U: case emu::OP_REDUCE_MAX_I: return "__reduce_max_sync";
        case emu::OP_REDUCE_AND: return "__reduce_and_sync";
        case emu::OP_REDUCE_OR: return "__reduce_or_sync";
        case emu::OP_REDUCE_XOR: return "__reduce_xor_sync";
        case emu::OP_SYNCWARP: return "__syncwarp";
    }
    return "warp collective";
}

const char* barrier_name(int op) {
    switch (op) {
        case emu::BAR_COUNT: return "__syncthreads_count";
        case emu::BAR_AND: return "__syncthreads_and";
        case emu::BAR_OR: return "__syncthreads_or";
    }
    return "__syncthreads";
}

/// Where a fiber is, for messages: "waits at __syncthreads at f.cu:12", "has exited"...
std::string where(const Fiber& f, const Worker& w) {
    switch (f.state) {
        case St::Ready: return "is running";
        case St::Exited: return "has exited";
        case St::Barrier: return fmt("waits at %s at %s:%d", barrier_name(f.bar_op), f.file, f.line);
        case St::Collective: {
            unsigned warp = f.tid >> 5, lane = f.tid & 31;
            for (const Collective& c : w.warps[warp])
                if (c.arrived >> lane & 1)
                    return fmt("waits at %s (mask 0x%08x) at %s:%d", op_name(c.op), c.mask, c.file, c.line);
            return "waits at a warp collective";
        }
    }
    return "?";
}

// --- Leaving a fiber ------------------------------------------------------------------------

/// Suspends the running fiber until the scheduler resumes it.
void yield_fiber(Worker* w, Fiber* f) { patchbay_emu_switch(&f->sp, w->sched_sp); }

/// Ends the running fiber's block with an error (never returns).
[[noreturn]] void fail_fiber(Worker* w, std::string msg) {
    if (w->error.empty()) w->error.swap(msg);
    Fiber* f = w->cur;
    f->state = St::Exited;
    patchbay_emu_switch(&f->sp, w->sched_sp);
    __builtin_unreachable();
}

Worker* current_worker(const char* what) {
    Worker* w = tls_worker;
    if (!w || !w->cur) {
        fprintf(stderr, "patchbay emulator: %s called outside of a kernel\n", what);
        abort();
    }
    return w;
}

}  // namespace

// --- Fiber entry ---------------------------------------------------------------------------------

extern "C" [[noreturn]] void patchbay_emu_fiber_main(Fiber* f) {
    Worker* w = f->w;
    try {
        w->job->entry->thunk(w->job->args);
    } catch (const std::exception& e) {
        fail_fiber(w, fmt("%s threw a C++ exception: %s", thread_str(*f).c_str(), e.what()));
    } catch (...) {
        fail_fiber(w, fmt("%s threw a C++ exception", thread_str(*f).c_str()));
    }
    f->state = St::Exited;
    patchbay_emu_switch(&f->sp, w->sched_sp);
    __builtin_unreachable();
}

// --- Device functions called by kernels (cuda_emu.h) ---------------------------------------------

namespace emu {

int syncthreads(const char* file, int line, int op, int pred) {
    Worker* w = current_worker("__syncthreads");
    Fiber* f = w->cur;
    f->state = St::Barrier;
    f->file = file;
    f->line = line;
    f->bar_op = op;
    f->pred = pred;
    yield_fiber(w, f);
    return (int)f->result;
}

unsigned activemask() {
    Worker* w = current_worker("__activemask");
    unsigned warp = w->cur->tid >> 5, m = 0;
    for (unsigned l = 0; l < 32; l++) {
        unsigned t = warp * 32 + l;
        if (t < w->nthreads && w->fibers[t].state != St::Exited) m |= 1u << l;
    }
    return m;
}

void trap(const char* file, int line, const char* what) {
    Worker* w = current_worker("__trap/assert");
    fail_fiber(w, fmt("%s at %s:%d (%s)", what, file, line, thread_str(*w->cur).c_str()));
}

namespace {
/// Computes the results of a complete collective into the lanes' fibers; returns an error or "".
std::string complete(Worker* w, unsigned warp, const Collective& c) {
    unsigned bits = 0;  // lanes whose predicate/value is non-zero
    for (unsigned l = 0; l < 32; l++)
        if ((c.mask >> l & 1) && c.value[l] != 0) bits |= 1u << l;
    for (unsigned l = 0; l < 32; l++) {
        if (!(c.mask >> l & 1)) continue;
        uint64_t r = 0;
        int width = c.width[l];
        switch (c.op) {
            case OP_SHFL_IDX: case OP_SHFL_UP: case OP_SHFL_DOWN: case OP_SHFL_XOR: {
                unsigned lo = l & ~(unsigned)(width - 1), hi = lo | (unsigned)(width - 1);
                long src = l;
                if (c.op == OP_SHFL_IDX) src = lo | ((unsigned)c.arg[l] & (unsigned)(width - 1));
                if (c.op == OP_SHFL_UP) src = (long)l - (long)(unsigned)c.arg[l];
                if (c.op == OP_SHFL_DOWN) src = (long)l + (long)(unsigned)c.arg[l];
                if (c.op == OP_SHFL_XOR) src = l ^ ((unsigned)c.arg[l] & 31);
                if (src < (c.op == OP_SHFL_XOR ? 0 : (long)lo) || src > (long)hi) src = l;  // own value
                if (!(c.mask >> src & 1))
                    return fmt("%s at %s:%d: lane %u reads lane %ld, which is not in the mask 0x%08x (undefined on a GPU)",
                               op_name(c.op), c.file, c.line, l, src, c.mask);
                r = c.value[src];
                break;
            }
            case OP_BALLOT: r = bits; break;
            case OP_ANY: r = bits != 0; break;
            case OP_ALL: r = bits == c.mask; break;
            case OP_MATCH_ANY:
                for (unsigned k = 0; k < 32; k++)
                    if ((c.mask >> k & 1) && c.value[k] == c.value[l]) r |= 1u << k;
                break;
            case OP_SYNCWARP: break;
            default: {  // 32-bit reductions
                uint32_t acc = (uint32_t)c.value[l];
                for (unsigned k = 0; k < 32; k++) {
                    if (!(c.mask >> k & 1) || k == l) continue;
                    uint32_t v = (uint32_t)c.value[k];
                    switch (c.op) {
                        case OP_REDUCE_ADD: acc += v; break;
                        case OP_REDUCE_MIN_U: acc = std::min(acc, v); break;
                        case OP_REDUCE_MAX_U: acc = std::max(acc, v); break;
                        case OP_REDUCE_MIN_I: acc = (uint32_t)std::min((int32_t)acc, (int32_t)v); break;
                        case OP_REDUCE_MAX_I: acc = (uint32_t)std::max((int32_t)acc, (int32_t)v); break;
                        case OP_REDUCE_AND: acc &= v; break;
                        case OP_REDUCE_OR: acc |= v; break;
                        case OP_REDUCE_XOR: acc ^= v; break;
                    }
                }
                r = acc;
            }
        }
        Fiber& f = w->fibers[warp * 32 + l];
        f.result = r;
    }
    return "";
}
}  // namespace

uint64_t warp_op(const char* file, int line, int op, unsigned mask, uint64_t value, int arg, int width) {
    Worker* w = current_worker(op_name(op));
    Fiber* f = w->cur;
    const unsigned warp = f->tid >> 5, lane = f->tid & 31;
    const unsigned nlanes = std::min(32u, w->nthreads - warp * 32);
    const unsigned present = nlanes == 32 ? ~0u : (1u << nlanes) - 1;
    const char* name = op_name(op);
    if (!(mask >> lane & 1))
        fail_fiber(w, fmt("%s at %s:%d: the calling lane %u (%s) is not in its mask 0x%08x",
                          name, file, line, lane, thread_str(*f).c_str(), mask));
    if (mask & ~present)
        fail_fiber(w, fmt("%s at %s:%d: mask 0x%08x names lanes of warp %u that do not exist (the block has %u threads)",
                          name, file, line, mask, warp, w->nthreads));
    if (op <= OP_SHFL_XOR && (width < 1 || width > 32 || (width & (width - 1))))
        fail_fiber(w, fmt("%s at %s:%d: width %d is not a power of 2 in [1, 32]", name, file, line, width));
    if (unsigned gone = mask & w->exited[warp])
        fail_fiber(w, fmt("%s at %s:%d (mask 0x%08x): lane %u of warp %u has exited, so it can never arrive "
                          "(lane %u arrived)", name, file, line, mask, (unsigned)__builtin_ctz(gone), warp, lane));

    std::vector<Collective>& pending = w->warps[warp];
    size_t i = 0;
    while (i < pending.size() && pending[i].mask != mask) i++;
    if (i == pending.size()) {
        pending.emplace_back();
        Collective& c = pending.back();
        c.mask = mask;
        c.op = op;
        c.file = file;
        c.line = line;
    } else if (pending[i].op != op) {
        const Collective& c = pending[i];
        fail_fiber(w, fmt("warp %u, mask 0x%08x: lanes meet at different collectives: %s at %s:%d and %s at %s:%d",
                          warp, mask, op_name(c.op), c.file, c.line, name, file, line));
    }
    Collective& c = pending[i];
    c.value[lane] = value;
    c.arg[lane] = arg;
    c.width[lane] = width;
    c.arrived |= 1u << lane;
    if (c.arrived == mask) {
        std::string err = complete(w, warp, c);
        if (!err.empty()) fail_fiber(w, std::move(err));
        for (unsigned l = 0; l < 32; l++)
            if ((mask >> l & 1) && l != lane) w->fibers[warp * 32 + l].state = St::Ready;
        pending.erase(pending.begin() + (long)i);
        return f->result;
    }
    f->state = St::Collective;
    f->file = file;
    f->line = line;
    yield_fiber(w, f);
    return f->result;
}

}  // namespace emu

// --- The scheduler --------------------------------------------------------------------------------

namespace {

char* new_stack() {
    size_t guard = page_size();
    void* p = mmap(nullptr, guard + kStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    mprotect(p, guard, PROT_NONE);
    return static_cast<char*>(p);
}

/// Builds the frame patchbay_emu_switch expects, returning into the trampoline. The stack top
/// is offset by a per-fiber multiple of 64 bytes ("cache colouring"): page-aligned tops would
/// put the hot frames of all fibers in the same few L1 sets.
void prepare_stack(Fiber& f) {
    size_t colour = (size_t)((f.tid * 37u) % 64u) * 64u;
    uint64_t* sp = reinterpret_cast<uint64_t*>(f.stack_base + page_size() + kStackBytes - colour);
    uint32_t mxcsr;
    uint16_t fpucw;
    __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
    __asm__ volatile("fnstcw %0" : "=m"(fpucw));
    *--sp = 0;                                                // alignment slot
    *--sp = reinterpret_cast<uint64_t>(&patchbay_emu_trampoline);  // return address
    *--sp = 0;                                                // rbp
    *--sp = reinterpret_cast<uint64_t>(&f);                    // rbx: the trampoline's argument
    *--sp = 0;                                                // r12
    *--sp = 0;                                                // r13
    *--sp = 0;                                                // r14
    *--sp = 0;                                                // r15
    *--sp = (uint64_t)mxcsr | ((uint64_t)fpucw << 32);        // control words
    f.sp = sp;
}

/// Makes room for a block of `n` threads and `smem` bytes of dynamic shared memory.
bool reserve(Worker& w, unsigned n, unsigned smem, std::string& err) {
    while (w.stacks.size() < n) {
        char* s = new_stack();
        if (!s) {
            err = fmt("out of memory mapping fiber stacks (%zu of %u)", w.stacks.size(), n);
            return false;
        }
        w.stacks.push_back(s);
    }
    if (w.fibers.size() < n) w.fibers.resize(n);
    if (w.warps.size() < (n + 31) / 32) w.warps.resize((n + 31) / 32);
    if (w.exited.size() < (n + 31) / 32) w.exited.resize((n + 31) / 32);
    size_t pg = page_size();
    size_t need = (smem + pg - 1) / pg * pg + pg;
    if (w.smem_len < need) {
        if (w.smem_map) munmap(w.smem_map, w.smem_len);
        void* p = mmap(nullptr, need, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            w.smem_map = nullptr;
            w.smem_len = 0;
            err = "out of memory mapping dynamic shared memory";
            return false;
        }
        w.smem_map = static_cast<char*>(p);
        w.smem_len = need;
        mprotect(w.smem_map + need - pg, pg, PROT_NONE);
    }
    return true;
}

void shuffle_order(Worker& w, unsigned n, int order) {
    w.order.resize(n);
    for (unsigned i = 0; i < n; i++) w.order[i] = order == 1 ? n - 1 - i : i;
    if (order == 2)
        for (unsigned i = n; i > 1; i--) std::swap(w.order[i - 1], w.order[splitmix(w.rng) % i]);
}

/// All fibers are blocked or exited: releases a barrier, or says what is wrong.
/// Returns "" and readies fibers, or an error.
std::string resolve(Worker& w) {
    const unsigned n = w.nthreads;
    const Fiber *exited = nullptr, *at_bar = nullptr, *in_coll = nullptr;
    unsigned n_exited = 0, n_bar = 0;
    for (unsigned t = 0; t < n; t++) {
        const Fiber& f = w.fibers[t];
        if (f.state == St::Exited) { n_exited++; if (!exited) exited = &f; }
        if (f.state == St::Barrier) { n_bar++; if (!at_bar) at_bar = &f; }
        if (f.state == St::Collective && !in_coll) in_coll = &f;
    }
    if (n_exited == n) return "";
    if (in_coll) {
        // A collective can never complete: name the lanes it waits for and where they are.
        unsigned warp = in_coll->tid >> 5;
        for (const Collective& c : w.warps[warp]) {
            unsigned missing = c.mask & ~c.arrived;
            if (!missing) continue;
            unsigned l = (unsigned)__builtin_ctz(missing);
            const Fiber& m = w.fibers[warp * 32 + l];
            return fmt("deadlock: %s at %s:%d (warp %u, mask 0x%08x) waits for lane %u, which %s",
                       op_name(c.op), c.file, c.line, warp, c.mask, l, where(m, w).c_str());
        }
        return "deadlock in a warp collective";
    }
    // Every remaining thread waits at a barrier.
    if (n_exited)
        return fmt("divergent %s at %s:%d: %u threads wait there (%s first) but %u threads of the block have "
                   "exited (%s first); every thread of the block must reach the same barrier",
                   barrier_name(at_bar->bar_op), at_bar->file, at_bar->line, n_bar, thread_str(*at_bar).c_str(),
                   n_exited, thread_str(*exited).c_str());
    for (unsigned t = 0; t < n; t++) {
        const Fiber& f = w.fibers[t];
        if (f.line != at_bar->line || f.bar_op != at_bar->bar_op || strcmp(f.file, at_bar->file) != 0)
            return fmt("divergent barriers: %s waits at %s at %s:%d, %s at %s at %s:%d",
                       thread_str(*at_bar).c_str(), barrier_name(at_bar->bar_op), at_bar->file, at_bar->line,
                       thread_str(f).c_str(), barrier_name(f.bar_op), f.file, f.line);
    }
    uint64_t count = 0;
    for (unsigned t = 0; t < n; t++) count += w.fibers[t].pred != 0;
    uint64_t r = at_bar->bar_op == emu::BAR_COUNT ? count
               : at_bar->bar_op == emu::BAR_AND  ? (uint64_t)(count == n)
               : at_bar->bar_op == emu::BAR_OR   ? (uint64_t)(count != 0)
                                                 : 0;
    for (unsigned t = 0; t < n; t++) {
        w.fibers[t].result = r;
        w.fibers[t].state = St::Ready;
    }
    return "";
}

/// Runs block `b` of the worker's job; returns "" or the error.
std::string run_block(Worker& w, uint64_t b) {
    Job& j = *w.job;
    const unsigned bx = j.block.x, by = j.block.y, n = j.block.x * j.block.y * j.block.z;
    w.nthreads = n;
    w.block_idx = uint3{(unsigned)(b % j.grid.x), (unsigned)(b / j.grid.x % j.grid.y),
                        (unsigned)(b / ((uint64_t)j.grid.x * j.grid.y))};
    w.error.clear();
    w.faulted = false;
    w.rng = j.seed ^ (b * 0x9e3779b97f4a7c15ull) ^ 0x5bd1e995ull;
    for (auto& p : w.warps) p.clear();
    std::fill(w.exited.begin(), w.exited.end(), 0u);

    // Dynamic shared memory: the requested bytes end where the guard page starts.
    size_t pg = page_size();
    char* guard = w.smem_map + w.smem_len - pg;
    size_t bytes16 = (j.shared_bytes + 15u) & ~15u;
    patchbay_emu_dynamic_smem = reinterpret_cast<unsigned char*>(guard - bytes16);
    memset(guard - bytes16, 0xFF, bytes16);

    for (unsigned t = 0; t < n; t++) {
        Fiber& f = w.fibers[t];
        f.w = &w;
        f.tid = t;
        f.stack_base = w.stacks[t];
        f.ts.thread_idx = uint3{t % bx, t / bx % by, t / (bx * by)};
        f.ts.block_idx = w.block_idx;
        f.ts.block_dim = j.block;
        f.ts.grid_dim = j.grid;
        f.state = St::Ready;
        f.result = 0;
        prepare_stack(f);
    }
    shuffle_order(w, n, j.order);

    for (;;) {
        bool ran = false;
        for (unsigned k = 0; k < n; k++) {
            Fiber& f = w.fibers[w.order[k]];
            if (f.state != St::Ready) continue;
            ran = true;
            patchbay_emu_current = &f.ts;
            w.cur = &f;
            patchbay_emu_switch(&w.sched_sp, f.sp);
            w.cur = nullptr;
            if (w.faulted) return w.fault_msg;
            if (!w.error.empty()) return w.error;
            if (f.state == St::Exited) w.exited[f.tid >> 5] |= 1u << (f.tid & 31);
        }
        if (ran) continue;
        std::string err = resolve(w);
        if (!err.empty()) return err;
        bool all_exited = true;
        for (unsigned t = 0; t < n && all_exited; t++) all_exited = w.fibers[t].state == St::Exited;
        if (all_exited) return "";
        if (j.order == 2) shuffle_order(w, n, j.order);  // a new interleaving after every barrier
    }
}

void work(Worker& w, Job& j) {
    w.job = &j;
    std::string err;
    const unsigned n = j.block.x * j.block.y * j.block.z;
    if (!reserve(w, n, j.shared_bytes, err)) {
        std::lock_guard<std::mutex> g(j.m);
        if (j.error.empty()) j.error = err;
        j.failed = true;
        return;
    }
    while (!j.failed.load(std::memory_order_relaxed)) {
        uint64_t b = j.next.fetch_add(1);
        if (b >= j.nblocks) break;
        err = run_block(w, b);
        if (!err.empty()) {
            std::lock_guard<std::mutex> g(j.m);
            if (b < j.error_block) {
                j.error_block = b;
                j.error = fmt("block (%u,%u,%u): ", w.block_idx.x, w.block_idx.y, w.block_idx.z) + err;
            }
            j.failed = true;
        }
    }
    w.job = nullptr;
}

// --- Memory faults inside kernels ---------------------------------------------------------------

struct sigaction g_prev_segv, g_prev_bus;

void on_fault(int sig, siginfo_t* si, void* uctx) {
    Worker* w = tls_worker;
    if (w && w->cur && !w->faulted) {
        Fiber* f = w->cur;
        char* a = static_cast<char*>(si->si_addr);
        size_t pg = page_size();
        const char* what = "invalid memory access (a pointer argument too small, an index out of bounds?)";
        if (a >= f->stack_base && a < f->stack_base + pg)
            what = "fiber stack overflow (256 KiB per thread: move large per-thread arrays to shared or global memory)";
        else if (w->smem_map && a >= w->smem_map + w->smem_len - pg && a < w->smem_map + w->smem_len)
            what = "access past the end of dynamic shared memory (more than the launch's shared_bytes)";
        const uint3& t = f->ts.thread_idx;
        snprintf(w->fault_msg, sizeof w->fault_msg, "%s at address %p (%s, thread (%u,%u,%u))", what, (void*)a,
                 sig == SIGSEGV ? "SIGSEGV" : "SIGBUS", t.x, t.y, t.z);
        w->faulted = true;
        f->state = St::Exited;
        // Leave the handler for good: back to the scheduler, which reports the fault. The
        // handler runs with SA_NODEFER, so no signal stays blocked.
        patchbay_emu_switch(&f->sp, w->sched_sp);
    }
    // Not ours: hand over to the previous handler (Rust's stack-overflow detection), or restore
    // the default action and let the faulting instruction run again.
    struct sigaction* prev = sig == SIGSEGV ? &g_prev_segv : &g_prev_bus;
    if ((prev->sa_flags & SA_SIGINFO) && prev->sa_sigaction) {
        prev->sa_sigaction(sig, si, uctx);
    } else if (prev->sa_handler == SIG_DFL || prev->sa_handler == SIG_IGN) {
        sigaction(sig, prev, nullptr);
    } else {
        prev->sa_handler(sig);
    }
}

void install_fault_handler() {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_prev_segv);
    sigaction(SIGBUS, &sa, &g_prev_bus);
}

// --- The pool -------------------------------------------------------------------------------------

class Pool {
public:
    static Pool& get() {
        static Pool* p = new Pool();  // never destroyed: workers may outlive static destructors
        return *p;
    }

    std::string run(Job& j) {
        std::lock_guard<std::mutex> one_launch_at_a_time(launch_m_);
        {
            std::unique_lock<std::mutex> g(m_);
            job_ = &j;
            busy_ = (unsigned)threads_.size();
            gen_++;
        }
        cv_.notify_all();
        std::unique_lock<std::mutex> g(m_);
        done_cv_.wait(g, [&] { return busy_ == 0; });
        job_ = nullptr;
        return j.error;
    }

private:
    Pool() {
        unsigned n = std::thread::hardware_concurrency();
        if (const char* s = getenv("PATCHBAY_EMU_THREADS")) n = (unsigned)atoi(s);
        n = std::max(1u, std::min(n, 256u));
        install_fault_handler();
        for (unsigned i = 0; i < n; i++) threads_.emplace_back([this] { loop(); });
        for (auto& t : threads_) t.detach();
    }

    void loop() {
        // An alternate signal stack, so that a fiber stack overflow can be reported.
        stack_t ss;
        ss.ss_size = 64 << 10;
        ss.ss_sp = mmap(nullptr, ss.ss_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        ss.ss_flags = 0;
        if (ss.ss_sp != MAP_FAILED) sigaltstack(&ss, nullptr);
        Worker* w = new Worker();  // lives as long as the thread (the process)
        tls_worker = w;
        uint64_t seen = 0;
        for (;;) {
            Job* j;
            {
                std::unique_lock<std::mutex> g(m_);
                cv_.wait(g, [&] { return gen_ != seen; });
                seen = gen_;
                j = job_;
            }
            work(*w, *j);
            std::lock_guard<std::mutex> g(m_);
            if (--busy_ == 0) done_cv_.notify_all();
        }
    }

    std::mutex launch_m_, m_;
    std::condition_variable cv_, done_cv_;
    Job* job_ = nullptr;
    uint64_t gen_ = 0;
    unsigned busy_ = 0;
    std::vector<std::thread> threads_;
};

void copy_error(const std::string& s, char* err, size_t errlen) {
    if (!err || errlen == 0) return;
    size_t k = std::min(s.size(), errlen - 1);
    memcpy(err, s.data(), k);
    err[k] = 0;
}

}  // namespace

// --- C interface (src/backend/emu.rs) -------------------------------------------------------------

/// Runs `e` on grid x block with `shared` bytes of dynamic shared memory. `order`: 0 fwd, 1 rev,
/// 2 rand (with `seed`). Returns 0, or 1 with a message in err.
extern "C" int patchbay_emu_launch(const patchbay_emu_entry* e, const unsigned* grid, const unsigned* block,
                                   unsigned shared, void** args, int order, uint64_t seed, char* err,
                                   size_t errlen) {
    try {
        std::string prefix = fmt("kernel `%s`, ", e->name);
        uint64_t nthreads = (uint64_t)block[0] * block[1] * block[2];
        if (nthreads == 0 || nthreads > kMaxThreadsPerBlock || block[2] > 64 || grid[0] == 0 || grid[1] == 0 ||
            grid[2] == 0 || grid[0] > 0x7fffffffu || grid[1] > 65535 || grid[2] > 65535) {
            copy_error(fmt("kernel `%s`: invalid launch configuration: grid (%u,%u,%u), block (%u,%u,%u) "
                           "(at most 1024 threads per block, block.z <= 64, grid.y/z <= 65535, no zero)",
                           e->name, grid[0], grid[1], grid[2], block[0], block[1], block[2]),
                       err, errlen);
            return 1;
        }
        if (shared > kMaxSharedBytes) {
            copy_error(fmt("kernel `%s`: %u bytes of dynamic shared memory requested, at most %u per block",
                           e->name, shared, kMaxSharedBytes),
                       err, errlen);
            return 1;
        }
        Job j;
        j.entry = e;
        j.args = args;
        j.grid = dim3(grid[0], grid[1], grid[2]);
        j.block = dim3(block[0], block[1], block[2]);
        j.shared_bytes = shared;
        j.order = order;
        j.seed = seed;
        j.nblocks = (uint64_t)grid[0] * grid[1] * grid[2];
        std::string r = Pool::get().run(j);
        if (r.empty()) return 0;
        copy_error(prefix + r, err, errlen);
        return 1;
    } catch (const std::exception& ex) {
        copy_error(fmt("emulator: %s", ex.what()), err, errlen);
        return 1;
    }
}
