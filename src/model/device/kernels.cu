// amlserve's CUDA kernels for the device forward (src/model/device/ops.rs says what each computes; the CPU
// implementations there are the reference). Compiled at run time by NVRTC, so no CUDA headers are included:
// bf16 is handled as its 16 bits.

#define BLOCK_TOKENS 16
#define ATTN_TILE 256
#define ATTN_THREADS 128
#define MAX_DIMS_PER_THREAD 4
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf16_to_f32(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// Round to nearest, ties to even; NaN stays NaN (as src/model/kv_cache.rs::to_bf16).
__device__ __forceinline__ unsigned short f32_to_bf16(float x) {
    unsigned int bits = __float_as_uint(x);
    if (x != x) return (unsigned short)((bits >> 16) | 0x40);
    unsigned int round = 0x7fff + ((bits >> 16) & 1);
    return (unsigned short)((bits + round) >> 16);
}

// Grid (tokens, query + key heads); rotates pairs (j, j + hd/2) of each head to the token's position.
extern "C" __global__ void amlserve_rope(float* qkv, const unsigned int* meta, const float* table, int width,
                                         int n_q_heads, int head_dim, float q_scale) {
    int i = blockIdx.x, h = blockIdx.y, half = head_dim / 2;
    const float* cs = table + (size_t)meta[i] * head_dim;
    float* x = qkv + (size_t)i * width + (size_t)h * head_dim;
    float s = h < n_q_heads ? q_scale : 1.0f;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        float c = cs[j], sn = cs[half + j];
        float x1 = x[j] * s, x2 = x[j + half] * s;
        x[j] = x1 * c - x2 * sn;
        x[j + half] = x1 * sn + x2 * c;
    }
}

// Grid (tokens); copies a token's keys and values (row2 floats from column k_col) to its slot, in bf16.
extern "C" __global__ void amlserve_store_kv_bf16(unsigned short* pool, const float* qkv, const unsigned int* meta,
                                                  int tokens, int width, int k_col, int row2) {
    int i = blockIdx.x;
    const float* src = qkv + (size_t)i * width + k_col;
    unsigned short* dst = pool + (size_t)meta[tokens + i] * row2;
    for (int j = threadIdx.x; j < row2; j += blockDim.x) dst[j] = f32_to_bf16(src[j]);
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

// Grid (tokens, query heads), ATTN_THREADS threads. Online softmax over the sequence's keys 0..=pos in tiles of
// ATTN_TILE: scores of a tile in shared memory (a thread per key), then each thread accumulates its output
// dimensions over the tile's values (threads side by side read a value row side by side).
extern "C" __global__ void amlserve_paged_attention_bf16(float* out, const float* qkv, const unsigned short* pool,
                                                         const unsigned int* meta, int tokens, int width,
                                                         int n_head, int n_kv_head, int head_dim) {
    extern __shared__ float smem[];
    float* q = smem;
    float* s = q + head_dim;
    float* red = s + ATTN_TILE;
    int i = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    int kvh = h / (n_head / n_kv_head);
    int row2 = 2 * n_kv_head * head_dim;
    int k_at = kvh * head_dim, v_at = n_kv_head * head_dim + kvh * head_dim;
    int n_keys = (int)meta[i] + 1;
    const unsigned int* table = meta + 3 * tokens + meta[2 * tokens + i];
    const float* qsrc = qkv + (size_t)i * width + (size_t)h * head_dim;
    for (int d = tid; d < head_dim; d += blockDim.x) q[d] = qsrc[d];
    __syncthreads();

    float acc[MAX_DIMS_PER_THREAD];
    for (int c = 0; c < MAX_DIMS_PER_THREAD; c++) acc[c] = 0.0f;
    float m = NEG_INF, l = 0.0f;
    for (int t0 = 0; t0 < n_keys; t0 += ATTN_TILE) {
        int n = min(ATTN_TILE, n_keys - t0);
        for (int j = tid; j < n; j += blockDim.x) {
            int key = t0 + j;
            size_t slot = (size_t)table[key / BLOCK_TOKENS] * BLOCK_TOKENS + key % BLOCK_TOKENS;
            const unsigned short* k = pool + slot * row2 + k_at;
            float dot = 0.0f;
            for (int d = 0; d < head_dim; d++) dot += q[d] * bf16_to_f32(k[d]);
            s[j] = dot;
        }
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
        for (int c = 0; c < MAX_DIMS_PER_THREAD; c++) {
            int d = tid + c * blockDim.x;
            if (d < head_dim) {
                float a = acc[c] * corr;
                for (int j = 0; j < n; j++) {
                    int key = t0 + j;
                    size_t slot = (size_t)table[key / BLOCK_TOKENS] * BLOCK_TOKENS + key % BLOCK_TOKENS;
                    a += s[j] * bf16_to_f32(pool[slot * row2 + v_at + d]);
                }
                acc[c] = a;
            }
        }
        m = new_m;
        __syncthreads();
    }
    float* o = out + (size_t)i * n_head * head_dim + (size_t)h * head_dim;
    for (int c = 0; c < MAX_DIMS_PER_THREAD; c++) {
        int d = tid + c * blockDim.x;
        if (d < head_dim) o[d] = acc[c] / l;
    }
}
