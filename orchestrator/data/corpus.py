"""Small corpora generated locally, so the embedded pipeline downloads nothing.

`stories`: short stories about a fixed cast of characters (each with a pet, a colour, a town and a
food that stay the same across stories), in a few sentence templates: enough regularity for a
small GPT to learn in minutes on a CPU. `qa`: question/answer pairs about the same facts, for
fine-tuning; a model pretrained on the stories has seen the facts and learns the answer format.

The stories mention every character; the fine-tuning pairs ask only about half of them (`taught`),
and `heldout_qa` asks about the other half: a fine-tuned model answers those only if it learned the
facts in pretraining (a model fine-tuned from random weights can only guess).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ["Mia", "Leo", "Ava", "Noah", "Ella", "Omar", "Lily", "Finn", "Zoe", "Ravi", "Nina", "Theo",
         "Iris", "Hugo", "Maya", "Sam", "Lena", "Kai", "Rosa", "Ben"]
PETS = ["cat", "dog", "rabbit", "parrot", "turtle", "hamster", "goat", "pony"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
TOWNS = ["Paris", "Lima", "Oslo", "Cairo", "Quito", "Dublin", "Kyoto", "Perth"]
FOODS = ["apples", "soup", "bread", "rice", "cheese", "pears", "noodles", "cake"]
PLACES = ["park", "river", "market", "garden", "hill", "beach", "forest", "library"]
FEELINGS = ["happy", "tired", "hungry", "curious", "sleepy", "proud", "calm", "brave"]
TIMES = ["One morning", "One day", "Later", "In the evening", "At noon", "On Sunday"]


@dataclass(frozen=True)
class Character:
    name: str
    pet: str
    colour: str
    town: str
    food: str


def cast(seed: int = 0) -> list[Character]:
    """The fixed cast: the facts the stories state and the questions ask about."""
    rng = random.Random(f"cast-{seed}")
    return [Character(n, rng.choice(PETS), rng.choice(COLOURS), rng.choice(TOWNS), rng.choice(FOODS)) for n in NAMES]


def _story(rng: random.Random, people: list[Character]) -> str:
    a, b = rng.sample(people, 2)
    place = rng.choice(PLACES)
    lines = [
        f"{a.name} lives in {a.town} with a {a.colour} {a.pet}.",
        f"{rng.choice(TIMES)}, {a.name} and the {a.pet} went to the {place}.",
        f"There they met {b.name}, who has a {b.colour} {b.pet}.",
        f"{b.name} said that {b.name} likes {b.food} and lives in {b.town}.",
        f"{a.name} felt {rng.choice(FEELINGS)} and shared some {a.food} with {b.name}.",
        f"The {a.pet} and the {b.pet} played by the {place} until it was dark.",
        f"Then {a.name} went home to {a.town}, and {b.name} went home to {b.town}.",
    ]
    keep = [lines[0]] + [s for s in lines[1:-1] if rng.random() < 0.8] + [lines[-1]]
    return " ".join(keep)


def stories(start: int, stop: int, seed: int = 0) -> list[str]:
    """Stories number `start` to `stop - 1`; each depends only on (seed, its number), so any range
    can be generated on its own (in parallel tasks)."""
    people = cast(seed)
    return [_story(random.Random(f"stories-{seed}-{i}"), people) for i in range(start, stop)]


def generate_stories(num_documents: int, seed: int = 0) -> list[str]:
    """`num_documents` short stories, deterministic in `seed`."""
    return stories(0, num_documents, seed)


QUESTIONS = [
    ("What pet does {n} have?", "{n} has a {c} {p}."),
    ("Where does {n} live?", "{n} lives in {t}."),
    ("What does {n} like to eat?", "{n} likes {f}."),
    ("What colour is the pet of {n}?", "The {p} of {n} is {c}."),
]


def taught(seed: int = 0) -> list[Character]:
    """The characters the fine-tuning pairs ask about (every other one of the cast)."""
    return cast(seed)[0::2]


def held_out(seed: int = 0) -> list[Character]:
    """The characters only the stories mention: `heldout_qa` asks about them."""
    return cast(seed)[1::2]


def _pair(ch: Character, question: tuple[str, str]) -> dict:
    q, a = question
    fill = dict(n=ch.name, p=ch.pet, c=ch.colour, t=ch.town, f=ch.food)
    return {"prompt": f"Question: {q.format(**fill)}\nAnswer:", "response": " " + a.format(**fill)}


def qa(start: int, stop: int, seed: int = 0) -> list[dict]:
    """Prompt/response pairs `start` to `stop - 1` about the taught characters."""
    people = taught(seed)
    return [_pair(rng.choice(people), rng.choice(QUESTIONS))
            for rng in (random.Random(f"qa-{seed}-{i}") for i in range(start, stop))]


def heldout_qa(seed: int = 0) -> list[dict]:
    """Every question about every held-out character: none of them is in `qa`'s pairs."""
    return [_pair(ch, q) for ch in held_out(seed) for q in QUESTIONS]


def generate_qa(num_examples: int, seed: int = 0) -> list[dict]:
    """Prompt/response pairs about the stories' cast: {"prompt": ..., "response": ...}."""
    return qa(0, num_examples, seed)


# name -> f(start, stop, seed): items `start` to `stop - 1` of a generated corpus
GENERATORS = {"stories": stories, "qa": qa}
