"""Token spans: where each token sits in its text, the common ground of two tokenizers.

A causal-LM cache keeps, for every row, the text its tokens cover and each token's [start, end)
character span in it (Python `str` indices, i.e. Unicode code points, as fast tokenizers report
them with `return_offsets_mapping`). A student with another tokenizer tokenizes the same text and
is aligned to the teacher through these spans (student/crosstok.py), with no teacher at hand.

Spans are normalised the same way on both sides, so that alignment needs only two rules:

* a special token (BOS, [CLS], [SEP], ...: fast tokenizers report (0, 0) for those the template
  adds) covers no text: it becomes an empty span at the end of the token before it (0 at the start);
* spans never go back: starts and ends are non-decreasing (running maxima). Byte-level BPE can split
  one character over several tokens; each of them reports the whole character's span, so they share
  one end and overlap, which is kept (alignment skips boundaries inside a character).
"""

from __future__ import annotations

import numpy as np

from ..errors import KDCacheError


def token_spans(offsets, special_mask) -> np.ndarray:
    """int32 [L, 2] normalised spans from a fast tokenizer's offsets and special-tokens mask (see above)."""
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    special = np.asarray(special_mask, dtype=bool)
    ends = np.maximum.accumulate(np.where(special, 0, spans[:, 1])) if len(spans) else spans[:, 1]
    starts = np.maximum.accumulate(np.where(special, ends, spans[:, 0])) if len(spans) else spans[:, 0]
    return np.stack([np.minimum(starts, ends), ends], axis=1).astype(np.int32)


def covered_text(text: str, spans: np.ndarray) -> str:
    """The part of `text` the tokens cover (all of it unless truncation cut tokens off): what a cache stores."""
    return text[:int(spans[-1, 1])] if len(spans) else ""


def check_spans(spans: np.ndarray | None, text: str | None, num_tokens: int, sample_id: int) -> np.ndarray:
    """`spans` if they are well-formed for `text` and `num_tokens` tokens; a one-line error otherwise.

    A cache is untrusted input: spans are range-checked before any alignment indexes with them.
    """
    if spans is None or text is None:
        raise KDCacheError(f"row {sample_id} has no token offsets or text")
    spans = np.asarray(spans)
    starts, ends = spans[:, 0].astype(np.int64), spans[:, 1].astype(np.int64)
    if (spans.shape != (num_tokens, 2) or (starts < 0).any() or (starts > ends).any() or (ends > len(text)).any()
            or (np.diff(starts) < 0).any() or (np.diff(ends) < 0).any()):
        raise KDCacheError(f"row {sample_id} has invalid token offsets: each of its {num_tokens} tokens needs "
                           f"0 <= start <= end <= {len(text)} (the text length), non-decreasing")
    return spans
