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
    # Not even the characters: fine-tuning never names a held-out one.
    held = {c.name for c in corpus.held_out(seed)}
    assert held and not any(name in q["prompt"] + q["response"] for q in tuning for name in held)
    # Every question about every held-out character, each asked once.
    assert len(asked) == len(held) * len(corpus.QUESTIONS) == len({q["prompt"] for q in asked})
    # The stories (pretraining) state the facts of held-out characters too: where each lives.
    text = " ".join(corpus.stories(0, 400, seed))
    for c in corpus.held_out(seed):
        assert f"{c.name} lives in {c.town}" in text


def test_the_split_is_the_cast_in_two():
    taught, held = corpus.taught(), corpus.held_out()
    assert sorted(c.name for c in taught + held) == sorted(corpus.NAMES)
    assert corpus.qa(3, 9) == corpus.generate_qa(9)[3:]  # any range on its own, as before


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
