#!/usr/bin/env python3
"""A tiny random Llama checkpoint written by transformers, with transformers' numbers for it.

Exercises what the SmolLM2 GGUF does not: a Hugging Face directory (config.json as
transformers 5 writes it, `model.safetensors`, tokenizer.json), grouped-query attention
(4 query heads, 2 key/value heads), an explicit head_dim, a non-default rope_theta, llama3
rope scaling whose original context (32) is short enough that all three frequency bands
(kept, smoothed, divided by the factor) occur, an untied lm_head, and non-unit RMSNorm weights.
The tokenizer is a byte-level BPE trained here (Python `tokenizers`) on generated text, with
a BOS added by its post-processor.

Run on the GPU machine (torch + transformers; the model runs on its CPU in float32, TF32 off).
Writes OUT_DIR/{config.json, generation_config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, reference.json}; quantlab's tests/llama_tiny.rs reads them from
tests/fixtures/llama-tiny/.

reference.json holds: per prompt, the ids from AutoTokenizer (reloaded from OUT_DIR) with
and without special tokens, transformers' logits for the ids with BOS (rounded to 1e-5; three prompts), the
greedy continuation from `generate` (do_sample=False) and its top-1/top-2 margins; the rotary
inverse frequencies transformers uses (and the unscaled ones, for contrast); versions.

Usage: llama_tiny_reference.py OUT_DIR
"""
import json
import os
import random
import sys

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.use_deterministic_algorithms(True)

VOCAB = 384
MAX_NEW = 24
SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2


def corpus(n_lines=400):
    """A few hundred lines of generated English-ish text with digits, punctuation, accents."""
    rng = random.Random(1234)
    subj = ["the cat", "a small dog", "my neighbour", "the old sailor", "every student", "the river",
            "our teacher", "a quiet robot", "the baker", "this model", "the café owner", "Zoë"]
    verb = ["sees", "likes", "builds", "remembers", "carries", "paints", "counts", "follows",
            "quantizes", "writes about", "walks past", "forgets"]
    obj = ["the red house", "three green apples", "a long letter", "the tiny boat", "old maps",
           "the blue bridge", "a naïve question", "forty stones", "the evening train", "his hat",
           "the weights", "a loud bell"]
    tail = ["in the morning", "after lunch", "near the station", "without a word", "again and again",
            "in 1997", "at 6:30 pm", "for 12 days", "with great care", "under the stars", "", ""]
    end = [".", ".", ".", "!", "?", "..."]
    lines = []
    for _ in range(n_lines):
        s = f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)} {rng.choice(tail)}".strip()
        s = s[0].upper() + s[1:] + rng.choice(end)
        if rng.random() < 0.3:
            s += f" It costs ${rng.randint(1, 999)}.{rng.randint(0, 99):02d}."
        lines.append(s)
    return lines


# Byte-level BPE tokenizer trained on the corpus; vocabulary = the model's.
bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
bpe.train_from_iterator(
    corpus(),
    trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    ),
)
assert bpe.get_vocab_size() == VOCAB, bpe.get_vocab_size()
bos_id, eos_id = bpe.token_to_id("<s>"), bpe.token_to_id("</s>")
bpe.post_processor = processors.TemplateProcessing(
    single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
)
PreTrainedTokenizerFast(
    tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
).save_pretrained(out)
# Say that this tokenizer adds BOS, as Llama tokenizers do (quantlab reads this flag).
tc_path = os.path.join(out, "tokenizer_config.json")
tc = json.load(open(tc_path))
tc["add_bos_token"] = True
tc["add_eos_token"] = False
json.dump(tc, open(tc_path, "w"), indent=2, sort_keys=True)
tok = AutoTokenizer.from_pretrained(out)

# (text, record logits): logits for three prompts keep the fixture under 1 MB; every prompt
# gets ids and a greedy continuation.
prompts = [
    ("The old sailor remembers the blue bridge", True),
    ("Zoë paints a naïve question at 6:30 pm! It costs $42.07.", True),
    (" leading space, then\ttab and\nnewline", False),
    # 59 tokens: runs past original_max_position_embeddings = 32.
    ("Every student counts forty stones near the station. The baker forgets his hat after lunch, "
     "and our teacher writes about the evening train in 1997.", True),
    ("quantlab 😀 café", False),
]
# Tokenizer-only probes: digits, runs of spaces, unseen words, a literal special token.
probes = [
    "In 2024, 1234567 robots sold 3.14159 apples.",
    "   three  spaces   and trailing ",
    "Xylophones whirr; jazz quiz!",
    "<s>already has a BOS</s> inside",
    "東京 Zürich naïve",
]


def hf_ids(text, special):
    return tok(text, add_special_tokens=special)["input_ids"]


def build(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_theta=50000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=0.15,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))  # non-unit RMSNorm weights
            else:
                p.normal_(0.0, 0.15)
    return model


@torch.no_grad()
def run(model):
    recs = []
    for text, keep_logits in prompts:
        with_bos, without = hf_ids(text, True), hf_ids(text, False)
        x = torch.tensor([with_bos])
        logits = model(x).logits[0].float()
        gen = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            num_beams=1,
            max_new_tokens=MAX_NEW,
            pad_token_id=eos_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        new = gen.sequences[0, x.shape[1]:].tolist()
        margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in gen.scores]
        recs.append({
            "text": text,
            "ids": with_bos,
            "ids_no_special": without,
            "decoded": tok.backend_tokenizer.decode(with_bos, skip_special_tokens=False),
            "logits": [[round(v, 5) for v in row] for row in logits.tolist()] if keep_logits else None,
            "greedy_new": new,
            "greedy_margins": margins,
            "greedy_decoded": tok.backend_tokenizer.decode(new, skip_special_tokens=False),
        })
    return recs


def acceptable(recs):
    """Greedy output varied (not one token repeated) and no near-tie an argmax could flip on."""
    for r in recs:
        if len(r["greedy_new"]) < MAX_NEW // 2 or len(set(r["greedy_new"])) < 6:
            return False
        if min(r["greedy_margins"]) < 2e-3:
            return False
    return True


for seed in range(50):
    model = build(seed)
    recs = run(model)
    print("seed", seed, [len(set(r["greedy_new"])) for r in recs],
          "min margin", min(min(r["greedy_margins"]) for r in recs), flush=True)
    if acceptable(recs):
        break
else:
    raise SystemExit("no seed in 0..49 gave varied greedy output without near-ties")

try:
    model.save_pretrained(out, safe_serialization=True)
except TypeError:  # a transformers that always writes safetensors and dropped the flag
    model.save_pretrained(out)
assert os.path.exists(os.path.join(out, "model.safetensors")), os.listdir(out)
rot = model.model.rotary_emb
inv_freq = rot.inv_freq.float().tolist()
base, dim = 50000.0, 16
plain = (1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))).tolist()
probs = [torch.softmax(torch.tensor(r["logits"]), -1).max(-1).values.mean().item() for r in recs if r["logits"]]
ref = {
    "seed": seed,
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "tokenizers": __import__("tokenizers").__version__,
    "attn_implementation": "eager",
    "device": "cpu",
    "bos_id": bos_id,
    "eos_id": eos_id,
    "inv_freq": inv_freq,
    "inv_freq_unscaled": plain,
    "attention_scaling": float(getattr(rot, "attention_scaling", 1.0)),
    "attn_implementation_used": model.config._attn_implementation,
    "prompts": recs,
    "probes": [
        {"text": p, "ids": hf_ids(p, True), "ids_no_special": hf_ids(p, False),
         "decoded": tok.backend_tokenizer.decode(hf_ids(p, True), skip_special_tokens=False)}
        for p in probes
    ],
    "files": sorted(os.listdir(out)),
}
json.dump(ref, open(os.path.join(out, "reference.json"), "w"))
print("files", {f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))})
print("inv_freq", inv_freq)
print("unscaled", plain)
print("mean max prob per prompt", probs, "uniform", 1 / VOCAB)
for r in recs:
    print(len(r["ids"]), r["ids"][:12], "->", r["greedy_new"], repr(r["greedy_decoded"]))
