"""A small word-level tokenizer for the built-in demo models, built with `tokenizers`.

A word keeps its leading space and a trailing colon, so "apple: 7\\n" becomes ["apple:", "Ġ7", "Ċ"]
(byte-level symbols: Ġ is a space, Ċ a newline): a value directly follows its key, as a lookup
(induction) circuit likes it. Decoding gives the text back. Unknown words become [UNK].
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

SPECIAL = ["[UNK]", "[PAD]"]
PUNCTUATION = [":", ",", ".", "-", "=", ">", "?", "!"]
SPLIT = Regex(r" ?[^\s:]+:?|:|\s")  # " word" or "word:" or " word:", a lone colon, one whitespace character


def _pre_tokenizer():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(SPLIT, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def build_word_tokenizer(words: list[str]):
    """A fast tokenizer whose vocabulary is SPECIAL, then each word with and without a leading space
    and a trailing colon, punctuation and whitespace, in a fixed order (same words, same ids)."""
    from transformers import PreTrainedTokenizerFast

    pre = _pre_tokenizer()
    pieces = list(SPECIAL)
    variants = [p for p in PUNCTUATION] + [f"{s}{w}{c}" for w in words for s in ("", " ") for c in ("", ":")]
    for text in [*variants, " ", "\n", "\t"]:
        for piece, _ in pre.pre_tokenize_str(text):
            if piece not in pieces:
                pieces.append(piece)
    tok = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
