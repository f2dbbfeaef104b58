#!/usr/bin/env python3
"""Independent reference numbers for the SmolLM2 GGUF, from Hugging Face transformers.

Run on the GPU machine (transformers + torch there; carry the `gguf` wheel). It writes one
JSON file that quantlab's tests compare against:

- tokenizer: transformers' GGUF tokenizer with SmolLM2's real pre-tokenizer restored
  (Digits(individual_digits=True) then ByteLevel; transformers' GGUF loader drops the
  digit split) -> ids of the whole WikiText-2 test file (count, sha256 of u32 LE, head) and
  of a few probe strings; the plain GPT-2 pre-tokenizer's count is recorded for contrast.
- perplexity: the model dequantized to float32 by transformers (TF32 off), llama.cpp's
  protocol (512-token chunks, logits at 256..510 scored), per-chunk NLL sums, with and
  without BOS; and the HF strided protocol (1024/512) on the first windows.
- last-word accuracy on the WikiText-2 rule documented in src/eval/lastword.rs.

Usage: smollm_reference.py GGUF TEXT OUT.json
"""
import hashlib
import json
import math
import struct
import sys

import torch
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, text_path, out_path = sys.argv[1:4]
folder, name = gguf.rsplit("/", 1)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = "cuda" if torch.cuda.is_available() else "cpu"

tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
text = open(text_path, encoding="utf-8").read()
plain_ids = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ]
)


def encode(s):
    return tok.backend_tokenizer.encode(s, add_special_tokens=False).ids


ids = encode(text)
probes = [
    "In 1997, the 3rd edition sold 12,345 copies at $4.99.",
    " = Valkyria Chronicles III = \n",
    "naïve café — “quoted” 😀 <|im_start|>user\nhi<|im_end|>",
    "   leading spaces and\ttabs\n\n\nnewlines ",
]
out = {
    "gguf": name,
    "text": text_path.rsplit("/", 1)[-1],
    "tokens": {
        "count": len(ids),
        "sha256_u32le": hashlib.sha256(struct.pack(f"<{len(ids)}I", *ids)).hexdigest(),
        "head": ids[:2048],
        "plain_gpt2_count": len(plain_ids),
        "probes": [{"text": p, "ids": encode(p)} for p in probes],
    },
}

model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
model = model.to(dev).eval()
bos = tok.bos_token_id if tok.bos_token_id is not None else model.config.bos_token_id


@torch.no_grad()
def log_probs(seq):
    x = torch.tensor([seq], device=dev)
    return torch.log_softmax(model(x).logits[0].float(), dim=-1)


def llama_cpp(ctx, use_bos, limit=None):
    n = len(ids) // ctx
    if limit:
        n = min(n, limit)
    sums = []
    for c in range(n):
        chunk = ids[c * ctx : (c + 1) * ctx]
        if use_bos:
            chunk = [bos] + chunk[1:]
        lp = log_probs(chunk)
        first = ctx // 2
        tgt = torch.tensor(chunk[first + 1 :], device=dev)
        sums.append(-lp[first : ctx - 1].gather(1, tgt[:, None]).sum().item())
    scored = n * (ctx - 1 - ctx // 2)
    return {"chunks": n, "scored": scored, "chunk_nll": sums, "ppl": math.exp(sum(sums) / scored)}


def strided(max_len, stride, limit):
    sums, scored, prev_end, begin = [], 0, 0, 0
    while begin < len(ids) and len(sums) < limit:
        end = min(begin + max_len, len(ids))
        trg = end - prev_end
        seq = ids[begin:end]
        first_target = max(len(seq) - trg, 1)
        lp = log_probs(seq)
        tgt = torch.tensor(seq[first_target:], device=dev)
        sums.append(-lp[first_target - 1 : len(seq) - 1].gather(1, tgt[:, None]).sum().item())
        scored += len(seq) - first_target
        prev_end = end
        if end == len(ids):
            break
        begin += stride
    return {"windows": len(sums), "scored": scored, "window_nll": sums, "ppl": math.exp(sum(sums) / scored)}


def is_word(w):
    return len(w) > 0 and all(c.isascii() and c.isalpha() for c in w)


def last_word_examples(min_context_words=40):
    ex = []
    for line in text.split("\n"):
        s = line.strip()
        if not s or s.startswith("="):
            continue
        words = s.split(" ")
        while words and not is_word(words[-1]):
            words.pop()
        if len(words) < min_context_words + 1 or len(words[-1]) < 3:
            continue
        ex.append((" ".join(words[:-1]), " " + words[-1]))
    return ex


def last_word(limit, max_context=1024):
    res = []
    for context, target in last_word_examples()[:limit]:
        c, t = encode(context)[-max_context:], encode(target)
        lp = log_probs(c + t)
        ranks = []
        for k, tid in enumerate(t):
            row = lp[len(c) - 1 + k]
            ranks.append(int((row > row[tid]).sum().item()))
        res.append({"target_tokens": len(t), "top1": max(ranks) < 1, "top5": max(ranks) < 5})
    return res


out["llama_cpp_512"] = llama_cpp(512, False)
out["llama_cpp_512_bos"] = llama_cpp(512, True, limit=16)
out["strided_1024_512"] = strided(1024, 512, 16)
out["last_word"] = {"examples": len(last_word_examples()), "first": last_word(200)}
lw = out["last_word"]["first"]
print(
    "tokens", len(ids), "plain", len(plain_ids),
    "ppl", out["llama_cpp_512"]["ppl"], "chunks", out["llama_cpp_512"]["chunks"],
    "ppl_bos16", out["llama_cpp_512_bos"]["ppl"], "strided16", out["strided_1024_512"]["ppl"],
    "lastword top1", sum(r["top1"] for r in lw) / len(lw), "top5", sum(r["top5"] for r in lw) / len(lw),
    "examples", out["last_word"]["examples"],
)
json.dump(out, open(out_path, "w"))
