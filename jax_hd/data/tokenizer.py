"""Small byte-level BPE tokenizers trained locally (for the embedded-default policies; no hub download)."""

from __future__ import annotations

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
