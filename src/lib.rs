//! quantlab: load models into Candle, quantize them per layer, and measure what changed.

pub mod arch;
pub mod cli;
pub mod data;
pub mod device;
pub mod eval;
pub mod lab;
pub mod load;
pub mod model;
pub mod nn;
pub mod profile;
pub mod progress;
pub mod quant;
pub mod report;
