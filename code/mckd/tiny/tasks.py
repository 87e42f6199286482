"""The generated instruction dataset of the embedded default.

Every record follows the published jsonl schema: ``instruction``, ``input`` (may be empty),
``output``, ``prompt`` (rendered with :func:`mckd.data.examples.render_prompt`) and ``category``
(the task family). ``output`` is the list of every valid phrasing of the answer with the drawn one
first (evaluation scores ROUGE-L against the best-matching reference); training files keep the
drawn phrasing only (:func:`training_record`).

The families are small algorithmic or in-context tasks whose content is fully determined by the
prompt, so a model can learn them from a few thousand examples, but they need different amounts of
"computation" (copying, sorting, carrying digits, two-hop lookup). A larger model learns them
clearly better than a smaller one in minutes of CPU training, which is what distillation needs.
Each answer has 3-4 phrasings drawn with unequal weights, so the targets have real entropy and a
teacher's full distribution says more than one label.

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

Record = dict  # instruction, input, output (str, or list of references), prompt, category
Variants = list[tuple[str, float]]  # (answer phrasing, probability weight)


def _record(rng: random.Random, category: str, instruction: str, input_text: str,
            variants: Variants) -> Record:
    """One record whose ``output`` lists every valid phrasing, the drawn one first.

    The answer is drawn from ``variants`` with their weights, so the training targets have real
    entropy (several phrasings of the same content, one more likely than the others); the drawn
    phrasing is the training label, every phrasing is a reference for ROUGE-L.
    """
    texts = [t for t, _ in variants]
    drawn = rng.choices(range(len(texts)), weights=[w for _, w in variants])[0]
    refs = [texts[drawn], *(t for i, t in enumerate(texts) if i != drawn)]
    return {"instruction": instruction, "input": input_text, "output": refs,
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
    return _record(rng, "arithmetic", f"{text} How many {item} does {name} have now?", "", [
        (f"{name} has {total} {item} now.", 0.4), (f"Now {name} has {total} {item}.", 0.25),
        (f"{name} ends up with {total} {item}.", 0.2), (f"The answer is {total} {item}.", 0.15)])


def sort_numbers(rng: random.Random) -> Record:
    """Sort 3-6 numbers ascending or descending."""
    nums = rng.sample(range(1, 100), rng.randint(3, 6))
    desc = rng.random() < 0.3
    order = "largest to smallest" if desc else "smallest to largest"
    out = ", ".join(map(str, sorted(nums, reverse=desc)))
    return _record(rng, "sorting", f"Sort the following numbers from {order}.", ", ".join(map(str, nums)),
                   [(out, 0.5), (f"The sorted numbers are {out}.", 0.3),
                    (f"From {order}: {out}", 0.2)])


def reverse_words(rng: random.Random) -> Record:
    """Reverse the order of 3-6 words."""
    words = rng.sample(WORDS, rng.randint(3, 6))
    out = " ".join(reversed(words))
    return _record(rng, "reversal", "Reverse the order of the words in the list.", " ".join(words),
                   [(out, 0.5), (f"The reversed list is: {out}", 0.3), (f"Reversed: {out}", 0.2)])


def pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word of 2-3 consonant-vowel syllables (e.g. 'tobaki')."""
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))


def string_transform(rng: random.Random) -> Record:
    """Character-level rewrites of made-up words (so they cut across learned tokens): capitals,
    spelling with dashes, letter reversal."""
    word = pseudo_word(rng)
    kind = rng.randrange(3)
    if kind == 0:
        instruction, out, what = "Write the word in capital letters.", word.upper(), "In capital letters"
    elif kind == 1:
        instruction, out, what = ("Spell the word with a dash between the letters.", "-".join(word),
                                  "Spelled out")
    else:
        instruction, out, what = "Write the letters of the word in reverse order.", word[::-1], "Reversed"
    return _record(rng, "string", instruction, word,
                   [(out, 0.5), (f"{what}, {word} is {out}.", 0.3), (f"The result is {out}.", 0.2)])


def unit_conversion(rng: random.Random) -> Record:
    """'Convert 7 kilometers to meters.' -> '7 kilometers is 7000 meters.'"""
    src, dst, factor = rng.choice(CONVERSIONS)
    n = rng.randint(2, 99)
    m = n * factor
    return _record(rng, "conversion", f"Convert {n} {src} to {dst}.", "", [
        (f"{n} {src} is {m} {dst}.", 0.4), (f"{n} {src} equals {m} {dst}.", 0.3),
        (f"That is {m} {dst}.", 0.2), (f"The answer is {m} {dst}.", 0.1)])


def lookup(rng: random.Random) -> Record:
    """In-context lookup, one hop (favourite colour) or two hops (pet -> owner -> city)."""
    people = rng.sample(NAMES, 4)
    if rng.random() < 0.5:
        colors = rng.sample(COLORS, 4)
        table = "\n".join(f"{p}: {c}" for p, c in zip(people, colors))
        i = rng.randrange(4)
        p, c = people[i], colors[i]
        return _record(rng, "lookup", f"Using the list, what is the favorite color of {p}?", table, [
            (f"The favorite color of {p} is {c}.", 0.4), (f"{p} likes {c} best.", 0.3),
            (f"It is {c}.", 0.2), (f"{c}", 0.1)])
    pets, cities = rng.sample(PETS, 4), rng.sample(CITIES, 4)
    owners = "\n".join(f"{p} owns the {a}." for p, a in zip(people, pets))
    homes = "\n".join(f"{p} lives in {c}." for p, c in zip(rng.sample(people, 4), cities))
    where = {line.split(" lives in ")[0]: line.split(" lives in ")[1][:-1] for line in homes.split("\n")}
    i = rng.randrange(4)
    pet, p, c = pets[i], people[i], where[people[i]]
    return _record(rng, "lookup", f"In which city does the owner of the {pet} live?",
                   f"{owners}\n{homes}", [
                       (f"The {pet} belongs to {p}, who lives in {c}.", 0.4),
                       (f"{p} owns the {pet} and lives in {c}.", 0.3),
                       (f"The owner of the {pet} lives in {c}.", 0.2), (f"In {c}.", 0.1)])


def counting(rng: random.Random) -> Record:
    """Count words in a list or occurrences of one word."""
    if rng.random() < 0.5:
        words = rng.sample(WORDS, rng.randint(2, 9))
        n = len(words)
        return _record(rng, "counting", "How many words are in the list?", " ".join(words), [
            (f"There are {n} words in the list.", 0.4), (f"The list has {n} words.", 0.3),
            (f"{n} words.", 0.2), (f"{n}", 0.1)])
    target = rng.choice(COLORS)
    others = [c for c in COLORS if c != target]
    k = rng.randint(1, 5)
    words = [target] * k + [rng.choice(others) for _ in range(rng.randint(1, 5))]
    rng.shuffle(words)
    return _record(rng, "counting", f"How many times does the word {target} appear in the list?",
                   " ".join(words), [
                       (f"The word {target} appears {k} times.", 0.4),
                       (f"{target} appears {k} times in the list.", 0.3),
                       (f"It appears {k} times.", 0.2), (f"{k} times.", 0.1)])


def sequence(rng: random.Random) -> Record:
    """Continue an arithmetic progression by two terms."""
    start, step, n = rng.randint(1, 30), rng.randint(2, 12), rng.randint(3, 5)
    terms = [start + step * i for i in range(n + 2)]
    a, b = terms[n], terms[n + 1]
    return _record(rng, "sequence", "Continue the sequence with the next two numbers.",
                   ", ".join(map(str, terms[:n])), [
                       (f"{a}, {b}", 0.5), (f"The next two numbers are {a} and {b}.", 0.3),
                       (f"{a} and {b}", 0.2)])


def comparison(rng: random.Random) -> Record:
    """Pick the larger/smaller of two numbers and say so."""
    a, b = rng.sample(range(1, 1000), 2)
    hi, lo = max(a, b), min(a, b)
    if rng.random() < 0.5:
        return _record(rng, "comparison", f"Which number is larger, {a} or {b}?", "", [
            (f"{hi} is larger than {lo}.", 0.4), (f"The larger number is {hi}.", 0.3),
            (f"{hi} is larger.", 0.2), (f"{hi}", 0.1)])
    return _record(rng, "comparison", f"Which number is smaller, {a} or {b}?", "", [
        (f"{lo} is smaller than {hi}.", 0.4), (f"The smaller number is {lo}.", 0.3),
        (f"{lo} is smaller.", 0.2), (f"{lo}", 0.1)])


FAMILIES: dict[str, Callable[[random.Random], Record]] = {
    "arithmetic": arithmetic, "sorting": sort_numbers, "reversal": reverse_words,
    "string": string_transform, "conversion": unit_conversion, "lookup": lookup,
    "counting": counting, "sequence": sequence, "comparison": comparison,
}

# The teacher's corpus is the large split; the student trains on its first STUDENT_TRAIN records.
DEFAULT_SPLITS = {"teacher_train": 8000, "dev": 200, "test": 300}
STUDENT_TRAIN = 500


def training_record(rec: Record) -> Record:
    """The record as a training file holds it: ``output`` is the drawn phrasing alone."""
    out = rec["output"]
    return {**rec, "output": out[0] if isinstance(out, list) else out}


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
