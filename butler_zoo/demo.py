"""`butler-zoo demo`: what TokenButler does, shown in one command on a long context.

The prompt is a note naming a ship, then the first four chapters of Genesis (King James Version, public
domain; 3.4K tokens, the text of the project's `kjv` corpus, shipped in ``demo_data/``), then a sentence
that can only be finished by going back to the note, 3.4K tokens earlier. The same model decodes it twice,
densely and with TokenButler's sparse decode (sinks + window + the predicted top-B of every layer and KV
head), and the demo prints both answers, whether both name the ship, the fraction of the KV cache the
sparse decode read and the time of each. Prefill is dense in both runs (TokenButler only changes decode).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DemoPrompt", "demo_prompt", "PASSAGE_FILE"]

PASSAGE_FILE = Path(__file__).resolve().parent / "demo_data" / "genesis_1-4_kjv.txt"
NOTE = "A note before the text: the ship that carried this book across the sea was called the Silver Marigold.\n\n"
QUESTION = "\n\nThe ship that carried this book across the sea was called the"
FACT = "Silver Marigold"


@dataclass
class DemoPrompt:
    text: str
    fact: str
    question: str


def demo_prompt() -> DemoPrompt:
    """The long-context prompt: note, passage, the sentence to finish."""
    return DemoPrompt(text=NOTE + PASSAGE_FILE.read_text(encoding="utf-8") + QUESTION, fact=FACT, question=QUESTION.strip())


def run_demo(model, tokenizer, max_new_tokens: int = 8, echo=print) -> dict:
    """Decode the demo prompt densely and sparsely with ``model`` (a model with a predictor attached);
    print the comparison through ``echo`` and return its figures."""
    prompt = demo_prompt()
    enc = tokenizer(prompt.text, return_tensors="pt").to(next(model.parameters()).device)
    n = enc["input_ids"].shape[1]
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False,
               pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    model.generate(**tokenizer("Warm up.", return_tensors="pt").to(enc["input_ids"].device), max_new_tokens=2,
                   **{k: v for k, v in gen.items() if k != "max_new_tokens"})  # first-call costs out of the timings
    runs = {}
    for name, enabled in (("dense", False), ("TokenButler", True)):
        stats = model.butler.track_stats()
        t0 = time.perf_counter()
        out = model.generate(**enc, butler_enabled=enabled, **gen)[0, n:]
        seconds = time.perf_counter() - t0
        model.butler.stats = None
        answer = tokenizer.decode(out, skip_special_tokens=True)
        runs[name] = {"answer": answer, "seconds": seconds, "fraction_read": stats.fraction_read,
                      "sparse_steps": stats.sparse_layer_steps, "steps": stats.layer_steps, "has_fact": prompt.fact in answer}
    policy = model.butler.policy
    echo(f"Context: {n:,} tokens: a note naming a ship, Genesis 1-4 (KJV), then the sentence to finish:")
    echo(f"  \"... {prompt.question}\"   (the note, {n:,} tokens back, says: {prompt.fact})")
    echo(f"Policy: {policy.describe()}")
    for name, r in runs.items():
        echo(f"== {name:<12} {r['answer']!r}  [{r['seconds']:.1f} s]")
    sparse = runs["TokenButler"]
    if sparse["sparse_steps"]:
        echo(f"TokenButler read {sparse['fraction_read']:.1%} of the KV cache during decode (the layers it serves; "
             f"{sparse['sparse_steps']} of {sparse['steps']} layer steps sparse); prefill is dense in both runs.")
    else:
        echo("No decode step was sparse: the context fits in the budget (or in sinks + window).")
    both = runs["dense"]["has_fact"] and sparse["has_fact"]
    echo(f"Both answers name the ship: {'yes' if both else 'no'} (dense: {'yes' if runs['dense']['has_fact'] else 'no'}, "
         f"TokenButler: {'yes' if sparse['has_fact'] else 'no'}). Times are this machine's, not a benchmark "
         "(docs/benchmarks.md measures speed).")
    return {"context_tokens": n, "runs": runs, "both_name_the_fact": both}
