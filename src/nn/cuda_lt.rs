//! Int8 and FP8 matrix products on tensor cores (cuBLASLt), for W8A8 layers on a GPU.
//!
//! Without these, a W8A8 layer on CUDA ran as an emulation: its weight dequantized to the
//! compute dtype and its activations fake-quantized, then a bf16/f32 cuBLAS product. With
//! them the codes themselves are multiplied: `s8 × s8 → s32` (IMMA) or `e4m3 × e4m3 → f32`
//! (the H100/H200 FP8 tensor cores), and the scales are applied to the result — per
//! activation row and per output channel, as the CPU kernels do.
//!
//! [`lt_matmul`] is a candle custom op: on the CPU it computes the same products exactly
//! (integer sums; FP8 products, which are exact in f32, summed in f64), which is the
//! reference the GPU result is tested against (`tests/cuda.rs`).

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

/// The element type of both operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LtInput {
    /// Signed int8 codes, held in a U8 tensor as two's complement bytes.
    I8,
    /// FP8 E4M3 values, held in a U8 tensor as their bytes (candle 0.11's CUDA casts to
    /// and from F8E4M3 look for kernels under other names, so E4M3 data never goes through
    /// candle's F8E4M3 type here).
    Fp8,
}

/// Activation rows `x` (f32 `[m, k]`) as codes of `kind` (U8 bytes), given each row's
/// absolute maximum `amax` (`[m, 1]`): int8 `round_half_even(x · (1/amax) · 127)` clamped
/// to ±127 (the CPU kernels' rule, bit for bit); E4M3 of `x / (amax / 448)` rounded to
/// nearest even with saturation. Rows with `amax` 0 give zero codes.
pub fn quantize_rows(x: &Tensor, amax: &Tensor, kind: LtInput) -> Result<Tensor> {
    let op = RowQuant { kind, fake: false };
    Ok(x.contiguous()?.apply_op2_no_bwd(&amax.contiguous()?, &op)?)
}

/// `x` through the E4M3 per-row quantization and back (f32): W8A8-FP8's emulation.
pub fn fake_quant_rows_e4m3(x: &Tensor, amax: &Tensor) -> Result<Tensor> {
    let op = RowQuant {
        kind: LtInput::Fp8,
        fake: true,
    };
    Ok(x.contiguous()?.apply_op2_no_bwd(&amax.contiguous()?, &op)?)
}

struct RowQuant {
    kind: LtInput,
    /// Decode the codes again (f32 output) instead of returning them.
    fake: bool,
}

impl RowQuant {
    fn cpu_row(&self, x: &[f32], amax: f32, codes: &mut [u8], out: &mut [f32]) {
        use crate::quant::fp8;
        match self.kind {
            LtInput::I8 => {
                let mul = if amax > 0.0 {
                    (1.0f32 / amax) * 127.0
                } else {
                    0.0
                };
                for (c, &v) in codes.iter_mut().zip(x) {
                    *c = (v * mul).round_ties_even().clamp(-127.0, 127.0) as i8 as u8;
                }
            }
            LtInput::Fp8 => {
                let s = if amax > 0.0 {
                    amax / fp8::E4M3_MAX
                } else {
                    1.0
                };
                for ((c, o), &v) in codes.iter_mut().zip(out.iter_mut()).zip(x) {
                    *c = fp8::encode(v / s);
                    *o = if amax > 0.0 { fp8::decode(*c) * s } else { 0.0 };
                }
            }
        }
    }
}

impl CustomOp2 for RowQuant {
    fn name(&self) -> &'static str {
        "quantlab-row-quant"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k, o1) = dims(l1)?;
        let (_, _, o2) = dims(l2)?;
        let (CpuStorage::F32(x), CpuStorage::F32(a)) = (s1, s2) else {
            return Err(candle_core::Error::Msg(
                "row quantization takes f32 rows and f32 absolute maxima".into(),
            ));
        };
        let mut codes = vec![0u8; m * k];
        let mut out = vec![0f32; if self.fake { m * k } else { k }];
        for r in 0..m {
            let o = if self.fake { r * k } else { 0 };
            self.cpu_row(
                &x[o1 + r * k..o1 + (r + 1) * k],
                a[o2 + r],
                &mut codes[r * k..(r + 1) * k],
                &mut out[o..o + k],
            );
        }
        Ok(if self.fake {
            (CpuStorage::F32(out), Shape::from((m, k)))
        } else {
            (CpuStorage::U8(codes), Shape::from((m, k)))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::row_quant(self.kind, self.fake, s1, l1, s2, l2)
    }
}

/// Whether the tensor-core kernels take a `[*, k] · [n, k]ᵀ` product: cuBLASLt's int8 and
/// FP8 kernels want 16-byte aligned rows, so `k` and `n` multiples of 16.
pub fn shapes_fit(k: usize, n: usize) -> bool {
    k > 0 && n > 0 && k.is_multiple_of(16) && n.is_multiple_of(16)
}

/// `a [m, k] · wᵀ` (`w` is `[n, k]`) → f32 `[m, n]`, both operands of type `kind`.
pub fn lt_matmul(a: &Tensor, w: &Tensor, kind: LtInput) -> Result<Tensor> {
    for (t, what) in [(a, "activations"), (w, "weight")] {
        if t.dtype() != DType::U8 || t.rank() != 2 {
            bail!(
                "tensor-core {kind:?} product: {what} must be a U8 matrix, got {:?} {:?}",
                t.dtype(),
                t.dims()
            );
        }
    }
    if a.dim(1)? != w.dim(1)? {
        bail!(
            "tensor-core product: activations {:?} do not match weight {:?}",
            a.dims(),
            w.dims()
        );
    }
    Ok(a.contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &LtMatmul(kind))?)
}

struct LtMatmul(LtInput);

fn dims(layout: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let (r, c) = layout.shape().dims2()?;
    match layout.contiguous_offsets() {
        Some((start, _)) => Ok((r, c, start)),
        None => Err(candle_core::Error::Msg(
            "tensor-core product needs contiguous operands".into(),
        )),
    }
}

/// The exact products on the CPU: integer sums for int8; for FP8 each product of two E4M3
/// values is exact in f32 and the sum is taken in f64, then rounded once.
fn cpu_product(a: &[f32], w: &[f32], m: usize, n: usize, k: usize, integer: bool) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for r in 0..m {
        let x = &a[r * k..(r + 1) * k];
        for (j, out) in y[r * n..(r + 1) * n].iter_mut().enumerate() {
            let wr = &w[j * k..(j + 1) * k];
            *out = if integer {
                x.iter()
                    .zip(wr)
                    .map(|(p, q)| *p as i64 * *q as i64)
                    .sum::<i64>() as f32
            } else {
                x.iter().zip(wr).map(|(p, q)| (*p * *q) as f64).sum::<f64>() as f32
            };
        }
    }
    y
}

fn cpu_values(s: &CpuStorage, start: usize, len: usize) -> candle_core::Result<Vec<f32>> {
    Ok(match s {
        CpuStorage::U8(v) => v[start..start + len]
            .iter()
            .map(|&b| b as i8 as f32)
            .collect(),
        _ => {
            return Err(candle_core::Error::Msg(
                "tensor-core product takes u8 operands (int8 or E4M3 bytes)".into(),
            ))
        }
    })
}

impl CustomOp2 for LtMatmul {
    fn name(&self) -> &'static str {
        "quantlab-lt-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k, o1) = dims(l1)?;
        let (n, _, o2) = dims(l2)?;
        let (mut a, mut w) = (cpu_values(s1, o1, m * k)?, cpu_values(s2, o2, n * k)?);
        if self.0 == LtInput::Fp8 {
            // The bytes read as i8 above; E4M3 decodes them instead.
            for v in a.iter_mut().chain(w.iter_mut()) {
                *v = crate::quant::fp8::decode(*v as i8 as u8);
            }
        }
        let y = cpu_product(&a, &w, m, n, k, self.0 == LtInput::I8);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::matmul(self.0, s1, l1, s2, l2)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{dims, LtInput};
    use candle_core::backend::{BackendDevice, BackendStorage};
    use candle_core::cuda_backend::cudarc::cublaslt::safe::MatmulShared;
    use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys, CudaBlasLT};
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
    use candle_core::{CudaDevice, CudaStorage, DeviceLocation, Layout, Result, Shape};
    use std::collections::HashMap;
    use std::ffi::c_void;
    use std::sync::{Arc, Mutex, OnceLock};

    /// A cuBLASLt handle and workspace per GPU, made on first use.
    struct Lt {
        blas: CudaBlasLT,
        workspace: CudaSlice<u8>,
        /// Descriptors and the chosen kernel per (type, m, n, k): building them and asking
        /// cuBLASLt's heuristic costs more than a small product itself.
        plans: Mutex<HashMap<PlanKey, Arc<Plan>>>,
    }

    /// Operand type, m, n, k.
    type PlanKey = (LtInput, usize, usize, usize);

    /// A product's cuBLASLt descriptors and kernel choice.
    struct Plan {
        g: Guard,
        algo: sys::cublasLtMatmulAlgo_t,
    }

    // SAFETY: the descriptors are host-side cuBLASLt objects that are only read after they
    // are built (by cublasLtMatmul, which does not modify them); the algorithm is plain data.
    unsafe impl Send for Plan {}
    unsafe impl Sync for Plan {}

    /// Plans kept per GPU before the cache starts over (each is a few hundred bytes).
    const MAX_PLANS: usize = 1024;

    const WORKSPACE: usize = 32 << 20;

    fn err<E: std::fmt::Debug>(what: &str) -> impl Fn(E) -> candle_core::Error + '_ {
        move |e| candle_core::Error::Msg(format!("cuBLASLt {what}: {e:?}"))
    }

    fn handle(dev: &CudaDevice) -> Result<Arc<Lt>> {
        static HANDLES: OnceLock<Mutex<HashMap<usize, Arc<Lt>>>> = OnceLock::new();
        let gpu = match dev.location() {
            DeviceLocation::Cuda { gpu_id } => gpu_id,
            _ => 0,
        };
        let mut map = HANDLES.get_or_init(Default::default).lock().unwrap();
        if let Some(h) = map.get(&gpu) {
            return Ok(h.clone());
        }
        let stream = dev.cuda_stream();
        let blas = CudaBlasLT::new(stream.clone()).map_err(err("handle"))?;
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE)
            .map_err(err("workspace"))?;
        let h = Arc::new(Lt {
            blas,
            workspace,
            plans: Mutex::new(HashMap::new()),
        });
        map.insert(gpu, h.clone());
        Ok(h)
    }

    /// Descriptors destroyed when the call ends, whatever happens.
    struct Guard {
        desc: sys::cublasLtMatmulDesc_t,
        layouts: Vec<sys::cublasLtMatrixLayout_t>,
        pref: sys::cublasLtMatmulPreference_t,
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            // SAFETY: each handle was created by cuBLASLt in `matmul` and is destroyed
            // once, here; null handles (never created) are skipped.
            unsafe {
                for l in &self.layouts {
                    let _ = lt::destroy_matrix_layout(*l);
                }
                if !self.pref.is_null() {
                    let _ = lt::destroy_matmul_pref(self.pref);
                }
                if !self.desc.is_null() {
                    let _ = lt::destroy_matmul_desc(self.desc);
                }
            }
        }
    }

    use crate::nn::cuda::gpu::{MODULE, PTX};

    /// The accumulators as f32, by `i32_to_f32` in kernels/cuda/fused.cu.
    fn i32_to_f32(dev: &CudaDevice, x: &CudaSlice<i32>, n: usize) -> Result<CudaSlice<f32>> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let func = dev.get_or_load_custom_func("i32_to_f32", MODULE, PTX)?;
        // SAFETY: the kernel writes all n elements before the buffer is read.
        let y = unsafe { dev.alloc::<f32>(n)? };
        let len = n as i64;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = func.builder();
        b.arg(x);
        b.arg(&y);
        b.arg(&len);
        // SAFETY: the arguments match the kernel's signature (an i32 and an f32 pointer to n
        // elements each, and n as a 64-bit integer); the kernel's grid-stride loop stays below n.
        unsafe { b.launch(cfg) }.w()?;
        Ok(y)
    }

    fn build_plan(lt: &Lt, kind: LtInput, m: usize, n: usize, k: usize) -> Result<Plan> {
        use sys::cudaDataType_t as T;
        let (compute, scale, ab, cd) = match kind {
            LtInput::I8 => (
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32I,
                T::CUDA_R_32I,
                T::CUDA_R_8I,
                T::CUDA_R_32I,
            ),
            LtInput::Fp8 => (
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                T::CUDA_R_32F,
                T::CUDA_R_8F_E4M3,
                T::CUDA_R_32F,
            ),
        };
        // Row-major Y[m, n] = X[m, k] · W[n, k]ᵀ is column-major Yᶜ[n, m] = op(A) · B with
        // A = W read as column-major [k, n] (ld k) transposed, B = X as column-major
        // [k, m] (ld k): the "TN" form the int8 and FP8 kernels require.
        let mut g = Guard {
            desc: lt::create_matmul_desc(compute, scale).map_err(err("descriptor"))?,
            layouts: Vec::new(),
            pref: std::ptr::null_mut(),
        };
        // cublasOperation_t: CUBLAS_OP_T is 1 (a 32-bit enum).
        let op_t: i32 = 1;
        // SAFETY: the attribute value is a live 32-bit integer of the size passed.
        unsafe {
            lt::set_matmul_desc_attribute(
                g.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &op_t as *const _ as *const c_void,
                std::mem::size_of_val(&op_t),
            )
            .map_err(err("transpose"))?;
        }
        for (ty, rows, cols, ld) in [(ab, k, n, k), (ab, k, m, k), (cd, n, m, n)] {
            let l = lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64)
                .map_err(err("layout"))?;
            g.layouts.push(l);
        }
        g.pref = lt::create_matmul_pref().map_err(err("preference"))?;
        let ws = WORKSPACE as u64;
        // SAFETY: the attribute value is a live u64 of the size passed.
        unsafe {
            lt::set_matmul_pref_attribute(
                g.pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const _ as *const c_void,
                std::mem::size_of_val(&ws),
            )
            .map_err(err("workspace size"))?;
        }
        let (la, lb, lc) = (g.layouts[0], g.layouts[1], g.layouts[2]);
        // SAFETY: descriptors and layouts were created above and describe the operands.
        let heuristic = unsafe {
            lt::get_matmul_algo_heuristic(*lt.blas.handle(), g.desc, la, lb, lc, lc, g.pref)
        }
        .map_err(err("no kernel for these types and shapes"))?;
        Ok(Plan {
            g,
            algo: heuristic.algo,
        })
    }

    pub(super) fn matmul(
        kind: LtInput,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (m, k, o1) = dims(l1)?;
        let (n, k2, o2) = dims(l2)?;
        if k != k2 || !super::shapes_fit(k, n) {
            return Err(candle_core::Error::Msg(format!(
                "tensor-core product of [{m}, {k}] by [{n}, {k2}]ᵀ: k and n must match and be multiples of 16"
            )));
        }
        let dev = s1.device().clone();
        let lt = handle(&dev)?;
        let stream = dev.cuda_stream();
        let plan = {
            let mut plans = lt.plans.lock().unwrap();
            match plans.get(&(kind, m, n, k)) {
                Some(p) => p.clone(),
                None => {
                    let p = Arc::new(build_plan(&lt, kind, m, n, k)?);
                    if plans.len() >= MAX_PLANS {
                        plans.clear();
                    }
                    plans.insert((kind, m, n, k), p.clone());
                    p
                }
            }
        };
        let (la, lb, lc) = (plan.g.layouts[0], plan.g.layouts[1], plan.g.layouts[2]);
        let (alpha_i, beta_i) = (1i32, 0i32);
        let (alpha_f, beta_f) = (1f32, 0f32);
        let (alpha, beta): (*const c_void, *const c_void) = match kind {
            LtInput::I8 => (
                &alpha_i as *const _ as *const c_void,
                &beta_i as *const _ as *const c_void,
            ),
            LtInput::Fp8 => (
                &alpha_f as *const _ as *const c_void,
                &beta_f as *const _ as *const c_void,
            ),
        };
        let launch = |a: u64, b: u64, d: u64| -> Result<()> {
            let (wsp, _ws_guard) = lt.workspace.device_ptr(&stream);
            // SAFETY: a, b, d point to device buffers of exactly the layouts' sizes (the
            // operands' contiguous ranges and a fresh m × n output), alpha/beta to host
            // scalars of the scale type, the workspace to WORKSPACE bytes; all on the
            // stream the product is enqueued on.
            unsafe {
                lt::matmul(
                    *lt.blas.handle(),
                    plan.g.desc,
                    alpha,
                    beta,
                    a as *const c_void,
                    la,
                    b as *const c_void,
                    lb,
                    d as *const c_void,
                    lc,
                    d as *mut c_void,
                    lc,
                    &plan.algo,
                    wsp as *mut c_void,
                    WORKSPACE,
                    stream.cu_stream() as _,
                )
            }
            .map_err(err("matmul"))
        };
        let x = s1.as_cuda_slice::<u8>()?.slice(o1..o1 + m * k);
        let w = s2.as_cuda_slice::<u8>()?.slice(o2..o2 + n * k);
        match kind {
            LtInput::I8 => {
                // SAFETY: every element is written by the product before it is read.
                let mut y = unsafe { stream.alloc::<i32>(m * n) }.map_err(err("output"))?;
                {
                    let (xp, _gx) = x.device_ptr(&stream);
                    let (wp, _gw) = w.device_ptr(&stream);
                    let (yp, _gy) = y.device_ptr_mut(&stream);
                    launch(wp, xp, yp)?;
                }
                Ok((
                    CudaStorage::wrap_cuda_slice(i32_to_f32(&dev, &y, m * n)?, dev.clone()),
                    Shape::from((m, n)),
                ))
            }
            LtInput::Fp8 => {
                // SAFETY: every element is written by the product before it is read.
                let mut y = unsafe { stream.alloc::<f32>(m * n) }.map_err(err("output"))?;
                {
                    let (xp, _gx) = x.device_ptr(&stream);
                    let (wp, _gw) = w.device_ptr(&stream);
                    let (yp, _gy) = y.device_ptr_mut(&stream);
                    launch(wp, xp, yp)?;
                }
                Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((m, n))))
            }
        }
    }

    /// `quantize_rows_*` / `fake_quant_rows_e4m3` of kernels/cuda/fused.cu, one warp a row.
    pub(super) fn row_quant(
        kind: LtInput,
        fake: bool,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        let (m, k, o1) = dims(l1)?;
        let (ma, _, o2) = dims(l2)?;
        if ma != m {
            return Err(candle_core::Error::Msg(format!(
                "row quantization: {ma} maxima for {m} rows"
            )));
        }
        let dev = s1.device().clone();
        let x = s1.as_cuda_slice::<f32>()?.slice(o1..o1 + m * k);
        let a = s2.as_cuda_slice::<f32>()?.slice(o2..o2 + m);
        let name = match (kind, fake) {
            (LtInput::I8, false) => "quantize_rows_i8",
            (LtInput::Fp8, false) => "quantize_rows_e4m3",
            (LtInput::Fp8, true) => "fake_quant_rows_e4m3",
            (LtInput::I8, true) => {
                return Err(candle_core::Error::Msg(
                    "int8 fake quantization is not a row-quant kernel".into(),
                ))
            }
        };
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let (rows, cols) = (
            i32::try_from(m).map_err(|_| candle_core::Error::Msg("too many rows".into()))?,
            i32::try_from(k).map_err(|_| candle_core::Error::Msg("rows too long".into()))?,
        );
        const ROWS_PER_BLOCK: usize = 4;
        let cfg = LaunchConfig {
            grid_dim: (m.div_ceil(ROWS_PER_BLOCK).max(1) as u32, 1, 1),
            block_dim: (32, ROWS_PER_BLOCK as u32, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! go {
            ($t:ty) => {{
                // SAFETY: the kernel writes every element of its m × k output.
                let y = unsafe { dev.alloc::<$t>(m * k)? };
                let mut b = func.builder();
                b.arg(&x);
                b.arg(&a);
                b.arg(&y);
                b.arg(&rows);
                b.arg(&cols);
                // SAFETY: the arguments match the kernel (f32 rows, f32 maxima, an output of
                // m × k elements, two i32); it bounds rows by `rows` and columns by `cols`.
                unsafe { b.launch(cfg) }.w()?;
                Ok((
                    CudaStorage::wrap_cuda_slice(y, dev.clone()),
                    Shape::from((m, k)),
                ))
            }};
        }
        if fake {
            go!(f32)
        } else {
            go!(u8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn int8_products_are_exact_integer_sums() {
        let (m, n, k) = (3, 5, 32);
        let a: Vec<i8> = (0..m * k).map(|i| ((i * 37) % 255) as i8).collect();
        let w: Vec<i8> = (0..n * k).map(|i| ((i * 91 + 7) % 255) as i8).collect();
        let bytes = |v: &[i8]| v.iter().map(|&c| c as u8).collect::<Vec<u8>>();
        let at = Tensor::from_vec(bytes(&a), (m, k), &Device::Cpu).unwrap();
        let wt = Tensor::from_vec(bytes(&w), (n, k), &Device::Cpu).unwrap();
        let y = lt_matmul(&at, &wt, LtInput::I8)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for r in 0..m {
            for j in 0..n {
                let want: i32 = (0..k)
                    .map(|t| a[r * k + t] as i32 * w[j * k + t] as i32)
                    .sum();
                assert_eq!(y[r][j], want as f32);
            }
        }
    }

    #[test]
    fn fp8_products_use_the_decoded_values_and_bad_operands_are_refused() {
        let (m, n, k) = (2, 3, 16);
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 - 10.0) / 4.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin() * 30.0).collect();
        let cast = |v: &[f32], r: usize| {
            let bytes: Vec<u8> = v.iter().map(|&x| crate::quant::fp8::encode(x)).collect();
            Tensor::from_vec(bytes, (r, k), &Device::Cpu).unwrap()
        };
        let y = lt_matmul(&cast(&x, m), &cast(&w, n), LtInput::Fp8)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let q = |v: f32| crate::quant::fp8::decode(crate::quant::fp8::encode(v)) as f64;
        for r in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|t| q(x[r * k + t]) * q(w[j * k + t])).sum();
                assert!((y[r][j] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0));
            }
        }
        let f = Tensor::zeros((2, 16), DType::F32, &Device::Cpu).unwrap();
        let e = lt_matmul(&f, &f, LtInput::Fp8).unwrap_err().to_string();
        assert!(e.contains("U8"), "{e}");
        assert!(shapes_fit(576, 1536) && !shapes_fit(784, 10));
    }

    /// The row quantizers against the CPU kernels' own rules: int8 codes equal
    /// `format::int8::quantize_row_symmetric`'s (which stores code + 128), E4M3 codes equal
    /// `quant::fp8::encode` of `x / (amax / 448)`, and the fake-quantized rows equal
    /// `quant::fp8::fake_quantize_row`.
    #[test]
    fn row_quantizers_follow_the_cpu_rules() {
        let (m, k) = (3, 40);
        let mut x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.77).sin() * 5.0).collect();
        x[k..2 * k].fill(0.0);
        x[5] = 2.5 * 5.0 / 127.0; // a tie candidate
        let amax: Vec<f32> = x
            .chunks(k)
            .map(|r| r.iter().fold(0f32, |a, v| a.max(v.abs())))
            .collect();
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let at = Tensor::from_vec(amax.clone(), (m, 1), &Device::Cpu).unwrap();
        let i8c = quantize_rows(&xt, &at, LtInput::I8)
            .unwrap()
            .to_vec2::<u8>()
            .unwrap();
        let f8c = quantize_rows(&xt, &at, LtInput::Fp8)
            .unwrap()
            .to_vec2::<u8>()
            .unwrap();
        let fake = fake_quant_rows_e4m3(&xt, &at)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for r in 0..m {
            let row = &x[r * k..(r + 1) * k];
            let mut cpu = vec![0u8; k];
            crate::nn::format::int8::quantize_row_symmetric(row, amax[r], &mut cpu);
            let cpu: Vec<u8> = cpu.iter().map(|&c| (c as i32 - 128) as i8 as u8).collect();
            assert_eq!(i8c[r], cpu, "int8 row {r}");
            let s = if amax[r] > 0.0 { amax[r] / 448.0 } else { 1.0 };
            let want: Vec<u8> = row
                .iter()
                .map(|&v| crate::quant::fp8::encode(v / s))
                .collect();
            assert_eq!(f8c[r], want, "e4m3 row {r}");
            let mut fq = row.to_vec();
            crate::quant::fp8::fake_quantize_row(&mut fq);
            assert_eq!(fake[r], fq, "fake e4m3 row {r}");
        }
    }
}
