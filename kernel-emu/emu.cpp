// Runs amlserve's CUDA kernels (src/model/device/kernels.cu, included below as C++) on the CPU.
//
// A launch runs its blocks one after another on the calling thread. Each CUDA thread of a block is a fiber with its
// own stack (switched by a few instructions on x86-64, by ucontext elsewhere; a guard page below each), so a
// kernel's locals are per thread as on the GPU, while shared arrays (SHARED_ARRAY) and the dynamic shared buffer are
// one copy the block's threads share, filled with 0xff bytes (a NaN) at each block's start.
//
// A fiber runs until it reaches __syncthreads or a warp shuffle and then yields to the block's scheduler. The
// scheduler runs one warp at a time as far as it can go (through its own shuffles) before the next warp starts, so
// a missing barrier between warps shows as one warp reading shared memory another has not written yet; blocks
// alternate the order of the warps and of each warp's lanes (first to last, then last to first), so a missing
// __syncwarp shows too (a shuffle also orders shared memory here, which on a GPU it does not: that gap remains).
// A shuffle or __syncwarp is released when every lane of the warp has reached it, at the same line with the same
// mask (a full mask needs all 32 lanes); a barrier when every thread of the block that has not returned has
// reached it, at the same line. Anything else fails the launch with a message instead of hanging. Everything is
// thread-local, so launches on different threads do not meet.

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};

static thread_local Dim3 threadIdx, blockIdx, blockDim, gridDim;
static thread_local char* emu_dynamic_shared = nullptr;

namespace emu {

enum class State { Runnable, AtBarrier, AtShuffle, Done };

// A suspended fiber or scheduler.
struct Context {
#if defined(__x86_64__)
    void* sp = nullptr;
#else
    ucontext_t uc;
#endif
};

struct Fiber {
    Context ctx;
    State state = State::Runnable;
    int site = 0;              // the source line of the barrier or shuffle it waits at
    unsigned mask = 0;         // a shuffle's lane mask
    float offered = 0.0f;      // the value this lane offers at a shuffle
    int source = 0;            // the lane whose value it reads
    float received = 0.0f;
};

// A fiber's stack: mapped memory with an inaccessible page below it, so an overflow faults.
struct Stack {
    char* base = nullptr;
    std::size_t size = 0;
    std::size_t guard = 0;
    Stack(std::size_t bytes) {
        guard = (std::size_t)sysconf(_SC_PAGESIZE);
        size = bytes + guard;
        void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) throw std::bad_alloc();
        base = static_cast<char*>(p);
        mprotect(base, guard, PROT_NONE);
    }
    Stack(const Stack&) = delete;
    Stack& operator=(const Stack&) = delete;
    ~Stack() { munmap(base, size); }
    char* bottom() const { return base + guard; }
    char* top() const { return base + size; }
};

struct Block {
    std::vector<Fiber> fibers;
    std::vector<std::unique_ptr<Stack>> stacks;
    Context scheduler;
    int current = -1;
    std::function<void()> kernel;
};

static thread_local Block* block = nullptr;
// The first fault a launch's threads met (a GPU would stop the kernel with an error), empty if none.
static thread_local std::string faulted;

static void fault(const char* what) {
    if (faulted.empty()) faulted = what;
}
// Counts blocks run on this thread: a shared array is poisoned the first time a block reaches its declaration.
static thread_local unsigned long generation = 0;
static thread_local std::map<void*, unsigned long> shared_arrays;

// Fills `bytes` at `p` with 0xff (a NaN) once per block, the first time any of the block's threads declares it.
static void shared_array(void* p, std::size_t bytes) {
    auto [it, fresh] = shared_arrays.try_emplace(p, generation);
    if (fresh || it->second != generation) {
        std::memset(p, 0xff, bytes);
        it->second = generation;
    }
}

#if defined(__x86_64__)
// Saves the callee-saved registers and the SSE and x87 control words on the current stack, stores the stack
// pointer in *from, and resumes the context whose stack pointer is `to` (glibc's swapcontext also saves the
// signal mask with a system call, which made it most of the emulation's time).
extern "C" void amlserve_emu_switch(void** from, void* to);
asm(R"(
    .pushsection .text
    .p2align 4
    .globl amlserve_emu_switch
    .hidden amlserve_emu_switch
    .type amlserve_emu_switch, @function
amlserve_emu_switch:
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
    .size amlserve_emu_switch, .-amlserve_emu_switch
    .popsection
)");

static void switch_to(Context& from, Context& to) { amlserve_emu_switch(&from.sp, to.sp); }

[[noreturn]] static void fiber_main();

// Prepares `f` to start in fiber_main on `stack`: the frame amlserve_emu_switch pops, returning into fiber_main
// with the stack aligned as after a call.
static void start(Fiber& f, Stack& stack, Context&) {
    auto top = reinterpret_cast<std::uintptr_t>(stack.top()) & ~std::uintptr_t(15);
    auto* frame = reinterpret_cast<std::uint64_t*>(top - 72);
    std::uint32_t mxcsr;
    std::uint16_t fcw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fcw));
    frame[0] = std::uint64_t(mxcsr) | (std::uint64_t(fcw) << 32);
    for (int r = 1; r <= 6; r++) frame[r] = 0;  // r15, r14, r13, r12, rbx, rbp
    frame[7] = reinterpret_cast<std::uint64_t>(&fiber_main);
    frame[8] = 0;  // fiber_main never returns
    f.ctx.sp = frame;
}
#else
static void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

static void fiber_main();

static void start(Fiber& f, Stack& stack, Context& scheduler) {
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = stack.bottom();
    f.ctx.uc.uc_stack.ss_size = (std::size_t)(stack.top() - stack.bottom());
    f.ctx.uc.uc_link = &scheduler.uc;
    makecontext(&f.ctx.uc, fiber_main, 0);
}
#endif

__attribute__((noinline)) static void yield_as(State s, int site) {
    Fiber& f = block->fibers[block->current];
    f.state = s;
    f.site = site;
    switch_to(f.ctx, block->scheduler);
}

static void fiber_main() {
    block->kernel();
    Fiber& f = block->fibers[block->current];
    f.state = State::Done;
    switch_to(f.ctx, block->scheduler);
#if defined(__x86_64__)
    __builtin_unreachable();
#endif
}

constexpr std::size_t STACK_BYTES = 64 * 1024;

static std::string at(std::size_t thread, const Fiber& f) {
    const char* what = f.state == State::AtShuffle ? "a shuffle" : "a barrier";
    return "thread " + std::to_string(thread) + " at " + what + " on line " + std::to_string(f.site);
}

// Runs the warp of threads [w, end) as far as it can: its fibers (last lane first when `reverse`) until each
// waits or ends, then its shuffles, until none is left to release. An empty string, or what went wrong.
static std::string run_warp(Block& b, std::size_t w, std::size_t end, bool reverse) {
    for (;;) {
        for (std::size_t k = w; k < end; k++) {
            std::size_t i = reverse ? end - 1 - (k - w) : k;
            if (b.fibers[i].state != State::Runnable) continue;
            b.current = (int)i;
            threadIdx = Dim3{(unsigned)i, 0, 0};
            switch_to(b.scheduler, b.fibers[i].ctx);
        }
        std::size_t shuffling = 0, live = 0, first = end;
        for (std::size_t i = w; i < end; i++) {
            const Fiber& f = b.fibers[i];
            if (f.state == State::Done) continue;
            live++;
            if (f.state == State::AtShuffle) {
                shuffling++;
                if (first == end) first = i;
            }
        }
        if (shuffling == 0) return "";
        if (shuffling != live) {
            for (std::size_t i = w; i < end; i++)
                if (b.fibers[i].state == State::AtBarrier) return at(first, b.fibers[first]) + " while " + at(i, b.fibers[i]);
        }
        const Fiber& lead = b.fibers[first];
        for (std::size_t i = w; i < end; i++) {
            const Fiber& f = b.fibers[i];
            if (f.state != State::AtShuffle) continue;
            if (f.site != lead.site || f.mask != lead.mask)
                return at(first, lead) + " (mask " + std::to_string(lead.mask) + ") while " + at(i, f) + " (mask " +
                       std::to_string(f.mask) + ")";
            if ((f.mask >> (i - w) & 1) == 0) return at(i, f) + " whose mask leaves its own lane out";
        }
        for (std::size_t lane = 0; lane < 32; lane++) {
            bool named = lead.mask >> lane & 1;
            if (named && (w + lane >= end || b.fibers[w + lane].state != State::AtShuffle))
                return at(first, lead) + " names lane " + std::to_string(lane) +
                       ", which has returned or is not in the block";
        }
        for (std::size_t i = w; i < end; i++) {
            Fiber& f = b.fibers[i];
            if (f.state != State::AtShuffle) continue;
            std::size_t src = w + (std::size_t)f.source;
            if (src >= end || (lead.mask >> f.source & 1) == 0)
                return at(i, f) + " reads lane " + std::to_string(f.source) + ", which its mask leaves out";
            f.received = b.fibers[src].offered;
        }
        for (std::size_t i = w; i < end; i++)
            if (b.fibers[i].state == State::AtShuffle) b.fibers[i].state = State::Runnable;
    }
}

// Runs one block to its end, its warps and each warp's lanes in reverse order when `reverse`; an empty string when it ended, else why
// it could not.
static std::string run_block(Block& b, bool reverse) {
    std::size_t n = b.fibers.size();
    generation++;
    for (std::size_t i = 0; i < n; i++) {
        b.fibers[i] = Fiber{};
        start(b.fibers[i], *b.stacks[i], b.scheduler);
    }
    std::size_t warps = (n + 31) / 32;
    for (;;) {
        for (std::size_t k = 0; k < warps; k++) {
            std::size_t w = 32 * (reverse ? warps - 1 - k : k);
            std::string failure = run_warp(b, w, std::min(n, w + 32), reverse);
            if (!failure.empty()) return failure;
        }
        // Every thread now waits at a barrier or has returned.
        std::size_t first = n;
        for (std::size_t i = 0; i < n; i++) {
            const Fiber& f = b.fibers[i];
            if (f.state == State::Done) continue;
            if (first == n) first = i;
            if (f.site != b.fibers[first].site) return at(first, b.fibers[first]) + " while " + at(i, f);
        }
        if (first == n) return "";
        for (auto& f : b.fibers)
            if (f.state == State::AtBarrier) f.state = State::Runnable;
    }
}

}  // namespace emu

// The CUDA names kernels.cu uses.
#define __global__
#define __device__ static inline
#define __forceinline__
#define DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(emu_dynamic_shared)
#define SHARED_ARRAY(T, name, n) \
    static thread_local T name[n]; \
    emu::shared_array(name, sizeof(name))
#define __syncthreads() emu_syncthreads(__LINE__)
#define __shfl_xor_sync(mask, v, lane_mask) emu_shfl_xor((mask), (v), (lane_mask), __LINE__)
// A warp's barrier: every lane meets it as at a shuffle (a full mask, at one line).
#define __syncwarp() emu_shfl_xor(0xffffffffu, 0.0f, 0, __LINE__)

// CUDA's built-in vector types of four 32-bit words, which a GPU loads 16 bytes at a time.
struct uint4 {
    unsigned x, y, z, w;
};
struct float4 {
    float x, y, z, w;
};

// A load through the read-only cache. A GPU faults on an address that is not a multiple of the load's size: so
// does the emulated launch.
template <typename T>
static inline T __ldg(const T* p) {
    if (reinterpret_cast<std::uintptr_t>(p) % sizeof(T) != 0) emu::fault("a load from a misaligned address");
    return *p;
}

using std::max;
using std::min;

// glibc declares its own __expf.
static inline float emu_expf(float x) { return std::exp(x); }
#define __expf emu_expf
static inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
static inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
static inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
static inline void emu_syncthreads(int site) { emu::yield_as(emu::State::AtBarrier, site); }
static inline float emu_shfl_xor(unsigned mask, float v, int lane_mask, int site) {
    emu::Fiber& f = emu::block->fibers[emu::block->current];
    f.mask = mask;
    f.offered = v;
    f.source = (int)(threadIdx.x & 31) ^ lane_mask;
    emu::yield_as(emu::State::AtShuffle, site);
    return emu::block->fibers[emu::block->current].received;
}

#include "kernels.cu"

// The emulation's own tests (kernel-emu's unit tests), each something that would hang a GPU or read garbage.
// Lanes 0-15 of a warp shuffle while lanes 16-31 wait at a barrier.
extern "C" __global__ void emu_test_divergent(float* out) {
    float v = threadIdx.x < 16 ? __shfl_xor_sync(0xffffffff, 1.0f, 1) : 0.0f;
    if (threadIdx.x >= 16) __syncthreads();
    out[threadIdx.x] = v;
}

// Each warp's lane 0 writes its slot, then (with no barrier between) every thread sums all slots.
extern "C" __global__ void emu_test_missing_barrier(float* out) {
    SHARED_ARRAY(float, slots, 32);
    if ((threadIdx.x & 31) == 0) slots[threadIdx.x >> 5] = 1.0f;
    float sum = 0.0f;
    for (unsigned w = 0; w < blockDim.x / 32; w++) sum += slots[w];
    out[threadIdx.x] = sum;
}

// Thread t loads the 16 bytes from word `offset` + 4t of `in`: a fault unless offset is a multiple of 4 words.
extern "C" __global__ void emu_test_vector_load(unsigned* out, const unsigned* in, int offset) {
    uint4 w = __ldg((const uint4*)(in + offset + 4 * threadIdx.x));
    out[threadIdx.x] = w.x + w.y + w.z + w.w;
}

namespace {

// Binds a launch's arguments (pointers to each, as cuLaunchKernel takes them), copying their values.
template <typename... A, std::size_t... I>
std::function<void()> bind_values(void (*f)(A...), void** args, std::index_sequence<I...>) {
    std::tuple<std::decay_t<A>...> values{*static_cast<std::decay_t<A>*>(args[I])...};
    return [f, values]() { std::apply(f, values); };
}

template <typename... A>
std::function<void()> bind_all(void (*f)(A...), void** args) {
    return bind_values(f, args, std::index_sequence_for<A...>{});
}

// A parameter's kind: 'p' a pointer, 'i' an int, 'f' a float ('?' anything else).
template <typename A>
constexpr char kind_of() {
    if constexpr (std::is_pointer_v<A>) return 'p';
    else if constexpr (std::is_same_v<A, int>) return 'i';
    else if constexpr (std::is_same_v<A, float>) return 'f';
    else return '?';
}

template <typename... A>
std::string kinds(void (*)(A...)) {
    return std::string{kind_of<A>()...};
}

struct Kernel {
    const char* name;
    std::string (*kinds)();
    std::function<void()> (*bind)(void**);
};

#define KERNEL(k) Kernel{#k, []() { return kinds(k); }, [](void** a) { return bind_all(k, a); }}

const Kernel KERNELS[] = {
    KERNEL(amlserve_store_kv_bf16),
    KERNEL(amlserve_gated),
    KERNEL(amlserve_add_bias),
    KERNEL(amlserve_paged_attention_bf16),
    KERNEL(amlserve_prefill_attention_bf16),
    KERNEL(amlserve_grouped_attention_bf16_64),
    KERNEL(amlserve_grouped_attention_bf16_128),
    KERNEL(amlserve_grouped_attention_bf16_256),
    KERNEL(amlserve_attention_combine),
    KERNEL(amlserve_head_norms),
    KERNEL(amlserve_add_rms_norm),
    KERNEL(amlserve_row_argmax),
    KERNEL(amlserve_q8_0_rows_1),
    KERNEL(amlserve_q8_0_rows_2),
    KERNEL(amlserve_q8_0_rows_4),
    KERNEL(amlserve_q8_0_rows_8),
    KERNEL(emu_test_divergent),
    KERNEL(emu_test_missing_barrier),
    KERNEL(emu_test_vector_load),
};

const Kernel* find(const char* name) {
    for (const auto& k : KERNELS)
        if (std::strcmp(k.name, name) == 0) return &k;
    return nullptr;
}

void say(char* err, std::size_t len, const std::string& msg) {
    if (len == 0) return;
    std::size_t n = std::min(len - 1, msg.size());
    std::memcpy(err, msg.data(), n);
    err[n] = '\0';
}

const char* kind_name(char k) { return k == 'p' ? "a pointer" : k == 'i' ? "an int" : k == 'f' ? "a float" : "?"; }

// Bytes of 0xff before and after the dynamic shared memory: a write there fails the launch, a read gives NaN.
constexpr std::size_t SHARED_GUARD = 1024;

std::string launch(const char* name, const unsigned* grid, unsigned block, unsigned shared, void** args,
                   const char* arg_kinds) {
    const Kernel* k = find(name);
    if (k == nullptr) return std::string("no kernel named ") + name;
    std::string want = k->kinds(), given = arg_kinds;
    if (want.size() != given.size())
        return std::string(name) + " takes " + std::to_string(want.size()) + " arguments, given " +
               std::to_string(given.size());
    for (std::size_t i = 0; i < want.size(); i++)
        if (want[i] != given[i])
            return std::string(name) + ": argument " + std::to_string(i) + " is " + kind_name(given[i]) +
                   ", the kernel takes " + kind_name(want[i]);
    if (block == 0 || block > 1024 || grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[1] > 65535 ||
        grid[2] > 65535)
        return "invalid launch shape";
    emu::Block b;
    b.kernel = k->bind(args);
    b.fibers.resize(block);
    for (unsigned i = 0; i < block; i++) b.stacks.push_back(std::make_unique<emu::Stack>(emu::STACK_BYTES));
    std::vector<char> dynamic(SHARED_GUARD + shared + SHARED_GUARD);
    emu_dynamic_shared = dynamic.data() + SHARED_GUARD;
    blockDim = Dim3{block, 1, 1};
    gridDim = Dim3{grid[0], grid[1], grid[2]};
    emu::block = &b;
    emu::faulted.clear();
    std::string failure;
    unsigned long index = 0;
    for (unsigned z = 0; z < grid[2] && failure.empty(); z++)
        for (unsigned y = 0; y < grid[1] && failure.empty(); y++)
            for (unsigned x = 0; x < grid[0] && failure.empty(); x++, index++) {
                blockIdx = Dim3{x, y, z};
                std::fill(dynamic.begin(), dynamic.end(), (char)0xff);
                failure = emu::run_block(b, index % 2 == 1);
                if (failure.empty() && !emu::faulted.empty()) failure = emu::faulted;
                bool guards = std::all_of(dynamic.begin(), dynamic.begin() + SHARED_GUARD,
                                          [](char c) { return c == (char)0xff; }) &&
                              std::all_of(dynamic.end() - SHARED_GUARD, dynamic.end(),
                                          [](char c) { return c == (char)0xff; });
                if (failure.empty() && !guards)
                    failure = "wrote outside its " + std::to_string(shared) + " bytes of dynamic shared memory";
                if (!failure.empty())
                    failure = std::string(name) + ", block (" + std::to_string(x) + ", " + std::to_string(y) +
                              ", " + std::to_string(z) + "): " + failure;
            }
    emu::block = nullptr;
    emu_dynamic_shared = nullptr;
    return failure;
}

}  // namespace

// Whether `name` is a kernel this emulation runs.
extern "C" int amlserve_emu_knows(const char* name) { return find(name) != nullptr; }

// Launches kernel `name` on grid (grid[0], grid[1], grid[2]) of 1-D blocks of `block` threads with `shared` bytes
// of dynamic shared memory. `args` points to each argument; `arg_kinds` says what each is ('p' a pointer, 'i' an
// int, 'f' a float), checked against the kernel's parameters. 0 when it ran; else 1 with the reason in `err`.
extern "C" int amlserve_emu_launch(const char* name, const unsigned* grid, unsigned block, unsigned shared,
                                   void** args, const char* arg_kinds, char* err, std::size_t err_len) noexcept {
    try {
        std::string failure = launch(name, grid, block, shared, args, arg_kinds);
        if (failure.empty()) return 0;
        say(err, err_len, failure);
    } catch (const std::exception& e) {
        say(err, err_len, std::string("the emulation failed: ") + e.what());
    } catch (...) {
        say(err, err_len, "the emulation failed");
    }
    return 1;
}
