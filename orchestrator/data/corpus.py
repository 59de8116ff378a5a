"""Small corpora generated locally, so the embedded pipeline downloads nothing.

`stories`: short stories about a fixed cast of characters (each with a pet, a colour, a town and a
food that stay the same across stories), in a few sentence templates: enough regularity for a
small GPT to learn in minutes on a CPU. `qa`: question/answer pairs about the same facts, for
fine-tuning; a model pretrained on the stories has seen the facts and learns the answer format.

The stories state every fact; the fine-tuning pairs ask two of the three questions about each
character, and `heldout_qa` asks the third (where Mia lives, say, when fine-tuning asked only about
her pet and her food): a fine-tuned model answers it only if it learned the fact in pretraining; a
model fine-tuned from random weights can only guess.
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
    lines = [  # each fact also stated as the answers to the questions state it ("Mia likes apples.")
        f"{a.name} lives in {a.town}. {a.name} has a {a.colour} {a.pet}.",
        f"{rng.choice(TIMES)}, {a.name} and the {a.pet} went to the {place}.",
        f"There they met {b.name}. {b.name} has a {b.colour} {b.pet}.",
        f"{b.name} likes {b.food} and lives in {b.town}.",
        f"{a.name} felt {rng.choice(FEELINGS)} and shared some {a.food} with {b.name}. {a.name} likes {a.food}.",
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


# The answers say the facts as the stories say them ("Mia lives in Paris."): fine-tuning teaches the
# answer's form, and a model that learned the stories completes it with the right fact.
QUESTIONS = [
    ("What pet does {n} have?", "{n} has a {c} {p}."),
    ("Where does {n} live?", "{n} lives in {t}."),
    ("What does {n} like to eat?", "{n} likes {f}."),
]


def _pairs(seed: int, held: bool) -> list[tuple[Character, tuple[str, str]]]:
    """(character, question) pairs: character i's question i mod 3 is held out, the others taught."""
    return [(ch, q) for i, ch in enumerate(cast(seed)) for j, q in enumerate(QUESTIONS)
            if (j == i % len(QUESTIONS)) == held]


def _pair(ch: Character, question: tuple[str, str]) -> dict:
    q, a = question
    fill = dict(n=ch.name, p=ch.pet, c=ch.colour, t=ch.town, f=ch.food)
    return {"prompt": f"Question: {q.format(**fill)}\nAnswer:", "response": " " + a.format(**fill)}


def qa(start: int, stop: int, seed: int = 0) -> list[dict]:
    """Prompt/response pairs `start` to `stop - 1`: the taught questions, drawn at random."""
    taught = _pairs(seed, held=False)
    return [_pair(*rng.choice(taught)) for rng in (random.Random(f"qa-{seed}-{i}") for i in range(start, stop))]


def heldout_qa(seed: int = 0) -> list[dict]:
    """The held-out questions, one per character: none of them is among `qa`'s pairs."""
    return [_pair(*p) for p in _pairs(seed, held=True)]


def generate_qa(num_examples: int, seed: int = 0) -> list[dict]:
    """Prompt/response pairs about the stories' cast: {"prompt": ..., "response": ...}."""
    return qa(0, num_examples, seed)


# name -> f(start, stop, seed): items `start` to `stop - 1` of a generated corpus
GENERATORS = {"stories": stories, "qa": qa}
