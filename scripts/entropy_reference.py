#!/usr/bin/env python3
"""Independent float64 reference for quantlab's entropy (KL) calibration.

Follows the TensorRT / NVIDIA pytorch-quantization recipe: for each candidate threshold
bin i >= levels, P = hist[:i] with the outlier mass folded into bin i-1; Q = hist[:i]
merged into `levels` bins (the last takes the remainder) and spread evenly over P's
non-empty bins; pick the i with the smallest KL(P||Q), the last one on ties.

Prints the chosen bin for the fixed histogram used in quantlab's test
`quant::observer::tests::entropy_matches_python_reference`. Pure Python, no numpy.
"""
import math


def histogram():
    # A decaying bulk with a bump and a far outlier, 2048 bins.
    h = [float(int(1000.0 * math.exp(-i / 150.0))) for i in range(2048)]
    for i in range(300, 320):
        h[i] += 40.0
    h[2000] += 3.0
    return h


def threshold(hist, levels):
    n = len(hist)
    best = (math.inf, n)
    for i in range(levels, n + 1):
        p = hist[:i]
        p[i - 1] += sum(hist[i:])
        merged = i // levels
        q = [0.0] * i
        for j in range(levels):
            start = j * merged
            stop = i if j == levels - 1 else start + merged
            mass = sum(hist[start:stop])
            nz = sum(1 for v in p[start:stop] if v != 0)
            if nz:
                for k in range(start, stop):
                    if p[k] != 0:
                        q[k] = mass / nz
        sp, sq = sum(p), sum(q)
        kl = 0.0
        for k in range(i):
            if p[k] > 0:
                pk, qk = p[k] / sp, q[k] / sq
                kl += pk * math.log(pk / qk) if qk > 0 else math.inf
        if kl <= best[0]:
            best = (kl, i)
    return best


if __name__ == "__main__":
    kl, i = threshold(histogram(), 128)
    print(f"levels=128 chosen_bin={i} kl={kl!r}")
