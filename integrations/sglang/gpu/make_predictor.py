#!/usr/bin/env python3
"""Write a random-init TokenButler predictor shaped for a model folder's config.json.

usage: make_predictor.py MODEL_DIR OUT_DIR [--sinks 64] [--window 128] [--budget 0.1] [--seed 0]

Random weights give meaningless selections (speed and serving tests only: every kernel does the
same work as with trained weights); the policy fields are the predictor's defaults, which the
--tokenbutler-* flags override.
"""
import argparse
import json

import torch

from butler_zoo import ButlerConfig, ButlerPredictor

ap = argparse.ArgumentParser()
ap.add_argument("model_dir")
ap.add_argument("out_dir")
ap.add_argument("--sinks", type=int, default=64)
ap.add_argument("--window", type=int, default=128)
ap.add_argument("--budget", type=float, default=0.1)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--name", default="")
args = ap.parse_args()

cfg = json.load(open(f"{args.model_dir}/config.json"))
heads = cfg["num_attention_heads"]
bc = ButlerConfig(
    base_model=args.name or args.model_dir,
    base_model_type=cfg["model_type"],
    num_hidden_layers=cfg["num_hidden_layers"],
    hidden_size=cfg["hidden_size"],
    num_attention_heads=heads,
    num_key_value_heads=cfg.get("num_key_value_heads") or heads,
    head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
    policy={"sinks": args.sinks, "window": args.window, "budget": args.budget, "prediction_interval": 1},
    training={"recipe": "random init (serving/speed tests only)", "seed": args.seed},
)
g = torch.Generator().manual_seed(args.seed)
p = ButlerPredictor(bc)
p.reset_parameters(generator=g)
p.save_pretrained(args.out_dir)
print(f"wrote {args.out_dir}: random predictor, {p.num_parameters() / 1e6:.1f}M parameters, {bc.default_policy.describe()}")
