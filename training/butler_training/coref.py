"""Synthetic co-reference retrieval, in the spirit of the TokenButler paper's task (arXiv 2503.07518
§4: "an entity named early, filler, a tie-back question, the entity").

A sample is ``<intro> <Name>. <filler sentences> <question> <Name>.``: an invented name is introduced
in the first sentence, a few hundred tokens of unrelated statements (philosophy, food, arithmetic,
as in the paper's pools) follow, and a question that paraphrases the intro is answered by the name.
Teacher-forced, a sample is *correct* when every token of the final name is the argmax prediction
of the row before it; accuracy is the fraction of correct samples. Names are made of random
syllables (seeded), so the model cannot guess them: it must retrieve them from the intro.

The pools below were written for butler-zoo (the paper's were generated with GPT-4o-mini and are not
reused). Pieces are tokenized separately and concatenated (every piece after the first starts with
a space, so BPE tokenizers produce the same ids as for the joined text, up to merges across spaces).
"""

from __future__ import annotations

import dataclasses
import random

import torch

__all__ = ["CorefSample", "make_coref_samples", "coref_batch", "NAME_SYLLABLES"]

NAME_SYLLABLES = ("ka", "vel", "mor", "tri", "dan", "sul", "qua", "ren", "bo", "lis", "zan", "thu", "gor", "pe",
                  "nim", "ax", "ol", "vra", "ster", "ib", "lo", "cor", "fen", "yu", "wex", "del", "ma", "rou")

# (intro ending right before the name, tie-back question ending right before the name)
INTROS = (
    ("The old lighthouse keeper had named his little boat", "What had the lighthouse keeper named his boat? He had named it"),
    ("Long ago the travellers reached a hidden valley called", "Which hidden valley did the travellers reach long ago? They reached"),
    ("My grandmother's favourite cat was a grey tabby named", "What was the name of my grandmother's grey tabby cat? It was"),
    ("The captain of the expedition was a quiet woman called", "Who was the quiet woman leading the expedition? Her name was"),
    ("Deep in the forest there stood a village known as", "What was the village deep in the forest known as? It was known as"),
    ("The inventor called his strange new machine the", "What did the inventor call his strange machine? He called it the"),
    ("Our team gave the secret project the code name", "What code name did our team give the secret project? The code name was"),
    ("The small island where we spent the summer is called", "Where did we spend the summer? On the small island called"),
    ("In the story, the wise old dragon was named", "What was the name of the wise old dragon in the story? It was"),
    ("The new bakery on the corner of our street is called", "What is the name of the new bakery on our street? It is called"),
    ("The comet that the astronomers discovered was named", "Which comet did the astronomers discover? They discovered"),
    ("Her first novel told the story of a girl named", "Who was the girl in her first novel? The girl was named"),
)

FILLER = (
    # philosophy
    "A life without questions is a life that never learns what it could have been.",
    "Some thinkers argue that time is only the order in which we notice change.",
    "Every choice closes a thousand doors so that one of them may open.",
    "It is easier to admire patience than to practise it on a rainy afternoon.",
    "Doubt is uncomfortable, but certainty is often the more dangerous guest.",
    "We rarely see the world as it is; we see it as we have learned to look.",
    "Kindness costs little and is remembered long after clever words are forgotten.",
    "The wise traveller packs light and listens more than he speaks.",
    "Many old arguments about freedom turn on what we mean by a reason.",
    "A habit begins as a thread and ends as a rope.",
    "Silence can be an answer, though rarely the one we hoped to hear.",
    "The mind that cannot rest will also struggle to create.",
    # food
    "Fresh bread tastes best when it is still warm from the oven.",
    "A good soup needs time, a little salt and a patient cook.",
    "Ripe tomatoes, olive oil and basil make a simple summer salad.",
    "Many people drink strong coffee in the morning and mild tea at night.",
    "Rice should rest for a few minutes after cooking so the grains stay firm.",
    "Lemons brighten almost any dish, from fish to cakes.",
    "Roasted vegetables turn sweet when their edges begin to brown.",
    "Honey never really spoils if it is kept in a closed jar.",
    "Apples, pears and plums are gathered in the orchard every autumn.",
    "A pinch of cinnamon changes the smell of the whole kitchen.",
    "Cheese made from goat milk has a sharper taste than cheese from cows.",
    "The market sells onions, carrots and potatoes in large wooden boxes.",
    # mathematics
    "The sum of the angles of a triangle is always one hundred and eighty degrees.",
    "Seven times eight is fifty-six, and nine times nine is eighty-one.",
    "A prime number has exactly two divisors, one and itself.",
    "The square root of one hundred and forty-four is twelve.",
    "Half of a half is a quarter, and half of a quarter is an eighth.",
    "Every even number greater than two is the sum of two primes, or so it is believed.",
    "A circle's circumference is a little more than three times its diameter.",
    "If you double a number and then halve it, you return to where you began.",
    "There are sixty minutes in an hour and twenty-four hours in a day.",
    "The number zero was a late arrival in the history of counting.",
    "Adding the numbers from one to ten gives fifty-five.",
    "Parallel lines on a flat page never meet, however far they run.",
)


@dataclasses.dataclass
class CorefSample:
    ids: list[int]
    answer: tuple[int, int]  # token positions [start, end) of the final name
    name: str
    text: str


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(NAME_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def make_coref_samples(tokenizer, n: int = 100, target_tokens: int = 320, seed: int = 0) -> list[CorefSample]:
    """``n`` samples of about ``target_tokens`` tokens (the filler grows until the total reaches it)."""
    rng = random.Random(seed)

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    samples = []
    for _ in range(n):
        intro, question = rng.choice(INTROS)
        name = _name(rng)
        name_ids = enc(" " + name)
        head = enc(intro) + name_ids + enc(".")
        tail_q = enc(" " + question)
        tail_end = enc(".")
        filler_ids: list[int] = []
        filler_txt: list[str] = []
        pool = list(FILLER)
        rng.shuffle(pool)
        while len(head) + len(filler_ids) + len(tail_q) + len(name_ids) + len(tail_end) < target_tokens:
            if not pool:
                pool = list(FILLER)
                rng.shuffle(pool)
            s = pool.pop()
            filler_ids += enc(" " + s)
            filler_txt.append(s)
        ids = head + filler_ids + tail_q
        start = len(ids)
        ids = ids + name_ids + tail_end
        text = f"{intro} {name}. {' '.join(filler_txt)} {question} {name}."
        samples.append(CorefSample(ids=ids, answer=(start, start + len(name_ids)), name=name, text=text))
    return samples


def coref_batch(samples: list[CorefSample], pad_id: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Right-padded ``[B, L]`` ids (padding after the text never changes a causal row) + answer spans."""
    width = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
    return ids, [s.answer for s in samples]
