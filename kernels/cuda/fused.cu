// Fused CUDA kernels for quantlab's Llama forward pass and perplexity scoring.
// Compiled to PTX by build.rs (nvcc --ptx) under the `cuda` feature and loaded through
// candle's CUDA device (src/nn/cuda.rs). Every kernel accumulates in f32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ void from_f(float v, float* y) { *y = v; }
__device__ __forceinline__ void from_f(float v, __nv_bfloat16* y) { *y = __float2bfloat16(v); }
__device__ __forceinline__ void from_f(float v, __half* y) { *y = __float2half(v); }

// Merges two online-softmax states (running max m, sum of exp(x - m) s).
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  float mx = fmaxf(m, m2);
  if (mx == -INFINITY) { m = mx; s = 0.f; return; }
  s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
  m = mx;
}

__device__ __forceinline__ void warp_merge(float& m, float& s) {
  for (int o = 16; o > 0; o >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    merge(m, s, m2, s2);
  }
}

// Causal softmax of attention scores, one warp per row.
// scores: [rows, total] contiguous; row r holds the query at position (r % t) + offset,
// which sees columns 0..=(r % t) + offset (rows of several query heads that share a key
// head are stacked: grouped-query attention without repeating keys). Each score is
// multiplied by `scale` first; masked columns get probability 0.
template <typename T>
__device__ void causal_softmax(const T* __restrict__ x, T* __restrict__ y, int rows,
                               int t, int total, int offset, float scale) {
  int row = blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  int lane = threadIdx.x;
  int last = row % t + offset;  // last visible column
  int n = min(last + 1, total);
  const T* xr = x + (size_t)row * total;
  T* yr = y + (size_t)row * total;
  float m = -INFINITY, s = 0.f;
  for (int j = lane; j < n; j += 32) {
    float v = to_f(xr[j]) * scale;
    if (v > m) { s = s * __expf(m - v) + 1.f; m = v; }
    else { s += __expf(v - m); }
  }
  warp_merge(m, s);
  float inv = s > 0.f ? 1.f / s : 0.f;
  for (int j = lane; j < total; j += 32) {
    float p = j < n ? __expf(to_f(xr[j]) * scale - m) * inv : 0.f;
    from_f(p, &yr[j]);
  }
}

// The same causal softmax with 16-byte loads and the row held in registers (one read of
// the scores instead of two): for rows of at most 32 * NV 16-byte vectors (total a multiple
// of 16 / sizeof(T), rows 16-byte aligned; the caller checks). Lane l holds vectors
// l, l + 32, ..., so each load instruction of the warp reads 512 contiguous bytes.
template <typename T, int NV>
__device__ void causal_softmax_vec(const T* __restrict__ x, T* __restrict__ y, int rows,
                                   int t, int total, int offset, float scale) {
  constexpr int E = 16 / sizeof(T);
  int row = blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  int lane = threadIdx.x;
  int n = min(row % t + offset + 1, total);
  int nvec = total / E;
  const uint4* xr = reinterpret_cast<const uint4*>(x + (size_t)row * total);
  uint4* yr = reinterpret_cast<uint4*>(y + (size_t)row * total);
  float v[NV][E];
  float m = -INFINITY;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    int c = k * 32 + lane;
    if (c < nvec && c * E < n) {
      uint4 raw = xr[c];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < E; ++j) {
        float s = c * E + j < n ? to_f(e[j]) * scale : -INFINITY;
        v[k][j] = s;
        m = fmaxf(m, s);
      }
    } else {
#pragma unroll
      for (int j = 0; j < E; ++j) v[k][j] = -INFINITY;
    }
  }
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
#pragma unroll
    for (int j = 0; j < E; ++j) {
      float p = __expf(v[k][j] - m);
      v[k][j] = p;
      sum += p;
    }
  }
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  float inv = 1.f / sum;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    int c = k * 32 + lane;
    if (c < nvec) {
      uint4 out;
      T* o = reinterpret_cast<T*>(&out);
#pragma unroll
      for (int j = 0; j < E; ++j) from_f(v[k][j] * inv, &o[j]);
      yr[c] = out;
    }
  }
}

// Rotary position embedding fused with the head transpose: x [b, t, heads * hd] (the
// projection's output) to y [b, heads, t, hd], rotated at positions offset + 0..t by the
// tables cos/sin [positions, hd / 2]. Pairs (2i, 2i + 1) when interleaved (GGUF's q/k
// layout), else (i, i + hd / 2). In f32; one thread per pair.
template <typename T>
__device__ void rope_heads(const T* __restrict__ x, const T* __restrict__ cos,
                           const T* __restrict__ sin, T* __restrict__ y, int b, int t,
                           int heads, int hd, int offset, int interleaved) {
  int half = hd / 2;
  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  long long total = (long long)b * t * heads * half;
  if (i >= total) return;
  int p = i % half;
  long long r = i / half;
  int h = r % heads;
  r /= heads;
  int pos = r % t;
  int bi = r / t;
  int a0 = interleaved ? 2 * p : p;
  int a1 = interleaved ? 2 * p + 1 : p + half;
  const T* xr = x + (((long long)bi * t + pos) * heads + h) * hd;
  T* yr = y + (((long long)bi * heads + h) * t + pos) * hd;
  float c = to_f(cos[(long long)(offset + pos) * half + p]);
  float s = to_f(sin[(long long)(offset + pos) * half + p]);
  float x0 = to_f(xr[a0]), x1 = to_f(xr[a1]);
  from_f(x0 * c - x1 * s, &yr[a0]);
  from_f(x0 * s + x1 * c, &yr[a1]);
}

// Negative log-likelihood of one target per row: logsumexp(row) - row[target], without
// a log-softmax tensor. One block (blockDim.x a multiple of 32, at most 1024) per row.
// A target outside 0..cols gives NaN (the caller reports it).
template <typename T>
__device__ void nll_rows(const T* __restrict__ x, const uint32_t* __restrict__ target,
                         float* __restrict__ out, int cols) {
  int row = blockIdx.x;
  const T* xr = x + (size_t)row * cols;
  float m = -INFINITY, s = 0.f;
  for (int j = threadIdx.x; j < cols; j += blockDim.x) {
    float v = to_f(xr[j]);
    if (v > m) { s = s * __expf(m - v) + 1.f; m = v; }
    else { s += __expf(v - m); }
  }
  warp_merge(m, s);
  __shared__ float sm[32], ss[32];
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) { sm[warp] = m; ss[warp] = s; }
  __syncthreads();
  if (warp == 0) {
    int warps = blockDim.x / 32;
    m = lane < warps ? sm[lane] : -INFINITY;
    s = lane < warps ? ss[lane] : 0.f;
    warp_merge(m, s);
    if (lane == 0) {
      uint32_t k = target[row];
      float tv = k < (uint32_t)cols ? to_f(xr[k]) : NAN;
      out[row] = (m + logf(s)) - tv;
    }
  }
}

// min and max with NaN propagated (fminf/fmaxf would drop a NaN).
__device__ __forceinline__ float nmin(float a, float b) { return (a != a || b != b) ? NAN : fminf(a, b); }
__device__ __forceinline__ float nmax(float a, float b) { return (a != a || b != b) ? NAN : fmaxf(a, b); }

// Dynamic per-tensor u8 activation quantization, emulated (quantize, dequantize) on the
// device without a host round trip. Pass 1: each block's min and max (NaN if it saw one)
// into part[2 * block], part[2 * block + 1]. Pass 2 (every block): reduce the partials,
// derive scale and zero point exactly as the CPU kernel's activation_qparams_u8 (f32,
// round half to even), and write round(x / scale) + zp clamped to 0..255, minus zp, times
// scale. A NaN or infinite input gives NaN outputs (the caller's finiteness check reports
// it at the end of the pass).
template <typename T>
__device__ void minmax_partial(const T* __restrict__ x, long long n, float* __restrict__ part) {
  float lo = INFINITY, hi = -INFINITY;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    float v = to_f(x[i]);
    lo = nmin(lo, v);
    hi = nmax(hi, v);
  }
  for (int o = 16; o > 0; o >>= 1) {
    lo = nmin(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = nmax(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  __shared__ float slo[32], shi[32];
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) { slo[warp] = lo; shi[warp] = hi; }
  __syncthreads();
  if (warp == 0) {
    lo = lane < warps ? slo[lane] : INFINITY;
    hi = lane < warps ? shi[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) {
      lo = nmin(lo, __shfl_xor_sync(0xffffffffu, lo, o));
      hi = nmax(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    if (lane == 0) { part[2 * blockIdx.x] = lo; part[2 * blockIdx.x + 1] = hi; }
  }
}

template <typename T>
__device__ void fake_quant_u8_dyn(const T* __restrict__ x, T* __restrict__ y, long long n,
                                  const float* __restrict__ part, int parts) {
  __shared__ float s_scale, s_inv, s_zp;
  if (threadIdx.x < 32) {
    float lo = INFINITY, hi = -INFINITY;
    for (int i = threadIdx.x; i < parts; i += 32) {
      lo = nmin(lo, part[2 * i]);
      hi = nmax(hi, part[2 * i + 1]);
    }
    for (int o = 16; o > 0; o >>= 1) {
      lo = nmin(lo, __shfl_xor_sync(0xffffffffu, lo, o));
      hi = nmax(hi, __shfl_xor_sync(0xffffffffu, hi, o));
    }
    if (threadIdx.x == 0) {
      bool ok = isfinite(lo) && isfinite(hi);
      lo = fminf(lo, 0.f);
      hi = fmaxf(hi, 0.f);
      float scale = fmaxf(__fdiv_rn(hi - lo, 255.f), 1.1920929e-7f);
      float zp = fminf(fmaxf(-rintf(__fdiv_rn(lo, scale)), 0.f), 255.f);
      s_scale = ok ? scale : NAN;
      s_inv = __fdiv_rn(1.f, scale);
      s_zp = zp;
    }
  }
  __syncthreads();
  float scale = s_scale, inv = s_inv, zp = s_zp;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    float q = fminf(fmaxf(rintf(__fmul_rn(to_f(x[i]), inv)) + zp, 0.f), 255.f);
    from_f(__fmul_rn(q - zp, scale), &y[i]);
  }
}

#define INSTANCES(NAME, T)                                                               \
  extern "C" __global__ void causal_softmax_##NAME(const T* x, T* y, int rows, int t,     \
                                                   int total, int offset, float scale) {  \
    causal_softmax<T>(x, y, rows, t, total, offset, scale);                               \
  }                                                                                       \
  extern "C" __global__ void nll_rows_##NAME(const T* x, const uint32_t* target,          \
                                             float* out, int cols) {                      \
    nll_rows<T>(x, target, out, cols);                                                    \
  }                                                                                       \
  extern "C" __global__ void causal_softmax_v1_##NAME(const T* x, T* y, int rows, int t,  \
                                                      int total, int offset, float scale) { \
    causal_softmax_vec<T, 1>(x, y, rows, t, total, offset, scale);                        \
  }                                                                                       \
  extern "C" __global__ void causal_softmax_v2_##NAME(const T* x, T* y, int rows, int t,  \
                                                      int total, int offset, float scale) { \
    causal_softmax_vec<T, 2>(x, y, rows, t, total, offset, scale);                        \
  }                                                                                       \
  extern "C" __global__ void causal_softmax_v4_##NAME(const T* x, T* y, int rows, int t,  \
                                                      int total, int offset, float scale) { \
    causal_softmax_vec<T, 4>(x, y, rows, t, total, offset, scale);                        \
  }                                                                                       \
  extern "C" __global__ void causal_softmax_v8_##NAME(const T* x, T* y, int rows, int t,  \
                                                      int total, int offset, float scale) { \
    causal_softmax_vec<T, 8>(x, y, rows, t, total, offset, scale);                        \
  }                                                                                       \
  extern "C" __global__ void rope_heads_##NAME(const T* x, const T* cos, const T* sin, T* y, \
                                               int b, int t, int heads, int hd, int offset, \
                                               int interleaved) {                          \
    rope_heads<T>(x, cos, sin, y, b, t, heads, hd, offset, interleaved);                  \
  }                                                                                       \
  extern "C" __global__ void minmax_partial_##NAME(const T* x, long long n, float* part) {  \
    minmax_partial<T>(x, n, part);                                                        \
  }                                                                                       \
  extern "C" __global__ void fake_quant_u8_dyn_##NAME(const T* x, T* y, long long n,       \
                                                      const float* part, int parts) {     \
    fake_quant_u8_dyn<T>(x, y, n, part, parts);                                           \
  }

INSTANCES(f32, float)
INSTANCES(bf16, __nv_bfloat16)
INSTANCES(f16, __half)

// The int32 accumulators of a tensor-core int8 product (src/nn/cuda_lt.rs) as f32: candle
// has no i32 -> f32 cast kernel. Each value is rounded once to f32.
extern "C" __global__ void i32_to_f32(const int32_t* __restrict__ x, float* __restrict__ y,
                                      long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)blockDim.x * gridDim.x) {
    y[i] = (float)x[i];
  }
}

// Per-row activation quantization for the tensor-core W8A8 products (src/nn/cuda_lt.rs),
// one warp per row of k f32 values, given each row's absolute maximum `amax`:
//   int8: code = rint(x * ((1 / amax) * 127)) clamped to +-127 (round half to even, as the
//         CPU kernels and bitsandbytes), written as a two's complement byte; amax 0 -> 0;
//   e4m3: the FP8 E4M3 byte of x / (amax / 448), rounded to nearest even and saturated
//         (the __nv_fp8_e4m3 conversion); amax 0 -> 0.
extern "C" __global__ void quantize_rows_i8(const float* __restrict__ x,
                                            const float* __restrict__ amax,
                                            uint8_t* __restrict__ y, int rows, int k) {
  int row = blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  float a = amax[row];
  float mul = a > 0.f ? (1.0f / a) * 127.0f : 0.f;
  const float* xr = x + (size_t)row * k;
  uint8_t* yr = y + (size_t)row * k;
  for (int j = threadIdx.x; j < k; j += 32) {
    float q = fminf(fmaxf(rintf(xr[j] * mul), -127.f), 127.f);
    yr[j] = (uint8_t)(int8_t)(int)q;
  }
}

extern "C" __global__ void quantize_rows_e4m3(const float* __restrict__ x,
                                              const float* __restrict__ amax,
                                              uint8_t* __restrict__ y, int rows, int k) {
  int row = blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  float a = amax[row];
  float s = a > 0.f ? a / 448.0f : 1.f;
  const float* xr = x + (size_t)row * k;
  uint8_t* yr = y + (size_t)row * k;
  for (int j = threadIdx.x; j < k; j += 32) {
    __nv_fp8_e4m3 q(xr[j] / s);
    yr[j] = q.__x;
  }
}

// The e4m3 per-row quantization above, decoded again (x -> e4m3 -> f32, times the scale):
// the emulation of W8A8-FP8 where the tensor-core product does not take the shapes.
extern "C" __global__ void fake_quant_rows_e4m3(const float* __restrict__ x,
                                                const float* __restrict__ amax,
                                                float* __restrict__ y, int rows, int k) {
  int row = blockIdx.x * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  float a = amax[row];
  float s = a > 0.f ? a / 448.0f : 1.f;
  const float* xr = x + (size_t)row * k;
  float* yr = y + (size_t)row * k;
  for (int j = threadIdx.x; j < k; j += 32) {
    __nv_fp8_e4m3 q(xr[j] / s);
    yr[j] = a > 0.f ? (float)q * s : 0.f;
  }
}
#include "gemv.cuh"
#include "gemv_q8.cuh"
