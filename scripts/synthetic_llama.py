#!/usr/bin/env python3
"""A random-weight Llama checkpoint of any shape, for decode-speed measurements where the
weights are the memory traffic (SmolLM2-135M is too small for that on a GPU: a token's
bf16 weights take ~75 µs to read on an H200, a decode step's launches take milliseconds).

Writes a Hugging Face folder (config.json, safetensors shards in bf16, and the tokenizer
files copied from --tokenizer-dir, e.g. `quantlab quantize --model SMOLLM --plan '*=bf16'
--out DIR`'s output) that both quantlab and transformers load. The weights are N(0, 0.02²)
from a seeded generator: the numbers are meaningless, the speed is not. With
--bench-decode, transformers' own greedy decode tokens/s at batch 1 on the same folder is
appended to --out as a JSON line (same protocol as transformers_gpu_reference.py).

    python3 scripts/synthetic_llama.py --out /tmp/big --layers 4 --hidden 8192 \
        --intermediate 28672 --heads 64 --kv-heads 8 --tokenizer-dir /tmp/ql/tok \
        --bench-decode --bench-out results.jsonl
"""
import argparse
import json
import os
import shutil
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def build(a):
    vocab = json.load(open(os.path.join(a.tokenizer_dir, "config.json")))["vocab_size"]
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(a.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Built on the CPU, then moved: transformers may ignore a default-device context while
    # it initialises, which left the model on the CPU (and decode 27x slower) in one run.
    model = LlamaForCausalLM(cfg).to(dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


@torch.no_grad()
def bench_decode(model, vocab, prompt_len, new_tokens):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, vocab, (1, prompt_len), generator=g).cuda()
    out = model(x[:, :8], use_cache=True)  # warm-up
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    model(nxt, past_key_values=out.past_key_values, use_cache=True)
    torch.cuda.synchronize()
    out = model(x, use_cache=True)
    past = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="folder to write (replaced if present)")
    ap.add_argument("--tokenizer-dir", required=True,
                    help="folder with tokenizer.json, tokenizer_config.json and a config.json "
                    "whose vocab_size the model takes")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--intermediate", type=int, default=28672)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bench-decode", action="store_true")
    ap.add_argument("--bench-out", default=None)
    a = ap.parse_args()
    if a.hidden % a.heads or a.heads % a.kv_heads:
        ap.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    t0 = time.perf_counter()
    model = build(a)
    params = sum(p.numel() for p in model.parameters())
    tmp = a.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="4GB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(a.tokenizer_dir, f), tmp)
    shutil.rmtree(a.out, ignore_errors=True)
    os.rename(tmp, a.out)  # a half-written folder never carries the final name
    row = {"tool": "transformers", "version": __import__("transformers").__version__,
           "torch": torch.__version__, "model": "synthetic-llama", "layers": a.layers,
           "hidden": a.hidden, "intermediate": a.intermediate, "heads": a.heads,
           "kv_heads": a.kv_heads, "params": params, "dtype": "bf16",
           "write_s": round(time.perf_counter() - t0, 1)}
    if a.bench_decode:
        row["gpu"] = torch.cuda.get_device_name()
        row["weights_on"] = str(next(model.parameters()).device)
        row["decode_tokens"] = 128
        row["decode_tokens_per_s"] = bench_decode(model, model.config.vocab_size, 128, 128)
    print(json.dumps(row))
    if a.bench_out:
        with open(a.bench_out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
