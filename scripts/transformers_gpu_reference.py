#!/usr/bin/env python3
"""transformers on the same GPU, text and protocol as `quantlab perplexity` / `generate`:
perplexity throughput (llama.cpp chunks of --ctx tokens, second half scored, no BOS,
--batch chunks per forward) and greedy decode tokens/s at batch 1, in bf16 and f32.

Runs on the GPU machine (torch, transformers there; carry the `gguf` wheel for the GGUF
loader). SmolLM2's tokenizer splits digits before the GPT-2 byte-level regex; transformers'
GGUF loader forgets that, so it is put back here (see ../shared/data/README.md).

    python3 scripts/transformers_gpu_reference.py --gguf M.gguf --text wiki.test.raw \
        --dtype bf16 --batch 16 --out ref.jsonl
"""
import argparse
import json
import math
import os
import time

import torch
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer


def load(gguf, dtype):
    d, f = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
    return tok, model.cuda().eval()


@torch.no_grad()
def perplexity(model, ids, ctx, batch, max_chunks):
    n = len(ids) // ctx
    if max_chunks:
        n = min(n, max_chunks)
    first = ctx // 2
    chunks = torch.tensor(ids[: n * ctx], dtype=torch.long).view(n, ctx)
    nll, scored = 0.0, 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        x = chunks[i : i + batch].cuda()
        logits = model(x).logits[:, first : ctx - 1].float()
        lp = torch.log_softmax(logits, dim=-1)
        tgt = x[:, first + 1 : ctx]
        nll -= lp.gather(-1, tgt.unsqueeze(-1)).sum().item()
        scored += tgt.numel()
    torch.cuda.synchronize()
    s = time.perf_counter() - t0
    return {"chunks": n, "scored": scored, "ppl": math.exp(nll / scored), "seconds": s,
            "tokens_per_s": n * ctx / s}


@torch.no_grad()
def decode(model, prompt, new_tokens):
    x = torch.tensor([prompt], dtype=torch.long).cuda()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model(x, use_cache=True)
    past = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return {"prefill_tokens": len(prompt), "prefill_s": t1 - t0, "decode_tokens": new_tokens,
            "decode_tokens_per_s": new_tokens / (t2 - t1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-chunks", type=int, default=0)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[a.dtype]
    tok, model = load(a.gguf, dtype)
    ids = tok(open(a.text, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
    perplexity(model, ids, a.ctx, a.batch, 2)  # warm-up (kernels, allocator)
    row = {"tool": "transformers", "version": __import__("transformers").__version__,
           "torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "dtype": a.dtype,
           "ctx": a.ctx, "batch": a.batch, "text_tokens": len(ids)}
    row.update(perplexity(model, ids, a.ctx, a.batch, a.max_chunks))
    decode(model, ids[:16], 8)  # warm-up
    row.update(decode(model, ids[:128], a.decode_tokens))
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
