//! Fused q/k/v and gate/up projections (`arch::llama::fused`): the tiny Llama
//! (`tests/fixtures/llama-tiny`: hidden 64, q 64 rows, k/v 32, gate/up 128) gives the same
//! logits, bit for bit, with the stacked weights as with separate layers, for every format
//! that stacks, in a full pass (prefill: many rows) and decoding one token at a time; mixed
//! plans (q int4, k int8) stack only the groups whose parts agree, and still give the same
//! numbers. Rows are independent in every stacked format, so any difference is a bug.

mod common;
use candle_core::{Device, Tensor};
use common::tiny_llama;
use quantlab::arch::llama::Llama;
use quantlab::nn::{apply_plan, Plan};

/// Logits of a full pass over `ids`, then of `ids` decoded one token at a time.
fn logits(m: &Llama, ids: &[u32]) -> Vec<f32> {
    let x = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    let full = m.forward(&x, &mut m.new_cache(), false).unwrap();
    let mut out = full.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut cache = m.new_cache();
    for &id in ids {
        let x = Tensor::from_vec(vec![id], (1, 1), &Device::Cpu).unwrap();
        let l = m.forward(&x, &mut cache, true).unwrap();
        out.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    out
}

/// (plan, q/k/v groups expected stacked, gate/up groups expected stacked) over 2 blocks.
const PLANS: [(&str, usize, usize); 12] = [
    ("", 2, 2),
    ("*=dynamic-int8", 2, 2),
    ("*=w8a8:token", 2, 2),
    ("*=w:i8:sym:ch0", 2, 2),
    ("*=w:i4:sym:g32", 2, 2),
    ("*=w:i4:asym:g32", 2, 2),
    ("*=hqq:u4:g32", 2, 2),
    ("*=nf4", 2, 2),
    ("*=q8_0", 2, 2),
    ("*=q4_0", 2, 2),
    // Mixed: q int4 and k int8 do not stack; gate/up (both int4) do.
    (
        "*.q_proj=w:i4:sym:g32;*.k_proj=dynamic-int8;*=w:i4:sym:g32",
        0,
        2,
    ),
    // Block 0's gate differs from its up; block 1 is uniform.
    ("*.0.mlp.gate_proj=nf4;*=w:i4:sym:g32", 2, 1),
];

#[test]
fn fused_projections_give_bit_identical_logits() {
    let ids: Vec<u32> = (0..23).map(|i| (i * 37 + 5) % 300).collect();
    for (plan, qkv, gate_up) in PLANS {
        let mut m = tiny_llama(plan);
        assert!(m.fused_projections(), "fusion is on by default");
        let groups = m.fused_groups();
        let count = |suffix: &str| groups.iter().filter(|g| g[0].ends_with(suffix)).count();
        assert_eq!(
            (count("q_proj"), count("gate_proj")),
            (qkv, gate_up),
            "{plan:?}: stacked groups {groups:?}"
        );
        let fused = logits(&m, &ids);
        m.set_fused_projections(false);
        assert!(m.fused_groups().is_empty());
        let separate = logits(&m, &ids);
        assert_eq!(fused.len(), separate.len());
        let differ = fused
            .iter()
            .zip(&separate)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differ,
            0,
            "{plan:?}: {differ} of {} logits differ",
            fused.len()
        );
    }
}

/// A layer changed after the stacked weight was built (a plan applied later) is seen: the
/// stack is rebuilt from the new parts, not reused.
#[test]
fn stacked_weights_follow_a_later_plan() {
    let ids: Vec<u32> = (0..9).map(|i| (i * 11 + 3) % 300).collect();
    let mut m = tiny_llama("");
    let before = logits(&m, &ids);
    let plan: Plan = "*=w:i4:sym:g32".parse().unwrap();
    apply_plan(&mut m, &plan, |_| Ok(())).unwrap();
    let after = logits(&m, &ids);
    assert_ne!(before, after);
    m.set_fused_projections(false);
    assert_eq!(after, logits(&m, &ids));
}
