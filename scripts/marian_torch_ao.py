#!/usr/bin/env python3
"""torch.ao dynamic quantization of the shared MarianMT model, for comparison with
`quantlab lab marian` (the lab's own recipe: quantize_dynamic({nn.Linear}), CPU).

Prints BLEU/chrF on Multi30k test_2016_flickr (beam 4, max_new_tokens=128, batches of 32)
and the size of the saved state_dict, for fp32, dynamic int8 and dynamic fp16.
Run on a machine with torch + transformers + sacrebleu (the GPU machine's CPU here).

Usage: marian_torch_ao.py MODEL_DIR MULTI30K_DIR
"""
import gzip
import io
import os
import sys
import time

import sacrebleu
import torch
from transformers import MarianMTModel, MarianTokenizer

model_dir, m30k = sys.argv[1:3]
torch.set_num_threads(min(16, os.cpu_count() or 1))
lines = lambda n: [l.rstrip("\n") for l in gzip.open(os.path.join(m30k, n), "rt", encoding="utf-8")]
en, de = lines("test_2016_flickr.en.gz"), lines("test_2016_flickr.de.gz")
tok = MarianTokenizer.from_pretrained(model_dir)
for name, dtype in [("fp32", None), ("dynamic int8", torch.qint8), ("dynamic fp16", torch.float16)]:
    model = MarianMTModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    if dtype is not None:
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=dtype)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    start, out = time.time(), []
    for i in range(0, len(en), 32):
        enc = tok(en[i : i + 32], return_tensors="pt", padding=True)
        with torch.no_grad():
            g = model.generate(**enc, num_beams=4, max_new_tokens=128)
        out += tok.batch_decode(g, skip_special_tokens=True)
    secs = time.time() - start
    b = sacrebleu.corpus_bleu(out, [de])
    c = sacrebleu.corpus_chrf(out, [de])
    print(f"{name}: BLEU {b.score:.2f} chrF {c.score:.2f} size {len(buf.getvalue())/1e6:.2f} MB "
          f"samples/s {len(en)/secs:.1f} ({torch.get_num_threads()} threads) | {b}")
