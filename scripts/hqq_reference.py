#!/usr/bin/env python3
"""Float64 reference of HQQ's proximal solver on one small random layer.

Writes tests/fixtures/hqq_reference.json, which tests/rtn_hqq_reference.rs compares with
quantlab's f32 solver (src/quant/hqq.rs). The algorithm is mobiusml/hqq's default path,
re-derived here in float64 NumPy (read from hqq/core/quantize.py `Quantizer.quantize` and
hqq/core/optimize.py `optimize_weights_proximal_legacy`; not copied):

  groups of `group` consecutive weights of a row (axis=1)
  s = min((2^b - 1) / (max - min), 2e4)     inverse scale, fixed
  z = -min * s, rounded (half to even) for 4 bits only   (round_zero default)
  beta = 10; repeat up to 20 times:
      q  = clip(round(W s + z), 0, 2^b - 1)
      Wr = (q - z) / s
      We = sign(W - Wr) * relu(|W - Wr| - |W - Wr|^(p-1) / beta),   p = 0.7
      z  = mean_group(q - (W - We) s);  beta *= 1.01
      err = mean |W - Wr| over the layer (before this update); stop at the first
            iteration that does not improve it (keeping the zero just computed)
  q = clip(round(W s + z)); stored scale 1/s, zero z

Usage: python3 scripts/hqq_reference.py
"""
import json
import os

import numpy as np

ROWS, COLS, GROUP = 8, 256, 64
SEED = 20261125
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hqq_reference.json")


def weights():
    rng = np.random.default_rng(SEED)
    w = rng.standard_t(4, size=(ROWS, COLS)) * 0.02
    w[2, 17] = 0.35
    w[5, 200] = -0.25
    return w.astype(np.float32)


def hqq(w, bits, group, lp_norm=0.7, beta=10.0, kappa=1.01, iters=20):
    W = w.astype(np.float64).reshape(-1, group)
    lo = W.min(axis=1, keepdims=True)
    hi = W.max(axis=1, keepdims=True)
    max_v = 2 ** bits - 1
    with np.errstate(divide="ignore"):
        s = np.minimum(max_v / (hi - lo), 2e4)
    z = -lo * s
    if bits == 4:
        z = np.round(z)
    best = 1e4
    errors = []
    for _ in range(iters):
        q = np.clip(np.round(W * s + z), 0, max_v)
        r = (q - z) / s
        d = W - r
        with np.errstate(divide="ignore"):
            shrink = np.sign(d) * np.maximum(np.abs(d) - np.power(np.abs(d), lp_norm - 1) / beta, 0.0)
        z = np.mean(q - (W - shrink) * s, axis=1, keepdims=True)
        beta *= kappa
        err = float(np.mean(np.abs(d)))
        errors.append(err)
        if err < best:
            best = err
        else:
            break
    v = W * s + z
    q = np.clip(np.round(v), 0, max_v)
    frac = v - np.floor(v)
    near = np.flatnonzero(np.abs(frac - 0.5) < 1e-4)
    return {
        "codes": [int(c) for c in q.flatten()],
        "scale": [float(x) for x in (1.0 / s).flatten()],
        "zero": [float(x) for x in z.flatten()],
        "iterations": len(errors),
        "errors": errors,
        "near_ties": [int(i) for i in near],
    }


def main():
    w = weights()
    out = {"seed": SEED, "rows": ROWS, "cols": COLS, "group": GROUP, "weights": [float(v) for v in w.flatten()], "bits": {}}
    for bits in [4, 3, 2]:
        out["bits"][str(bits)] = hqq(w, bits, GROUP)
    with open(OUT, "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")
    for b, r in out["bits"].items():
        print(f"{b} bits: {r['iterations']} iterations, mean |W - W_r| {r['errors'][0]:.6g} -> {min(r['errors']):.6g}, {len(r['near_ties'])} near ties")


if __name__ == "__main__":
    main()
