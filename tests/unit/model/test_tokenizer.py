"""Unit tests of model/tokenizer.py: a byte-level BPE trained on a small generated corpus."""

import random

import pytest

from model import EOT_TOKEN, eot_id, tokenizer_from_json, tokenizer_to_json, train_bpe_tokenizer

VOCAB = 400

ARBITRARY = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n",
    "naïve café résumé — “quotes” ‘single’ …",
    "日本語のテキストと中文和한국어",
    "emoji 🤖🚀👩‍👩‍👧 and flags 🇫🇷",
    "math: ∑_{i=1}^{n} x_i² ≤ ∞; code: `def f(x): return x**2`",
    "zero\u200bwidth and control \x00\x07 chars",
    "",
    f"doc one{EOT_TOKEN}doc two",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    rng = random.Random(0)
    subjects = ["the cat", "a dog", "my friend", "the teacher", "our neighbour", "the old man"]
    verbs = ["sees", "likes", "walks to", "reads about", "talks with", "waits for"]
    objects = ["the park", "a small house", "the river", "an apple", "the morning train", "the city"]
    tails = ["today.", "every day.", "in the evening.", "before lunch.", "again!", "quietly."]
    return [
        f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(tails)}"
        for _ in range(400)
    ]


@pytest.fixture(scope="module")
def tok(corpus):
    return train_bpe_tokenizer(corpus, vocab_size=VOCAB)


def test_vocab_size_at_most_requested_and_merges_learned(tok):
    size = tok.get_vocab_size()
    assert size <= VOCAB
    assert size > 257  # it learned merges beyond the 256 bytes + EOT


def test_common_words_compress(tok, corpus):
    # BPE is doing its job: the corpus needs far fewer tokens than bytes.
    n_tokens = sum(len(tok.encode(s).ids) for s in corpus)
    n_bytes = sum(len(s.encode("utf-8")) for s in corpus)
    assert n_tokens < n_bytes / 2


@pytest.mark.parametrize("text", ARBITRARY)
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text).ids
    assert all(0 <= i < tok.get_vocab_size() for i in ids)
    # skip_special_tokens=False: an EOT inside the text is part of the text.
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_eot_is_id_zero_and_a_single_token(tok, corpus):
    assert eot_id(tok) == 0
    assert tok.encode(EOT_TOKEN).ids == [0]
    ids = tok.encode(f"the cat{EOT_TOKEN}the dog").ids
    assert ids.count(0) == 1
    # Stable: a tokenizer trained on other text puts EOT at the same id.
    other = train_bpe_tokenizer(reversed(corpus[:50]), vocab_size=300)
    assert eot_id(other) == eot_id(tok)


def test_json_round_trip_gives_identical_encodings(tok, corpus):
    s = tokenizer_to_json(tok)
    assert isinstance(s, str)
    again = tokenizer_from_json(s)
    assert again.get_vocab() == tok.get_vocab()
    for text in corpus[:20] + ARBITRARY:
        assert again.encode(text).ids == tok.encode(text).ids
    assert again.decode(tok.encode(ARBITRARY[5]).ids) == ARBITRARY[5]


def test_training_accepts_a_generator(corpus):
    tok = train_bpe_tokenizer((s for s in corpus), vocab_size=300)
    assert tok.get_vocab_size() <= 300


def test_too_small_vocab_raises():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["abc"], vocab_size=100)


def test_a_long_run_without_whitespace_trains_in_a_second_and_round_trips(corpus):
    """BPE training grows with the square of a word's length: a 1 MiB line without a space took
    minutes. Runs longer than MAX_WORD_CHARS are cut first, so it takes well under a second."""
    import time

    from model.tokenizer import MAX_WORD_CHARS

    rng = random.Random(1)
    run = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=1 << 20))  # 1 MiB, few repeated pairs
    t0 = time.perf_counter()
    tok = train_bpe_tokenizer(corpus + [run, "x" * (1 << 20)], vocab_size=VOCAB)
    assert time.perf_counter() - t0 < 20  # (about 0.5 s; minutes before the cut)
    ids = tok.encode(run).ids
    assert tok.decode(ids) == run
    # A run is cut into pieces of at most MAX_WORD_CHARS: no token spans two pieces
    assert len(tok.encode("y" * (4 * MAX_WORD_CHARS)).ids) >= 4


def test_text_without_long_runs_tokenizes_as_before_the_cut(corpus):
    """The cut changes nothing for text whose runs of non-space characters are shorter."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.decoder = decoders.ByteLevel()
    plain.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=VOCAB, min_frequency=2, special_tokens=[EOT_TOKEN], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = train_bpe_tokenizer(corpus, vocab_size=VOCAB)
    assert tok.get_vocab() == plain.get_vocab()
    for text in corpus[:50] + ARBITRARY:
        assert tok.encode(text).ids == plain.encode(text).ids
