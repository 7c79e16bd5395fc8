#!/usr/bin/env python3
"""Convert the SmolLM2-135M-Instruct Q4_1 GGUF into an HF safetensors folder SGLang can serve.

usage: gguf_to_hf.py GGUF_DIR GGUF_FILE OUT_DIR
transformers (5.6.0 in /tmp/site) de-quantizes the GGUF tensors (needs the `gguf` package, carried
in .whl/p2); weights are saved in bfloat16 with the tokenizer and chat template. The weights went
through 4-bit rounding: this is the same rounded model the shipped predictor was distilled from.
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

src, name, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.bfloat16)
model.save_pretrained(out)
tok.save_pretrained(out)
cfg = json.load(open(os.path.join(out, "config.json")))
print("wrote", out, {k: cfg.get(k) for k in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                                             "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings")})
