//! Reproductions of the lab handout's exercises, as library functions with reports.

pub mod bnb;
pub mod budget;
pub mod ex0;
pub mod ex1;
pub mod gptq;
pub mod marian;
pub mod mnist;
pub mod sensitivity;
pub mod smollm;
pub mod sweep;
pub mod sweep_key;
pub mod sweep_shard;

/// A tensor's values as rows of f64 (for reports and comparisons).
pub fn rows_f64(t: &candle_core::Tensor) -> anyhow::Result<Vec<Vec<f64>>> {
    let v = t.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    Ok(v.into_iter()
        .map(|r| r.into_iter().map(|x| x as f64).collect())
        .collect())
}
