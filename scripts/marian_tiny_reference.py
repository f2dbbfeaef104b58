#!/usr/bin/env python3
"""A tiny random MarianMT checkpoint in PyTorch format, with transformers' logits for it.

Exercises what the shared model does not: `pytorch_model.bin` weights, relu activation,
separate encoder/decoder embeddings (share_encoder_decoder_embeddings=false), a non-zero final_logits_bias, and padded batches.
Run on the GPU machine (torch + transformers); writes OUT_DIR/{config.json,
pytorch_model.bin, generation_config.json} and OUT_DIR/reference.json.

Usage: marian_tiny_reference.py OUT_DIR
"""
import json
import os
import sys

import torch
from transformers import MarianConfig, MarianMTModel

out = sys.argv[1]
torch.manual_seed(0)
cfg = MarianConfig(
    vocab_size=40,
    decoder_vocab_size=40,
    d_model=16,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=4,
    encoder_ffn_dim=24,
    decoder_ffn_dim=20,
    max_position_embeddings=32,
    activation_function="relu",
    scale_embedding=True,
    share_encoder_decoder_embeddings=False,
    pad_token_id=39,
    decoder_start_token_id=39,
    eos_token_id=0,
    forced_eos_token_id=0,
)
model = MarianMTModel(cfg).eval()
with torch.no_grad():
    model.final_logits_bias.normal_(0, 0.5)
model.save_pretrained(out)
# transformers 5 writes only safetensors: write the PyTorch pickle the older checkpoints use.
os.remove(os.path.join(out, "model.safetensors"))
torch.save(model.state_dict(), os.path.join(out, "pytorch_model.bin"))
src = [[5, 9, 13, 2, 0], [7, 3, 0, 39, 39]]  # second row padded with pad 39
mask = [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
dec = [[39, 4, 8, 1], [39, 6, 2, 11]]
with torch.no_grad():
    o = model(
        input_ids=torch.tensor(src),
        attention_mask=torch.tensor(mask),
        decoder_input_ids=torch.tensor(dec),
    )
    greedy = model.generate(
        input_ids=torch.tensor(src), attention_mask=torch.tensor(mask), num_beams=1, max_new_tokens=8
    )
    beam = model.generate(
        input_ids=torch.tensor(src), attention_mask=torch.tensor(mask), num_beams=3, max_new_tokens=8
    )
json.dump(
    {
        "src": src,
        "mask": mask,
        "dec": dec,
        "logits": o.logits.tolist(),
        "greedy": greedy.tolist(),
        "beam3": beam.tolist(),
        "keys": sorted(model.state_dict().keys()),
        "files": sorted(os.listdir(out)),
    },
    open(os.path.join(out, "reference.json"), "w"),
)
print(sorted(os.listdir(out)), os.path.getsize(os.path.join(out, "pytorch_model.bin")))
print("greedy", greedy.tolist(), "beam", beam.tolist())
