"""Pass-key retrieval in long haystacks of held-out text ("needle in a haystack").

A sample is ``<haystack, with a needle at depth d> <question> <answer>``: the needle sits at a fraction
``d`` of a haystack cut from held-out text, a question closes the prompt and the answer is the key.
Everything before the answer is the prompt, prefilled densely as a server would; the answer is decoded
under the method's policy. The key's first token comes from the prompt's last row (dense, as the first
generated token of a real request: the same for every method, scored apart); the others from decode rows,
which must find the needle thousands of tokens back to copy it. Teacher-forced, a sample is *correct* when
each of those decoded tokens is the argmax prediction of the row before it
(``by_length._needle_accuracy``). Keys are random (seeded), so they cannot be guessed.

Two kinds of key (``KEY_KINDS``):

- ``words`` (the default): an invented word of three random syllables, ``The secret word is Velmorka.
  Remember it. Velmorka is the secret word.``; ``What is the secret word? The secret word is``
  ``Velmorka``. It is several tokens, none of them guessable from the ones before.
- ``digits``: the classic five-digit pass key, ``The pass key is 58213. ...``. SmolLM2-135M fails it
  even with dense attention from 4K tokens on (accuracy 0 at every depth on the H200 run of
  eval_by_length.json), so at that size it measures nothing about the sparse methods; it is kept for
  larger bases.
"""

from __future__ import annotations

import dataclasses
import random

import torch

__all__ = ["KEY_KINDS", "NeedleSample", "make_needle_samples", "needle_batches"]

# (needle, question): the needle names the key twice, as pass-key tests do
KEY_KINDS = {
    "words": (" The secret word is {key}. Remember it. {key} is the secret word.",
              " What is the secret word? The secret word is"),
    "digits": (" The pass key is {key}. Remember it. {key} is the pass key.",
               " What is the pass key? The pass key is"),
}
# syllables of the invented words: none is an English word on its own, so the model cannot complete one
# from its first syllable (the co-reference task's names are made the same way)
SYLLABLES = ("vel", "mor", "ka", "tri", "dan", "sul", "qua", "ren", "lis", "zan", "thu", "gor", "nim", "vra",
             "ster", "ib", "cor", "fen", "wex", "del", "rou", "bex", "tal", "pim")


def _key(rng: random.Random, kind: str) -> str:
    if kind == "digits":
        return str(rng.randrange(10_000, 100_000))
    return "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()


@dataclasses.dataclass
class NeedleSample:
    ids: list[int]
    answer: tuple[int, int]  # token positions [start, end) of the key in the answer
    length: int
    depth: float
    key: str


def make_needle_samples(tokenizer, haystack: list[int] | torch.Tensor, length: int, depths, per_depth: int,
                        seed: int = 0, key_kind: str = "words") -> list[NeedleSample]:
    """``per_depth`` samples of exactly ``length`` tokens for each needle depth (a fraction of the
    haystack before the needle), each haystack cut at a random offset of ``haystack`` (token ids of
    held-out text), with keys of ``key_kind`` (see ``KEY_KINDS``)."""
    if key_kind not in KEY_KINDS:
        raise ValueError(f"unknown needle key kind {key_kind!r}; choose one of {', '.join(KEY_KINDS)}")
    needle_text, question_text = KEY_KINDS[key_kind]
    rng = random.Random(seed * 1_000_003 + length)
    hay = [int(t) for t in haystack]

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    question = enc(question_text)
    samples = []
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"needle depth must be in [0, 1], got {depth}")
        for _ in range(per_depth):
            key = _key(rng, key_kind)
            needle, answer, tail = enc(needle_text.format(key=key)), enc(" " + key), enc(".")
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
