#!/usr/bin/env python3
"""Records FP8 E4M3 (float8_e4m3fn) reference codes for tests/fixtures/fp8_e4m3.json.

ml_dtypes (JAX's float8 implementation, the same rounding as torch.float8_e4m3fn: round
to nearest, ties to even) casts the values after clamping to +-448, as torchao does before
its cast. Also records a per-channel quantized 4x40 matrix: scale = amax(row) / 448.

    pip install numpy ml_dtypes && python3 scripts/fp8_reference.py
"""
import json
import pathlib

import ml_dtypes
import numpy as np

rng = np.random.default_rng(0)
mag = 2.0 ** rng.uniform(-12, 10, 1500)
vals = (mag * rng.choice([-1.0, 1.0], 1500)).astype(np.float32)
# Exact midpoints between neighbouring codes (the ties) and out-of-range values.
codes = np.arange(0, 0x7F, dtype=np.uint8)
finite = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
mids = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)
vals = np.concatenate([vals, mids, -mids, np.float32([500, -1e9, 464, 448, 0.0])])
clamped = np.clip(vals, -448, 448)
ref = clamped.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)

w = rng.standard_normal((4, 40)).astype(np.float32)
w[2] *= 1e-3
scale = (np.abs(w).max(axis=1) / np.float32(448)).astype(np.float32)
wq = (w / scale[:, None]).astype(np.float32)
wcodes = np.clip(wq, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)

out = {
    "values_f32_bits": vals.view(np.uint32).tolist(),
    "codes": ref.tolist(),
    "matrix_f32_bits": w.reshape(-1).view(np.uint32).tolist(),
    "matrix_scale_f32_bits": scale.view(np.uint32).tolist(),
    "matrix_codes": wcodes.reshape(-1).tolist(),
    "generator": f"ml_dtypes {ml_dtypes.__version__}, numpy {np.__version__}",
}
path = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/fp8_e4m3.json"
path.write_text(json.dumps(out))
print(f"wrote {path} ({len(vals)} values)")
