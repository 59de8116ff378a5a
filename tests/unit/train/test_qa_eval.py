"""The demo's held-out question answering: the split of the generated corpus (no question asked
after fine-tuning is in the fine-tuning data), the exact-match scoring, the ranks' shares, and the
baseline job of the default pipeline (the same fine-tune from random weights)."""

from __future__ import annotations

import pytest

from orchestrator.config.compose import compose_root, resolve_jobs
from orchestrator.data import corpus
from orchestrator.errors import ConfigError
from orchestrator.train.qa_eval import QAScore, answer_text, exact_match, heldout_questions, normalise, rank_share


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_no_heldout_question_is_in_the_finetuning_data(seed):
    asked = heldout_questions("generated:qa", seed)
    tuning = corpus.qa(0, 5000, seed)
    assert {q["prompt"] for q in asked}.isdisjoint(q["prompt"] for q in tuning)
    # One question per character, the one fine-tuning never asks about that character; fine-tuning
    # asks each character's two others (so it names everyone), and every answer differs from the
    # answers fine-tuning trains on (nothing of a held-out answer can be copied from a taught one).
    assert len(asked) == len(corpus.NAMES) == len({q["prompt"] for q in asked})
    assert {q["prompt"] for q in tuning} | {q["prompt"] for q in asked} == {
        corpus._pair(c, q)["prompt"] for c in corpus.cast(seed) for q in corpus.QUESTIONS}
    assert {q["response"] for q in asked}.isdisjoint(q["response"] for q in tuning)
    assert {kind for kind in ("has a", "lives in", "likes") for q in asked if kind in q["response"]} == {
        "has a", "lives in", "likes"}
    # The stories (pretraining) state every held-out answer, word for word.
    text = " ".join(corpus.stories(0, 400, seed))
    for q in asked:
        assert q["response"].strip() in text, q


def test_any_range_of_pairs_on_its_own():
    assert corpus.qa(3, 9) == corpus.generate_qa(9)[3:]


def test_only_the_generated_qa_corpus_has_heldout_questions():
    assert heldout_questions("generated:stories", 0) == []
    assert heldout_questions("s3://bucket/qa/", 0) == []
    assert heldout_questions(None, 0) == []


@pytest.mark.parametrize("answer, expected, same", [
    (" Mia lives in Oslo.", " Mia lives in Oslo.", True),
    ("mia  lives in OSLO", " Mia lives in Oslo.", True),  # case, spacing and the full stop aside
    ("Mia lives in Oslo. ", "Mia lives in Oslo.", True),
    (" Mia lives in Lima.", " Mia lives in Oslo.", False),  # another character's town
    (" Mia lives in", " Mia lives in Oslo.", False),  # cut short
    (" Mia lives in Oslo with a cat.", " Mia lives in Oslo.", False),  # more than the answer
    ("", " Mia lives in Oslo.", False),
])
def test_exact_match(answer, expected, same):
    assert exact_match(answer, expected) is same


def test_normalise():
    assert normalise("  The CAT of Mia\tis  red. ") == "the cat of mia is red"


def test_answer_text_stops_at_end_of_text_and_at_a_new_line():
    decode = lambda ids: "".join(chr(i) for i in ids)  # noqa: E731
    assert answer_text([ord(c) for c in " Mia"] + [0, ord("x")], decode, eot=0) == " Mia"
    assert answer_text([ord(c) for c in " Mia\nQuestion"], decode, eot=0) == " Mia"
    assert answer_text([ord(c) for c in " Mia"], decode, eot=0) == " Mia"


@pytest.mark.parametrize("n", [0, 1, 5, 40, 41])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_rank_shares_cover_every_question_once_and_have_one_length(n, world):
    shares = [rank_share(n, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # the same number of forward passes on every rank
    asked = sorted(i for s in shares for i in s if i is not None)
    assert asked == list(range(n))


def test_score():
    assert QAScore(17, 20).accuracy == 0.85 and QAScore(0, 0).accuracy == 0.0


def test_default_pipeline_has_the_same_finetune_from_random_weights():
    jobs = {j.name: j for j in resolve_jobs(compose_root(["pipeline.jobs.finetune.trainer.max_steps=7",
                                                          "pipeline.jobs.finetune.data.num_documents=300"]))}
    fine, scratch = jobs["finetune"], jobs["finetune_scratch"]
    assert scratch.from_scratch and not fine.from_scratch and scratch.init_from is None
    assert scratch.depends_on == fine.depends_on == ("pretrain",)
    assert scratch.trainer == fine.trainer and scratch.trainer.max_steps == 7  # follows finetune's overrides
    assert scratch.workers == fine.workers
    same = ("kind", "source", "seq_len", "num_documents", "seed", "tokenizer_uri", "val_fraction")
    assert {k: getattr(scratch.data, k) for k in same} == {k: getattr(fine.data, k) for k in same}
    assert scratch.data.num_documents == 300
    assert scratch.data.uri != fine.data.uri  # prepared side by side: never into one folder


def test_the_baseline_can_be_dropped_and_cannot_also_have_weights():
    assert [j.name for j in resolve_jobs(compose_root(["~pipeline.jobs.finetune_scratch"]))] == ["pretrain",
                                                                                                 "finetune"]
    with pytest.raises(ConfigError, match="from_scratch=true and init_from=/m contradict"):
        compose_root(["+pipeline.jobs.finetune_scratch.init_from=/m"])


def test_the_pipeline_line_shows_the_two_finetunes_side_by_side():
    """`orch run` prints the default pipeline as it runs: pretraining, then both fine-tunes."""
    from types import SimpleNamespace

    from orchestrator.service.pipeline import _stages

    jobs = [SimpleNamespace(id=f"p1-{name}", depends_on=deps) for name, deps in
            (("pretrain", []), ("finetune", ["p1-pretrain"]), ("finetune_scratch", ["p1-pretrain"]))]
    assert _stages(jobs) == "p1-pretrain -> p1-finetune, p1-finetune_scratch"
    chain = [SimpleNamespace(id="a", depends_on=[]), SimpleNamespace(id="b", depends_on=["a"]),
             SimpleNamespace(id="c", depends_on=["b"])]
    assert _stages(chain) == "a -> b -> c"
    assert _stages([SimpleNamespace(id="d", depends_on=["p0-pretrain"])]) == "d"  # (after another pipeline's job)
