#!/usr/bin/env python3
"""Float64 reference for AWQ's scale and clip searches on one layer group.

Writes tests/fixtures/awq_search.json, which tests/awq_smooth.rs compares quantlab against.
An independent NumPy transcription of AutoAWQ's `_search_best_scale` (duo scaling, 20
ratios, loss = mean squared error of the group's linear outputs on stored input rows) and
`_compute_best_clip` (per output row and weight group, shrink 1 .. 0.55 in steps of 1/20,
error = mean squared partial product of the group's inputs), with quantlab's uniform
quantizer (PyTorch convention) in float32 as quantlab and PyTorch run it; the rest
(activation means, weight means, scales, losses) is float64 on the stored input rows.
quantlab computes the same losses from the inputs' second moment XᵀX/N instead of the rows.

Usage: python3 scripts/awq_reference.py
"""
import json
import os

import numpy as np

F32 = np.float32
EPS = np.finfo(np.float32).eps


def qrange(bits, signed):
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def fake_quant(w, bits, signed, mode, gs):
    """quantlab's per-group quantize-dequantize (PyTorch observer convention), float32."""
    w = w.astype(F32)
    rows, cols = w.shape
    qmin, qmax = qrange(bits, signed)
    out = np.empty_like(w)
    for r in range(rows):
        for a in range(0, cols, gs):
            seg = w[r, a:a + gs]
            lo, hi = F32(min(seg.min(), 0)), F32(max(seg.max(), 0))
            if mode == "sym":
                amax = max(-lo, hi)
                scale = max(F32(amax / F32((qmax - qmin) / 2.0)), F32(EPS))
                zp = 0 if signed else (qmin + qmax + 1) // 2
            else:
                scale = max(F32((hi - lo) / F32(qmax - qmin)), F32(EPS))
                zp = int(np.clip(qmin - np.rint(F32(lo / scale)), qmin, qmax))
            inv = F32(F32(1.0) / scale)
            q = np.clip(np.rint(seg * inv) + F32(zp), qmin, qmax)
            out[r, a:a + gs] = (q - F32(zp)) * scale
    return out


def weight_mean(ws, gs):
    w = np.concatenate(ws, 0).astype(np.float64)
    rows, cols = w.shape
    m = np.empty_like(w)
    for a in range(0, cols, gs):
        seg = np.abs(w[:, a:a + gs])
        m[:, a:a + gs] = seg / (seg.max(1, keepdims=True) + 1e-6)
    return m.mean(0)


def search_scales(x, ws, q, n_grid=20):
    x_mean = np.abs(x).mean(0).astype(F32).astype(np.float64)  # quantlab keeps f32 means
    w_mean = weight_mean(ws, q["gs"])
    ref = [x @ w.astype(np.float64).T for w in ws]
    losses, best, best_loss, best_s = [], -1, np.inf, None
    for i in range(n_grid):
        r = i / n_grid
        s = np.maximum(x_mean ** r / (w_mean ** (1 - r) + 1e-4), 1e-4)
        s = (s / np.sqrt(s.max() * s.min())).astype(F32)
        err, n = 0.0, 0
        for w, y in zip(ws, ref):
            qw = fake_quant(w * s, **q) / s  # float32, as the Rust search
            err += ((x @ qw.astype(np.float64).T - y) ** 2).sum()
            n += y.size
        loss = err / n
        losses.append(loss)
        if loss < best_loss:
            best, best_loss, best_s = i, loss, s
    return best, losses, best_s


def search_clip(x, w, q, n_grid=20, max_shrink=0.5):
    w = w.astype(F32)
    rows, cols = w.shape
    gs = q["gs"]
    ng = -(-cols // gs)
    amax = np.array([[np.abs(w[r, g * gs:(g + 1) * gs]).max() for g in range(ng)] for r in range(rows)], F32)
    best_err = np.full((rows, ng), np.inf)
    best_shrink = np.ones((rows, ng), F32)
    for step in range(int(round(max_shrink * n_grid))):
        shrink = F32(1.0 - step / n_grid)
        c = w.copy()
        for r in range(rows):
            for g in range(ng):
                m = amax[r, g] * shrink
                c[r, g * gs:(g + 1) * gs] = np.clip(c[r, g * gs:(g + 1) * gs], -m, m)
        d = (fake_quant(c, **q) - w).astype(np.float64)
        for g in range(ng):
            sl = slice(g * gs, (g + 1) * gs)
            err = ((x[:, sl] @ d[:, sl].T) ** 2).mean(0)  # per row
            better = err < best_err[:, g]
            best_err[better, g] = err[better]
            best_shrink[better, g] = shrink
    return best_shrink


def main():
    rng = np.random.default_rng(14)
    n, cols, outs = 128, 40, (12, 20)
    # Inputs with a few outlier channels (what AWQ protects) and per-channel spread.
    spread = np.exp(rng.normal(0, 0.6, cols))
    spread[[3, 17, 30]] *= 12
    x = (rng.normal(0, 1, (n, cols)) * spread).astype(F32)
    ws = [(rng.normal(0, 0.05, (o, cols))).astype(F32) for o in outs]
    x64 = x.astype(np.float64)
    results = []
    for name, q in [
        ("i4:sym:g16", dict(bits=4, signed=True, mode="sym", gs=16)),
        ("u4:affine:g16", dict(bits=4, signed=False, mode="affine", gs=16)),
        ("i3:sym:g16", dict(bits=3, signed=True, mode="sym", gs=16)),
    ]:
        best, losses, s = search_scales(x64, ws, q)
        # Fold: weights' columns times s (f32), inputs divided by s; then clip each layer.
        shrinks = [search_clip(x64 / s.astype(np.float64), w * s, q).ravel().tolist() for w in ws]
        results.append({
            "scheme": name,
            "best": best,
            "losses": losses,
            "scales": s.astype(np.float64).tolist(),
            "shrink": shrinks,
        })
        print(name, "best ratio", best / 20, "loss", losses[best], "ratio 0", losses[0])
    out = {
        "note": "scripts/awq_reference.py: AutoAWQ scale + clip search, float64 (quantizer float32)",
        "x": [[float(v) for v in r] for r in x],
        "weights": [[[float(v) for v in r] for r in w] for w in ws],
        "results": results,
    }
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "awq_search.json")
    with open(path, "w") as f:
        json.dump(out, f)
    print("wrote", path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
