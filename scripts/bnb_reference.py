#!/usr/bin/env python3
"""bitsandbytes reference for quantlab's NF4/FP4 and LLM.int8() (tests/bnb_reference.rs).

Runs bitsandbytes' own code on one small random layer and input and records, in
tests/fixtures/bnb_reference.json:
  - NF4 / FP4 `quantize_4bit` (blocksize 64, with and without double quant): packed codes,
    absmax (or its 8-bit codes, per-256 scales and offset);
  - `int8_vectorwise_quant` of the weight (CB, SCB) and of the input with threshold 6.0
    (CA, SCA, outlier columns);
  - the LLM.int8() output as `MatMul8bitLt.forward` computes it at inference
    (`int8_mixed_scaled_mm`: int8 part + outlier columns with the dequantized int8 weights),
    checked equal to `bnb.matmul(..., threshold=6.0)`;
  - a float64 NumPy evaluation of the same definition (codes from the rule, all arithmetic
    in f64) and, per output, the magnitude sum that scales rounding errors.

The weight, input and bias are fp16-exact (bitsandbytes casts both to fp16 first), with a
ragged shape (150 columns: the last 4-bit block is partial) and planted outlier columns.

BNB_DEVICE=cuda runs bitsandbytes' CUDA kernels instead of its CPU ones (the fixture
records which; on CPU, bitsandbytes 0.50.2 gives FP4 values below the smallest step the
opposite zero sign to its CUDA kernel, which the Rust test tolerates only for CPU fixtures).

Versions this was written against and run with (CPU, no GPU needed):
  bitsandbytes 0.50.2, torch 2.15.0, numpy 2.4.6, Python 3.11.
  python3 -m venv /tmp/bnbvenv && /tmp/bnbvenv/bin/pip install bitsandbytes==0.50.2 numpy
  /tmp/bnbvenv/bin/python scripts/bnb_reference.py
"""

import json
import os
import sys

import numpy as np
import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F

THRESHOLD = 6.0
BLOCKSIZE = 64
M, K, N = 7, 150, 24
DEVICE = os.environ.get("BNB_DEVICE", "cpu")
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "bnb_reference.json")


def fp16_exact(a):
    return torch.as_tensor(a, dtype=torch.float32).half().float()


def main():
    rng = np.random.default_rng(15)
    w = fp16_exact(rng.standard_normal((N, K)) * 0.05)
    x = fp16_exact(rng.standard_normal((M, K)))
    # Planted outliers: column 3 in one row, column 40 in every row, column 77 exactly at
    # the threshold (|x| >= 6 is an outlier), column 100 just below it (not an outlier).
    x[2, 3] = 9.5
    x[:, 40] = fp16_exact(-7.0 - np.arange(M, dtype=np.float64) * 0.75)
    x[5, 77] = 6.0
    x[1, 100] = -5.99609375  # fp16-exact, < 6
    bias = fp16_exact(rng.standard_normal(N) * 0.1)

    fixture = {
        "versions": {
            "bitsandbytes": bnb.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "device": DEVICE,
        "shape": [M, K, N],
        "threshold": THRESHOLD,
        "blocksize": BLOCKSIZE,
        "w": w.flatten().tolist(),
        "x": x.flatten().tolist(),
        "bias": bias.tolist(),
    }

    # NF4 / FP4, plain and double-quantized absmax.
    four = {}
    for qt in ("nf4", "fp4"):
        for dq in (False, True):
            packed, st = F.quantize_4bit(
                w.to(DEVICE), blocksize=BLOCKSIZE, quant_type=qt, compress_statistics=dq
            )
            packed, absmax = packed.cpu(), st.absmax.cpu()
            rec = {"packed": packed.flatten().tolist()}
            if dq:
                rec["absmax_codes"] = absmax.flatten().tolist()
                rec["absmax_scales"] = st.state2.absmax.cpu().flatten().tolist()
                rec["offset"] = float(st.offset)
                assert st.state2.blocksize == 256
            else:
                rec["absmax"] = absmax.flatten().tolist()
            four[qt + (":dq" if dq else "")] = rec
    fixture["fourbit"] = four

    # LLM.int8: MatMul8bitLt.forward's steps at inference.
    xh, wh, bh = (t.half().to(DEVICE) for t in (x, w, bias))
    cb, scb, _ = F.int8_vectorwise_quant(wh.clone())
    # Everything back on the CPU for recording and the NumPy check.
    to_cpu = lambda *ts: [t.cpu() if t is not None else None for t in ts]
    ca, sca, cols = F.int8_vectorwise_quant(xh.clone(), threshold=THRESHOLD)
    out, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm(xh, ca, cb, sca, scb, cols, bh)
    state = bnb.MatmulLtState()
    state.threshold = THRESHOLD
    state.has_fp16_weights = False
    state.is_training = False
    state.CB, state.SCB = cb, scb
    out2 = bnb.matmul(xh, None, state=state, threshold=THRESHOLD, bias=bh)
    assert torch.equal(out, out2), "int8_mixed_scaled_mm and bnb.matmul disagree"
    cb, scb, ca, sca, cols, out = to_cpu(cb, scb, ca, sca, cols, out)
    cols = sorted(int(c) for c in cols.tolist())
    fixture["int8"] = {
        "cb": cb.flatten().tolist(),
        "scb": scb.tolist(),
        "ca": ca.flatten().tolist(),
        "sca": sca.tolist(),
        "outlier_cols": cols,
        "out_fp16": out.float().flatten().tolist(),
    }

    # float64 definition (codes by the f32 rule bitsandbytes uses, then exact arithmetic).
    xn, wn, bn = x.numpy(), w.numpy(), bias.numpy().astype(np.float64)
    wamax = np.abs(wn).max(axis=1)
    # torch evaluates `127.0 / row_stats` as `row_stats.reciprocal() * 127` (in f32).
    mul = lambda amax: ((np.float32(1.0) / amax) * np.float32(127.0)).astype(np.float32)[:, None]
    wq = np.round(wn * mul(wamax)).astype(np.float64)
    flagged = (np.abs(xn) >= THRESHOLD).any(axis=0)
    assert sorted(np.nonzero(flagged)[0].tolist()) == cols, "outlier columns differ"
    xin = np.where(np.abs(xn) >= THRESHOLD, 0.0, xn).astype(np.float32)
    xamax = np.abs(xin).max(axis=1)
    xq = np.round(xin * mul(xamax)).astype(np.float64)
    xq[:, flagged] = 0
    assert np.array_equal(xq, ca.numpy()), "activation codes differ from the rule"
    assert np.array_equal(wq, cb.numpy()), "weight codes differ from the rule"
    s = xamax.astype(np.float64)[:, None] * wamax.astype(np.float64)[None, :] / 127.0**2
    int_part = s * (xq @ wq.T)
    wd = wq * wamax.astype(np.float64)[:, None] / 127.0
    xo = np.where(flagged[None, :], xn.astype(np.float64), 0.0)
    flt = xo @ wd.T
    y = int_part + flt + bn[None, :]
    mag = np.abs(int_part) + np.abs(xo) @ np.abs(wd).T + np.abs(bn)[None, :]
    fixture["f64"] = {"out": y.flatten().tolist(), "magnitude": mag.flatten().tolist()}
    err = np.abs(out.float().numpy() - y) / mag
    print(f"bnb fp16 vs f64 definition: max |diff| / magnitude = {err.max():.3e}", file=sys.stderr)

    with open(OUT, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
    print(f"wrote {os.path.normpath(OUT)} ({os.path.getsize(OUT)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
