"""The generated instruction dataset of the embedded default (DESIGN section 6).

Every record follows the published jsonl schema (spec 3.1): ``instruction``, ``input`` (may be
empty), ``output`` (the reference answer), ``prompt`` (rendered with
:func:`mckd.data.examples.render_prompt`) and ``category`` (the task family).

The families are small algorithmic or in-context tasks whose answers are fully determined by the
prompt, so a model can learn them from a few thousand examples, but they need different amounts of
"computation" (copying, sorting, carrying digits, two-hop lookup). A larger model learns them
clearly better than a smaller one in minutes of CPU training, which is what distillation needs.
Answers are short sentences rather than bare tokens, so ROUGE-L gives graded credit.

Generation is deterministic: one :class:`random.Random` seeded per split, no global state.
"""
from __future__ import annotations

import random
from typing import Callable

from mckd.data.examples import render_prompt

NAMES = ("Anna", "Ben", "Cara", "Dan", "Eva", "Finn", "Gina", "Hugo", "Iris", "Jack", "Kira",
         "Leo", "Mia", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tina", "Umar", "Vera", "Will")
ITEMS = ("apples", "books", "coins", "cards", "shells", "pens", "stamps", "marbles", "cookies",
         "stickers", "flowers", "candles")
COLORS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink", "brown")
CITIES = ("Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Rome", "Quito", "Dublin", "Seoul", "Perth")
PETS = ("dog", "cat", "parrot", "rabbit", "turtle", "hamster", "horse", "goat")
WORDS = ("river", "stone", "garden", "window", "music", "planet", "silver", "forest", "candle",
         "bridge", "winter", "pocket", "tiger", "lemon", "rocket", "mirror", "island", "jacket",
         "castle", "pencil", "cloud", "dragon", "basket", "harbor", "meadow", "copper", "falcon",
         "ladder", "orbit", "puzzle", "sugar", "thunder", "violet", "wagon", "yellow", "zebra",
         "anchor", "bottle", "carpet", "desert")
# (from unit, to unit, factor): "N <from> is N*factor <to>"
CONVERSIONS = (("kilometers", "meters", 1000), ("meters", "centimeters", 100),
               ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24),
               ("weeks", "days", 7), ("kilograms", "grams", 1000), ("dozens", "items", 12),
               ("years", "months", 12), ("liters", "milliliters", 1000))

Record = dict[str, str]


def _record(category: str, instruction: str, input_text: str, output: str) -> Record:
    return {"instruction": instruction, "input": input_text, "output": output,
            "prompt": render_prompt(instruction, input_text), "category": category}


def arithmetic(rng: random.Random) -> Record:
    """Two-step word problem with carries: 'Mia has 23 marbles. ...' -> 'Mia has 20 marbles now.'"""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(10, 60), rng.randint(2, 30), rng.randint(2, 30)
    if rng.random() < 0.5:
        total = a + b - c
        text = f"{name} has {a} {item}. {name} buys {b} more and gives away {c}."
    else:
        b = min(b, a - 1)
        total = a - b + c
        text = f"{name} has {a} {item}. {name} loses {b} and then finds {c} more."
    return _record("arithmetic", f"{text} How many {item} does {name} have now?", "",
                   f"{name} has {total} {item} now.")


def sort_numbers(rng: random.Random) -> Record:
    """Sort 3-6 numbers ascending or descending."""
    nums = rng.sample(range(1, 100), rng.randint(3, 6))
    desc = rng.random() < 0.3
    order = "largest to smallest" if desc else "smallest to largest"
    return _record("sorting", f"Sort the following numbers from {order}.",
                   ", ".join(map(str, nums)), ", ".join(map(str, sorted(nums, reverse=desc))))


def reverse_words(rng: random.Random) -> Record:
    """Reverse the order of 3-6 words."""
    words = rng.sample(WORDS, rng.randint(3, 6))
    return _record("reversal", "Reverse the order of the words in the list.", " ".join(words),
                   " ".join(reversed(words)))


def pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word of 2-3 consonant-vowel syllables (e.g. 'tobaki')."""
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))


def string_transform(rng: random.Random) -> Record:
    """Character-level rewrites of made-up words (so they cut across learned tokens): capitals,
    spelling with dashes, letter reversal."""
    word = pseudo_word(rng)
    kind = rng.randrange(3)
    if kind == 0:
        return _record("string", "Write the word in capital letters.", word, word.upper())
    if kind == 1:
        return _record("string", "Spell the word with a dash between the letters.", word,
                       "-".join(word))
    return _record("string", "Write the letters of the word in reverse order.", word, word[::-1])


def unit_conversion(rng: random.Random) -> Record:
    """'Convert 7 kilometers to meters.' -> '7 kilometers is 7000 meters.'"""
    src, dst, factor = rng.choice(CONVERSIONS)
    n = rng.randint(2, 99)
    return _record("conversion", f"Convert {n} {src} to {dst}.", "",
                   f"{n} {src} is {n * factor} {dst}.")


def lookup(rng: random.Random) -> Record:
    """In-context lookup, one hop (favourite colour) or two hops (pet -> owner -> city)."""
    people = rng.sample(NAMES, 4)
    if rng.random() < 0.5:
        colors = rng.sample(COLORS, 4)
        table = "\n".join(f"{p}: {c}" for p, c in zip(people, colors))
        i = rng.randrange(4)
        return _record("lookup", f"Using the list, what is the favorite color of {people[i]}?",
                       table, f"The favorite color of {people[i]} is {colors[i]}.")
    pets, cities = rng.sample(PETS, 4), rng.sample(CITIES, 4)
    owners = "\n".join(f"{p} owns the {a}." for p, a in zip(people, pets))
    homes = "\n".join(f"{p} lives in {c}." for p, c in zip(rng.sample(people, 4), cities))
    where = {line.split(" lives in ")[0]: line.split(" lives in ")[1][:-1] for line in homes.split("\n")}
    i = rng.randrange(4)
    return _record("lookup", f"In which city does the owner of the {pets[i]} live?",
                   f"{owners}\n{homes}",
                   f"The {pets[i]} belongs to {people[i]}, who lives in {where[people[i]]}.")


def counting(rng: random.Random) -> Record:
    """Count words in a list or occurrences of one word."""
    if rng.random() < 0.5:
        words = rng.sample(WORDS, rng.randint(2, 9))
        return _record("counting", "How many words are in the list?", " ".join(words),
                       f"There are {len(words)} words in the list.")
    target = rng.choice(COLORS)
    others = [c for c in COLORS if c != target]
    k = rng.randint(1, 5)
    words = [target] * k + [rng.choice(others) for _ in range(rng.randint(1, 5))]
    rng.shuffle(words)
    return _record("counting", f"How many times does the word {target} appear in the list?",
                   " ".join(words), f"The word {target} appears {k} times.")


def sequence(rng: random.Random) -> Record:
    """Continue an arithmetic progression by two terms."""
    start, step, n = rng.randint(1, 30), rng.randint(2, 12), rng.randint(3, 5)
    terms = [start + step * i for i in range(n + 2)]
    return _record("sequence", "Continue the sequence with the next two numbers.",
                   ", ".join(map(str, terms[:n])), f"{terms[n]}, {terms[n + 1]}")


def comparison(rng: random.Random) -> Record:
    """Pick the larger/smaller of two numbers and say so."""
    a, b = rng.sample(range(1, 1000), 2)
    if rng.random() < 0.5:
        return _record("comparison", f"Which number is larger, {a} or {b}?", "",
                       f"{max(a, b)} is larger than {min(a, b)}.")
    return _record("comparison", f"Which number is smaller, {a} or {b}?", "",
                   f"{min(a, b)} is smaller than {max(a, b)}.")


FAMILIES: dict[str, Callable[[random.Random], Record]] = {
    "arithmetic": arithmetic, "sorting": sort_numbers, "reversal": reverse_words,
    "string": string_transform, "conversion": unit_conversion, "lookup": lookup,
    "counting": counting, "sequence": sequence, "comparison": comparison,
}

DEFAULT_SPLITS = {"train": 4000, "dev": 200, "test": 300}


def generate_splits(sizes: dict[str, int] | None = None, *, seed: int = 1234,
                    families: tuple[str, ...] | None = None) -> dict[str, list[Record]]:
    """Generate disjoint splits (no prompt appears in two splits), families in round robin.

    Args:
        sizes: records per split, in generation order (default :data:`DEFAULT_SPLITS`).
        seed: the only source of randomness; the same seed gives the same records.
        families: names from :data:`FAMILIES` to use (default: all).

    Raises:
        ValueError: an unknown family, or a split that cannot be filled with unique prompts.
    """
    sizes = dict(DEFAULT_SPLITS if sizes is None else sizes)
    names = tuple(FAMILIES) if families is None else tuple(families)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"unknown task families {unknown}; known: {sorted(FAMILIES)}")
    seen: set[str] = set()
    out: dict[str, list[Record]] = {}
    for split_idx, (split, n) in enumerate(sizes.items()):
        rng = random.Random(seed * 1000 + split_idx)
        records: list[Record] = []
        tries = 0
        while len(records) < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise ValueError(f"cannot generate {n} unique records for split {split!r}")
            rec = FAMILIES[names[len(records) % len(names)]](rng)
            key = rec["prompt"]
            if key in seen:
                continue
            seen.add(key)
            records.append(rec)
        out[split] = records
    return out
