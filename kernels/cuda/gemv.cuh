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
#pragma unroll
        for (int j = 0; j < 8; j++) {
          const int c = col + j;
          if (c >= k) break;
          const float2 sz = prow[c / group];
          const float v = TAB ? q[j] * sz.x : (q[j] - sz.y) * sz.x;
#pragma unroll
          for (int i = 0; i < GEMV_MAX_M; i++) {
            if (i >= m) break;
            acc[i] = fmaf(v, to_f(x[(size_t)i * k + c]), acc[i]);
          }
        }
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
