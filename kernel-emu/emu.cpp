// Runs amlserve's CUDA kernels (src/model/device/kernels.cu, included below as C++) on the CPU.
//
// A launch runs its blocks one after another on the calling thread. Each CUDA thread of a block is a fiber
// with its own stack (switched by a few instructions on x86-64, by ucontext elsewhere), so a kernel's locals are per thread as on the GPU, while `__shared__` arrays and
// the dynamic shared buffer are one copy the block's threads share. A fiber runs until it reaches __syncthreads
// or a warp shuffle and then yields to the block's scheduler, which releases a warp's shuffle when every live lane
// of the warp has reached it, and a barrier when every live thread of the block has. Threads that wait at
// different barriers, or a shuffle reading a lane that is not there, fail the launch with a message instead of
// hanging. Everything is thread-local, so launches on different threads (parallel tests) do not meet.

#include <ucontext.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
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
    float offered = 0.0f;  // the value this lane offers at a shuffle
    int source = 0;        // the lane whose value it reads
    float received = 0.0f;
};

struct Block {
    std::vector<Fiber> fibers;
    std::vector<std::vector<char>> stacks;
    Context scheduler;
    int current = -1;
    std::function<void()> kernel;
};

static thread_local Block* block = nullptr;

#if defined(__x86_64__)
// Saves the callee-saved registers and the SSE and x87 control words on the current stack, stores the stack
// pointer in *from, and resumes the context whose stack pointer is `to` (glibc's swapcontext also saves the
// signal mask with a system call, which made it most of the emulation's time).
extern "C" void amlserve_emu_switch(void** from, void* to);
asm(R"(
    .text
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
)");

static void switch_to(Context& from, Context& to) { amlserve_emu_switch(&from.sp, to.sp); }

[[noreturn]] static void fiber_main();

// Prepares `f` to start in fiber_main on `stack`: the frame amlserve_emu_switch pops, returning into fiber_main
// with the stack aligned as after a call.
static void start(Fiber& f, std::vector<char>& stack, Context&) {
    auto top = reinterpret_cast<std::uintptr_t>(stack.data() + stack.size()) & ~std::uintptr_t(15);
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

static void start(Fiber& f, std::vector<char>& stack, Context& scheduler) {
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = stack.data();
    f.ctx.uc.uc_stack.ss_size = stack.size();
    f.ctx.uc.uc_link = &scheduler.uc;
    makecontext(&f.ctx.uc, fiber_main, 0);
}
#endif

__attribute__((noinline)) static void yield_as(State s) {
    Fiber& f = block->fibers[block->current];
    f.state = s;
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

// Runs one block to its end; an empty string when it ended, else why it could not.
static std::string run_block(Block& b) {
    std::size_t n = b.fibers.size();
    for (std::size_t i = 0; i < n; i++) {
        b.fibers[i] = Fiber{};
        start(b.fibers[i], b.stacks[i], b.scheduler);
    }
    for (;;) {
        for (std::size_t i = 0; i < n; i++) {
            if (b.fibers[i].state != State::Runnable) continue;
            b.current = (int)i;
            threadIdx = Dim3{(unsigned)i, 0, 0};
            switch_to(b.scheduler, b.fibers[i].ctx);
        }
        // Every thread now waits or has ended. Shuffles first: a warp whose live lanes all wait at one.
        bool released = false;
        for (std::size_t w = 0; w < n; w += 32) {
            std::size_t end = std::min(n, w + 32);
            bool live = false, all = true;
            for (std::size_t i = w; i < end; i++) {
                if (b.fibers[i].state == State::Done) continue;
                live = true;
                all = all && b.fibers[i].state == State::AtShuffle;
            }
            if (!live || !all) continue;
            for (std::size_t i = w; i < end; i++) {
                Fiber& f = b.fibers[i];
                if (f.state == State::Done) continue;
                std::size_t src = w + (std::size_t)f.source;
                if (src >= end || b.fibers[src].state != State::AtShuffle)
                    return "thread " + std::to_string(i) + " shuffles from lane " + std::to_string(f.source) +
                           ", which is not at the shuffle";
                f.received = b.fibers[src].offered;
            }
            for (std::size_t i = w; i < end; i++)
                if (b.fibers[i].state == State::AtShuffle) b.fibers[i].state = State::Runnable;
            released = true;
        }
        if (released) continue;
        bool live = false, all = true;
        for (auto& f : b.fibers) {
            if (f.state == State::Done) continue;
            live = true;
            all = all && f.state == State::AtBarrier;
        }
        if (!live) return "";
        if (!all) return "the block's threads wait at different barriers (a __syncthreads or shuffle not every thread reaches)";
        for (auto& f : b.fibers)
            if (f.state == State::AtBarrier) f.state = State::Runnable;
    }
}

}  // namespace emu

// The CUDA names kernels.cu uses.
#define __global__
#define __device__ static inline
#define __forceinline__
#define __shared__ static thread_local
#define DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(emu_dynamic_shared)

using std::max;
using std::min;

// glibc declares its own __expf.
static inline float emu_expf(float x) { return std::exp(x); }
#define __expf emu_expf
static inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
static inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
static inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
static inline void __syncthreads() { emu::yield_as(emu::State::AtBarrier); }
static inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    emu::Fiber& f = emu::block->fibers[emu::block->current];
    f.offered = v;
    f.source = (int)(threadIdx.x & 31) ^ lane_mask;
    emu::yield_as(emu::State::AtShuffle);
    return emu::block->fibers[emu::block->current].received;
}

#include "kernels.cu"

// The emulation's own test (kernel-emu's unit tests): lanes 0-15 of a warp shuffle while lanes 16-31 wait at a
// barrier, which would hang a GPU.
extern "C" __global__ void emu_test_divergent(float* out) {
    float v = threadIdx.x < 16 ? __shfl_xor_sync(0xffffffff, 1.0f, 1) : 0.0f;
    if (threadIdx.x >= 16) __syncthreads();
    out[threadIdx.x] = v;
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

template <typename... A>
constexpr std::size_t arity(void (*)(A...)) {
    return sizeof...(A);
}

struct Kernel {
    const char* name;
    std::size_t args;
    std::function<void()> (*bind)(void**);
};

#define KERNEL(k) Kernel{#k, arity(k), [](void** a) { return bind_all(k, a); }}

const Kernel KERNELS[] = {
    KERNEL(amlserve_store_kv_bf16),
    KERNEL(amlserve_gated),
    KERNEL(amlserve_add_bias),
    KERNEL(amlserve_paged_attention_bf16),
    KERNEL(amlserve_attention_combine),
    KERNEL(amlserve_head_norms),
    KERNEL(amlserve_add_rms_norm),
    KERNEL(amlserve_row_argmax),
    KERNEL(emu_test_divergent),
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

}  // namespace

// Whether `name` is a kernel this emulation runs.
extern "C" int amlserve_emu_knows(const char* name) { return find(name) != nullptr; }

// Launches kernel `name` on grid (grid[0], grid[1], grid[2]) of 1-D blocks of `block` threads with `shared` bytes
// of dynamic shared memory (filled with 0xff bytes, a NaN, at each block's start, so a read of shared memory no
// thread wrote shows; a write past its end fails the launch). `args` points to each of the kernel's `n_args` arguments. 0 when it ran; else 1 with the
// reason in `err`.
extern "C" int amlserve_emu_launch(const char* name, const unsigned* grid, unsigned block, unsigned shared,
                                   void** args, std::size_t n_args, char* err, std::size_t err_len) {
    const Kernel* k = find(name);
    if (k == nullptr) {
        say(err, err_len, std::string("no kernel named ") + name);
        return 1;
    }
    if (k->args != n_args) {
        say(err, err_len, std::string(name) + " takes " + std::to_string(k->args) + " arguments, given " +
                              std::to_string(n_args));
        return 1;
    }
    if (block == 0 || block > 1024 || grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[1] > 65535 ||
        grid[2] > 65535) {
        say(err, err_len, "invalid launch shape");
        return 1;
    }
    emu::Block b;
    b.kernel = k->bind(args);
    b.fibers.resize(block);
    b.stacks.assign(block, std::vector<char>(emu::STACK_BYTES));
    // The launch's dynamic shared memory, then a guard a write past it would change.
    constexpr std::size_t SHARED_GUARD = 1024;
    std::vector<char> dynamic(shared + SHARED_GUARD);
    emu_dynamic_shared = dynamic.data();
    blockDim = Dim3{block, 1, 1};
    gridDim = Dim3{grid[0], grid[1], grid[2]};
    emu::block = &b;
    std::string failure;
    for (unsigned z = 0; z < grid[2] && failure.empty(); z++)
        for (unsigned y = 0; y < grid[1] && failure.empty(); y++)
            for (unsigned x = 0; x < grid[0] && failure.empty(); x++) {
                blockIdx = Dim3{x, y, z};
                std::fill(dynamic.begin(), dynamic.begin() + shared, (char)0xff);
                std::fill(dynamic.begin() + shared, dynamic.end(), (char)0xa5);
                failure = emu::run_block(b);
                if (failure.empty() &&
                    std::any_of(dynamic.begin() + shared, dynamic.end(), [](char c) { return c != (char)0xa5; }))
                    failure = "wrote past its " + std::to_string(shared) + " bytes of dynamic shared memory";
                if (!failure.empty())
                    failure = std::string(name) + ", block (" + std::to_string(x) + ", " + std::to_string(y) +
                              ", " + std::to_string(z) + "): " + failure;
            }
    emu::block = nullptr;
    emu_dynamic_shared = nullptr;
    if (!failure.empty()) {
        say(err, err_len, failure);
        return 1;
    }
    return 0;
}
