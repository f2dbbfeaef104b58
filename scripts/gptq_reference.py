#!/usr/bin/env python3
"""Float64 NumPy GPTQ (Frantar et al. 2022, Algorithm 1) on one small random layer, written
from the paper and the reference code's documented behaviour, independent of quantlab's
Rust. Writes tests/fixtures/gptq_reference.safetensors, which
`quant::gptq::tests::matches_the_numpy_reference` compares against.

The layer: W [48, 160], calibration inputs X [256, 160] (f16 values, so both sides start
from the same numbers) with loud and correlated channels and one dead input.
H = 2/N · XᵀX in float64. For each configuration: codes, scales, zero points, the output
error ‖XWᵀ − XŴᵀ‖²_F of GPTQ and of round-to-nearest, and the positions where a code was
decided within 1e-3 of a rounding tie (there an independent implementation may differ).

Algorithm (per the paper and IST-DASLab gptq.py):
  * dead inputs (H_ii = 0): H_ii = 1, W[:, i] = 0;
  * act-order: static groups fitted on W before the pass, then columns permuted by
    descending diag(H) (stable order for equal diagonals);
  * H += damp · mean(diag H) · I; Hinv = upper Cholesky factor of H⁻¹;
  * blocks of B columns: inside a block each column is quantized and its scaled error
    (w − q) / Hinv_ii is subtracted from the block's later columns; at the block's end the
    block's errors update all later columns at once;
  * without act-order a group's parameters are fitted when its first column comes up, on
    W as it stands at the start of the current block (the reference reads W, not W1).

Grid (quantlab's PyTorch convention, in float32): symmetric signed scale max|x| / ((qmax −
qmin) / 2); affine scale (max − min) / (qmax − qmin) over a range holding 0, zero point
qmin − round_half_even(min / scale); scale at least float32 eps; code = clamp(
round_half_even(x · (1 / scale)) + zero, qmin, qmax), value (code − zero) · scale.

Run: python3 scripts/gptq_reference.py   (numpy only; about a second)
"""

import json
import os
import struct

import numpy as np

F32 = np.float32
ROWS, COLS, N = 48, 160, 256
GROUP, BLOCK, DAMP = 32, 64, 0.01
CONFIGS = [
    # name, bits, signed, symmetric, act_order
    ("i4_sym_g32", 4, True, True, False),
    ("i4_sym_g32_act", 4, True, True, True),
    ("i3_sym_g32", 3, True, True, False),
    ("i3_sym_g32_act", 3, True, True, True),
    ("u4_affine_g32", 4, False, False, False),
]
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "gptq_reference.safetensors")


def qrange(bits, signed):
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def fit(v, bits, signed, sym):
    """(scale, zero) per row of v [rows, k] (float64 values, fitted on their float32 range)."""
    qmin, qmax = qrange(bits, signed)
    v = v.astype(F32)
    lo = np.minimum(v.min(axis=1), F32(0))
    hi = np.maximum(v.max(axis=1), F32(0))
    eps = np.finfo(F32).eps
    if sym:
        amax = np.maximum(-lo, hi)
        scale = np.maximum(amax / F32((qmax - qmin) / 2.0), F32(eps)).astype(F32)
        zero = np.full(v.shape[0], 0 if signed else (qmin + qmax + 1) // 2, dtype=np.int64)
    else:
        scale = np.maximum((hi - lo) / F32(qmax - qmin), F32(eps)).astype(F32)
        zero = qmin - np.rint((lo / scale).astype(F32)).astype(np.int64)
        zero = np.clip(zero, qmin, qmax)
    return scale, zero


def quant(x, scale, zero, bits, signed):
    """Codes and float32 values of x [rows] with per-row (scale, zero)."""
    qmin, qmax = qrange(bits, signed)
    inv = (F32(1.0) / scale).astype(F32)
    t = (x.astype(F32) * inv).astype(F32)
    q = np.clip(np.rint(t) + zero.astype(F32), qmin, qmax).astype(F32)
    margin = np.abs(np.abs(t - np.floor(t)) - F32(0.5))
    deq = ((q - zero.astype(F32)) * scale).astype(F32)
    return q.astype(np.int64), deq, margin


def rtn(w, bits, signed, sym):
    codes = np.zeros(w.shape, dtype=np.int64)
    deq = np.zeros(w.shape)
    for g0 in range(0, w.shape[1], GROUP):
        s, z = fit(w[:, g0:g0 + GROUP], bits, signed, sym)
        for c in range(g0, min(g0 + GROUP, w.shape[1])):
            codes[:, c], deq[:, c], _ = quant(w[:, c], s, z, bits, signed)
    return codes, deq


def gptq(w, h, bits, signed, sym, act_order):
    rows, cols = w.shape
    ng = (cols + GROUP - 1) // GROUP
    w = w.astype(np.float64).copy()
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scales = np.zeros((rows, ng), dtype=F32)
    zeros = np.zeros((rows, ng), dtype=np.int64)
    if act_order:
        for g in range(ng):
            scales[:, g], zeros[:, g] = fit(w[:, g * GROUP:(g + 1) * GROUP], bits, signed, sym)
        perm = np.argsort(-np.diag(h), kind="stable")
    else:
        perm = np.arange(cols)
    w = w[:, perm]
    h = h[perm][:, perm]
    h[np.diag_indices(cols)] += DAMP * np.mean(np.diag(h))
    lower = np.linalg.cholesky(h)
    linv = np.linalg.inv(lower)
    hinv = np.linalg.cholesky(linv.T @ linv).T  # upper: H⁻¹ = Uᵀ U

    codes = np.zeros((rows, cols), dtype=np.int64)
    deqs = np.zeros((rows, cols))
    near = []
    loss = 0.0
    s_cur = z_cur = None
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros((rows, i2 - i1))
        for i in range(i2 - i1):
            col = i1 + i
            orig = perm[col]
            if act_order:
                s_cur, z_cur = scales[:, orig // GROUP], zeros[:, orig // GROUP]
            elif col % GROUP == 0:
                # W (not w1): the weights as they stood when this block started.
                s_cur, z_cur = fit(w[:, col:col + GROUP], bits, signed, sym)
                scales[:, col // GROUP], zeros[:, col // GROUP] = s_cur, z_cur
            x = w1[:, i]
            q, deq, margin = quant(x, s_cur, z_cur, bits, signed)
            codes[:, orig] = q
            deqs[:, orig] = deq
            for r in np.nonzero(margin < 1e-3)[0]:
                near.append((int(r), int(orig)))
            d = hinv[col, col]
            e = (x - deq.astype(np.float64)) / d
            loss += float(np.sum((x - deq) ** 2) / d ** 2 / 2)
            w1[:, i:] -= np.outer(e, hinv[col, col:i2])
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, deqs, scales, zeros, loss, near


def output_error(x, w, wq):
    d = x @ (w - wq).T
    return float(np.sum(d * d))


def write_safetensors(path, tensors, meta):
    header, blobs, off = {"__metadata__": meta}, [], 0
    for name, (dtype, arr) in tensors.items():
        b = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def main():
    rng = np.random.default_rng(14)
    z = rng.standard_normal((N, COLS))
    mix = np.eye(COLS) + 0.3 * rng.standard_normal((COLS, COLS)) / np.sqrt(COLS)
    x = z @ mix
    x[:, ::17] *= 12.0  # loud channels
    x[:, 7] = 0.0  # a dead input
    x = x.astype(np.float16)
    w = (0.05 * rng.standard_normal((ROWS, COLS))).astype(F32)
    w[rng.random((ROWS, COLS)) < 0.01] *= 8.0  # outlier weights
    xd = x.astype(np.float64)
    h = 2.0 / N * (xd.T @ xd)

    tensors = {"x": ("F16", x.view(np.uint16).astype("<u2")), "w": ("F32", w.astype("<f4"))}
    meta = {"group": str(GROUP), "block": str(BLOCK), "damp": str(DAMP)}
    for name, bits, signed, sym, act in CONFIGS:
        codes, deq, scales, zeros, loss, near = gptq(w, h, bits, signed, sym, act)
        _, rtn_deq = rtn(w.astype(np.float64), bits, signed, sym)
        e_gptq = output_error(xd, w.astype(np.float64), deq)
        e_rtn = output_error(xd, w.astype(np.float64), rtn_deq)
        tensors[f"{name}.codes"] = ("I8", codes.astype("i1"))
        tensors[f"{name}.scale"] = ("F32", scales.astype("<f4"))
        tensors[f"{name}.zero"] = ("I16", zeros.astype("<i2"))
        tensors[f"{name}.near_ties"] = ("I32", np.array(near, dtype="<i4").reshape(-1, 2))
        meta[name] = json.dumps({"bits": bits, "signed": signed, "sym": sym, "act_order": act,
                                 "err_gptq": e_gptq, "err_rtn": e_rtn, "loss": loss})
        print(f"{name:16} output error GPTQ {e_gptq:.5g}  RTN {e_rtn:.5g}  ratio {e_gptq / e_rtn:.3f}"
              f"  loss {loss:.5g}  near-ties {len(near)}")
    write_safetensors(OUT, tensors, meta)
    print(f"wrote {os.path.normpath(OUT)} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
