#!/usr/bin/env python3
"""Float64 reference for SmoothQuant's smoothing scales on one norm -> q/k/v group.

Writes tests/fixtures/sq_scales.json, which tests/awq_smooth.rs compares quantlab against.
A NumPy transcription of mit-han-lab/smoothquant: `calibration.get_act_scales` (max |x| per
input channel over all calibration rows) and `smooth.smooth_ln_fcs_llama_like`
(weight maxima per column over all projections, floored at 1e-5;
s = act^alpha / w^(1-alpha), floored at 1e-5; norm weight / s, projection columns * s).

Usage: python3 scripts/smoothquant_reference.py
"""
import json
import os

import numpy as np

F32 = np.float32


def main():
    rng = np.random.default_rng(15)
    n, cols, outs = 64, 48, (48, 16, 16)  # q, k, v of a GQA block
    spread = np.exp(rng.normal(0, 0.5, cols))
    spread[[5, 29]] *= 40  # the activation outliers SmoothQuant migrates
    x = (rng.normal(0, 1, (n, cols)) * spread).astype(F32)
    x[:, 41] = 0  # a dead channel: scale floored
    ws = [rng.normal(0, 0.05, (o, cols)).astype(F32) for o in outs]
    ws[2][:, 7] = 0  # a column no projection uses: weight maximum floored
    norm = rng.uniform(0.5, 1.5, cols).astype(F32)
    act = np.abs(x.astype(np.float64)).max(0)
    wmax = np.maximum(np.max([np.abs(w.astype(np.float64)).max(0) for w in ws], 0), 1e-5)
    results = []
    for alpha in (0.25, 0.5, 0.75):
        s = np.maximum(act ** alpha / wmax ** (1 - alpha), 1e-5)
        results.append({
            "alpha": alpha,
            "scales": s.tolist(),
            "norm": (norm / s).tolist(),
            # Largest |activation| per channel after smoothing, and per-column weight max:
            # alpha 0.5 balances them (both sqrt(act * wmax)).
            "act_after": (act / s).tolist(),
            "w_after": (wmax * s).tolist(),
        })
    out = {
        "note": "scripts/smoothquant_reference.py: SmoothQuant scales, float64",
        "x": [[float(v) for v in r] for r in x],
        "weights": [[[float(v) for v in r] for r in w] for w in ws],
        "norm": [float(v) for v in norm],
        "results": results,
    }
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "sq_scales.json")
    with open(path, "w") as f:
        json.dump(out, f)
    print("wrote", path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
