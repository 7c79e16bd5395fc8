"""Pass-key retrieval in long haystacks of held-out text ("needle in a haystack").

A sample is ``<haystack, with a needle at depth d> <question> <answer>``: the needle ``The pass key is
58213. Remember it. 58213 is the pass key.`` sits at a fraction ``d`` of a haystack cut from held-out
text, the question ``What is the pass key? The pass key is`` closes the prompt and the answer is the
five-digit key. Everything before the answer is the prompt, prefilled densely as a server would; the
answer is decoded under the method's policy. Teacher-forced, a sample is *correct* when every answer
token is the argmax prediction of the row before it; the first digit comes from the prompt's last row
(dense, as the first generated token of a real request), the others from decode rows, which must
retrieve the key from thousands of tokens back. Keys are random (seeded), so they cannot be guessed.
"""

from __future__ import annotations

import dataclasses
import random

import torch

__all__ = ["NeedleSample", "make_needle_samples", "needle_batches"]

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclasses.dataclass
class NeedleSample:
    ids: list[int]
    answer: tuple[int, int]  # token positions [start, end) of the key in the answer
    length: int
    depth: float
    key: str


def make_needle_samples(tokenizer, haystack: list[int] | torch.Tensor, length: int, depths, per_depth: int,
                        seed: int = 0) -> list[NeedleSample]:
    """``per_depth`` samples of exactly ``length`` tokens for each needle depth (a fraction of the
    haystack before the needle), each haystack cut at a random offset of ``haystack`` (token ids of
    held-out text)."""
    rng = random.Random(seed * 1_000_003 + length)
    hay = [int(t) for t in haystack]

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    question = enc(QUESTION)
    samples = []
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"needle depth must be in [0, 1], got {depth}")
        for _ in range(per_depth):
            key = str(rng.randrange(10_000, 100_000))
            needle, answer, tail = enc(NEEDLE.format(key=key)), enc(" " + key), enc(".")
            fill = length - len(needle) - len(question) - len(answer) - len(tail)
            if fill < 1 or fill > len(hay):
                raise ValueError(f"a {length}-token sample needs {fill} haystack tokens; {len(hay)} available")
            start = rng.randrange(0, len(hay) - fill + 1)
            body = hay[start : start + fill]
            at = int(round(depth * fill))
            ids = body[:at] + needle + body[at:] + question + answer + tail
            a0 = len(ids) - len(answer) - len(tail)
            samples.append(NeedleSample(ids=ids, answer=(a0, a0 + len(answer)), length=length, depth=float(depth), key=key))
    return samples


def needle_batches(samples: list[NeedleSample], batch_size: int) -> list[tuple[torch.Tensor, list[tuple[int, int]], int, list[str]]]:
    """Batches ``(ids [B, L], answer spans, prefill, cells)`` of samples that share a length and an answer
    start, so that one decode plan (prefill = the prompt) fits the whole batch; ``cells`` name each
    sample's ``length@depth``."""
    groups: dict[tuple[int, int], list[NeedleSample]] = {}
    for s in samples:
        groups.setdefault((len(s.ids), s.answer[0]), []).append(s)
    out = []
    for (_, start), group in sorted(groups.items()):
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            out.append((torch.tensor([s.ids for s in chunk]), [s.answer for s in chunk], start,
                        [f"{s.length}@{s.depth:.1f}" for s in chunk]))
    return out
