"""A character-level tokenizer for the corpus: one token per character, built with `tokenizers`.

Decisions that the later stages rely on:

* No post-processor: nothing is added automatically, neither bos nor eos. Every prompt starts with
  the `<INS>` token, which already marks the start of a sequence, and training appends eos to the
  text itself. So encoding gives the same ids with or without `add_special_tokens` (TRL's DPO calls the
  tokenizer with the default True, the text-generation pipeline with False), and the prompt's ids are
  always a prefix of the prompt+completion ids.
* Save next to a Llama `config.json`: with transformers 5, AutoTokenizer swaps in the model type's own
  tokenizer class for some architectures (a qwen2 config gives Qwen2Tokenizer, whose byte-level
  pre-tokenizer drops every Chinese character), while a llama config loads our `tokenizer.json` as is.
  tests/test_tokenizer.py checks both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from poemdpo.data.prompts import INSTRUCTION, SPECIAL_TOKENS

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
DEFAULT_MIN_FREQUENCY = 3
DEFAULT_MODEL_MAX_LENGTH = 256
# Always in the vocabulary whatever the texts: line breaks carry the poem's shape, and the fixed
# instruction must never encode to <unk>.
ALWAYS_KEPT = "\n" + INSTRUCTION


def train_char_tokenizer(
    texts: Iterable[str],
    min_frequency: int = DEFAULT_MIN_FREQUENCY,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> PreTrainedTokenizerFast:
    """A tokenizer whose vocabulary is every character seen at least `min_frequency` times in `texts`.

    Rarer characters encode to `<unk>`; `<INS>`, `<INP>`, `<RES>` and the bos/eos/pad/unk tokens are
    kept whole. The ids are ordered: the 4 core specials, the 3 prompt markers, then characters by
    falling frequency (ties by code point), so the same texts always give the same ids.
    """
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
    counts: Counter[str] = Counter()
    for text in texts:
        # The markers are added tokens, so their letters must not be counted as characters.
        for marker in SPECIAL_TOKENS:
            text = text.replace(marker, "")
        counts.update(text)
    kept = {char for char, n in counts.items() if n >= min_frequency} | set(ALWAYS_KEPT)
    chars = sorted(kept, key=lambda c: (-counts[c], ord(c)))
    specials = [PAD, BOS, EOS, UNK, *SPECIAL_TOKENS]
    vocab = {token: i for i, token in enumerate(specials + chars)}

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every single character (newline included) is a "word"; WordLevel then looks each one up.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Join tokens back with nothing between them (the default decoder would put spaces in).
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=list(SPECIAL_TOKENS),
        model_max_length=model_max_length,
        # Right padding for training; generation code that batches prompts pads left explicitly.
        padding_side="right",
        clean_up_tokenization_spaces=False,
        chat_template=None,
    )
