//! Measurements: latency statistics, perplexity, KL divergence to a base model.

pub mod bleu;
pub mod compare;
pub mod kl;
pub mod lastword;
pub mod latency;
pub mod lm;
pub mod measure;
pub mod mt;
pub mod perplexity;
pub mod prepare;
pub mod protocols;
pub mod runfile;
pub mod seq2seq;
pub mod speed;
pub mod stats;
