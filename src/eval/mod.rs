//! Measurements: latency statistics (and, per task, quality metrics).

pub mod latency;
