//! Measurements: latency statistics, perplexity, KL divergence to a base model.

pub mod bleu;
pub mod kl;
pub mod lastword;
pub mod latency;
pub mod lm;
pub mod mt;
pub mod perplexity;
pub mod prepare;
pub mod seq2seq;
pub mod speed;
