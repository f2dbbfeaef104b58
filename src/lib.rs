//! quantlab: load models into Candle, quantize them per layer, and measure what changed.

pub mod cli;
pub mod data;
pub mod lab;
pub mod quant;
pub mod report;
