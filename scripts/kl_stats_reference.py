#!/usr/bin/env python3
"""Float64 NumPy reference for quantlab's KL statistics (src/eval/stats.rs) and paired
chunk bootstrap (src/eval/compare.rs).

Writes tests/fixtures/kl_stats_reference.json: seeded per-token arrays in ragged chunks
(two quantized runs A and B against one base), the statistics llama.cpp's
`llama-perplexity --kl-divergence` prints (tools/perplexity/perplexity.cpp) computed from
their definitions, and bootstrap intervals for a fixed list of resample indices that the
Rust test passes to its own bootstrap. Written independently of the Rust code: the
definitions are re-derived here from llama.cpp's formulas.

Run: python3 scripts/kl_stats_reference.py
"""
import json
import pathlib

import numpy as np

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/kl_stats_reference.json"


def mean_err(x):
    """llama.cpp mean_and_uncertainty: sqrt(population var / (n-1)), 0 for n <= 10."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    m = x.mean()
    var = np.mean((x - m) ** 2)
    err = np.sqrt(var / (n - 1)) if (var > 0 and n > 10) else 0.0
    return float(m), float(err)


def cov_of_means(a, b):
    n = a.size
    if n < 10:
        return 0.0
    return float(np.mean((a - a.mean()) * (b - b.mean())) / (n - 1))


KL_P = [0.999, 0.99, 0.95, 0.90, 0.10, 0.05, 0.01, 0.001]
DP_P = [0.999, 0.99, 0.95, 0.90, 0.75, 0.25, 0.10, 0.05, 0.01, 0.001]


def dist(v, fr):
    return {
        "max": float(np.max(v)),
        "percentiles": [[f, float(np.percentile(v, 100 * f))] for f in fr],
        "median": float(np.median(v)),
        "min": float(np.min(v)),
    }


def chunk_se(sums, counts):
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    c = sums.size
    m = sums.sum() / counts.sum()
    nbar = counts.sum() / c
    return float(np.sqrt(np.sum((sums - m * counts) ** 2) / (c * (c - 1))) / nbar)


def summary(chunks):
    nll = np.concatenate([c["nll"] for c in chunks])
    nb = np.concatenate([c["nll_base"] for c in chunks])
    kl = np.concatenate([c["kl"] for c in chunks])
    top = np.concatenate([c["same_top"] for c in chunks]).astype(np.float64)
    dp = np.exp(-nll) - np.exp(-nb)
    n = nll.size
    q = mean_err(nll)
    b = mean_err(nb)
    cov = cov_of_means(nll, nb)
    ppl_q = (np.exp(q[0]), np.exp(q[0]) * q[1])
    ppl_b = (np.exp(b[0]), np.exp(b[0]) * b[1])
    lr = (q[0] - b[0], np.sqrt(q[1] ** 2 + b[1] ** 2 - 2 * cov))
    ratio = (np.exp(lr[0]), np.exp(lr[0]) * lr[1])
    diff = (ppl_q[0] - ppl_b[0], np.sqrt(ppl_q[1] ** 2 + ppl_b[1] ** 2 - 2 * ppl_q[0] * ppl_b[0] * cov))
    mse = mean_err(dp ** 2)
    rms = np.sqrt(mse[0])
    same = top.mean()
    counts = [len(c["nll"]) for c in chunks]
    return {
        "tokens": int(n),
        "ppl_q": list(map(float, ppl_q)),
        "ppl_base": list(map(float, ppl_b)),
        # Pearson r of the per-token NLLs, straight from NumPy (llama.cpp's Cor).
        "cor": float(np.corrcoef(nll, nb)[0, 1]),
        "ln_ratio": list(map(float, lr)),
        "ratio": list(map(float, ratio)),
        "diff": list(map(float, diff)),
        "kl": list(mean_err(kl)),
        "kl_dist": dist(kl, KL_P),
        "kl_chunk_se": chunk_se([np.sum(c["kl"]) for c in chunks], counts),
        "dp": list(mean_err(dp)),
        "dp_dist": dist(dp, DP_P),
        "dp_rms": [float(rms), float(0.5 / rms * mse[1])],
        "same_top": [float(same), float(np.sqrt(same * (1 - same) / (n - 1)))],
        "nll_chunk_se": chunk_se([np.sum(c["nll"]) for c in chunks], counts),
    }


def bootstrap(sa, sb, counts, stat, indices, conf):
    sa, sb, counts = map(lambda x: np.asarray(x, dtype=np.float64), (sa, sb, counts))
    d = []
    for idx in indices:
        idx = np.asarray(idx)
        n = counts[idx].sum()
        d.append(stat(sb[idx].sum(), n) - stat(sa[idx].sum(), n))
    d = np.asarray(d)
    tail = (1 - conf) / 2
    n = counts.sum()
    return {
        "a": float(stat(sa.sum(), n)),
        "b": float(stat(sb.sum(), n)),
        "ci": [float(np.percentile(d, 100 * tail)), float(np.percentile(d, 100 * (1 - tail)))],
        "share_negative": float(np.mean(d < 0)),
    }


def main():
    rng = np.random.default_rng(16)
    sizes = [37, 50, 41, 50, 23, 50, 12]
    base_nll = [rng.gamma(2.0, 1.5, s) for s in sizes]

    def run(noise, bias):
        chunks = []
        for nb in base_nll:
            s = nb.size
            nll = np.maximum(nb + rng.normal(bias, noise, s), 1e-4)
            kl = rng.gamma(1.2, noise, s)
            top = rng.random(s) > 4 * noise
            chunks.append({"nll": nll, "nll_base": nb, "kl": kl, "same_top": top})
        return chunks

    a = run(0.05, 0.01)
    b = run(0.15, 0.08)
    counts = sizes
    indices = rng.integers(0, len(sizes), size=(300, len(sizes)))
    conf = 0.9

    def sums(ch, key):
        return [float(np.sum(c[key])) for c in ch]

    boot = {
        "ppl": bootstrap(sums(a, "nll"), sums(b, "nll"), counts, lambda s, n: np.exp(s / n), indices, conf),
        "nll": bootstrap(sums(a, "nll"), sums(b, "nll"), counts, lambda s, n: s / n, indices, conf),
        "kl": bootstrap(sums(a, "kl"), sums(b, "kl"), counts, lambda s, n: s / n, indices, conf),
    }
    enc = lambda ch: [
        {
            "nll": c["nll"].tolist(),
            "nll_base": c["nll_base"].tolist(),
            "kl": c["kl"].tolist(),
            "same_top": c["same_top"].astype(bool).tolist(),
        }
        for c in ch
    ]
    out = {
        "note": "generated by scripts/kl_stats_reference.py (float64 NumPy)",
        "run_a": enc(a),
        "run_b": enc(b),
        "summary_a": summary(a),
        "summary_b": summary(b),
        "bootstrap": {"indices": indices.tolist(), "confidence": conf, **boot},
    }
    OUT.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
