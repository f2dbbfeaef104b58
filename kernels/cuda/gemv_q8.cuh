// Decode GEMV against activations quantized to 8 bits per 32 columns (`--activations q8`),
// llama.cpp's CUDA approach (mmvq: activations quantized once per call, integer dot
// products with __dp4a), written for the packed layout of gemv.cuh (the same codes and
// (scale, zero) pairs: no second copy of the weights). Included by fused.cu; the host
// side and a CPU reference of the same arithmetic are src/nn/format/packed_cuda/q8.rs.
//
// 1. q8_quantize_*: each 32-column block b of activation row i becomes
//      d = max|x| / 127, q = round(x * (1/d)) (half away from zero, 0 where d = 0),
//    stored as int8 codes, f32(f16(d)) and the block's sum Σq: bit for bit the CPU q8
//    route's blocks (llama.cpp's quantize_row_q8_1_ref, `ggml_blocks::ActBlocks`).
//    Columns past k are 0. With `perm` each run of 8 codes is stored as the even columns
//    then the odd ones, the order in which `w & 0x0F0F0F0F` and `(w >> 4) & 0x0F0F0F0F`
//    give a 32-bit word of nibbles (column 2j in byte j's low nibble, 2j + 1 in its high).
// 2. gemv_q8_*: per row r and block b the exact integer sum
//      I = Σ_j (u_j − z) q_j = Σ_j u_j q_j − z Σq      (u: the stored unsigned code)
//    by __dp4a (8-bit codes as signed bytes u − 128: w ^ 0x80808080, z − 128), and
//      y += f32(I) · (scale_w · d_b)
//    in f32. Code books (NF4/FP4): nibbles looked up by __byte_perm in the book rounded
//    to signed bytes t8 = round(127 t / max|t|) (4 registers), scale_w · (max|t| / 127).
//    Groups must be whole blocks (a multiple of 32 columns, or one group per row) and
//    zero points integers: the host checks, other layouts take gemv.cuh.
// Threads: as gemv2 (GEMV2_*): `lanes` lanes share Q8_R rows, each lane U blocks of
// each row per iteration; lanes' sums added by shuffles (gemv_epilogue, gemv.cuh).
// 3. gemv_q8f_*: 1 and 2 in one launch (below).

#define Q8_WARPS 4
#define Q8_R 2
#define Q8_MM 2

template <typename T>
__device__ void q8_quantize(const T* __restrict__ x, int8_t* __restrict__ q,
                            float* __restrict__ d, int* __restrict__ s, int k, int kb, int perm) {
  const int i = blockIdx.y, b = blockIdx.x * Q8_WARPS + threadIdx.y, j = threadIdx.x;
  if (b >= kb) return;  // the whole warp leaves together
  const int c = b * 32 + j;
  const float v = c < k ? to_f(x[(size_t)i * k + c]) : 0.f;
  float amax = fabsf(v);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float dd = amax / 127.f;
  const float id = dd != 0.f ? 1.f / dd : 0.f;
  const float r = roundf(v * id);
  // As Rust's saturating `as i8` (NaN to 0).
  const int qv = isnan(r) ? 0 : (int)fminf(fmaxf(r, -128.f), 127.f);
  int sum = qv;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const int pos = perm ? (j & ~7) | ((j & 1) << 2) | ((j & 7) >> 1) : j;
  q[((size_t)i * kb + b) * 32 + pos] = (int8_t)qv;
  if (j == 0) {
    d[(size_t)i * kb + b] = __half2float(__float2half_rn(dd));
    s[(size_t)i * kb + b] = sum;
  }
}

#define Q8_QUANTIZE(NAME, T)                                                                   \
  extern "C" __global__ void __launch_bounds__(32 * Q8_WARPS)                                  \
      NAME(const T* x, int8_t* q, float* d, int* s, int k, int kb, int perm) {                 \
    q8_quantize<T>(x, q, d, s, k, kb, perm);                                                   \
  }
Q8_QUANTIZE(q8_quantize_f32, float)
Q8_QUANTIZE(q8_quantize_bf16, __nv_bfloat16)
Q8_QUANTIZE(q8_quantize_f16, __half)

// The signed table bytes of the 4 nibbles in the low 16 bits of `v` (nibble n: column n),
// in column order. The table is t.x..t.w (entries 0-3, 4-7, 8-11, 12-15); a __byte_perm
// selector picks one of 8 bytes (bit 3 of a selector nibble is PTX prmt's sign-replicate
// flag, so it is cleared), so entries 0-7 and 8-15 are looked up separately and bit 3 of
// each index chooses between them (selector n or n + 4).
__device__ __forceinline__ int q8_tab4(uint32_t v, uint4 t) {
  const uint32_t i = v & 0x7777u;
  const uint32_t lo = __byte_perm(t.x, t.y, i), hi = __byte_perm(t.z, t.w, i);
  const uint32_t sel = 0x3210u | ((v & 0x8888u) >> 1);
  return (int)__byte_perm(lo, hi, sel);
}

// Word t (0-7) of activation row i's current block.
#define Q8_AW(i, t) (reinterpret_cast<const int*>(&a[i][0])[t])

// One 32-column block of R rows against MM quantized activation rows (both kernels):
// wv[s] the block's codes of row slot s (WPB 16-byte words), sz[s] its (scale, zero),
// a[i] the block's 32 activation codes of row i (2 int4, in the kernel's order), dx[i]
// their scale and sq[i] their sum. acc[s][i] += f32(I) · (scale_w · d).
template <int BITS, bool TAB, int R, int MM, int WPB>
__device__ __forceinline__ void q8_block(const uint4 (&wv)[R][WPB], const float2 (&sz)[R],
                                         const int4 (&a)[MM][2], const float (&dx)[MM],
                                         const int (&sq)[MM], uint4 tab, float tfac,
                                         float (&acc)[R][MM]) {
#pragma unroll
  for (int s = 0; s < R; s++) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(&wv[s][0]);
    int isum[MM];
#pragma unroll
    for (int i = 0; i < MM; i++) isum[i] = 0;
#pragma unroll
    for (int t = 0; t < 4 * WPB; t++) {
      if (BITS == 8) {
        const int v = (int)(w[t] ^ 0x80808080u);  // u - 128 as signed bytes
#pragma unroll
        for (int i = 0; i < MM; i++) isum[i] = __dp4a(v, Q8_AW(i, t), isum[i]);
      } else if (TAB) {
        // Columns 8t..8t+3 and 8t+4..8t+7, activations in column order.
        const int v0 = q8_tab4(w[t], tab), v1 = q8_tab4(w[t] >> 16, tab);
#pragma unroll
        for (int i = 0; i < MM; i++) {
          isum[i] = __dp4a(v0, Q8_AW(i, 2 * t), isum[i]);
          isum[i] = __dp4a(v1, Q8_AW(i, 2 * t + 1), isum[i]);
        }
      } else {
        // Even columns then odd ones, as the activations were stored (perm).
        const int lo = (int)(w[t] & 0x0F0F0F0Fu), hi = (int)((w[t] >> 4) & 0x0F0F0F0Fu);
#pragma unroll
        for (int i = 0; i < MM; i++) {
          isum[i] = __dp4a(lo, Q8_AW(i, 2 * t), isum[i]);
          isum[i] = __dp4a(hi, Q8_AW(i, 2 * t + 1), isum[i]);
        }
      }
    }
    const float sw = TAB ? sz[s].x * tfac : sz[s].x;
    const int zc = TAB ? 0 : (int)sz[s].y - (BITS == 8 ? 128 : 0);
#pragma unroll
    for (int i = 0; i < MM; i++)
      acc[s][i] = fmaf((float)(isum[i] - zc * sq[i]), sw * dx[i], acc[s][i]);
  }
}
#undef Q8_AW

// `n` outputs (GLU: rows r and r + n give output r, as gemv2_packed); kb blocks per row;
// bpg blocks per scale group (0: one group per row). The activations come quantized by
// q8_quantize (the two-launch route: QUANTLAB_Q8_FUSED=0, or rows too long for gemv_q8f).
template <typename T, int BITS, bool TAB, bool GLU>
__device__ void gemv_q8_body(const int8_t* __restrict__ xq, const float* __restrict__ xd,
                             const int* __restrict__ xs, const uint8_t* __restrict__ codes,
                             const float* __restrict__ params, T* __restrict__ y, int m, int n,
                             int kb, int ld, int bpg, int gpr, uint4 tab, float tfac, int n1,
                             int n2, int lanes) {
  constexpr int R = Q8_R, MM = Q8_MM;
  constexpr int U = BITS == 4 ? 4 : 2;     // blocks per row in flight per lane
  constexpr int WPB = BITS == 4 ? 1 : 2;   // 16-byte words per block
  constexpr int RO = GLU ? R / 2 : R;      // outputs per thread
  const int L = lanes;
  const int seg = threadIdx.x / L, l = threadIdx.x % L;
  const int out0 = ((blockIdx.x * Q8_WARPS + threadIdx.y) * (32 / L) + seg) * RO;
  int row[R];
  bool valid[R];
#pragma unroll
  for (int s = 0; s < R; s++) {
    const int o = out0 + (GLU ? s % RO : s);
    valid[s] = o < n;
    row[s] = valid[s] ? (GLU && s >= RO ? o + n : o) : 0;
  }
  const float2* pr = reinterpret_cast<const float2*>(params);
  float acc[R][MM];
#pragma unroll
  for (int s = 0; s < R; s++)
#pragma unroll
    for (int i = 0; i < MM; i++) acc[s][i] = 0.f;
  // Every lane runs the loop (no early exit): the shuffles below need the whole warp.
  for (int base = l; base < kb; base += L * U) {
    uint4 wv[U][R][WPB];
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int b = base + L * u;
#pragma unroll
      for (int s = 0; s < R; s++)
#pragma unroll
        for (int h = 0; h < WPB; h++) {
          const int off = b * 16 * WPB + 16 * h;  // bytes into the row
          wv[u][s][h] = b < kb && valid[s] && off < ld
                            ? __ldg(reinterpret_cast<const uint4*>(codes + (size_t)row[s] * ld + off))
                            : make_uint4(0u, 0u, 0u, 0u);
        }
    }
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int b = base + L * u;
      if (b >= kb) break;
      int4 a[MM][2];
      float dx[MM];
      int sq[MM];
#pragma unroll
      for (int i = 0; i < MM; i++) {
        if (i < m) {
          const int4* p = reinterpret_cast<const int4*>(xq + ((size_t)i * kb + b) * 32);
          a[i][0] = __ldg(p);
          a[i][1] = __ldg(p + 1);
          dx[i] = __ldg(xd + (size_t)i * kb + b);
          sq[i] = __ldg(xs + (size_t)i * kb + b);
        } else {
          a[i][0] = a[i][1] = make_int4(0, 0, 0, 0);
          dx[i] = 0.f;
          sq[i] = 0;
        }
      }
      const int g = bpg > 0 ? b / bpg : 0;
      float2 sz[R];
#pragma unroll
      for (int s = 0; s < R; s++)
        sz[s] = valid[s] ? pr[(size_t)row[s] * gpr + g] : make_float2(0.f, 0.f);
      q8_block<BITS, TAB, R, MM, WPB>(wv[u], sz, a, dx, sq, tab, tfac, acc);
    }
  }
  gemv_epilogue<T, R, MM, GLU>(acc, L, out0, m, n, n1, n2, 1.f, y);
}

// ---------------------------------------------------------------------------------------
// The fused kernel (one launch per product): each block quantizes all m activation rows
// into shared memory in its prologue, exactly as q8_quantize (same codes, f16-rounded
// scales and sums, bit for bit), while its first weight loads are in flight, then walks
// its share of the output rows reading activations from shared memory. Blocks loop over
// row tiles (a tile: W · (32 / lanes) · RO outputs, W warps of a block)
// so that a grid about one wave deep quantizes x once per block, not once per tile.
// Blocks of W = blockDim.y warps (at most Q8_WARPS): the host takes fewer warps per
// block, then more lanes per row, until the tiles number at least the multiprocessors
// (SmolLM2's 576-row layers: 9 tiles of 4 warps would leave 123 of 132 SMs idle).
// Shared memory: [m][2][kb] int4 (bytes 0-15 and 16-31 of each block: the lanes of a row
// group read consecutive blocks, so consecutive 16-byte words: no bank conflicts), then
// [m][kb] f32 scales, then [m][kb] i32 sums: m · kb · 40 bytes (the host checks the limit
// and keeps the two launches above it).
// Quantization: a thread per run of 8 columns (4 threads, aligned lanes, per 32-block:
// max and sum by two shuffles), Q8F_P runs per thread loaded before any is used; with
// 4-bit codes each run stores its even columns then its odd ones (perm).
// Weights: a step's codes and (scale, zero) pairs (U blocks of the R rows) are loaded, then
// used, as in the two-launch kernel; the first step's before the prologue.

#define Q8F_P 4

__device__ __forceinline__ uint32_t q8_pack4(int a, int b, int c, int d) {
  return (uint32_t)(a & 0xFF) | ((uint32_t)(b & 0xFF) << 8) | ((uint32_t)(c & 0xFF) << 16) |
         ((uint32_t)(d & 0xFF) << 24);
}

template <typename T, int BITS, bool TAB, bool GLU>
__device__ void gemv_q8f_body(const T* __restrict__ x, const uint8_t* __restrict__ codes,
                              const float* __restrict__ params, T* __restrict__ y, int m,
                              int n, int k, int ld, int bpg, int gpr, uint4 tab, float tfac,
                              int n1, int n2, int lanes, int xvec) {
  extern __shared__ int4 q8smem[];
  constexpr int R = Q8_R, MM = Q8_MM;
  constexpr int U = BITS == 4 ? 4 : 2;
  constexpr int WPB = BITS == 4 ? 1 : 2;
  constexpr int RO = GLU ? R / 2 : R;
  constexpr bool PERM = BITS == 4 && !TAB;
  const int W = blockDim.y;  // warps per block (1, 2 or 4: the host's choice)
  const int NT = 32 * W;
  const int kb = (k + 31) / 32;
  int4* qa = q8smem;                                      // [m][2][kb]
  float* sd = reinterpret_cast<float*>(qa + 2 * m * kb);  // [m][kb]
  int* ss = reinterpret_cast<int*>(sd + m * kb);          // [m][kb]
  const int L = lanes, seg = threadIdx.x / L, l = threadIdx.x % L;
  const int per_tile = W * (32 / L) * RO;
  const int ntiles = (n + per_tile - 1) / per_tile;
  const int my_tiles = blockIdx.x < ntiles ? (ntiles - 1 - blockIdx.x) / gridDim.x + 1 : 0;
  const int spt = (kb + L * U - 1) / (L * U);  // steps per tile (the same for every lane)
  const float2* pr = reinterpret_cast<const float2*>(params);
  // The first output of this thread's rows in its t-th tile.
  auto first_out = [&](int t) {
    return (((blockIdx.x + t * gridDim.x) * W + threadIdx.y) * (32 / L) + seg) * RO;
  };
  // Codes and parameters of step s of tile t (zeros past the row, the tiles or n).
  auto load = [&](uint4 (&wv)[U][R][WPB], float2 (&sz)[U][R], int t, int s) {
    const int o0 = first_out(t), base = l + s * L * U;
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int b = base + L * u;
      const int g = bpg > 0 ? b / bpg : 0;
#pragma unroll
      for (int r = 0; r < R; r++) {
        const int o = o0 + (GLU ? r % RO : r);
        const bool ok = t < my_tiles && b < kb && o < n;
        const int row = GLU && r >= RO ? o + n : o;
#pragma unroll
        for (int h = 0; h < WPB; h++) {
          const int off = b * 16 * WPB + 16 * h;  // bytes into the row
          wv[u][r][h] = ok && off < ld
                            ? __ldg(reinterpret_cast<const uint4*>(codes + (size_t)row * ld + off))
                            : make_uint4(0u, 0u, 0u, 0u);
        }
        sz[u][r] = ok ? __ldg(pr + (size_t)row * gpr + g) : make_float2(0.f, 0.f);
      }
    }
  };
  uint4 wv[U][R][WPB];
  float2 sz[U][R];
  load(wv, sz, 0, 0);  // in flight during the quantization
  const int tid = threadIdx.y * 32 + threadIdx.x;
  const int runs = kb * 4;  // runs of 8 columns per row
  for (int i = 0; i < m; i++) {
    for (int g0 = 0; g0 < runs; g0 += NT * Q8F_P) {
      float xv[Q8F_P][8];
#pragma unroll
      for (int p = 0; p < Q8F_P; p++) {
        const int c = 8 * (g0 + p * NT + tid);
        load_x8<T>(x + (size_t)i * k + c, xvec, k - c, xv[p]);  // zeros from k on
      }
#pragma unroll
      for (int p = 0; p < Q8F_P; p++) {
        const int g = g0 + p * NT + tid, b = g >> 2, r = g & 3;
        float amax = 0.f;
#pragma unroll
        for (int j = 0; j < 8; j++) amax = fmaxf(amax, fabsf(xv[p][j]));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
        const float dd = amax / 127.f;
        const float id = dd != 0.f ? 1.f / dd : 0.f;
        int qv[8];
        int sum = 0;
#pragma unroll
        for (int j = 0; j < 8; j++) {
          const float rv = roundf(xv[p][j] * id);
          // As Rust's saturating `as i8` (NaN to 0), as q8_quantize.
          qv[j] = isnan(rv) ? 0 : (int)fminf(fmaxf(rv, -128.f), 127.f);
          sum += qv[j];
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const uint32_t w0 = PERM ? q8_pack4(qv[0], qv[2], qv[4], qv[6])
                                 : q8_pack4(qv[0], qv[1], qv[2], qv[3]);
        const uint32_t w1 = PERM ? q8_pack4(qv[1], qv[3], qv[5], qv[7])
                                 : q8_pack4(qv[4], qv[5], qv[6], qv[7]);
        if (b < kb) {
          reinterpret_cast<int2*>(qa)[((i * 2 + (r >> 1)) * kb + b) * 2 + (r & 1)] =
              make_int2((int)w0, (int)w1);
          if (r == 0) {
            sd[i * kb + b] = __half2float(__float2half_rn(dd));
            ss[i * kb + b] = sum;
          }
        }
      }
    }
  }
  __syncthreads();
  // One flat walk over (tile, step), the same count for every thread of the block.
  float acc[R][MM];
  int t = 0, s = 0;
  for (int it = 0; it < my_tiles * spt; it++) {
    if (s == 0) {
#pragma unroll
      for (int r = 0; r < R; r++)
#pragma unroll
        for (int i = 0; i < MM; i++) acc[r][i] = 0.f;
    }
    // Step 0's loads were issued before the prologue; the rest as the two-launch kernel
    // (a step's U blocks of R rows loaded, then used): a second register set for the next
    // step's loads cost occupancy (4-bit: 10-25% slower at 14336x4096..28672x8192).
    if (it > 0) load(wv, sz, t, s);
    const int base = l + s * L * U;
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int b = base + L * u;
      if (b >= kb) break;
      int4 a[MM][2];
      float dx[MM];
      int sq[MM];
#pragma unroll
      for (int i = 0; i < MM; i++) {
        if (i < m) {
          a[i][0] = qa[(i * 2) * kb + b];
          a[i][1] = qa[(i * 2 + 1) * kb + b];
          dx[i] = sd[i * kb + b];
          sq[i] = ss[i * kb + b];
        } else {
          a[i][0] = a[i][1] = make_int4(0, 0, 0, 0);
          dx[i] = 0.f;
          sq[i] = 0;
        }
      }
      q8_block<BITS, TAB, R, MM, WPB>(wv[u], sz[u], a, dx, sq, tab, tfac, acc);
    }
    if (s + 1 == spt) gemv_epilogue<T, R, MM, GLU>(acc, L, first_out(t), m, n, n1, n2, 1.f, y);
    if (++s == spt) {
      s = 0;
      t++;
    }
  }
}

#define GEMV_Q8_KERNEL(NAME, T, BITS, TAB, GLU)                                                 \
  extern "C" __global__ void __launch_bounds__(32 * Q8_WARPS)                                   \
      NAME(const int8_t* xq, const float* xd, const int* xs, const uint8_t* codes,              \
           const float* params, T* y, int m, int n, int kb, int ld, int bpg, int gpr,           \
           uint32_t t0, uint32_t t1, uint32_t t2, uint32_t t3, float tfac, int n1, int n2,      \
           int lanes) {                                                                         \
    gemv_q8_body<T, BITS, TAB, GLU>(xq, xd, xs, codes, params, y, m, n, kb, ld, bpg, gpr,       \
                                    make_uint4(t0, t1, t2, t3), tfac, n1, n2, lanes);           \
  }

#define GEMV_Q8_KERNELS(SUFFIX, GLU)                                          \
  GEMV_Q8_KERNEL(gemv_q8_q4_int_f32##SUFFIX, float, 4, false, GLU)            \
  GEMV_Q8_KERNEL(gemv_q8_q4_int_bf16##SUFFIX, __nv_bfloat16, 4, false, GLU)   \
  GEMV_Q8_KERNEL(gemv_q8_q4_int_f16##SUFFIX, __half, 4, false, GLU)           \
  GEMV_Q8_KERNEL(gemv_q8_q8_int_f32##SUFFIX, float, 8, false, GLU)            \
  GEMV_Q8_KERNEL(gemv_q8_q8_int_bf16##SUFFIX, __nv_bfloat16, 8, false, GLU)   \
  GEMV_Q8_KERNEL(gemv_q8_q8_int_f16##SUFFIX, __half, 8, false, GLU)           \
  GEMV_Q8_KERNEL(gemv_q8_q4_tab_f32##SUFFIX, float, 4, true, GLU)             \
  GEMV_Q8_KERNEL(gemv_q8_q4_tab_bf16##SUFFIX, __nv_bfloat16, 4, true, GLU)    \
  GEMV_Q8_KERNEL(gemv_q8_q4_tab_f16##SUFFIX, __half, 4, true, GLU)

GEMV_Q8_KERNELS(, false)
GEMV_Q8_KERNELS(_glu, true)

#define GEMV_Q8F_KERNEL(NAME, T, BITS, TAB, GLU)                                                \
  extern "C" __global__ void __launch_bounds__(32 * Q8_WARPS)                                    \
      NAME(const T* x, const uint8_t* codes, const float* params, T* y, int m, int n, int k,      \
           int ld, int bpg, int gpr, uint32_t t0, uint32_t t1, uint32_t t2, uint32_t t3,          \
           float tfac, int n1, int n2, int lanes, int xvec) {                                     \
    gemv_q8f_body<T, BITS, TAB, GLU>(x, codes, params, y, m, n, k, ld, bpg, gpr,                 \
                                     make_uint4(t0, t1, t2, t3), tfac, n1, n2, lanes, xvec);     \
  }

// Names: gemv_q8f_<kind>_<dtype>[_glu].
#define GEMV_Q8F_KERNELS(SUFFIX, GLU)                                          \
  GEMV_Q8F_KERNEL(gemv_q8f_q4_int_f32##SUFFIX, float, 4, false, GLU)            \
  GEMV_Q8F_KERNEL(gemv_q8f_q4_int_bf16##SUFFIX, __nv_bfloat16, 4, false, GLU)   \
  GEMV_Q8F_KERNEL(gemv_q8f_q4_int_f16##SUFFIX, __half, 4, false, GLU)           \
  GEMV_Q8F_KERNEL(gemv_q8f_q8_int_f32##SUFFIX, float, 8, false, GLU)            \
  GEMV_Q8F_KERNEL(gemv_q8f_q8_int_bf16##SUFFIX, __nv_bfloat16, 8, false, GLU)   \
  GEMV_Q8F_KERNEL(gemv_q8f_q8_int_f16##SUFFIX, __half, 8, false, GLU)           \
  GEMV_Q8F_KERNEL(gemv_q8f_q4_tab_f32##SUFFIX, float, 4, true, GLU)             \
  GEMV_Q8F_KERNEL(gemv_q8f_q4_tab_bf16##SUFFIX, __nv_bfloat16, 4, true, GLU)    \
  GEMV_Q8F_KERNEL(gemv_q8f_q4_tab_f16##SUFFIX, __half, 4, true, GLU)

GEMV_Q8F_KERNELS(, false)
GEMV_Q8F_KERNELS(_glu, true)
