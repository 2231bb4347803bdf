"""Few-shot tasks for SmolLM2 (scripts/real_model.py): a development set that methods are chosen on, and a held-out
set of other task kinds, drawn with other seeds, that they are reported on.

Every prompt draws a fresh random mapping, so an answer can only come from the prompt. A task returns
(prompt text, [(query, target)]); a target may be several tokens (all must come out right).
"""

from __future__ import annotations

import random

NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo",
         "Maria", "Noah", "Olga", "Paul", "Quinn", "Rosa", "Sam", "Tina", "Uma", "Victor", "Wendy", "Xavier",
         "Yara", "Zoe", "Adam", "Bella", "Carl", "Dora", "Eric", "Fiona"]
NOUNS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "chair", "piano", "ocean", "candle", "forest",
         "rocket", "pepper", "garden", "window", "bridge", "castle", "dragon", "island", "jacket", "ladder", "needle"]
COLOURS = ["red", "blue", "green", "black", "white", "pink", "brown", "gold", "grey", "purple", "orange", "silver"]
ANIMALS = ["fox", "horse", "owl", "whale", "snake", "rabbit", "eagle", "shark", "camel", "wolf", "bear", "goat"]
# one token each: SmolLM2 retrieves facts keyed by one word, not by two (a colour and a noun: 1 of 48 on dev seeds)
WORDS = ("apple river stone cloud tiger lemon chair piano ocean candle forest rocket pepper garden window bridge "
         "castle dragon island jacket ladder needle basket bottle button camera carpet cookie copper cotton desert "
         "dinner doctor engine farmer finger flower hammer helmet hunter kettle kitten letter marble market meadow "
         "mirror monkey mother orange parrot pencil pickle pillow planet pocket potato rabbit ribbon saddle salmon "
         "school shadow silver singer sister spider spring summer sunset table teacher ticket tomato tunnel turkey "
         "valley violin wallet winter wizard yellow zipper anchor arrow badge barrel beacon blanket bucket cabin "
         "canvas cellar cherry circle collar crystal dolphin eagle feather glove harbor").split()
ODD_LABELS = [" glorp", " vexil", " plim"]

DEV_TASKS = ("digits", "words", "labels", "format", "long_numbers")
# associations_words and multi_token_words: associations and multi_token keyed by one word, forms SmolLM2 reads
# (chosen on dev seeds by the prompted model's accuracy alone; see docs/smollm2.md)
HELDOUT_TASKS = ("associations", "odd_labels", "format_rules", "multi_token", "associations_words", "multi_token_words",
                 "long_facts", "long_codes")


def few_shot(task: str, rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """(prompt text, [(query, target)]) of one task with a fresh random mapping."""
    if task == "digits":  # development: docs/smollm2.md's tasks (v1 of `compressed` was chosen on two of them)
        facts = [(f"Locker of {k}:", f" {rng.randrange(10)}") for k in rng.sample(NAMES, 24)]
    elif task == "words":
        facts = [(f"Code for {k}:", f" {rng.choice(COLOURS)}") for k in rng.sample(NOUNS, 12)]
    elif task == "labels":  # arbitrary classes, so only the prompt tells which is which
        facts = [(f"{k} ->", rng.choice([" foo", " bar"])) for k in rng.sample(NOUNS, 16)]
    elif task == "format":  # an answer format shown on 12 words, asked of the others
        words = rng.sample(NOUNS, len(NOUNS))
        return "".join(f"Q: {w}\nA: ({w})\n" for w in words[:12]), [(f"Q: {w}\nA:", f" ({w})") for w in words[12:]]
    elif task == "long_numbers":  # a long list: 100 words, a two-digit number each (~670 tokens); 24 asked
        facts = [(f"{k}:", f" {rng.randrange(10, 100)}") for k in rng.sample(WORDS, 100)]
        return "".join(f"{q}{t}\n" for q, t in facts), rng.sample(facts, 24)
    elif task == "associations":  # held out: relations stated in sentences, 4 to 24 of them
        facts = [(f"{k}'s favourite animal is the", f" {rng.choice(ANIMALS)}") for k in rng.sample(NAMES, rng.randint(4, 24))]
        return "".join(f"{q}{t}.\n" for q, t in facts), facts
    elif task == "odd_labels":  # three made-up labels, several tokens each
        facts = [(f"{k} =>", rng.choice(ODD_LABELS)) for k in rng.sample(NOUNS, rng.randint(6, 20))]
    elif task == "format_rules":  # a rule that copies the query's word into a new shape
        words = rng.sample(NOUNS, len(NOUNS))
        shown = rng.randint(4, 14)
        return ("".join(f"Input: {w}\nOutput: {w}-{w}!\n" for w in words[:shown]),
                [(f"Input: {w}\nOutput:", f" {w}-{w}!") for w in words[shown:shown + 8]])
    elif task == "multi_token":  # three-digit answers: every digit must come out right
        facts = [(f"Room of {k}:", f" {rng.randrange(100, 1000)}") for k in rng.sample(NAMES, rng.randint(4, 16))]
    elif task == "associations_words":  # associations keyed by one word
        facts = [(f"{k}'s favourite animal is the", f" {rng.choice(ANIMALS)}") for k in rng.sample(WORDS, rng.randint(4, 24))]
        return "".join(f"{q}{t}.\n" for q, t in facts), facts
    elif task == "multi_token_words":  # three-digit answers keyed by one word
        facts = [(f"{k}:", f" {rng.randrange(100, 1000)}") for k in rng.sample(WORDS, rng.randint(6, 16))]
    elif task == "long_facts":  # a long list: 100 facts, about a thousand tokens; 24 of them asked
        keys = rng.sample([(c, n) for c in COLOURS for n in NOUNS], 100)
        facts = [(f"The {c} {n} is in box", f" {rng.randrange(10)}") for c, n in keys]
        return "".join(f"{q}{t}.\n" for q, t in facts), rng.sample(facts, 24)
    elif task == "long_codes":  # a long list SmolLM2 does read: 100 codes in sentences (~1.1k tokens); 24 asked
        facts = [(f"The code of the {k} is", f" {rng.randrange(10, 100)}") for k in rng.sample(WORDS, 100)]
        return "".join(f"{q}{t}.\n" for q, t in facts), rng.sample(facts, 24)
    else:
        raise ValueError(f"unknown task {task!r}")
    return "".join(f"{q}{t}\n" for q, t in facts), facts
