// amlserve's CUDA kernels for the device forward (src/model/device/ops.rs says what each computes; the CPU
// implementations there are the reference). Compiled at run time by NVRTC, so no CUDA headers are included:
// bf16 is handled as its 16 bits. The same source also compiles as C++ for the CPU emulation in kernel-emu
// (tests/kernels_emulated.rs), which defines the CUDA names this file uses.

#define BLOCK_TOKENS 16
#define ATTN_TILE 256
#define ATTN_THREADS 256
#define MAX_DIMS_PER_THREAD 4
#define NEG_INF __int_as_float(0xff800000)
// A split of a token's keys (split-K attention) takes at least this many keys.
#define SPLIT_MIN_KEYS 64
// A kernel's dynamic shared memory and its shared arrays (macros, so that the CPU emulation can give its own).
#ifndef DYNAMIC_SHARED
#define DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#define SHARED_ARRAY(T, name, n) __shared__ T name[n]
#endif

__device__ __forceinline__ float bf16_to_f32(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// The two bf16 halves of a 32-bit word, as floats (the lower one first in memory).
__device__ __forceinline__ float bf16_lo(unsigned int w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(unsigned int w) { return __uint_as_float(w & 0xffff0000u); }

// Round to nearest, ties to even; NaN stays NaN (as src/model/kv_cache.rs::to_bf16).
__device__ __forceinline__ unsigned short f32_to_bf16(float x) {
    unsigned int bits = __float_as_uint(x);
    if (x != x) return (unsigned short)((bits >> 16) | 0x40);
    unsigned int round = 0x7fff + ((bits >> 16) & 1);
    return (unsigned short)((bits + round) >> 16);
}

// The rotary embedding of dimension d of a head x scaled by s, at the position whose cosines and sines are cs: pairs
// (j, j + hd/2) rotate together (as ops.rs's `rotate`, the same expressions).
__device__ __forceinline__ float rotated(const float* x, const float* cs, int d, int half, float s) {
    int j = d < half ? d : d - half;
    float x1 = x[j] * s, x2 = x[j + half] * s;
    return d < half ? x1 * cs[j] - x2 * cs[half + j] : x1 * cs[half + j] + x2 * cs[j];
}

// Grid (tokens); writes a token's keys, rotated to its position, and its values (from column k_col of its qkv
// row) to its slot, in bf16.
extern "C" __global__ void amlserve_store_kv_bf16(unsigned short* pool, const float* qkv, const unsigned int* meta,
                                                  const float* table, int tokens, int width, int k_col, int row2,
                                                  int head_dim) {
    int i = blockIdx.x, kv_row = row2 / 2, half = head_dim / 2;
    const float* src = qkv + (size_t)i * width + k_col;
    const float* cs = table + (size_t)meta[i] * head_dim;
    unsigned short* dst = pool + (size_t)meta[tokens + i] * row2;
    for (int j = threadIdx.x; j < kv_row; j += blockDim.x) {
        int d = j % head_dim;
        dst[j] = f32_to_bf16(rotated(src + (j - d), cs, d, half, 1.0f));
        dst[kv_row + j] = f32_to_bf16(src[kv_row + j]);
    }
}

// act(g) * u: act is SiLU, or GELU's tanh form when `gelu` is set.
__device__ __forceinline__ float gated(float g, float u, bool gelu) {
    float a = gelu ? 0.5f * g * (1.0f + tanhf(0.7978845608f * g * (1.0f + 0.044715f * g * g)))
                   : g / (1.0f + __expf(-g));
    return a * u;
}

// Grid-stride over tokens x width: out = act(gate) * up, rows holding gate then up (`gated`).
extern "C" __global__ void amlserve_gated(float* out, const float* x, int rows, int width, int gelu) {
    size_t n = (size_t)rows * width;
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += (size_t)gridDim.x * blockDim.x) {
        size_t r = k / width, c = k % width;
        out[k] = gated(x[r * 2 * width + c], x[r * 2 * width + width + c], gelu != 0);
    }
}

// Grid-stride over rows x width: x[r][c] += bias[c].
extern "C" __global__ void amlserve_add_bias(float* x, const float* bias, int rows, int width) {
    size_t n = (size_t)rows * width;
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += (size_t)gridDim.x * blockDim.x)
        x[k] += bias[k % width];
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// Every thread gets the block's maximum (is_max) or sum. `red` holds one float per warp.
__device__ float block_reduce(float v, float* red, bool is_max) {
    v = is_max ? warp_max(v) : warp_sum(v);
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    float r = lane < nw ? red[lane] : (is_max ? NEG_INF : 0.0f);
    return is_max ? warp_max(r) : warp_sum(r);
}

// The keys [*first, *end) a token at `pos` reads in split z of `splits`: its keys 0..=pos, or with a sliding
// window (window > 0) the last `window` of them up to its own; split-K (splits > 1) cuts those into `splits` equal
// runs of at least SPLIT_MIN_KEYS each, so a short context leaves the last runs empty (*first == *end).
__device__ __forceinline__ void key_range(unsigned int pos, int window, int splits, int z, int* first, int* end) {
    int n = (int)pos + 1;
    int f = window > 0 ? max(0, n - window) : 0;
    if (splits > 1) {
        int chunk = max(SPLIT_MIN_KEYS, (n - f + splits - 1) / splits);
        f = min(n, f + z * chunk);
        n = min(n, f + chunk);
    }
    *first = f;
    *end = n;
}

// Grid (tokens, query heads), ATTN_THREADS threads. The query is scaled by q_scale and rotated to the token's
// position as it is read (rope: the rotary table). Online softmax over the sequence's keys 0..=pos in tiles of
// ATTN_TILE. Scores: a warp per key, its lanes over dimension pairs (one 32-bit load of two bf16 each, side by
// side), summed across the warp. Values: when a head is narrower than the block, the threads form `groups`
// groups of head_dim threads, each group taking every groups-th key (a group reads a value row side by side),
// and the groups' sums are added at the end; a wider head gives each thread several dimensions.
//
// Split-K (splits > 1, grid z = splits): a few tokens fill only tokens x heads blocks of the GPU, each scanning
// its whole context in turn. Then block z takes the z-th of `splits` equal runs of the token's keys (at least
// SPLIT_MIN_KEYS each, so a short context leaves the last blocks without keys) and writes its running maximum,
// sum and unnormalised output to `partial` ([tokens, heads, splits, 2 + head_dim]); amlserve_attention_combine
// merges them. Given `splits`, the runs depend on the token's own context only; the launcher chooses `splits` from
// the step's size, so a row's sums are ordered differently alone and in a large batch (close, not bit for bit).
extern "C" __global__ void amlserve_paged_attention_bf16(float* out, float* partial, const float* qkv,
                                                         const unsigned short* pool, const unsigned int* meta,
                                                         const float* rope, float q_scale, int tokens, int width,
                                                         int n_head, int n_kv_head, int head_dim, int window,
                                                         int splits) {
    DYNAMIC_SHARED(float, smem);
    int groups = max(1, (int)blockDim.x / head_dim);
    float* q = smem;
    float* s = q + head_dim;
    float* red = s + ATTN_TILE;
    float* part = red + 32;
    unsigned int* slots = (unsigned int*)(part + groups * head_dim);
    int i = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    int lane = tid & 31, warp = tid >> 5, n_warps = blockDim.x >> 5;
    int kvh = h / (n_head / n_kv_head);
    int row2 = 2 * n_kv_head * head_dim;
    int k_at = kvh * head_dim, v_at = n_kv_head * head_dim + kvh * head_dim;
    int first_key, n_keys;
    key_range(meta[i], window, splits, (int)blockIdx.z, &first_key, &n_keys);
    const unsigned int* table = meta + 3 * tokens + meta[2 * tokens + i];
    const float* qsrc = qkv + (size_t)i * width + (size_t)h * head_dim;
    const float* cs = rope + (size_t)meta[i] * head_dim;
    for (int d = tid; d < head_dim; d += blockDim.x) q[d] = rotated(qsrc, cs, d, head_dim / 2, q_scale);
    __syncthreads();

    int g = tid / head_dim, gd = tid % head_dim;
    float acc[MAX_DIMS_PER_THREAD];
    for (int c = 0; c < MAX_DIMS_PER_THREAD; c++) acc[c] = 0.0f;
    float m = NEG_INF, l = 0.0f;
    int half_dim = head_dim / 2;
    for (int t0 = first_key; t0 < n_keys; t0 += ATTN_TILE) {
        int n = min(ATTN_TILE, n_keys - t0);
        for (int j = warp; j < n; j += n_warps) {
            int key = t0 + j;
            unsigned int slot = table[key / BLOCK_TOKENS] * BLOCK_TOKENS + key % BLOCK_TOKENS;
            const unsigned int* k2 = (const unsigned int*)(pool + (size_t)slot * row2 + k_at);
            float dot = 0.0f;
            for (int p = lane; p < half_dim; p += 32) {
                unsigned int w = k2[p];
                dot += q[2 * p] * bf16_lo(w) + q[2 * p + 1] * bf16_hi(w);
            }
            dot = warp_sum(dot);
            if (lane == 0) {
                s[j] = dot;
                slots[j] = slot;
            }
        }
        __syncthreads();
        float tmax = NEG_INF;
        for (int j = tid; j < n; j += blockDim.x) tmax = fmaxf(tmax, s[j]);
        tmax = block_reduce(tmax, red, true);
        float new_m = fmaxf(m, tmax);
        float corr = __expf(m - new_m);
        float tsum = 0.0f;
        for (int j = tid; j < n; j += blockDim.x) {
            float e = __expf(s[j] - new_m);
            s[j] = e;
            tsum += e;
        }
        tsum = block_reduce(tsum, red, false);
        l = l * corr + tsum;
        if (groups > 1) {
            if (g < groups) {
                float a = acc[0] * corr;
                const unsigned short* v = pool + v_at + gd;
                for (int j = g; j < n; j += groups) a += s[j] * bf16_to_f32(v[(size_t)slots[j] * row2]);
                acc[0] = a;
            }
        } else {
            for (int c = 0; c < MAX_DIMS_PER_THREAD; c++) {
                int d = tid + c * blockDim.x;
                if (d < head_dim) {
                    float a = acc[c] * corr;
                    const unsigned short* v = pool + v_at + d;
                    for (int j = 0; j < n; j++) a += s[j] * bf16_to_f32(v[(size_t)slots[j] * row2]);
                    acc[c] = a;
                }
            }
        }
        m = new_m;
        __syncthreads();
    }
    // Whole: the output. A split: its maximum, sum and unnormalised output (m = -inf, l = 0 without keys).
    float* o = out + (size_t)i * n_head * head_dim + (size_t)h * head_dim;
    float scale = 1.0f / l;
    if (splits > 1) {
        float* p = partial + (((size_t)i * n_head + h) * splits + blockIdx.z) * (2 + head_dim);
        if (tid == 0) {
            p[0] = m;
            p[1] = l;
        }
        o = p + 2;
        scale = 1.0f;
    }
    if (groups > 1) {
        if (g < groups) part[g * head_dim + gd] = acc[0];
        __syncthreads();
        for (int d = tid; d < head_dim; d += blockDim.x) {
            float a = 0.0f;
            for (int k = 0; k < groups; k++) a += part[k * head_dim + d];
            o[d] = a * scale;
        }
    } else {
        for (int c = 0; c < MAX_DIMS_PER_THREAD; c++) {
            int d = tid + c * blockDim.x;
            if (d < head_dim) o[d] = acc[c] * scale;
        }
    }
}

// Warps per block of the grouped attention kernels (amlserve_grouped_attention_bf16_*).
#define GROUPED_WARPS 4

// Grid (tokens, kv heads, splits), GROUPED_WARPS warps: attention for one token and the `group` query heads that
// share one kv head, so each key and value row is read once for all of them (amlserve_paged_attention_bf16 reads
// it once per query head). Queries are scaled and rotated as they are read, into shared memory. The warps take
// the token's keys 32 at a time in turn, a lane per key: the lane reads its key row 16 bytes at a time (head_dim
// a multiple of 8; the pool is read-only here, so through the read-only cache) and scores it against each query
// head, and the warp keeps an online softmax per query head.
// Then the warp reads the 32 value rows side by side, a lane per pair of dimensions (PAIRS pairs a lane: head_dim
// up to 64 * PAIRS), weighting each by its probabilities. The warps' maxima, sums and outputs are merged at the end.
// A lane keeps group x 2 * PAIRS outputs in registers, so group is at most GMAX. Splits as in
// amlserve_paged_attention_bf16, written in its partial layout for amlserve_attention_combine.
template <int PAIRS>
__device__ void grouped_attention(float* smem, float* out, float* partial, const float* qkv, const unsigned short* pool,
                                  const unsigned int* meta, const float* rope, float q_scale, int tokens, int width,
                                  int n_head, int n_kv_head, int head_dim, int window, int splits) {
    constexpr int GMAX = PAIRS > 2 ? 4 : 8;
    int group = n_head / n_kv_head, pairs = head_dim / 2;
    int i = blockIdx.x, kvh = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    // Shared: the queries [group][head_dim]; each warp's chunk probabilities [group][32] and slots [32]; the
    // warps' maxima and sums [warps][group] and outputs [warps][group][head_dim] for the merge.
    float* q = smem;
    float* probs = q + group * head_dim + warp * group * 32;
    unsigned int* slots = (unsigned int*)(q + group * head_dim + GROUPED_WARPS * group * 32) + warp * 32;
    float* w_max = q + group * head_dim + GROUPED_WARPS * (group + 1) * 32;
    float* w_sum = w_max + GROUPED_WARPS * group;
    float* w_out = w_sum + GROUPED_WARPS * group;
    int row2 = 2 * n_kv_head * head_dim;
    int k_at = kvh * head_dim, v_at = n_kv_head * head_dim + kvh * head_dim;
    int first_key, n_keys;
    key_range(meta[i], window, splits, (int)blockIdx.z, &first_key, &n_keys);
    const unsigned int* table = meta + 3 * tokens + meta[2 * tokens + i];
    const float* cs = rope + (size_t)meta[i] * head_dim;
    for (int d = tid; d < group * head_dim; d += blockDim.x) {
        const float* qsrc = qkv + (size_t)i * width + (size_t)(kvh * group + d / head_dim) * head_dim;
        q[d] = rotated(qsrc, cs, d % head_dim, pairs, q_scale);
    }
    __syncthreads();

    float m[GMAX], l[GMAX], acc[GMAX][2 * PAIRS];
#pragma unroll
    for (int g = 0; g < GMAX; g++) {
        m[g] = NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int c = 0; c < 2 * PAIRS; c++) acc[g][c] = 0.0f;
    }
    for (int base = first_key + 32 * warp; base < n_keys; base += 32 * GROUPED_WARPS) {
        int key = base + lane;
        bool valid = key < n_keys;
        unsigned int slot = 0;
        float dot[GMAX];
#pragma unroll
        for (int g = 0; g < GMAX; g++) dot[g] = 0.0f;
        if (valid) {
            slot = table[key / BLOCK_TOKENS] * BLOCK_TOKENS + key % BLOCK_TOKENS;
            const uint4* k8 = (const uint4*)(pool + (size_t)slot * row2 + k_at);
            for (int c = 0; c < head_dim / 8; c++) {
                uint4 w = __ldg(k8 + c);
#pragma unroll
                for (int g = 0; g < GMAX; g++) {
                    if (g < group) {
                        // The query's 8 dimensions in two 16-byte reads (head_dim is a multiple of 8, so aligned).
                        const float4* qg = (const float4*)(q + g * head_dim + 8 * c);
                        float4 a = qg[0], b = qg[1];
                        dot[g] += a.x * bf16_lo(w.x) + a.y * bf16_hi(w.x) + a.z * bf16_lo(w.y) + a.w * bf16_hi(w.y) +
                                  b.x * bf16_lo(w.z) + b.y * bf16_hi(w.z) + b.z * bf16_lo(w.w) + b.w * bf16_hi(w.w);
                    }
                }
            }
        }
        // The warp's lanes have read the last chunk's probabilities and slots.
        __syncwarp();
        slots[lane] = slot;
#pragma unroll
        for (int g = 0; g < GMAX; g++) {
            if (g < group) {
                float s = valid ? dot[g] : NEG_INF;
                float new_m = fmaxf(m[g], warp_max(s));
                float corr = __expf(m[g] - new_m);
                float p = valid ? __expf(s - new_m) : 0.0f;
                l[g] = l[g] * corr + warp_sum(p);
                m[g] = new_m;
                probs[g * 32 + lane] = p;
#pragma unroll
                for (int c = 0; c < 2 * PAIRS; c++) acc[g][c] *= corr;
            }
        }
        __syncwarp();
        int n = min(32, n_keys - base);
#pragma unroll 8
        for (int j = 0; j < n; j++) {
            const unsigned int* v2 = (const unsigned int*)(pool + (size_t)slots[j] * row2 + v_at);
#pragma unroll
            for (int c = 0; c < PAIRS; c++) {
                if (lane + 32 * c < pairs) {
                    unsigned int w = v2[lane + 32 * c];
                    float lo = bf16_lo(w), hi = bf16_hi(w);
#pragma unroll
                    for (int g = 0; g < GMAX; g++) {
                        if (g < group) {
                            float pg = probs[g * 32 + j];
                            acc[g][2 * c] += pg * lo;
                            acc[g][2 * c + 1] += pg * hi;
                        }
                    }
                }
            }
        }
    }
    // Merge the warps: each weighted by exp(its maximum - the largest); a warp without keys weighs nothing.
#pragma unroll
    for (int g = 0; g < GMAX; g++) {
        if (g < group) {
            int at = warp * group + g;
            if (lane == 0) {
                w_max[at] = m[g];
                w_sum[at] = l[g];
            }
#pragma unroll
            for (int c = 0; c < PAIRS; c++) {
                int p = lane + 32 * c;
                if (p < pairs) {
                    w_out[at * head_dim + 2 * p] = acc[g][2 * c];
                    w_out[at * head_dim + 2 * p + 1] = acc[g][2 * c + 1];
                }
            }
        }
    }
    __syncthreads();
    for (int d = tid; d < group * head_dim; d += blockDim.x) {
        int g = d / head_dim, e = d % head_dim, h = kvh * group + g;
        float big = NEG_INF;
        for (int w = 0; w < GROUPED_WARPS; w++) big = fmaxf(big, w_max[w * group + g]);
        float sum = 0.0f, a = 0.0f;
        for (int w = 0; w < GROUPED_WARPS; w++) {
            float mw = w_max[w * group + g];
            if (mw != NEG_INF) {
                float f = __expf(mw - big);
                sum += w_sum[w * group + g] * f;
                a += w_out[(w * group + g) * head_dim + e] * f;
            }
        }
        if (splits > 1) {
            // A split's maximum, sum and unnormalised output (-inf, 0 and zeros without keys).
            float* p = partial + (((size_t)i * n_head + h) * splits + blockIdx.z) * (2 + head_dim);
            if (e == 0) {
                p[0] = big;
                p[1] = sum;
            }
            p[2 + e] = a;
        } else {
            out[((size_t)i * n_head + h) * head_dim + e] = a / sum;
        }
    }
}

// The grouped kernel for heads up to 64, 128 and 256 wide (one, two and four pairs of dimensions a lane).
#define GROUPED_ATTENTION(name, PAIRS)                                                                     \
    extern "C" __global__ void name(float* out, float* partial, const float* qkv, const unsigned short* pool, \
                                    const unsigned int* meta, const float* rope, float q_scale, int tokens,   \
                                    int width, int n_head, int n_kv_head, int head_dim, int window,           \
                                    int splits) {                                                             \
        DYNAMIC_SHARED(float, smem);                                                                          \
        grouped_attention<PAIRS>(smem, out, partial, qkv, pool, meta, rope, q_scale, tokens, width, n_head,    \
                                 n_kv_head, head_dim, window, splits);                                        \
    }
GROUPED_ATTENTION(amlserve_grouped_attention_bf16_64, 1)
GROUPED_ATTENTION(amlserve_grouped_attention_bf16_128, 2)
GROUPED_ATTENTION(amlserve_grouped_attention_bf16_256, 4)

// The most output values a thread of amlserve_prefill_attention_bf16 accumulates (registers).
#define TILE_OUT_PER_THREAD 16

// Grid (token tiles of qt from token `first`, kv heads), ATTN_THREADS threads: attention for the tokens of a step
// that come in runs (prompt chunks; the step's leading single tokens, decode rows, go to the grouped or per-row
// kernel). A block takes qt consecutive tokens and the query heads of one kv head, and for each run of them from one sequence (usually one run) reads that sequence's keys and values kt at a time into
// shared memory once for all of the run's rows (tokens x query heads), where amlserve_paged_attention_bf16 reads
// them once per row. Queries are scaled and rotated as they are read; each row keeps its own causal and window
// limit and an online softmax over the tiles. The host sizes qt so that rows x head_dim outputs fit
// TILE_OUT_PER_THREAD per thread, and kt so that shared memory holds: the rows' queries and a key tile (both with
// rows padded by one float against bank conflicts), a value tile, the rows' scores, their running max, sum and
// correction, and the tile's slots.
extern "C" __global__ void amlserve_prefill_attention_bf16(float* out, const float* qkv, const unsigned short* pool,
                                                           const unsigned int* meta, const float* rope,
                                                           float q_scale, int tokens, int first, int width,
                                                           int n_head, int n_kv_head, int head_dim, int window,
                                                           int qt, int kt) {
    DYNAMIC_SHARED(float, smem);
    int group = n_head / n_kv_head, hd = head_dim, ks = hd + 1, max_rows = qt * group;
    float* qs = smem;
    float* kts = qs + max_rows * ks;
    float* vts = kts + kt * ks;
    float* sc = vts + kt * hd;
    float* run_max = sc + max_rows * kt;
    float* run_sum = run_max + max_rows;
    float* corr = run_sum + max_rows;
    unsigned int* slots = (unsigned int*)(corr + max_rows);
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, n_warps = blockDim.x >> 5;
    int kvh = blockIdx.y, t0 = first + blockIdx.x * qt, t1 = min(tokens, t0 + qt);
    int row2 = 2 * n_kv_head * hd, k_at = kvh * hd, v_at = n_kv_head * hd + kvh * hd;
    const unsigned int* starts = meta + 2 * tokens;
    for (int a = t0; a < t1;) {
        int b = a + 1;
        while (b < t1 && starts[b] == starts[a]) b++;
        // Rows r of this run: token a + r / group, query head kvh * group + r % group.
        int rows = (b - a) * group;
        for (int e = tid; e < rows * hd; e += blockDim.x) {
            int r = e / hd, d = e % hd, i = a + r / group, h = kvh * group + r % group;
            qs[r * ks + d] = rotated(qkv + (size_t)i * width + (size_t)h * hd, rope + (size_t)meta[i] * hd, d, hd / 2, q_scale);
        }
        for (int r = tid; r < rows; r += blockDim.x) {
            run_max[r] = NEG_INF;
            run_sum[r] = 0.0f;
        }
        float acc[TILE_OUT_PER_THREAD];
#pragma unroll
        for (int c = 0; c < TILE_OUT_PER_THREAD; c++) acc[c] = 0.0f;
        const unsigned int* table = meta + 3 * tokens + starts[a];
        // The keys any row of the run sees: from the first row's window start to the last row's own position.
        int lo = window > 0 ? max(0, (int)meta[a] + 1 - window) : 0, hi = (int)meta[b - 1] + 1;
        for (int k0 = lo; k0 < hi; k0 += kt) {
            int n = min(kt, hi - k0);
            for (int j = tid; j < n; j += blockDim.x) {
                int key = k0 + j;
                slots[j] = table[key / BLOCK_TOKENS] * BLOCK_TOKENS + key % BLOCK_TOKENS;
            }
            __syncthreads();
            // Two dimensions per load (head_dim is even, so a pair never straddles a head).
            for (int e = tid; e < n * hd / 2; e += blockDim.x) {
                int j = e / (hd / 2), d = 2 * (e % (hd / 2));
                const unsigned short* src = pool + (size_t)slots[j] * row2;
                unsigned int k2 = *(const unsigned int*)(src + k_at + d), v2 = *(const unsigned int*)(src + v_at + d);
                kts[j * ks + d] = bf16_lo(k2);
                kts[j * ks + d + 1] = bf16_hi(k2);
                vts[j * hd + d] = bf16_lo(v2);
                vts[j * hd + d + 1] = bf16_hi(v2);
            }
            __syncthreads();
            for (int e = tid; e < rows * kt; e += blockDim.x) {
                int r = e / kt, j = e % kt, key = k0 + j, first, end;
                key_range(meta[a + r / group], window, 1, 0, &first, &end);
                float s = NEG_INF;
                if (j < n && key < end && key >= first) {
                    const float* q = qs + r * ks;
                    const float* k = kts + j * ks;
                    s = 0.0f;
                    for (int d = 0; d < hd; d++) s += q[d] * k[d];
                }
                sc[e] = s;
            }
            __syncthreads();
            // A warp per row: the tile's maximum, the row's new running maximum, the tile's weights and sum.
            for (int r = warp; r < rows; r += n_warps) {
                float mx = NEG_INF;
                for (int j = lane; j < kt; j += 32) mx = fmaxf(mx, sc[r * kt + j]);
                mx = warp_max(mx);
                float m_old = run_max[r], m_new = fmaxf(m_old, mx), sum = 0.0f;
                for (int j = lane; j < kt; j += 32) {
                    float s = sc[r * kt + j];
                    float p = s == NEG_INF ? 0.0f : __expf(s - m_new);
                    sc[r * kt + j] = p;
                    sum += p;
                }
                sum = warp_sum(sum);
                if (lane == 0) {
                    // Before the row's first key its sum is 0, whatever the correction.
                    float c = m_old == NEG_INF ? 0.0f : __expf(m_old - m_new);
                    corr[r] = c;
                    run_sum[r] = run_sum[r] * c + sum;
                    run_max[r] = m_new;
                }
            }
            __syncthreads();
            // Unrolled, so acc stays in registers.
#pragma unroll
            for (int c = 0; c < TILE_OUT_PER_THREAD; c++) {
                int e = tid + c * blockDim.x;
                if (e < rows * hd) {
                    int r = e / hd, d = e % hd;
                    const float* p = sc + r * kt;
                    float o = acc[c] * corr[r];
                    for (int j = 0; j < n; j++) o += p[j] * vts[j * hd + d];
                    acc[c] = o;
                }
            }
            __syncthreads();
        }
#pragma unroll
        for (int c = 0; c < TILE_OUT_PER_THREAD; c++) {
            int e = tid + c * blockDim.x;
            if (e < rows * hd) {
                int r = e / hd, d = e % hd, i = a + r / group, h = kvh * group + r % group;
                out[((size_t)i * n_head + h) * hd + d] = acc[c] / run_sum[r];
            }
        }
        __syncthreads();
        a = b;
    }
}

// Grid (tokens, query heads): merges a token's split-K partial results (amlserve_paged_attention_bf16) into its
// output, each split weighted by exp(its maximum - the largest); splits without keys weigh nothing.
extern "C" __global__ void amlserve_attention_combine(float* out, const float* partial, int n_head, int head_dim,
                                                      int splits) {
    int i = blockIdx.x, h = blockIdx.y, stride = 2 + head_dim;
    const float* p = partial + ((size_t)i * n_head + h) * splits * stride;
    float mx = NEG_INF;
    for (int z = 0; z < splits; z++) mx = fmaxf(mx, p[z * stride]);
    float l = 0.0f;
    for (int z = 0; z < splits; z++)
        if (p[z * stride] != NEG_INF) l += p[z * stride + 1] * __expf(p[z * stride] - mx);
    float* o = out + ((size_t)i * n_head + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.0f;
        for (int z = 0; z < splits; z++)
            if (p[z * stride] != NEG_INF) a += p[z * stride + 2 + d] * __expf(p[z * stride] - mx);
        o[d] = a / l;
    }
}

// Grid (tokens, query + key heads): RMS-normalises one head of a qkv row in place, by qn (query heads) or kn.
extern "C" __global__ void amlserve_head_norms(float* qkv, const float* qn, const float* kn, int width, int n_q_heads,
                                               int head_dim, float eps) {
    SHARED_ARRAY(float, red, 32);
    int i = blockIdx.x, h = blockIdx.y;
    float* x = qkv + (size_t)i * width + (size_t)h * head_dim;
    const float* w = h < n_q_heads ? qn : kn;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < head_dim; j += blockDim.x) ss += x[j] * x[j];
    ss = block_reduce(ss, red, false);
    float m = sqrtf(ss / head_dim + eps);
    for (int j = threadIdx.x; j < head_dim; j += blockDim.x) x[j] = x[j] / m * w[j];
}

// Grid (rows), 256 threads. out[0] = (x + y) / rms(x + y) * w, out[1] = x + y (the residual).
extern "C" __global__ void amlserve_add_rms_norm(float* out, const float* x, const float* y, const float* w,
                                                 int rows, int hidden, float eps) {
    SHARED_ARRAY(float, red, 32);
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (size_t)r * hidden;
    const float* yr = y + (size_t)r * hidden;
    float* nr = out + (size_t)r * hidden;
    float* sr = out + (size_t)rows * hidden + (size_t)r * hidden;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
        float v = xr[j] + yr[j];
        sr[j] = v;
        ss += v * v;
    }
    ss = block_reduce(ss, red, false);
    float inv = 1.0f / sqrtf(ss / hidden + eps);
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) nr[j] = sr[j] * inv * w[j];
}

// Grid (rows), ARGMAX_THREADS threads: out[r] = the index of row r's first largest value (src/engine/sampler.rs's
// argmax: NaN never wins, -0 equals 0, a row of NaN gives 0). Each thread keeps the best of a strided share of
// the row, then the block halves its candidates, the lower index winning ties.
#define ARGMAX_THREADS 256
extern "C" __global__ void amlserve_row_argmax(unsigned int* out, const float* x, int rows, int vocab) {
    SHARED_ARRAY(float, best_v, ARGMAX_THREADS);
    SHARED_ARRAY(unsigned int, best_i, ARGMAX_THREADS);
    int r = blockIdx.x, tid = threadIdx.x;
    if (r >= rows) return;
    const float* row = x + (size_t)r * vocab;
    float bv = NEG_INF;
    unsigned int bi = 0xffffffffu;
    for (int j = tid; j < vocab; j += blockDim.x) {
        float v = row[j];
        // Ascending j: only a larger value replaces (a NaN never compares larger or equal).
        if (v > bv || (v == bv && (unsigned int)j < bi)) {
            bv = v;
            bi = (unsigned int)j;
        }
    }
    best_v[tid] = bv;
    best_i[tid] = bi;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) {
            float v = best_v[tid + s];
            unsigned int i = best_i[tid + s];
            if (v > best_v[tid] || (v == best_v[tid] && i < best_i[tid])) {
                best_v[tid] = v;
                best_i[tid] = i;
            }
        }
        __syncthreads();
    }
    if (tid == 0) out[r] = best_i[0] == 0xffffffffu ? 0u : best_i[0];
}

// An IEEE half's 16 bits as a float (Q8_0's block scales), exactly: normals, subnormals, zeros, infinities, NaN.
__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    unsigned int sign = ((unsigned int)h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        // 2^-24 a unit of the mantissa.
        float f = (float)m * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    return __uint_as_float(sign | ((e + 112) << 23) | (m << 13));
}

// Warps a block of amlserve_q8_0_rows_*.
#define Q8_WARPS 4

// Grid (ceil(n / (Q8_WARPS * COLS))), Q8_WARPS warps: out[rows, n] = x[rows, k] times the transpose of w[n, k], for
// Q8_0 weights in ggml's layout (blocks of 32 weights: an f16 scale, then 32 int8; 17 16-bit words), k a multiple
// of 32, x 16 bytes aligned, rows <= ROWS. With `gate` (1 SiLU, 2 GELU) each row of x holds a gate and an up
// projection (2k values) and the kernel multiplies act(gate) * up (`gated`): the MLP's activation read into its
// down projection (every warp computes it again, so the launcher asks for it only for a row or two). A decode
// step's projections in one launch each, where candle's kernels first quantize the activations to Q8_1 in a launch
// of their own. A warp takes COLS output columns: its lanes take a quarter block (8 weights) of each at a time,
// against each row's 8 activations (kept f32, read once for the warp's columns), and the warp sums each (column,
// row) at the end. A lane keeps ROWS x 8 activations and COLS x ROWS sums in registers: one kernel per ROWS, each
// with its own COLS (more columns a warp read the activations fewer times, fewer give small projections more
// blocks).
template <int ROWS, int COLS>
__device__ void q8_0_rows(float* __restrict__ out, const unsigned short* __restrict__ w, const float* __restrict__ x,
                          int rows, int n, int k, int gate) {
    int col0 = (blockIdx.x * Q8_WARPS + (threadIdx.x >> 5)) * COLS, lane = threadIdx.x & 31;
    // A whole warp leaves together: the kernel has no block barrier.
    if (col0 >= n) return;
    int blocks = k / 32;
    size_t stride = gate ? 2 * (size_t)k : (size_t)k;
    float acc[COLS][ROWS];
#pragma unroll
    for (int c = 0; c < COLS; c++)
#pragma unroll
        for (int r = 0; r < ROWS; r++) acc[c][r] = 0.0f;
#pragma unroll 2
    for (int t = lane; t < k / 8; t += 32) {
        float xv[ROWS][8];
#pragma unroll
        for (int r = 0; r < ROWS; r++) {
            if (r < rows) {
                const float4* xr = (const float4*)(x + r * stride + 8 * t);
                float4 a = __ldg(xr), b = __ldg(xr + 1);
                xv[r][0] = a.x, xv[r][1] = a.y, xv[r][2] = a.z, xv[r][3] = a.w;
                xv[r][4] = b.x, xv[r][5] = b.y, xv[r][6] = b.z, xv[r][7] = b.w;
                if (gate) {
                    // The up projection, k values on.
                    const float4* ur = (const float4*)(x + r * stride + k + 8 * t);
                    float4 c = __ldg(ur), d = __ldg(ur + 1);
                    float up[8] = {c.x, c.y, c.z, c.w, d.x, d.y, d.z, d.w};
#pragma unroll
                    for (int i = 0; i < 8; i++) xv[r][i] = gated(xv[r][i], up[i], gate == 2);
                }
            }
        }
#pragma unroll
        for (int c = 0; c < COLS; c++) {
            if (col0 + c < n) {
                const unsigned short* block = w + ((size_t)(col0 + c) * blocks + (t >> 2)) * 17;
                float d = f16_to_f32(__ldg(block));
                float q[8];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    unsigned int v = __ldg(block + 1 + 4 * (t & 3) + i);
                    q[2 * i] = (float)(signed char)(v & 0xffu);
                    q[2 * i + 1] = (float)(signed char)(v >> 8);
                }
#pragma unroll
                for (int r = 0; r < ROWS; r++) {
                    if (r < rows) {
                        float dot = 0.0f;
#pragma unroll
                        for (int i = 0; i < 8; i++) dot += xv[r][i] * q[i];
                        acc[c][r] += d * dot;
                    }
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < COLS; c++) {
        if (col0 + c < n) {
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                if (r < rows) {
                    float s = warp_sum(acc[c][r]);
                    if (lane == 0) out[(size_t)r * n + col0 + c] = s;
                }
            }
        }
    }
}

// The Q8_0 kernel for up to 1, 2, 4 and 8 rows, a warp taking 1, 2, 4 and 4 columns.
#define Q8_0_ROWS(name, ROWS, COLS)                                                                            \
    extern "C" __global__ void name(float* out, const unsigned short* w, const float* x, int rows, int n, int k, \
                                    int gate) {                                                                 \
        q8_0_rows<ROWS, COLS>(out, w, x, rows, n, k, gate);                                                    \
    }
Q8_0_ROWS(amlserve_q8_0_rows_1, 1, 1)
Q8_0_ROWS(amlserve_q8_0_rows_2, 2, 2)
Q8_0_ROWS(amlserve_q8_0_rows_4, 4, 4)
Q8_0_ROWS(amlserve_q8_0_rows_8, 8, 4)
