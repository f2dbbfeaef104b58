// Fused dequantize-GEMV for decode (m <= 8 activation rows) straight from packed codes:
// y[i][r] = sum_c w(r, c) * x[i][c], w(r, c) decoded on the fly. Included by fused.cu
// (one PTX module); the layout is built on the host by src/nn/format/packed_cuda.rs,
// whose CPU reference repeats this file's index arithmetic.
//
// Layout (per output row r, `ld` bytes, a multiple of 16, zero padded):
//   BITS == 4: byte j holds column 2j in its low nibble and 2j + 1 in its high nibble;
//   BITS == 8: byte j holds column j.
// Codes are unsigned (signed codes are offset by 2^(bits-1) on the host, and their zero
// points with them, which leaves q - z unchanged). params: (scale, zero) f32 pairs, one
// per (row, group of `group` columns), `gpr` groups per row; for TAB kernels the value is
// table[code] * scale (16 f32 at params + tab_off) and the zero is unused; otherwise
// (code - zero) * scale. Each group's contribution is scale * (sum q x - zero * sum x) in
// f32. One warp per output row, lanes stride over 16-byte chunks of it.

#define GEMV_MAX_M 8
#define GEMV_ROWS_PER_BLOCK 4
#define GEMV_LOADS 4

template <typename T> struct X8;
template <> struct X8<float> {
  static __device__ __forceinline__ void load(const float* p, float* v) {
    float4 a = *reinterpret_cast<const float4*>(p);
    float4 b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
};
template <> struct X8<__nv_bfloat16> {
  static __device__ __forceinline__ void load(const __nv_bfloat16* p, float* v) {
    uint4 a = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&a);
#pragma unroll
    for (int j = 0; j < 4; j++) {
      float2 f = __bfloat1622float2(h[j]);
      v[2 * j] = f.x; v[2 * j + 1] = f.y;
    }
  }
};
template <> struct X8<__half> {
  static __device__ __forceinline__ void load(const __half* p, float* v) {
    uint4 a = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&a);
#pragma unroll
    for (int j = 0; j < 4; j++) {
      float2 f = __half22float2(h[j]);
      v[2 * j] = f.x; v[2 * j + 1] = f.y;
    }
  }
};

// The 8 codes of columns col..col+7 as floats (exact small integers, through the 2^23
// magic: 0x4B000000 | q is the float 2^23 + q).
template <int BITS>
__device__ __forceinline__ void codes8(const uint32_t* w, int sub, float* q) {
  if (BITS == 4) {
    uint32_t v = w[sub];
#pragma unroll
    for (int j = 0; j < 8; j++)
      q[j] = __int_as_float(0x4B000000u | ((v >> (4 * j)) & 0xFu)) - 8388608.f;
  } else {
    uint32_t lo = w[2 * sub], hi = w[2 * sub + 1];
#pragma unroll
    for (int j = 0; j < 4; j++) {
      q[j] = __int_as_float(0x4B000000u | ((lo >> (8 * j)) & 0xFFu)) - 8388608.f;
      q[4 + j] = __int_as_float(0x4B000000u | ((hi >> (8 * j)) & 0xFFu)) - 8388608.f;
    }
  }
}

// The element-wise loop for a run of 8 columns (from `col`) that a scale group boundary or
// the row's end cuts (shared by v1, v2 and v3): weight (q - zero) * scale (TAB: q * scale,
// q already the table's value) times xat(i, c) (activation row i, column c, as the caller
// stores it), added into acc[i] for i < m.
template <bool TAB, int MM, typename XAt>
__device__ __forceinline__ void gemv_ragged8(const float* q, const float2* prow, int col, int k,
                                             int group, int m, XAt xat, float* acc) {
#pragma unroll
  for (int j = 0; j < 8; j++) {
    const int c = col + j;
    if (c >= k) break;
    const float2 sz = prow[c / group];
    const float v = TAB ? q[j] * sz.x : (q[j] - sz.y) * sz.x;
#pragma unroll
    for (int i = 0; i < MM; i++) {
      if (i >= m) break;
      acc[i] = fmaf(v, xat(i, c), acc[i]);
    }
  }
}

// Adds row `row`'s products with the m activation rows into acc (this lane's share; the
// warp's lanes are summed by the caller).
template <typename T, int BITS, bool TAB>
__device__ __forceinline__ void row_dot(const T* __restrict__ x, const uint8_t* __restrict__ codes,
                                        const float* __restrict__ params, const float* tab,
                                        int m, int k, int ld, int group, int gpr, int xvec,
                                        int row, float* acc) {
  const int lane = threadIdx.x;
  constexpr int VPC = BITS == 4 ? 32 : 16;  // values per 16-byte chunk
  const int chunks = ld / 16;
  const uint4* wrow = reinterpret_cast<const uint4*>(codes + (size_t)row * ld);
  const float2* prow = reinterpret_cast<const float2*>(params) + (size_t)row * gpr;
  const bool whole8 = group % 8 == 0;  // a run of 8 columns never straddles two groups
  const int gshift = (group & (group - 1)) == 0 ? __ffs(group) - 1 : -1;  // log2 where exact
  // GEMV_LOADS chunks per lane are loaded before any is used: that many 16-byte loads in
  // flight per lane (one at a time left the kernel bound by memory latency).
  for (int base = lane; base < chunks; base += 32 * GEMV_LOADS) {
    uint4 wvs[GEMV_LOADS];
#pragma unroll
    for (int u = 0; u < GEMV_LOADS; u++) {
      const int ch = base + 32 * u;
      wvs[u] = ch < chunks ? __ldg(wrow + ch) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < GEMV_LOADS; u++) {
    const int ch = base + 32 * u;
    if (ch >= chunks) break;
    const uint32_t* w = reinterpret_cast<const uint32_t*>(&wvs[u]);
#pragma unroll
    for (int sub = 0; sub < VPC / 8; sub++) {
      const int col = ch * VPC + sub * 8;
      if (col >= k) break;
      float q[8];
      if (TAB) {
        const uint32_t v = w[sub];
#pragma unroll
        for (int j = 0; j < 8; j++) q[j] = tab[(v >> (4 * j)) & 0xFu];
      } else {
        codes8<BITS>(w, sub, q);
      }
      const bool full = col + 8 <= k;
      if (whole8 && full) {
        const float2 sz = prow[gshift >= 0 ? col >> gshift : col / group];
#pragma unroll
        for (int i = 0; i < GEMV_MAX_M; i++) {
          if (i >= m) break;
          float xv[8];
          const T* xr = x + (size_t)i * k + col;
          if (xvec) {
            X8<T>::load(xr, xv);
          } else {
#pragma unroll
            for (int j = 0; j < 8; j++) xv[j] = to_f(xr[j]);
          }
          float dot = 0.f, sx = 0.f;
#pragma unroll
          for (int j = 0; j < 8; j++) {
            dot = fmaf(q[j], xv[j], dot);
            sx += xv[j];
          }
          acc[i] = fmaf(sz.x, TAB ? dot : dot - sz.y * sx, acc[i]);
        }
      } else {
        // Ragged: groups that are not a multiple of 8 columns, or the row's last columns.
        gemv_ragged8<TAB, GEMV_MAX_M>(
            q, prow, col, k, group, m, [&](int i, int c) { return to_f(x[(size_t)i * k + c]); },
            acc);
      }
    }
      }
  }
}

__device__ __forceinline__ float warp_sum(float a) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffffu, a, o);
  return a;
}

// Where output (i, r) goes: rows split at n1 <= n2 into up to three blocks [m, n_s] stored
// one after the other (stacked q, k, v); n1 = n2 = n is one plain [m, n] output.
__device__ __forceinline__ size_t out_index(int i, int r, int m, int n, int n1, int n2) {
  if (r < n1) return (size_t)i * n1 + r;
  if (r < n2) return (size_t)m * n1 + (size_t)i * (n2 - n1) + (r - n1);
  return (size_t)m * n2 + (size_t)i * (n - n2) + (r - n2);
}

// The end shared by v2, v3 and the q8 kernels (gemv_q8.cuh): a thread's R row slots hold
// partial sums acc[s][i] (activation row i) of `lanes` lanes that share those rows (an
// aligned group of L lanes: xor offsets < L stay in it). They are summed across the group
// by shuffles, multiplied by e (a power of two, exact: v3's 2^E, 1 elsewhere) and written
// by the group's first lane: outputs out0..out0+RO of activation rows i < m, where RO = R,
// or R/2 for the GLU, whose slots t and t + RO are output out0 + t's gate and up rows
// (silu(gate) · up). Every lane of the warp must call it (the shuffles need all 32).
template <typename T, int R, int MM, bool GLU>
__device__ __forceinline__ void gemv_epilogue(float (&acc)[R][MM], int lanes, int out0, int m,
                                              int n, int n1, int n2, float e,
                                              T* __restrict__ y) {
  constexpr int RO = GLU ? R / 2 : R;
#pragma unroll
  for (int s = 0; s < R; s++)
#pragma unroll
    for (int i = 0; i < MM; i++)
      for (int o = lanes / 2; o > 0; o >>= 1)
        acc[s][i] += __shfl_xor_sync(0xffffffffu, acc[s][i], o);
  if (threadIdx.x % lanes != 0) return;
#pragma unroll
  for (int i = 0; i < MM; i++) {
    if (i >= m) break;
#pragma unroll
    for (int t = 0; t < RO; t++) {
      const int o = out0 + t;
      if (o >= n) break;
      if (GLU) {
        const float g = acc[t][i] * e, u = acc[t + RO][i] * e;
        from_f(g / (1.f + __expf(-g)) * u, &y[(size_t)i * n + o]);
      } else {
        from_f(acc[t][i] * e, &y[out_index(i, o, m, n, n1, n2)]);
      }
    }
  }
}

// n outputs. GLU: the matrix stacks 2n rows (gate rows 0..n, up rows n..2n) and output r
// is silu(gate_r · x) · (up_r · x) (the Llama MLP's first half in one launch).
template <typename T, int BITS, bool TAB, bool GLU>
__device__ void gemv_packed(const T* __restrict__ x, const uint8_t* __restrict__ codes,
                            const float* __restrict__ params, T* __restrict__ y, int m, int n,
                            int k, int ld, int group, int gpr, int tab_off, int xvec, int n1,
                            int n2) {
  __shared__ float tab[16];
  if (TAB) {
    if (threadIdx.y == 0 && threadIdx.x < 16) tab[threadIdx.x] = params[tab_off + threadIdx.x];
    __syncthreads();
  }
  const int row = blockIdx.x * GEMV_ROWS_PER_BLOCK + threadIdx.y;
  if (row >= n) return;
  float acc[GEMV_MAX_M];
#pragma unroll
  for (int i = 0; i < GEMV_MAX_M; i++) acc[i] = 0.f;
  row_dot<T, BITS, TAB>(x, codes, params, tab, m, k, ld, group, gpr, xvec, row, acc);
  if (GLU) {
    float up[GEMV_MAX_M];
#pragma unroll
    for (int i = 0; i < GEMV_MAX_M; i++) up[i] = 0.f;
    row_dot<T, BITS, TAB>(x, codes, params, tab, m, k, ld, group, gpr, xvec, row + n, up);
#pragma unroll
    for (int i = 0; i < GEMV_MAX_M; i++) {
      if (i >= m) break;
      const float g = warp_sum(acc[i]), u = warp_sum(up[i]);
      if (threadIdx.x == 0) from_f(g / (1.f + __expf(-g)) * u, &y[(size_t)i * n + row]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < GEMV_MAX_M; i++) {
      if (i >= m) break;
      const float a = warp_sum(acc[i]);
      if (threadIdx.x == 0) from_f(a, &y[out_index(i, row, m, n, n1, n2)]);
    }
  }
}

#define GEMV_KERNEL(NAME, T, BITS, TAB, GLU)                                                \
  extern "C" __global__ void __launch_bounds__(32 * GEMV_ROWS_PER_BLOCK)                    \
      NAME(const T* x, const uint8_t* codes, const float* params, T* y, int m, int n, int k, \
           int ld, int group, int gpr, int tab_off, int xvec, int n1, int n2) {              \
    gemv_packed<T, BITS, TAB, GLU>(x, codes, params, y, m, n, k, ld, group, gpr, tab_off,    \
                                   xvec, n1, n2);                                            \
  }

#define GEMV_KERNELS(SUFFIX, GLU)                                         \
  GEMV_KERNEL(gemv_q4_int_f32##SUFFIX, float, 4, false, GLU)              \
  GEMV_KERNEL(gemv_q4_int_bf16##SUFFIX, __nv_bfloat16, 4, false, GLU)     \
  GEMV_KERNEL(gemv_q4_int_f16##SUFFIX, __half, 4, false, GLU)             \
  GEMV_KERNEL(gemv_q8_int_f32##SUFFIX, float, 8, false, GLU)              \
  GEMV_KERNEL(gemv_q8_int_bf16##SUFFIX, __nv_bfloat16, 8, false, GLU)     \
  GEMV_KERNEL(gemv_q8_int_f16##SUFFIX, __half, 8, false, GLU)             \
  GEMV_KERNEL(gemv_q4_tab_f32##SUFFIX, float, 4, true, GLU)               \
  GEMV_KERNEL(gemv_q4_tab_bf16##SUFFIX, __nv_bfloat16, 4, true, GLU)      \
  GEMV_KERNEL(gemv_q4_tab_f16##SUFFIX, __half, 4, true, GLU)

GEMV_KERNELS(, false)
GEMV_KERNELS(_glu, true)

// ---------------------------------------------------------------------------------------
// The bandwidth kernel (v2) for decode: m <= GEMV2_MM activation rows, same layout and
// parameters as above. The v1 kernel spends ~200 instructions per 16 bytes of codes (per
// value: an activation conversion, a code extraction, an FMA and a Σx add), so it is bound
// by instruction issue and reads 0.5-1.5 TB/s on the H200. Here:
//   - each thread takes GEMV2_R rows at the same columns, so an activation value is
//     loaded and converted once for R rows (and Σx, for the zero point, once for R rows);
//   - a code becomes an exact float in two instructions, mask-or-magic and one subtract:
//     the nibble or byte at bit p is or-ed into the mantissa of 2^(23-p), where bit p has
//     weight 1, so (v & (mask << p)) | bits(2^(23-p)) is the float 2^(23-p) + q, no shift;
//   - where a 16-byte chunk of a row lies inside one scale group (group a multiple of the
//     chunk's values, or one group per row), the chunk's products are summed in f32 and
//     scaled once: scale * (Σ q x - zero * Σ x) per chunk instead of per 8 columns;
//   - GEMV2_U chunks of each of the R rows are loaded before any is used (R * U * 16 =
//     128 bytes in flight per lane);
//   - `lanes` (4, 8, 16 or 32, chosen on the host from the row length) lanes share a row,
//     so short rows (576 columns: 18 chunks) do not leave most of a warp idle; the
//     partial sums are added across those lanes with shuffles.
// Arithmetic: the same decoded weights and f32 products as v1; sums are grouped per chunk
// rather than per 8 columns (f32 summation order only). Runs of 8 that cross a group or
// the row's end take v1's element-wise path.

#define GEMV2_MM 2
#define GEMV2_R 4
#define GEMV2_U 2
#define GEMV2_WARPS 4

// Codes of columns col..col+7 (one 32-bit word of nibbles, or two of bytes) as exact floats.
template <int BITS>
__device__ __forceinline__ void codes8_fast(const uint32_t* w, int sub, float* q) {
  if (BITS == 4) {
    const uint32_t v = w[sub], h = v >> 12;
    q[0] = __uint_as_float((v & 0xFu) | 0x4B000000u) - 8388608.f;  // 2^23 + q
    q[1] = __uint_as_float((v & 0xF0u) | 0x49000000u) - 524288.f;  // 2^19 + q
    q[2] = __uint_as_float((v & 0xF00u) | 0x47000000u) - 32768.f;  // 2^15 + q
    q[3] = __uint_as_float((v & 0xF000u) | 0x45000000u) - 2048.f;  // 2^11 + q
    q[4] = __uint_as_float((v & 0xF0000u) | 0x43000000u) - 128.f;  // 2^7 + q
    // Nibbles 5-7 (bits 20-31) reach the exponent: shifted down by 12 first.
    q[5] = __uint_as_float((h & 0xF00u) | 0x47000000u) - 32768.f;
    q[6] = __uint_as_float((h & 0xF000u) | 0x45000000u) - 2048.f;
    q[7] = __uint_as_float((h & 0xF0000u) | 0x43000000u) - 128.f;
  } else {
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const uint32_t v = w[2 * sub + h], s = v >> 16;
      q[4 * h + 0] = __uint_as_float((v & 0xFFu) | 0x4B000000u) - 8388608.f;
      q[4 * h + 1] = __uint_as_float((v & 0xFF00u) | 0x47000000u) - 32768.f;
      q[4 * h + 2] = __uint_as_float((s & 0xFFu) | 0x4B000000u) - 8388608.f;
      q[4 * h + 3] = __uint_as_float((s & 0xFF00u) | 0x47000000u) - 32768.f;
    }
  }
}

template <typename T>
__device__ __forceinline__ void load_x8(const T* __restrict__ xr, int xvec, int cols, float* xv) {
  if (xvec && cols >= 8) {
    X8<T>::load(xr, xv);
  } else {
#pragma unroll
    for (int j = 0; j < 8; j++) xv[j] = j < cols ? to_f(xr[j]) : 0.f;
  }
}

// `n` outputs; GLU as in gemv_packed (rows r and r + n give output r). A thread's R row
// slots: R outputs, or for GLU R/2 outputs' gate rows then their up rows.
template <typename T, int BITS, bool TAB, bool GLU>
__device__ void gemv2_packed(const T* __restrict__ x, const uint8_t* __restrict__ codes,
                             const float* __restrict__ params, T* __restrict__ y, int m, int n,
                             int k, int ld, int group, int gpr, int tab_off, int xvec, int n1,
                             int n2, int lanes) {
  __shared__ float tab[16];
  if (TAB) {
    if (threadIdx.y == 0 && threadIdx.x < 16) tab[threadIdx.x] = params[tab_off + threadIdx.x];
    __syncthreads();
  }
  constexpr int R = GEMV2_R, U = GEMV2_U, MM = GEMV2_MM;
  constexpr int RO = GLU ? R / 2 : R;  // outputs per thread
  constexpr int VPC = BITS == 4 ? 32 : 16;
  const int L = lanes;
  const int seg = threadIdx.x / L, l = threadIdx.x % L;
  const int out0 = ((blockIdx.x * GEMV2_WARPS + threadIdx.y) * (32 / L) + seg) * RO;
  int row[R];
  bool valid[R];
#pragma unroll
  for (int s = 0; s < R; s++) {
    const int o = out0 + (GLU ? s % RO : s);
    valid[s] = o < n;
    row[s] = valid[s] ? (GLU && s >= RO ? o + n : o) : 0;
  }
  const int chunks = ld / 16;
  const bool chunk_group = gpr == 1 || group % VPC == 0;
  const int gshift = (group & (group - 1)) == 0 ? __ffs(group) - 1 : -1;
  const float2* pr = reinterpret_cast<const float2*>(params);
  float acc[R][MM];
#pragma unroll
  for (int s = 0; s < R; s++)
#pragma unroll
    for (int i = 0; i < MM; i++) acc[s][i] = 0.f;
  // The chunks base + L*u (u < U) of the R rows, zeros past the row or for invalid rows.
  auto load = [&](uint4 (&wv)[U][R], int base) {
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int ch = base + L * u;
#pragma unroll
      for (int s = 0; s < R; s++)
        wv[u][s] = ch < chunks && valid[s]
                       ? __ldg(reinterpret_cast<const uint4*>(codes + (size_t)row[s] * ld) + ch)
                       : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  auto consume = [&](const uint4 (&wv)[U][R], int base) {
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int ch = base + L * u;
      const int col0 = ch * VPC;
      if (ch >= chunks || col0 >= k) break;
      if (chunk_group && col0 + VPC <= k) {
        const int gi = gpr == 1 ? 0 : (gshift >= 0 ? col0 >> gshift : col0 / group);
        float dot[R][MM], sx[MM];
#pragma unroll
        for (int i = 0; i < MM; i++) {
          sx[i] = 0.f;
#pragma unroll
          for (int s = 0; s < R; s++) dot[s][i] = 0.f;
        }
#pragma unroll
        for (int sub = 0; sub < VPC / 8; sub++) {
          const int col = col0 + sub * 8;
          float xv[MM][8];
#pragma unroll
          for (int i = 0; i < MM; i++) {
            if (i < m) {
              load_x8<T>(x + (size_t)i * k + col, xvec, 8, xv[i]);
            } else {
#pragma unroll
              for (int j = 0; j < 8; j++) xv[i][j] = 0.f;
            }
            if (!TAB) {
#pragma unroll
              for (int j = 0; j < 8; j++) sx[i] += xv[i][j];
            }
          }
#pragma unroll
          for (int s = 0; s < R; s++) {
            const uint32_t* w = reinterpret_cast<const uint32_t*>(&wv[u][s]);
            float q[8];
            if (TAB) {
              const uint32_t v = w[sub];
#pragma unroll
              for (int j = 0; j < 8; j++) q[j] = tab[(v >> (4 * j)) & 0xFu];
            } else {
              codes8_fast<BITS>(w, sub, q);
            }
#pragma unroll
            for (int i = 0; i < MM; i++)
#pragma unroll
              for (int j = 0; j < 8; j++) dot[s][i] = fmaf(q[j], xv[i][j], dot[s][i]);
          }
        }
#pragma unroll
        for (int s = 0; s < R; s++) {
          const float2 sz = valid[s] ? pr[(size_t)row[s] * gpr + gi] : make_float2(0.f, 0.f);
#pragma unroll
          for (int i = 0; i < MM; i++)
            acc[s][i] = fmaf(sz.x, TAB ? dot[s][i] : dot[s][i] - sz.y * sx[i], acc[s][i]);
        }
      } else {
        // Ragged: chunks that cross a group or the row's end, element by element as v1.
#pragma unroll
        for (int sub = 0; sub < VPC / 8; sub++) {
          const int col = col0 + sub * 8;
          if (col >= k) break;
#pragma unroll
          for (int s = 0; s < R; s++) {
            if (!valid[s]) continue;
            const uint32_t* w = reinterpret_cast<const uint32_t*>(&wv[u][s]);
            float q[8];
            if (TAB) {
              const uint32_t v = w[sub];
#pragma unroll
              for (int j = 0; j < 8; j++) q[j] = tab[(v >> (4 * j)) & 0xFu];
            } else {
              codes8_fast<BITS>(w, sub, q);
            }
            gemv_ragged8<TAB, MM>(
                q, pr + (size_t)row[s] * gpr, col, k, group, m,
                [&](int i, int c) { return to_f(x[(size_t)i * k + c]); }, acc[s]);
          }
        }
      }
    }
  };
  // Every lane runs the loop (no early exit): the shuffles below need the whole warp.
  for (int base = l; base < chunks; base += L * U) {
    uint4 wv[U][R];
    load(wv, base);
    consume(wv, base);
  }
  gemv_epilogue<T, R, MM, GLU>(acc, L, out0, m, n, n1, n2, 1.f, y);
}

#define GEMV2_KERNEL(NAME, T, BITS, TAB, GLU)                                                  \
  extern "C" __global__ void __launch_bounds__(32 * GEMV2_WARPS)                               \
      NAME(const T* x, const uint8_t* codes, const float* params, T* y, int m, int n, int k,    \
           int ld, int group, int gpr, int tab_off, int xvec, int n1, int n2, int lanes) {      \
    gemv2_packed<T, BITS, TAB, GLU>(x, codes, params, y, m, n, k, ld, group, gpr, tab_off,      \
                                    xvec, n1, n2, lanes);                                       \
  }

#define GEMV2_KERNELS(SUFFIX, GLU)                                          \
  GEMV2_KERNEL(gemv2_q4_int_f32##SUFFIX, float, 4, false, GLU)                  \
  GEMV2_KERNEL(gemv2_q4_int_bf16##SUFFIX, __nv_bfloat16, 4, false, GLU)         \
  GEMV2_KERNEL(gemv2_q4_int_f16##SUFFIX, __half, 4, false, GLU)                 \
  GEMV2_KERNEL(gemv2_q8_int_f32##SUFFIX, float, 8, false, GLU)                  \
  GEMV2_KERNEL(gemv2_q8_int_bf16##SUFFIX, __nv_bfloat16, 8, false, GLU)         \
  GEMV2_KERNEL(gemv2_q8_int_f16##SUFFIX, __half, 8, false, GLU)                 \
  GEMV2_KERNEL(gemv2_q4_tab_f32##SUFFIX, float, 4, true, GLU)                   \
  GEMV2_KERNEL(gemv2_q4_tab_bf16##SUFFIX, __nv_bfloat16, 4, true, GLU)          \
  GEMV2_KERNEL(gemv2_q4_tab_f16##SUFFIX, __half, 4, true, GLU)

GEMV2_KERNELS(, false)
GEMV2_KERNELS(_glu, true)

// ---------------------------------------------------------------------------------------
// The bandwidth kernel (v3) for decode at large shapes: m = MM (1 or 2) activation rows,
// the same layout and parameters as v1/v2. v2 converted activations per row-thread and
// spent three instructions per weight on the code alone (mask-or-magic, subtract, FMA),
// so at 4 and 8 bits it took the same time (~90 µs at 28672×8192): bound by issue, not
// bytes. Here:
//   - the block converts its activations ONCE into shared memory as f32 (a tile of
//     GEMV3_TILE columns at a time), with Σx per 16-byte chunk of codes (for zero points);
//   - a code becomes a weight in ONE instruction: the nibble or byte at bit p of a code
//     word, masked in place, is the denormal float q·2^(p-149) (p + width <= 23: only
//     mantissa bits), and the activation that meets it was stored pre-multiplied by
//     2^(149-p-E), so the FMA's exact product is q·x·2^-E. Every product and sum is the
//     unscaled one times 2^-E (power-of-two scaling is exact in f32), so the result,
//     multiplied back by 2^E at the end, equals the same arithmetic on q and x: only f32
//     summation order differs from v1, as long as |x| < 2^(E-21) = 2^43 (the scaled
//     activation stays finite) and the products stay above 2^(E-126) = 2^-62 in
//     magnitude (no denormal results). FFMA takes denormal operands at full rate (the
//     PTX is built without -ftz);
//   - the shared-memory tile is stored so that the lanes of a warp, which read
//     consecutive chunks, read consecutive 16-byte words (no bank conflicts);
//   - GEMV3_R rows per thread share every activation read; GEMV3_U chunks of each row are
//     loaded (with their scales) one step ahead of their use, so 128 bytes of codes per
//     lane are in flight while the previous 128 are multiplied;
//   - `lanes` lanes per row as in v2 (short rows do not idle a warp).
// NF4/FP4 (TAB) read the 16-entry table from shared memory and unscaled activations.
// Chunks that cross a scale group (groups that are not a multiple of a chunk's values)
// take the element-wise loop shared with v1 (gemv_ragged8).

#define GEMV3_R 4
#define GEMV3_U 2
#define GEMV3_WARPS 4
#define GEMV3_TILE 4096  // activation columns per shared-memory tile (a multiple of 32)
#define GEMV3_E 64       // products are q·x·2^-E until the output is written

// 2^e as a float (normal range).
__device__ __forceinline__ float pow2f(int e) { return __uint_as_float((uint32_t)(127 + e) << 23); }

// The bit position p at which column c's code is masked (4-bit: columns 0-4 of a word at
// 4j, columns 5-7 at 4j-12 of the word shifted right by 12; 8-bit: 0 or 8 of the low or
// the high half-word).
template <int BITS>
__device__ __forceinline__ int code_pos(int c) {
  if (BITS == 4) {
    const int j = c & 7;
    return j < 5 ? 4 * j : 4 * j - 12;
  }
  return (c & 1) * 8;
}

// The 8 codes of one run of 8 columns as denormals q·2^(p-149): one LOP3 each (plus a
// shift per 4-bit word, two per 8-bit pair of words).
template <int BITS>
__device__ __forceinline__ void codes8_denorm(const uint32_t* w, int sub, float* q) {
  if (BITS == 4) {
    const uint32_t v = w[sub], h = v >> 12;
    q[0] = __uint_as_float(v & 0xFu);
    q[1] = __uint_as_float(v & 0xF0u);
    q[2] = __uint_as_float(v & 0xF00u);
    q[3] = __uint_as_float(v & 0xF000u);
    q[4] = __uint_as_float(v & 0xF0000u);
    q[5] = __uint_as_float(h & 0xF00u);
    q[6] = __uint_as_float(h & 0xF000u);
    q[7] = __uint_as_float(h & 0xF0000u);
  } else {
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
      const uint32_t v = w[2 * sub + hh], s = v >> 16;
      q[4 * hh + 0] = __uint_as_float(v & 0xFFu);
      q[4 * hh + 1] = __uint_as_float(v & 0xFF00u);
      q[4 * hh + 2] = __uint_as_float(s & 0xFFu);
      q[4 * hh + 3] = __uint_as_float(s & 0xFF00u);
    }
  }
}

// Where tile column tc is stored: quads of 4 columns, quad qi of chunk ch at
// (qi · tch + ch) · 4, so that lanes reading consecutive chunks read consecutive words.
template <int BITS>
__device__ __forceinline__ int tile_off(int tc, int tch) {
  constexpr int QPC = (BITS == 4 ? 32 : 16) / 4;  // quads per chunk
  const int qd = tc >> 2;
  return ((qd % QPC) * tch + qd / QPC) * 4 + (tc & 3);
}

template <typename T, int BITS, bool TAB, bool GLU, int MM>
__device__ void gemv3_packed(const T* __restrict__ x, const uint8_t* __restrict__ codes,
                             const float* __restrict__ params, T* __restrict__ y, int n, int k,
                             int ld, int group, int gpr, int tab_off, int xvec, int n1, int n2,
                             int lanes, int tch) {
  extern __shared__ float4 smem4[];
  float* xs = reinterpret_cast<float*>(smem4);  // [MM][tch · VPC] scaled activations
  constexpr int VPC = BITS == 4 ? 32 : 16;
  float* sxs = xs + MM * tch * VPC;               // [MM][tch] Σx·2^-E per chunk
  __shared__ float tab[16];
  if (TAB && threadIdx.y == 0 && threadIdx.x < 16) tab[threadIdx.x] = params[tab_off + threadIdx.x];
  constexpr int R = GEMV3_R, U = GEMV3_U;
  constexpr int RO = GLU ? R / 2 : R;
  const int L = lanes;
  const int seg = threadIdx.x / L, l = threadIdx.x % L;
  const int out0 = ((blockIdx.x * GEMV3_WARPS + threadIdx.y) * (32 / L) + seg) * RO;
  int row[R];
  bool valid[R];
#pragma unroll
  for (int s = 0; s < R; s++) {
    const int o = out0 + (GLU ? s % RO : s);
    valid[s] = o < n;
    row[s] = valid[s] ? (GLU && s >= RO ? o + n : o) : 0;
  }
  const int kch = (k + VPC - 1) / VPC;  // chunks that hold columns
  const bool chunk_group = gpr == 1 || group % VPC == 0;
  const int gshift = (group & (group - 1)) == 0 ? __ffs(group) - 1 : -1;
  const float2* pr = reinterpret_cast<const float2*>(params);
  float2 szr[R];  // one group per row: its parameters, read once
#pragma unroll
  for (int s = 0; s < R; s++)
    szr[s] = gpr == 1 && valid[s] ? pr[row[s]] : make_float2(0.f, 0.f);
  float acc[R][MM];
#pragma unroll
  for (int s = 0; s < R; s++)
#pragma unroll
    for (int i = 0; i < MM; i++) acc[s][i] = 0.f;
  const int tid = threadIdx.y * 32 + threadIdx.x;
  const float inv_e = TAB ? 1.f : pow2f(-GEMV3_E);
  // One flat loop over (tile, iteration in the tile), every thread through every step
  // (no early exit: the block synchronises per tile). The codes and scales of step it + 1
  // are loaded before step it is used (two register sets), so a lane keeps its loads in
  // flight while it computes (v3 without this was bound by load latency: ncu at
  // 28672x8192, 4-bit, 4 warps per scheduler, 57% of cycles waiting on global loads).
  const int ipt = (tch + L * U - 1) / (L * U);  // steps per tile
  const int ntiles = (kch + tch - 1) / tch;
  const int steps = ntiles * ipt;
  // Codes and scales of U chunks of the R rows at step `it`, zeros past the tile, past
  // the last step, or for invalid rows.
  auto load = [&](uint4 (&wv)[U][R], float2 (&sz)[U][R], int it) {
    const int t = it / ipt, base = l + (it - t * ipt) * L * U;
    const int tchunks = min(tch, kch - t * tch);
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int ch = base + L * u, gch = t * tch + ch;
      const int col0 = gch * VPC;
      const int gi = gshift >= 0 ? col0 >> gshift : col0 / group;
#pragma unroll
      for (int s = 0; s < R; s++) {
        const bool ok = it < steps && ch < tchunks && valid[s];
        wv[u][s] = ok ? __ldg(reinterpret_cast<const uint4*>(codes + (size_t)row[s] * ld) + gch)
                      : make_uint4(0u, 0u, 0u, 0u);
        sz[u][s] = !ok ? make_float2(0.f, 0.f)
                   : gpr == 1 ? szr[s]
                   : chunk_group ? __ldg(pr + (size_t)row[s] * gpr + gi)
                                 : make_float2(0.f, 0.f);
      }
    }
  };
  uint4 wv[U][R];
  float2 sz[U][R];
  load(wv, sz, 0);
  for (int it = 0; it < steps; it++) {
    const int t = it / ipt, base = l + (it - t * ipt) * L * U;
    const int t0 = t * tch * VPC;
    const int tcols = min(tch, kch - t * tch) * VPC, tchunks = tcols / VPC;
    if (it == t * ipt) {
      __syncthreads();  // the previous tile's readers are done (and the table is stored)
      // Fill: a thread per run of 8 columns, zeros past k; the runs of one chunk are
      // consecutive threads of one warp, whose sums are added with shuffles.
      for (int r0 = 0; r0 < tcols / 8; r0 += 32 * GEMV3_WARPS) {
        const int r = r0 + tid, c = t0 + 8 * r;
        const bool in = r < tcols / 8;
#pragma unroll
        for (int i = 0; i < MM; i++) {
          float xv[8];
          if (in) {
            load_x8<T>(x + (size_t)i * k + c, xvec, k - c, xv);
          } else {
#pragma unroll
            for (int j = 0; j < 8; j++) xv[j] = 0.f;
          }
          float sx = 0.f;
#pragma unroll
          for (int j = 0; j < 8; j++) {
            sx += xv[j];
            if (!TAB) xv[j] *= pow2f(149 - GEMV3_E - code_pos<BITS>(j));
          }
#pragma unroll
          for (int o = 1; o < VPC / 8; o <<= 1) sx += __shfl_xor_sync(0xffffffffu, sx, o);
          if (in) {
            float* xb = xs + i * tch * VPC;
            *reinterpret_cast<float4*>(xb + tile_off<BITS>(8 * r, tch)) =
                make_float4(xv[0], xv[1], xv[2], xv[3]);
            *reinterpret_cast<float4*>(xb + tile_off<BITS>(8 * r + 4, tch)) =
                make_float4(xv[4], xv[5], xv[6], xv[7]);
            if (r % (VPC / 8) == 0) sxs[i * tch + r / (VPC / 8)] = sx * inv_e;
          }
        }
      }
      __syncthreads();
    }
    uint4 nwv[U][R];
    float2 nsz[U][R];
    load(nwv, nsz, it + 1);
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int ch = base + L * u;
      if (ch >= tchunks) break;
      if (chunk_group) {
        float dot[R][MM];
#pragma unroll
        for (int s = 0; s < R; s++)
#pragma unroll
          for (int i = 0; i < MM; i++) dot[s][i] = 0.f;
#pragma unroll
        for (int sub = 0; sub < VPC / 8; sub++) {
          float xv[MM][8];
#pragma unroll
          for (int i = 0; i < MM; i++) {
            const float* b = xs + i * tch * VPC;
            const float4 a = *reinterpret_cast<const float4*>(b + ((2 * sub) * tch + ch) * 4);
            const float4 c = *reinterpret_cast<const float4*>(b + ((2 * sub + 1) * tch + ch) * 4);
            xv[i][0] = a.x; xv[i][1] = a.y; xv[i][2] = a.z; xv[i][3] = a.w;
            xv[i][4] = c.x; xv[i][5] = c.y; xv[i][6] = c.z; xv[i][7] = c.w;
          }
#pragma unroll
          for (int s = 0; s < R; s++) {
            const uint32_t* w = reinterpret_cast<const uint32_t*>(&wv[u][s]);
            float q[8];
            if (TAB) {
              const uint32_t v = w[sub];
#pragma unroll
              for (int j = 0; j < 8; j++) q[j] = tab[(v >> (4 * j)) & 0xFu];
            } else {
              codes8_denorm<BITS>(w, sub, q);
            }
#pragma unroll
            for (int i = 0; i < MM; i++)
#pragma unroll
              for (int j = 0; j < 8; j++) dot[s][i] = fmaf(q[j], xv[i][j], dot[s][i]);
          }
        }
#pragma unroll
        for (int s = 0; s < R; s++)
#pragma unroll
          for (int i = 0; i < MM; i++) {
            const float inner = TAB ? dot[s][i] : dot[s][i] - sz[u][s].y * sxs[i * tch + ch];
            acc[s][i] = fmaf(sz[u][s].x, inner, acc[s][i]);
          }
      } else {
        // Groups that split a chunk: element by element (v1's loop), x·2^-E per column.
        const int col0 = (t0 / VPC + ch) * VPC;
#pragma unroll
        for (int sub = 0; sub < VPC / 8; sub++) {
          const int col = col0 + sub * 8;
          if (col >= k) break;
#pragma unroll
          for (int s = 0; s < R; s++) {
            if (!valid[s]) continue;
            const uint32_t* w = reinterpret_cast<const uint32_t*>(&wv[u][s]);
            float q[8];
            if (TAB) {
              const uint32_t v = w[sub];
#pragma unroll
              for (int j = 0; j < 8; j++) q[j] = tab[(v >> (4 * j)) & 0xFu];
            } else {
              codes8_fast<BITS>(w, sub, q);
            }
            gemv_ragged8<TAB, MM>(q, pr + (size_t)row[s] * gpr, col, k, group, MM,
                                  [&](int i, int c) {
                                    const int tc = c - t0;
                                    const float v = xs[i * tch * VPC + tile_off<BITS>(tc, tch)];
                                    // Back to x·2^-E: times 2^(p-149), a denormal power of two.
                                    return TAB ? v : v * __uint_as_float(1u << code_pos<BITS>(c));
                                  },
                                  acc[s]);
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
      for (int s = 0; s < R; s++) {
        wv[u][s] = nwv[u][s];
        sz[u][s] = nsz[u][s];
      }
  }
  gemv_epilogue<T, R, MM, GLU>(acc, L, out0, MM, n, n1, n2, TAB ? 1.f : pow2f(GEMV3_E), y);
}

#define GEMV3_KERNEL(NAME, T, BITS, TAB, GLU, MM)                                              \
  extern "C" __global__ void __launch_bounds__(32 * GEMV3_WARPS, 3)                            \
      NAME(const T* x, const uint8_t* codes, const float* params, T* y, int n, int k, int ld,   \
           int group, int gpr, int tab_off, int xvec, int n1, int n2, int lanes, int tch) {     \
    gemv3_packed<T, BITS, TAB, GLU, MM>(x, codes, params, y, n, k, ld, group, gpr, tab_off,     \
                                        xvec, n1, n2, lanes, tch);                              \
  }

#define GEMV3_KERNELS(SUFFIX, GLU, MM)                                        \
  GEMV3_KERNEL(gemv3_q4_int_f32##SUFFIX, float, 4, false, GLU, MM)            \
  GEMV3_KERNEL(gemv3_q4_int_bf16##SUFFIX, __nv_bfloat16, 4, false, GLU, MM)   \
  GEMV3_KERNEL(gemv3_q4_int_f16##SUFFIX, __half, 4, false, GLU, MM)           \
  GEMV3_KERNEL(gemv3_q8_int_f32##SUFFIX, float, 8, false, GLU, MM)            \
  GEMV3_KERNEL(gemv3_q8_int_bf16##SUFFIX, __nv_bfloat16, 8, false, GLU, MM)   \
  GEMV3_KERNEL(gemv3_q8_int_f16##SUFFIX, __half, 8, false, GLU, MM)           \
  GEMV3_KERNEL(gemv3_q4_tab_f32##SUFFIX, float, 4, true, GLU, MM)             \
  GEMV3_KERNEL(gemv3_q4_tab_bf16##SUFFIX, __nv_bfloat16, 4, true, GLU, MM)    \
  GEMV3_KERNEL(gemv3_q4_tab_f16##SUFFIX, __half, 4, true, GLU, MM)

// Names: gemv3_<kind>_<dtype>_m<MM>[_glu].
GEMV3_KERNELS(_m1, false, 1)
GEMV3_KERNELS(_m1_glu, true, 1)
GEMV3_KERNELS(_m2, false, 2)
GEMV3_KERNELS(_m2_glu, true, 2)
