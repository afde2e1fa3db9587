"""How much of the data a tokenizer maps to its unknown token: the sign of a tokenizer that does not fit the text.

A WordPiece or word-level vocabulary built for other text (another language or alphabet, words of
another corpus) turns most words into `[UNK]`. Nothing fails: the teacher then sees a row of
identical tokens, its targets depend on little but the position, and a student learns them to a
loss of ~0. So the dump counts the unknown ids among the tokens it is about to feed the teacher,
and training counts them among the cached inputs; both warn above `UNKNOWN_SHARE_WARNING`.

Special tokens ([CLS], [SEP], [BOS], padding) are not counted: they are not the data, and on short
rows they would dilute the share. Byte-level tokenizers (GPT-2, Llama 3, SmolLM2) have no unknown
token: every text has tokens, so there is nothing to count (None).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# Above this share of the data's (non-special) tokens the tokenizer does not fit the text. A fitting
# tokenizer is far below it (MiniLM's uncased WordPiece: 0 of the 252,043 tokens of CoNLL-2003's training
# split), while a vocabulary built for other text makes [UNK] of most words.
UNKNOWN_SHARE_WARNING = 0.10


def unknown_tokens(token_lists: Iterable, tokenizer) -> dict | None:
    """{"token", "unknown", "tokens", "share"}: how many of the non-special ids in `token_lists` are
    `tokenizer`'s unknown token; None when the tokenizer has none."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return None
    special = np.array(sorted(set(tokenizer.all_special_ids) - {unk}), dtype=np.int64)
    unknown = tokens = 0
    for ids in token_lists:
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[~np.isin(ids, special)]
        unknown += int(np.count_nonzero(ids == unk))
        tokens += len(ids)
    return {"token": tokenizer.unk_token, "unknown": unknown, "tokens": tokens,
            "share": round(unknown / tokens, 6) if tokens else 0.0}


def unknown_warning(count: dict | None, where: str) -> str | None:
    """The one-line warning for `count` (from `unknown_tokens`) when its share is too high, else None;
    `where` says which tokens were counted ("the first 1000 rows")."""
    if count is None or count["share"] <= UNKNOWN_SHARE_WARNING:
        return None
    return (f"{count['share']:.0%} of the tokens of {where} are the unknown token {count['token']} "
            f"({count['unknown']} of {count['tokens']}): the tokenizer does not fit this text (another language, "
            f"alphabet or vocabulary?), so the teacher sees little of it and its targets are degenerate")
