#!/usr/bin/env python3
"""Independent reference outputs for quantlab's MarianMT path, from transformers and sacrebleu.

Run on the GPU machine (torch, transformers, sentencepiece and sacrebleu are installed there).
It writes one JSON file that quantlab's tests compare against:

- tokenizer: MarianTokenizer ids (source side with its EOS, and target side via text_target)
  for the first sentences of Multi30k test_2016_flickr (en, fr) and a set of probe strings, on
  the real opus-mt-en-mg and opus-mt-tc-big-fr-en vocabularies and on the shared model's own.
- translations: the shared marian-multi30k-en-de model in float32 (TF32 off) translating all
  1,000 English test sentences with `generate`: greedy and beam 4 (max_new_tokens=128, as the
  model's README), plus beam 4 with early_stopping=True and with length_penalty=0.6 on a
  prefix, and beam 4 with the generation config's own max_length (256); token ids,
  detokenized text and beam sequence scores.
- forward: teacher-forced log-probabilities of the greedy output for a few sentences.
- BLEU/chrF: sacrebleu's corpus scores (default settings) with signatures, single-sentence
  corpora (smoothing paths), and 13a tokenizations of probe strings.

Usage: marian_reference.py MODEL_DIR VOCAB_ROOT MULTI30K_DIR OUT.json [SOURCE_DUMP_DIR]
"""
import gzip
import importlib.util
import inspect
import json
import os
import shutil
import sys

import sacrebleu
import torch
import transformers
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from transformers import MarianMTModel, MarianTokenizer

model_dir, vocab_root, m30k, out_path = sys.argv[1:5]
dump = sys.argv[5] if len(sys.argv) > 5 else None
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = "cuda" if torch.cuda.is_available() else "cpu"


def lines(name):
    with gzip.open(os.path.join(m30k, name), "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


if dump:
    os.makedirs(dump, exist_ok=True)
    import transformers.generation.logits_process as lp
    import transformers.generation.utils as gu
    import transformers.models.marian.modeling_marian as mm
    import transformers.models.marian.tokenization_marian as tm

    for mod in (tm, gu, lp, mm):
        shutil.copy(inspect.getfile(mod), os.path.join(dump, os.path.basename(inspect.getfile(mod))))

PROBES = [
    "Hello world.",
    "  Two  spaces   inside and around  ",
    "Tabs\tand\nnewlines",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber Stra\u00dfe",
    "\u201cCurly quotes\u201d and \u2018single\u2019 \u2013 dashes \u2014 \u2026",
    "Full-width \uff21\uff22\uff23 \uff11\uff12\uff13 and ligature \ufb01ne",
    "Non\u00a0breaking\u2009thin space",
    "Numbers 3.14159, 1,000,000 and 2026-11-22.",
    "Unknown script: \u4f60\u597d\u4e16\u754c \u0928\u092e\u0938\u094d\u0924\u0947 \U0001f600",
    ">>deu<< A language code first.",
    "",
    "a",
    "UPPER lower MiXeD",
    "e-mail: someone@example.com, http://example.com/path?q=1",
    "A man in an orange hat starring at something.",
]


def tok_record(tok_dir, src_sents, tgt_sents):
    tok = MarianTokenizer.from_pretrained(tok_dir)
    src = [tok(s)["input_ids"] for s in src_sents]
    pieces = [tok.convert_ids_to_tokens(ids) for ids in src[:40]]
    tgt = [tok(text_target=s)["input_ids"] for s in tgt_sents]
    decoded = [tok.decode(ids, skip_special_tokens=True) for ids in tgt]
    return {
        "dir": os.path.basename(tok_dir.rstrip("/")),
        "source": {"text": src_sents, "ids": src, "pieces_head": pieces},
        "target": {"text": tgt_sents, "ids": tgt, "decoded": decoded},
        "special": {"eos": tok.eos_token_id, "unk": tok.unk_token_id, "pad": tok.pad_token_id},
    }


en = lines("test_2016_flickr.en.gz")
de = lines("test_2016_flickr.de.gz")
fr = lines("test_2016_flickr.fr.gz")
val_en = lines("val.en.gz")
val_fr = lines("val.fr.gz")

out = {
    "versions": {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "sacrebleu": sacrebleu.__version__,
        "sacremoses_installed": importlib.util.find_spec("sacremoses") is not None,
        "device": dev,
    },
    "tokenizers": [
        tok_record(os.path.join(vocab_root, "opus-mt-en-mg"), PROBES + en[:200] + val_en[:100], PROBES + en[:60]),
        tok_record(os.path.join(vocab_root, "opus-mt-tc-big-fr-en"), PROBES + fr[:200] + val_fr[:100], PROBES + en[:100]),
        tok_record(model_dir, PROBES + en[:300], PROBES + de[:300]),
    ],
}

tok = MarianTokenizer.from_pretrained(model_dir)
model = MarianMTModel.from_pretrained(model_dir, dtype=torch.float32).to(dev).eval()
BATCH = 32


def translate(sents, max_new_tokens=128, **kw):
    ids, texts, scores = [], [], []
    if max_new_tokens is not None:
        kw["max_new_tokens"] = max_new_tokens
    for i in range(0, len(sents), BATCH):
        enc = tok(sents[i : i + BATCH], return_tensors="pt", padding=True).to(dev)
        with torch.no_grad():
            res = model.generate(**enc, return_dict_in_generate=True, output_scores=True, **kw)
        for row in res.sequences.tolist():
            row = row[1:]  # decoder start
            while row and row[-1] == model.config.pad_token_id:
                row.pop()
            ids.append(row)
        texts += tok.batch_decode(res.sequences, skip_special_tokens=True)
        if getattr(res, "sequences_scores", None) is not None:
            scores += res.sequences_scores.tolist()
    return {"kwargs": kw, "ids": ids, "text": texts, "sequences_scores": scores}


def bleu_record(hyps, refs):
    bleu = sacrebleu.metrics.BLEU()
    b = bleu.corpus_score(hyps, [refs])
    chrf = sacrebleu.metrics.CHRF()
    c = chrf.corpus_score(hyps, [refs])
    return {
        "bleu": b.score,
        "counts": b.counts,
        "totals": b.totals,
        "sys_len": b.sys_len,
        "ref_len": b.ref_len,
        "bp": b.bp,
        "formatted": str(b),
        "signature": str(bleu.get_signature()),
        "chrf": c.score,
        "chrf_signature": str(chrf.get_signature()),
    }


runs = {
    "greedy": translate(en, num_beams=1, do_sample=False),
    "beam4": translate(en, num_beams=4, do_sample=False),
    "beam4_early": translate(en[:200], num_beams=4, do_sample=False, early_stopping=True),
    "beam4_lp06": translate(en[:200], num_beams=4, do_sample=False, length_penalty=0.6),
    # The model's own max_length (256): a few degenerate beams run on past 128 tokens.
    "beam4_maxlen256": translate(en, max_new_tokens=None),
}
for name, run in runs.items():
    run["scores"] = bleu_record(run["text"], de[: len(run["text"])])
out["translations"] = runs

forward = []
for i in range(4):
    enc = tok([en[i]], return_tensors="pt").to(dev)
    dec = torch.tensor([[model.config.decoder_start_token_id] + runs["greedy"]["ids"][i]], device=dev)
    with torch.no_grad():
        o = model(**enc, decoder_input_ids=dec, output_hidden_states=True)
    logp = torch.log_softmax(o.logits[0].double(), -1)
    chosen = [logp[t, dec[0, t + 1]].item() for t in range(dec.shape[1] - 1)]
    top = torch.topk(o.logits[0, 0], 10)
    enc_h = o.encoder_last_hidden_state[0]
    forward.append(
        {
            "index": i,
            "src_ids": enc["input_ids"][0].tolist(),
            "decoder_ids": dec[0].tolist(),
            "chosen_logprobs": chosen,
            "first_step_top10": {"ids": top.indices.tolist(), "logits": top.values.tolist()},
            "encoder_out_first_row_head": enc_h[0, :8].tolist(),
            "encoder_out_abs_mean": enc_h.abs().mean().item(),
        }
    )
out["forward"] = forward

tok13a = Tokenizer13a()
bleu_probes = PROBES + [
    "Ein Mann (mit Hut) sagt: \"Hallo!\" & geht.",
    "Preis: 3,50 \u20ac / 4.20$ -- 50% <b>fett</b> &amp; &quot;zitat&quot;",
    "end-of-line-hyphen-\nated",
]
out["sacrebleu"] = {
    "tok13a": [{"text": s, "tokens": tok13a(s)} for s in bleu_probes],
    "single": [
        {
            "hyp": runs["greedy"]["text"][i],
            "ref": de[i],
            "bleu": sacrebleu.corpus_bleu([runs["greedy"]["text"][i]], [[de[i]]]).score,
            "chrf": sacrebleu.corpus_chrf([runs["greedy"]["text"][i]], [[de[i]]]).score,
        }
        for i in range(40)
    ],
    "edge": [
        {"hyp": h, "ref": r, "bleu": sacrebleu.corpus_bleu([h], [[r]]).score, "chrf": sacrebleu.corpus_chrf([h], [[r]]).score}
        for h, r in [("a b c", "a b c"), ("a b", "a b c d e"), ("x y z", "a b c"), ("Der Hund.", "Der Hund läuft."), ("", "Etwas.")]
    ],
}

with open(out_path, "w", encoding="utf-8") as f:
    json.dump(out, f, ensure_ascii=False)
print("wrote", out_path)
for name, run in runs.items():
    print(name, run["scores"]["formatted"], "chrF", round(run["scores"]["chrf"], 2))
