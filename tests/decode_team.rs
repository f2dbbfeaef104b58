//! The decode thread team (`kernels::team`) changes who computes what, never the numbers:
//! the products it splits (f32 GEMV, the q8 panel walk), decode attention, and whole decode
//! steps of the tiny Llama give the same bits inside a team session on 2 and 3 threads as
//! on one thread without a team (the path every split must reproduce).

mod common;
use common::{decode_logits, tiny_llama};
use quantlab::nn::kernels::gemm_f32::{self, panel_width, PackedWeight};
use quantlab::nn::kernels::ggml_blocks::{panels, BlockKind, PackedBlocks};
use quantlab::nn::kernels::llm_f32::{causal_attention, KvHeads};
use quantlab::nn::kernels::{team, Isa};

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

/// A deterministic stream in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

/// `f` on one thread without a team, then inside a session on 2 and 3 threads: all equal
/// bit for bit.
fn same_everywhere(what: &str, f: impl Fn() -> Vec<f32> + Sync + Send) {
    let one = pool(1).install(&f);
    for threads in [2, 3] {
        let teamed = pool(threads).install(|| team::session_forced(|| (team::leading(), f())));
        assert!(teamed.0, "{what}: no session on {threads} threads");
        let same = one
            .iter()
            .zip(&teamed.1)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same && one.len() == teamed.1.len(),
            "{what}: {threads} threads differ"
        );
    }
}

#[test]
fn split_products_are_bit_identical_in_a_team() {
    for isa in Isa::available() {
        // Ragged: n not a multiple of any panel width, k not of a vector width; large
        // enough to be split (≥ 2^16 multiply-adds).
        for (n, k) in [(1003, 301), (77, 1000), (2050, 64)] {
            let w = PackedWeight::new(&values(n * k, 1), n, k, panel_width(isa));
            for m in [1, 3] {
                let x = values(m * k, 2);
                same_everywhere(&format!("f32 {isa:?} {m}×{n}×{k}"), || {
                    gemm_f32::matmul_with(isa, &x, m, &w)
                });
            }
        }
        // Q4_0 blocks (k a multiple of 32; f16 scale 0x2E66 ≈ 0.1, random nibbles).
        for (n, k) in [(1009, 320), (48, 4096)] {
            let kb = k / 32;
            let mut bytes = Vec::with_capacity(n * kb * 18);
            for (i, v) in values(n * kb * 16, 3).iter().enumerate() {
                if i % 16 == 0 {
                    bytes.extend_from_slice(&[0x66, 0x2E]);
                }
                bytes.push(((v + 1.0) * 127.9) as u8);
            }
            let rows = PackedBlocks::from_ggml(BlockKind::Q4_0, &bytes, n, k).unwrap();
            let pw = panels::PanelBlocks::from_rows(&rows);
            for m in [1, 2] {
                let x = values(m * (k - 7), 4);
                same_everywhere(&format!("q4_0 panels {isa:?} {m}×{n}×{k}"), || {
                    panels::matmul_f32(isa, &pw, &x, m, k - 7)
                });
            }
        }
    }
}

#[test]
fn decode_attention_is_bit_identical_in_a_team() {
    let (nh, nkv, hd) = (9, 3, 64);
    for total in [1, 2, 77, 300] {
        for t in [1, 3] {
            if t > total {
                continue;
            }
            let mut kv = KvHeads::default();
            kv.append(
                &values(total * nkv * hd, 5),
                &values(total * nkv * hd, 6),
                nkv,
                hd,
            );
            let q = values(t * nh * hd, 7);
            same_everywhere(&format!("attention {total} keys, {t} rows"), || {
                causal_attention(&q, t, nh, hd, &kv, total - t, 0.125)
            });
        }
    }
}

#[test]
fn tiny_llama_decode_is_bit_identical_on_any_thread_count() {
    let ids: Vec<u32> = (0..24).map(|i| (i * 41 + 3) % 300).collect();
    for plan in ["", "*=q4_0", "*=w:i4:sym:g32"] {
        let m = tiny_llama(plan);
        let one = pool(1).install(|| decode_logits(&m, &ids));
        for threads in [2, 3] {
            // rayon's splits (the default), then every step inside one team session.
            let many = pool(threads).install(|| decode_logits(&m, &ids));
            let teamed = pool(threads).install(|| team::session_forced(|| decode_logits(&m, &ids)));
            for (how, got) in [("rayon", &many), ("a team", &teamed)] {
                assert!(
                    one.len() == got.len()
                        && one.iter().zip(got).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "plan '{plan}': {threads} threads with {how} differ from one"
                );
            }
        }
    }
}
