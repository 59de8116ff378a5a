"""Held-out question answering: what a fine-tuned model learned in pretraining.

A job fine-tuned on the generated `qa` pairs (orchestrator.data.corpus) is asked, after its last
step, the question about each character that fine-tuning never asked (`heldout_qa`). Only the
stories of pretraining state those facts, so a model answers them only if it learned them there;
the same fine-tune started from random weights can only guess. Each answer is decoded
greedily and scored by exact match with the expected answer (case, spacing and a final full stop
aside).

The ranks share the questions; every rank makes the same number of forward passes (its share is
padded to the same length and each answer runs to the same number of tokens), so a ZeRO-3 model,
whose every forward is a collective, is asked the same way as a replicated one.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.data import corpus

GENERATED_QA = "generated:qa"


@dataclass(frozen=True)
class QAScore:
    """Exact-match answers of one model to the held-out questions."""

    correct: int
    questions: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.questions if self.questions else 0.0


def heldout_questions(source: str | None, seed: int) -> list[dict]:
    """The held-out prompt/response pairs of a dataset's source: those of the generated `qa` corpus
    (same seed: the same cast); none for any other source (nothing is known to be held out)."""
    return corpus.heldout_qa(seed) if source == GENERATED_QA else []


def normalise(answer: str) -> str:
    """An answer as compared: lower case, single spaces, without a final full stop."""
    return " ".join(answer.lower().split()).rstrip(". ")


def exact_match(answer: str, expected: str) -> bool:
    """Whether the model's answer is the expected one, up to `normalise`."""
    return normalise(answer) == normalise(expected)


def answer_text(new_tokens: list[int], decode, eot: int) -> str:
    """The answer in a greedy continuation: up to the end-of-text token, on its first line."""
    if eot in new_tokens:
        new_tokens = new_tokens[: new_tokens.index(eot)]
    return decode(new_tokens).split("\n", 1)[0]


def rank_share(n: int, rank: int, world: int) -> list[int | None]:
    """The question indices rank `rank` asks (round robin), padded with None (asked, not scored) to
    the same length on every rank."""
    per_rank = -(-n // world)
    mine: list[int | None] = list(range(rank, n, world))
    return mine + [None] * (per_rank - len(mine))


def ask(model, tok, questions: list[dict], indices: list[int | None], eot: int, device) -> int:
    """Greedy answers of `model` (any family of model/) to `questions[i]` for i in `indices`: how many
    match. Every call decodes the same number of tokens (the longest expected answer's, plus its
    end-of-text), so ranks stay in step."""
    import torch  # (only where a model is asked)

    from model.sampling import generate

    if not questions:
        return 0
    budget = max(len(tok.encode(q["response"], add_special_tokens=False).ids) for q in questions) + 1
    correct = 0
    for i in indices:
        q = questions[0 if i is None else i]
        ids = tok.encode(q["prompt"], add_special_tokens=False).ids
        out = generate(model, torch.tensor([ids], device=device), budget, temperature=0.0)  # (1, T + budget)
        answer = answer_text(out[0, len(ids):].tolist(), tok.decode, eot)
        correct += i is not None and exact_match(answer, q["response"])
    return correct
