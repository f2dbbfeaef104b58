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
// Threads: as gemv2 (GEMV2_*): `lanes` lanes share Q8_R rows, each lane Q8_U blocks of
// each row per iteration, loaded before any is used; lanes' sums added by shuffles.

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

// `n` outputs (GLU: rows r and r + n give output r, as gemv2_packed); kb blocks per row;
// bpg blocks per scale group (0: one group per row).
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
#pragma unroll
      for (int s = 0; s < R; s++) {
        const uint32_t* w = reinterpret_cast<const uint32_t*>(&wv[u][s][0]);
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
        const float2 sz = valid[s] ? pr[(size_t)row[s] * gpr + g] : make_float2(0.f, 0.f);
        const float sw = TAB ? sz.x * tfac : sz.x;
        const int zc = TAB ? 0 : (int)sz.y - (BITS == 8 ? 128 : 0);
#pragma unroll
        for (int i = 0; i < MM; i++)
          acc[s][i] = fmaf((float)(isum[i] - zc * sq[i]), sw * dx[i], acc[s][i]);
      }
    }
  }
#pragma unroll
  for (int s = 0; s < R; s++)
#pragma unroll
    for (int i = 0; i < MM; i++)
      for (int o = L / 2; o > 0; o >>= 1) acc[s][i] += __shfl_xor_sync(0xffffffffu, acc[s][i], o);
  if (l != 0) return;
#pragma unroll
  for (int i = 0; i < MM; i++) {
    if (i >= m) break;
#pragma unroll
    for (int t = 0; t < RO; t++) {
      const int o = out0 + t;
      if (o >= n) break;
      if (GLU) {
        const float gt = acc[t][i], up = acc[t + RO][i];
        from_f(gt / (1.f + __expf(-gt)) * up, &y[(size_t)i * n + o]);
      } else {
        from_f(acc[t][i], &y[out_index(i, o, m, n, n1, n2)]);
      }
    }
  }
}
#undef Q8_AW

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
