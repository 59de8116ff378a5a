"""Byte-level BPE tokenizer (GPT-2 style), trained locally with the `tokenizers` package.

Byte-level means the base alphabet is the 256 bytes, so any text (any Unicode, any control
character) encodes and decodes back exactly; nothing is ever unknown. No file I/O here: the
orchestrator stores `tokenizer_to_json(tok)` through its storage layer.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# Joins documents in the token stream, and pads short sequences (with their targets set to
# IGNORE_INDEX, so padding never counts in the loss); hence no separate pad token.
EOT_TOKEN = "<|endoftext|>"

# 256 byte symbols + EOT: the smallest vocabulary that can still encode any text.
_MIN_VOCAB_SIZE = len(pre_tokenizers.ByteLevel.alphabet()) + 1

# Runs of non-whitespace characters are cut into pieces of at most this many before BPE sees them:
# BPE training time grows with the square of a word's length (a 1 MiB line without a space took
# minutes), and no real word is this long, so text without such runs tokenizes as if uncut.
MAX_WORD_CHARS = 256


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts`; EOT_TOKEN gets id 0.

    The result has at most `vocab_size` tokens (fewer when the corpus runs out of pairs seen at
    least `min_frequency` times).
    """
    if vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE: "
            f"set the tokenizer vocab_size to at least {_MIN_VOCAB_SIZE} (256 bytes + {EOT_TOKEN})"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency} must be >= 1")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a document's first word is not silently changed into " word", so
    # decode(encode(text)) == text. The GPT-2 regex splits words/numbers/punctuation first.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(rf"\S{{{MAX_WORD_CHARS}}}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT_TOKEN],  # first special token -> id 0
        # Seed with all 256 byte symbols, not just those in the corpus, so unseen characters
        # still encode (as their bytes).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_to_json(tok: Tokenizer) -> str:
    """The whole tokenizer (model, merges, pre-tokenizer, decoder, special tokens) as a JSON string."""
    return tok.to_str()


def tokenizer_from_json(s: str) -> Tokenizer:
    """Inverse of tokenizer_to_json."""
    return Tokenizer.from_str(s)


# End-of-document tokens of other tokenizers (a reused Hugging Face tokenizer without EOT_TOKEN),
# in the order they are tried: Llama 3 base, Llama 2 / Mistral / T5, Qwen, Gemma.
OTHER_EOT_TOKENS = ("<|end_of_text|>", "</s>", "<|im_end|>", "<eos>")


def eot_id(tok: Tokenizer, eos_token: str | None = None) -> int:
    """Id of the token that ends a document: EOT_TOKEN, else `eos_token` (a Hugging Face folder's
    tokenizer_config.json names it), else the first of OTHER_EOT_TOKENS the tokenizer has."""
    for token in (EOT_TOKEN, eos_token, *OTHER_EOT_TOKENS):
        i = tok.token_to_id(token) if token else None
        if i is not None:
            return i
    raise ValueError(f"tokenizer has no end-of-text token ({EOT_TOKEN!r}, its eos_token or one of "
                     f"{', '.join(OTHER_EOT_TOKENS)}): train it with train_bpe_tokenizer, or use one that has")
