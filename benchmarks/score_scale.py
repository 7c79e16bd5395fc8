"""Magnitude of a predictor's scores during real decode, and how many octaves they span.

The selection kernels bin scores on a log scale over the whole float range, so a common rescale
costs nothing; but each scoring program histograms in registers only a window of 31.75 octaves
below (and 3 above) the largest magnitude of its first chunk, and counts the rest with one atomic
each (docs/kernels.md). This decodes a held-out KJV book with the predictor attached (CPU,
reference path), records every ``reference.score_tokens`` output and prints quantiles of |score|
and the octaves between the 1% and 99.9% quantiles.

    python benchmarks/score_scale.py [--predictor DIR_OR_ID] [--base-model DIR] [--chars 3000]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from butler_kernels import reference as ref


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--predictor", help="default: the SmolLM2 predictor shipped with butler-zoo")
    p.add_argument("--base-model", help="override the base (default: the one the predictor pins)")
    p.add_argument("--text", default="data/corpora/kjv/66_revelation.txt", help="a held-out text file")
    p.add_argument("--chars", type=int, default=3000)
    p.add_argument("--new-tokens", type=int, default=8)
    args = p.parse_args()

    from butler_zoo import AutoButler
    from butler_zoo.zoo import default_predictor

    seen: list[torch.Tensor] = []
    original = ref.score_tokens

    def spy(*a, **k):
        s = original(*a, **k)
        seen.append(s.detach().abs().flatten().float())
        return s

    ref.score_tokens = spy  # the CPU decode path calls the reference through this module attribute
    predictor = args.predictor or default_predictor()
    kwargs = {"base_model": args.base_model} if args.base_model else {}
    model = AutoButler.from_pretrained(predictor, dtype=torch.float32, budget=0.25, **kwargs)
    tok = AutoButler.tokenizer(predictor)
    ids = tok(Path(args.text).read_text()[: args.chars], return_tensors="pt")
    model.generate(**ids, max_new_tokens=args.new_tokens, do_sample=False)
    if not seen:
        raise SystemExit("no scores were recorded: the decode did not go through butler_kernels.reference")
    a = torch.cat(seen)
    a = a[torch.isfinite(a)]
    print(f"{predictor}: {len(seen)} score calls, {a.numel():,} scores over a {ids['input_ids'].shape[1]}-token prompt")
    sample = a[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    for q in (0.01, 0.1, 0.5, 0.9, 0.99):
        print(f"  |score| quantile {q:>4}: {float(torch.quantile(sample, q)):.4g}")
    lo, hi = (float(torch.quantile(sample, q)) for q in (0.01, 0.999))
    print(f"  octaves from the 1% to the 99.9% quantile: {torch.tensor(hi / max(lo, 1e-38)).log2().item():.1f}")


if __name__ == "__main__":
    main()
