"""Small byte-level BPE tokenizers trained locally (for the embedded-default policies; no hub download)."""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
# Search-agent tags are single tokens, so stop strings and query spans fall on token boundaries.
AGENT_TAGS = (
    "<think>", "</think>", "<search>", "</search>", "<information>", "</information>",
    "<documents>", "</documents>", "<refine>", "</refine>", "<answer>", "</answer>",
)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, extra_tokens: Sequence[str] = AGENT_TAGS
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 / Qwen2 style pre-tokenisation) trained on `texts`.

    Ids 0 and 1 are `PAD_TOKEN` and `EOS_TOKEN`; `extra_tokens` are added as single (non-special) tokens so they
    survive decoding. Training is deterministic for a given text sequence.
    """
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_tokens(list(extra_tokens))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN)


UNK_TOKEN = "<|unk|>"


def _word_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Whitespace-separated words, with every punctuation character a word of its own."""
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def train_word_tokenizer(
    texts: Iterable[str], extra_tokens: Sequence[str] = AGENT_TAGS, max_vocab_size: int = 0,
    phrases: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `texts`: one token per whitespace-separated word and per punctuation character,
    so that copying a word is copying one token (the embedded tiny policy of the compact QA world).

    Ids 0, 1, 2 are `PAD_TOKEN`, `EOS_TOKEN`, `UNK_TOKEN`; then the words by decreasing count (ties in code-point
    order; the `max_vocab_size` most frequent when > 0, the rest map to `UNK_TOKEN`); then `extra_tokens` (the agent
    tags) and `phrases` (e.g. entity names such as `Empire of Japan`), each one token, matched as whole words before
    splitting (the longest match first). Whitespace is not kept: `decode` joins tokens with single spaces, so
    `decode(encode(text))` is `text` with its whitespace normalised around punctuation. Deterministic for a given
    text sequence.
    """
    pre_tokenizer = _word_pre_tokenizer()
    tags = set(extra_tokens)
    counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        for tag in extra_tokens:
            text = text.replace(tag, " ")
        counts.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(text) if piece not in tags)
    words = sorted(counts, key=lambda w: (-counts[w], w))
    if max_vocab_size > 0:
        words = words[: max(max_vocab_size - 3 - len(extra_tokens), 0)]
    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1, UNK_TOKEN: 2} | {w: i + 3 for i, w in enumerate(words)}
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.add_special_tokens([PAD_TOKEN, EOS_TOKEN, UNK_TOKEN])
    tokenizer.add_tokens(list(extra_tokens))
    multiword = sorted({p for p in phrases if " " in p.strip()})
    tokenizer.add_tokens([tokenizers.AddedToken(p, single_word=True, normalized=False) for p in multiword])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                   unk_token=UNK_TOKEN)
