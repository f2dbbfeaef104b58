#!/usr/bin/env python3
"""bitsandbytes' own kernels on a whole model: SmolLM2 perplexity with every linear layer of
the transformer blocks (lm_head kept, as quantlab's `lab bnb` rows do) replaced by
bitsandbytes' `Linear8bitLt` (LLM.int8(), threshold T) or `Linear4bit` (NF4/FP4, block 64),
on the same text and protocol as `quantlab perplexity` (llama.cpp chunks of --ctx tokens,
second half scored, no BOS). It answers: does bitsandbytes' LLM.int8() itself stay within
0.5% of f32 on this model, or is the gap a property of the method here?

Runs on the GPU machine (torch, transformers; bitsandbytes and gguf carried as wheels):

    PYTHONPATH=/tmp/site python3 scripts/bnb_gpu_perplexity.py --gguf M.gguf \
        --text wiki.test.raw --max-chunks 8 --out bnb.jsonl
"""
import argparse
import json
import math
import time

import torch
import bitsandbytes as bnb

from transformers_gpu_reference import load


def replace_linears(model, mode, threshold):
    """Swaps every nn.Linear under model.model.layers for its bitsandbytes counterpart."""
    for block in model.model.layers:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                w = child.weight.data.detach().to(torch.float16).cpu()
                if mode == "llm.int8":
                    q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=False,
                                            has_fp16_weights=False, threshold=threshold)
                    q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
                else:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                          compute_dtype=torch.float32, quant_type=mode)
                    q.weight = bnb.nn.Params4bit(child.weight.data.detach().float().cpu(),
                                                 requires_grad=False, quant_type=mode,
                                                 blocksize=64)
                setattr(parent, name, q.cuda())
    return model


@torch.no_grad()
def perplexity(model, ids, ctx, max_chunks):
    n = min(len(ids) // ctx, max_chunks) if max_chunks else len(ids) // ctx
    first = ctx // 2
    nll, scored = 0.0, 0
    t0 = time.perf_counter()
    for i in range(n):
        x = torch.tensor(ids[i * ctx:(i + 1) * ctx], dtype=torch.long).view(1, ctx).cuda()
        lp = torch.log_softmax(model(x).logits[:, first:ctx - 1].float(), dim=-1)
        tgt = x[:, first + 1:ctx]
        nll -= lp.gather(-1, tgt.unsqueeze(-1)).double().sum().item()
        scored += tgt.numel()
    return {"chunks": n, "scored": scored, "ppl": math.exp(nll / scored),
            "seconds": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-chunks", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[6.0, 3.0, 1.5, 0.0])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    runs = [("f32", None)] + [("llm.int8", t) for t in a.thresholds] + [("nf4", None), ("fp4", None)]
    for mode, thr in runs:
        tok, model = load(a.gguf, torch.float32)
        ids = tok(open(a.text, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
        if mode != "f32":
            replace_linears(model, mode, thr)
        for mc in a.max_chunks:
            row = {"tool": "bitsandbytes", "bnb": bnb.__version__, "torch": torch.__version__,
                   "gpu": torch.cuda.get_device_name(), "mode": mode, "threshold": thr,
                   "activations": "f32 model; bnb casts int8 inputs to fp16", "ctx": a.ctx}
            row.update(perplexity(model, ids, a.ctx, mc))
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
