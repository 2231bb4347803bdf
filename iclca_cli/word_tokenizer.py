"""A small word-level tokenizer for the built-in demo models, built with `tokenizers`.

Text is split the GPT-2 way (byte-level, a leading space belongs to the word), so "apple: 7\n"
becomes ["apple", ":", "Ġ7", "Ċ"]; decoding gives the text back. Unknown words become [UNK].
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIAL = ["[UNK]", "[PAD]"]
PUNCTUATION = [":", ",", ".", "-", "=", ">", "?", "!"]


def build_word_tokenizer(words: list[str]):
    """A fast tokenizer whose vocabulary is SPECIAL, the words with and without a leading space,
    punctuation and newlines, in a fixed order (the same words give the same ids)."""
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pieces = list(SPECIAL)
    for w in [*PUNCTUATION, *words]:
        for variant in (w, " " + w):
            (piece, _), = byte_level.pre_tokenize_str(variant)
            if piece not in pieces:
                pieces.append(piece)
    for nl in ("\n", "\n\n"):
        (piece, _), = byte_level.pre_tokenize_str(nl)
        pieces.append(piece)
    tok = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
