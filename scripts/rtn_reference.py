#!/usr/bin/env python3
"""Float64 references for the round-to-nearest variants, on one small random layer.

Writes tests/fixtures/rtn_reference.json, which tests/rtn_hqq_reference.rs compares
against quantlab's f32 implementations:

* signed-max (llama.cpp's quantize_row_q4_0_ref rule at 4 and 3 bits): the group's
  largest-magnitude weight m (first on equal magnitudes), d = m / -2^(b-1),
  code = min(2^b - 1, floor(x/d + 2^(b-1) + 1/2)) - 2^(b-1)  (round half up);
* the MSE clipping search: per group, for alpha in 1.00, 0.99, ..., 0.20, PyTorch's
  (scale, zero point) of the range [alpha*min(lo,0), alpha*max(hi,0)], codes
  clamp(round_half_even(x/s) + z), squared error sum (x - (q - z) s)^2 (or, for the
  ":x2" entry, weighted by x^2 as llama.cpp's make_qx_quants does); the table of
  errors within 1e-4 of the best is stored so the test can accept another factor whose
  error ties with the best one within f32 rounding;
* tie counts of PyTorch's symmetric scale (s = max|x| / 7.5 in f32) with the correctly
  rounded f32 quotient x / s, and how many codes x * (1/s) and x / s disagree on.

The grid choice is justified by `--grid-study`: the MSE-optimal shrink factor of
64-weight groups of Gaussian, Laplace and Student-t(3) samples at 2/3/4/8 bits.

Usage: python3 scripts/rtn_reference.py [--grid-study]
"""
import json
import os
import sys

import numpy as np

ROWS, COLS, GROUP = 8, 200, 64  # ragged: the last group of each row holds 8 weights
SEED = 20261124
GRID = [1.0 - i / 100.0 for i in range(81)]
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "rtn_reference.json")


def weights():
    rng = np.random.default_rng(SEED)
    # Heavy-tailed like LLM weights, a few outliers.
    w = rng.standard_t(4, size=(ROWS, COLS)) * 0.02
    w[1, 5] = 0.4
    w[6, 190] = -0.3
    return w.astype(np.float32)


def groups(cols, group):
    return [(k, min(k + group, cols)) for k in range(0, cols, group)]


def signed_max(w, bits):
    half = 2 ** (bits - 1)
    codes, scales, near = [], [], []
    for row in w.astype(np.float64):
        crow = []
        for a, b in groups(COLS, GROUP):
            g = row[a:b]
            m = g[int(np.argmax(np.abs(g)))]  # argmax: first of equal magnitudes
            d = m / -half
            scales.append(d)
            for x in g:
                v = x / d if d != 0 else 0.0
                crow.append(int(min(2 ** bits - 1, np.floor(v + half + 0.5))) - half)
                near.append(bool(abs((v - np.floor(v)) - 0.5) < 1e-5))
        codes.append(crow)
    return codes, scales, [i for i, n in enumerate(near) if n]


def round_half_even(x):
    return np.round(x)  # numpy rounds half to even


def pytorch_params(lo, hi, bits, signed, mode):
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    eps = float(np.finfo(np.float32).eps)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if mode == "sym":
        s = max(max(-lo, hi) / ((qmax - qmin) / 2.0), eps)
        z = 0 if signed else (qmin + qmax + 1) // 2
    else:
        s = max((hi - lo) / (qmax - qmin), eps)
        z = int(min(max(qmin - round_half_even(lo / s), qmin), qmax))
    return s, z, qmin, qmax


def clip_search(w, bits, signed, mode, x2=False):
    w = w.astype(np.float64)
    errors, best, codes, near = [], [], [], []
    for row in w:
        for a, b in groups(COLS, GROUP):
            g = row[a:b]
            errs = []
            for alpha in GRID:
                s, z, qmin, qmax = pytorch_params(alpha * g.min(), alpha * g.max(), bits, signed, mode)
                q = np.clip(round_half_even(g / s) + z, qmin, qmax)
                weight = g ** 2 if x2 else 1.0  # llama.cpp make_qx_quants' rmse_type 1
                errs.append(float(np.sum(weight * (g - (q - z) * s) ** 2)))
            i = int(np.argmin(errs))  # first minimum: the larger range on ties
            best.append(i)
            # Candidates whose error is within 1e-4 (relative) of the best: f32 arithmetic
            # may pick any of them; the others are far beyond its rounding.
            errors.append([[j, e] for j, e in enumerate(errs) if e <= errs[i] * (1 + 1e-4) + 1e-30])
            s, z, qmin, qmax = pytorch_params(GRID[i] * g.min(), GRID[i] * g.max(), bits, signed, mode)
            v = g / s
            codes.extend(int(c) for c in np.clip(round_half_even(v) + z, qmin, qmax))
            near.extend(bool(abs((t - np.floor(t)) - 0.5) < 1e-5) for t in v)
    near = [i for i, n in enumerate(near) if n]
    return {"best": best, "errors": errors, "codes": codes, "near_ties": near}


def pytorch_sym_ties(w, bits):
    """Ties of PyTorch's symmetric per-group scale, in f32 as PyTorch computes it."""
    half_range = np.float32((2 ** bits - 1) / 2.0)
    ties, flips = 0, 0
    for row in w:
        for a, b in groups(COLS, GROUP):
            g = row[a:b]
            amax = np.float32(max(-min(g.min(), 0), max(g.max(), 0)))
            s = np.maximum(amax / half_range, np.finfo(np.float32).eps).astype(np.float32)
            v = (g / s).astype(np.float32)  # correctly rounded f32 quotient
            ties += int(np.sum(v - np.floor(v) == 0.5))
            inv = np.float32(1.0) / s
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            qa = np.clip(np.round((g * inv).astype(np.float32)), lo, hi)
            qb = np.clip(np.round(v), lo, hi)
            flips += int(np.sum(qa != qb))
    return ties, flips


def grid_study():
    rng = np.random.default_rng(0)
    for name, draw in [
        ("gauss", lambda n: rng.standard_normal(n)),
        ("laplace", lambda n: rng.laplace(size=n)),
        ("t3", lambda n: rng.standard_t(3, size=n)),
    ]:
        x = draw((600, 64))
        for bits in [2, 3, 4, 8]:
            for mode in ["sym", "affine"]:
                best = []
                for g in x:
                    errs = []
                    for alpha in [i / 100 for i in range(100, 9, -1)]:
                        s, z, qmin, qmax = pytorch_params(alpha * g.min(), alpha * g.max(), bits, mode == "sym", mode)
                        q = np.clip(round_half_even(g / s) + z, qmin, qmax)
                        errs.append(np.sum((g - (q - z) * s) ** 2))
                    best.append(1.0 - int(np.argmin(errs)) / 100)
                best = np.array(best)
                print(f"{name:8s} {bits} bits {mode:6s}: optimal factor median {np.median(best):.2f}, 1st percentile {np.percentile(best, 1):.2f}, min {best.min():.2f}")


def main():
    if "--grid-study" in sys.argv:
        grid_study()
        return
    w = weights()
    out = {
        "seed": SEED,
        "rows": ROWS,
        "cols": COLS,
        "group": GROUP,
        "weights": [float(v) for v in w.flatten()],
        "grid": GRID,
        "signed_max": {},
        "clip": {},
        "pytorch_sym_ties": {},
    }
    for bits in [4, 3]:
        codes, scales, near = signed_max(w, bits)
        out["signed_max"][f"i{bits}"] = {
            "codes": [c for row in codes for c in row],
            "scale": scales,
            "near_ties": near,
        }
    for spec, bits, signed, mode in [("i4:sym", 4, True, "sym"), ("u3:affine", 3, False, "affine"), ("i2:sym", 2, True, "sym")]:
        out["clip"][spec] = clip_search(w, bits, signed, mode)
    out["clip"]["i3:sym:x2"] = clip_search(w, 3, True, "sym", x2=True)
    for bits in [4, 3]:
        ties, flips = pytorch_sym_ties(w, bits)
        out["pytorch_sym_ties"][f"i{bits}"] = {"ties": ties, "mul_vs_div_code_flips": flips}
    with open(OUT, "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")
    for k, v in out["pytorch_sym_ties"].items():
        print(f"PyTorch sym {k} g{GROUP}: {v['ties']} ties, {v['mul_vs_div_code_flips']} codes differ between x*(1/s) and x/s")


if __name__ == "__main__":
    main()
