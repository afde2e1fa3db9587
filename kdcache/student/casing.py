"""Case- and normalisation-aware vocabulary mapping: a normalising teacher facing a student that keeps the difference.

An uncased teacher (BERT's lowercasing WordPiece), an accent-stripping or an NFKC one predicts " the"
where a cased student reads " The" or " the": its vocabulary has only the normalised text. Mapping by
text alone sends all of that mass to the student's " the", which teaches the student that capitals
never come. Here a teacher token's student token has *variants*: the student tokens that the
teacher's own normaliser (its `tokenizers` backend `normalizer`, not a copy of what it does) turns
into the same text (" the", " The", " THE"; " cafe", " café"). At a position where the student's
true next token is one of the variants of a listed teacher token, that token's mass goes to it: the
teacher's token matches the text as written, up to the teacher's normaliser. Elsewhere a listed
token's mass is split over its variants by a prior estimated from the cache's own text: how often
the student writes each variant after the same *context class* of the text read so far (sentence
start, line start, after other whitespace, glued to a word), smoothed towards the share of each
*casing class* (lowercase, capitalised, other) of all student tokens there, so that a word seen
rarely still follows its context's casing.

Where teacher and student normalise alike (the same normaliser, or none on the teacher's side),
or no student text has two variants, nothing changes: every token is its only variant.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np

from ..tasks.spans import token_spans

CONTEXTS = ("sentence", "line", "space", "word")  # what the student has read before its next token ends in
CASINGS = ("lowercase", "capitalised", "other")  # of a student token's letters
MAX_VARIANTS = 8  # student tokens one teacher token's mass can be split over (the mapped one and 7 more)
LOOK_BACK = 64  # characters of the text read that decide the context class
_CLOSING = "\"'’”)]*_"  # may follow a sentence's end before the whitespace


def context_class(text: str, boundary: int) -> int:
    """The index in CONTEXTS of the text before character `boundary`: where the next token comes."""
    left = text[max(0, boundary - LOOK_BACK):boundary]
    stripped = left.rstrip()
    core = stripped.rstrip(_CLOSING)
    if (not core and boundary <= LOOK_BACK) or core[-1:] in (".", "!", "?"):
        return 0
    if "\n" in left[len(stripped):]:
        return 1
    return 2 if len(stripped) < len(left) else 3


def casing_class(text: bytes | str | None) -> int:
    """The index in CASINGS of a token text: lowercase (all its letters), capitalised (its first letter), other."""
    if isinstance(text, bytes):
        text = text.decode(errors="ignore")
    letters = [char for char in text or "" if char.isalpha()]
    if letters and all(char.islower() for char in letters):
        return 0
    return 1 if letters and letters[0].isupper() else 2


def normalises_alike(teacher_tokenizer, student_tokenizer) -> bool:
    """Whether the student sees no distinction the teacher's normaliser removes: the same normaliser, or none
    on the teacher's side."""
    teacher = json.loads(teacher_tokenizer.backend_tokenizer.to_str()).get("normalizer")
    return teacher is None or teacher == json.loads(student_tokenizer.backend_tokenizer.to_str()).get("normalizer")


def variant_table(teacher_tokenizer, student_texts: list[bytes | str | None]) -> np.ndarray:
    """int64 [V_student, G]: per student id, the student tokens the teacher's normaliser cannot tell from it,
    itself first, then by id, padded with -1; G = 1 when no student token has another variant.

    Only the first id of each text takes part (the one `vocabulary_map` maps to); texts of whitespace
    alone (before or after the normaliser), special tokens and bytes that are not whole characters are their
    own only variant.
    """
    table = np.arange(len(student_texts), dtype=np.int64)[:, None]
    normalizer = teacher_tokenizer.backend_tokenizer.normalizer
    if normalizer is None:
        return table
    groups: dict[str, list[int]] = {}
    seen: set[bytes] = set()
    for index, text in enumerate(student_texts):
        if not isinstance(text, bytes) or text in seen or not text.strip():
            continue
        seen.add(text)
        try:
            key = normalizer.normalize_str(text.decode())
        except UnicodeDecodeError:
            continue
        if key.strip():  # a normaliser that drops control characters leaves nothing of them to tell apart
            groups.setdefault(key, []).append(index)
    shared = [members for members in groups.values() if len(members) > 1]
    width = min(MAX_VARIANTS, max((len(members) for members in shared), default=1))
    table = np.concatenate([table, np.full((len(student_texts), width - 1), -1, dtype=np.int64)], axis=1)
    for members in shared:
        for index in members:
            others = [other for other in members if other != index][:width - 1]
            table[index, 1:1 + len(others)] = others
    return table


def variant_scores(student_tokenizer, texts: Iterable[str], casings: np.ndarray) -> np.ndarray:
    """float64 [len(CONTEXTS), V_student]: the prior weight of each student token as a variant, per context class.

    Its count after that context class in `texts` (the student's own tokenization of the cache's text),
    plus the smoothed share of its casing class among all student tokens there, (n_casing + 1) / (n + 3):
    what the prior falls back on for a token rarely or never seen, and never zero.
    """
    counts = np.zeros((len(CONTEXTS), len(casings)), dtype=np.float64)
    texts = list(texts)
    encoded = student_tokenizer(texts, return_offsets_mapping=True, return_special_tokens_mask=True)
    for text, ids, offsets, special in zip(texts, encoded["input_ids"], encoded["offset_mapping"],
                                          encoded["special_tokens_mask"]):
        boundary = 0
        for token, (start, end) in zip(ids, token_spans(offsets, special).tolist()):
            if end > start:
                counts[context_class(text, boundary), token] += 1
            boundary = end
    by_casing = np.stack([np.bincount(casings, weights=row, minlength=len(CASINGS)) for row in counts])
    shares = (by_casing + 1) / (by_casing.sum(1, keepdims=True) + len(CASINGS))
    return counts + shares[:, casings]


def split_over_variants(ids: np.ndarray, logprobs: np.ndarray, mapped: np.ndarray, variants: np.ndarray,
                        scores: np.ndarray, actual: np.ndarray, contexts: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Target entries [n, k] spread over their variants: (variant slot [n, k·G], log-prob [n, k·G]).

    `mapped` [n, k] is each entry's student id (-1: unmapped, or not a teacher id), `actual` [n] the student's
    true next token, `contexts` [n] each position's context class. Entry j's variant g (its `variants` row,
    slot 0 the mapped token itself) gets column j·G + g: an entry whose mapped token has variants goes whole
    to the true next token when that is one of them, else is split by `scores`; any other entry stays whole
    in slot 0. The caller turns (entry id, slot) into an id (`CrossTokenizer.target_map`).
    """
    members = np.where(mapped[..., None] >= 0, variants[np.maximum(mapped, 0)], -1)  # [n, k, G]
    members[..., 0] = mapped
    valid = members >= 0
    matched = valid & (members == actual[:, None, None])
    weights = np.where(valid, scores[contexts[:, None, None], np.maximum(members, 0)], 0.0)
    weights = np.where(matched.any(-1, keepdims=True), matched, weights)
    whole = np.zeros(members.shape[-1])
    whole[0] = 1.0
    weights = np.where(valid[..., 1:2], weights / np.maximum(weights.sum(-1, keepdims=True), 1e-300), whole)
    with np.errstate(divide="ignore"):
        split = logprobs[..., None].astype(np.float64) + np.log(weights)
    slots = np.broadcast_to(np.arange(members.shape[-1]), members.shape)
    return slots.reshape(len(ids), -1), split.reshape(len(ids), -1).astype(np.float32)
