"""Cross-tokenizer distillation: a student whose tokenizer is not the cache's learns from the cache.

The cache keeps each row's text and every teacher token's character span (tasks/spans.py), so the
student side needs no teacher:

1. **Tokenize** the cached text with the student's tokenizer (offsets, same span normalisation).
2. **Align** by character boundaries. Position t of a causal LM predicts what follows the text up to
   the end of token t. A position is a *boundary* when its next token covers text and starts at or
   after that end (not inside a character that byte-level BPE split over several tokens). A student
   boundary takes the targets of the *last teacher boundary between the end of the student's token
   and the start of its next one*: both distributions then predict the student's next piece of text
   after the same prefix. Mostly that teacher boundary ends at the same character; when the student
   skips whitespace (WordPiece drops it), it is the teacher boundary after the whitespace, where the
   teacher predicts the next word rather than a line break; among boundaries ending at one character
   (zero-width tokens) the last, which has seen the most tokens, is used. Where the spans do not line
   up one-to-one, the cache's next positions are used rather than skipping:
   * a student boundary *inside* a teacher token (the student splits " Beatrice" into "beat" "##rice")
     takes the targets of the teacher position that predicts that token, *conditioned* on the text
     the student has read beyond it: listed tokens not beginning with it are ruled out, the others
     give their remainder's student piece (`_inside_targets`);
   * where the student's next token spans *several* teacher tokens ("hamlet" for " H" "AM" "LET"),
     the teacher's next token's mass is split by the teacher's prediction after it, along the text
     (chain rule, up to PATH_TOKENS tokens; `_along_the_path`).
   Both need the student's piece of a text it was not given; the student's own tokenizer is asked
   (`_next_pieces`). Student positions left without a target (before [SEP], inside a split character,
   a boundary inside a teacher token none of whose listed tokens fits) are skipped; `report` gives the
   shares aligned, inside and skipped.
3. **Map the vocabulary** once: a teacher id maps to the student id whose token has the same text
   (`vocabulary_map`), after the student's normaliser (an uncased student maps " The" and " the" to
   " the"). Token text is read from each tokenizer's conventions: byte-level BPE bytes, "▁" for a
   space (SentencePiece), "<0xNN>" byte fallback, WordPiece "##" continuations (other word-initial
   pieces follow a space, punctuation follows directly); special tokens map only to special tokens
   of the same name. When two student tokens share a text, the lower id is used. With `token_map`
   first-token (the default) a teacher token with no same-text student token maps to the student's
   first token of its text (`first_token_map`): when the teacher predicts "**" or " shalt", the
   student's next token is "*" or the first piece of "shalt". That is exact for whole words and
   punctuation runs and an approximation for a word's first piece; word continuations are left out.
   A teacher whose normaliser removes what the student keeps (uncased, accents stripped, NFKC) maps to
   the *variant* the student writes, or splits over the variants by a prior from the cache's text
   (casing.py, `_case_aware`); nothing changes where both normalise alike.
4. **Loss** (objective.py): `kd` is the chosen divergence on [mapped ids, rest], the rest holding the
   unmapped listed mass and the tail (`losses.map_targets`); `uld` (weight `uld_weight`) is the
   ULD-style sorted-probability distance on the mass that does not map, tail included
   (`losses.uld_loss`). The targets' ids index `CrossTokenizer.target_map`: teacher ids through the map,
   then student ids given directly (step 2). With the same tokenizer on both sides, every position
   aligns one-to-one, the map is the identity and `kd` is exactly same-tokenizer KD. The student's own
   next-token CE is unchanged.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterable

import numpy as np
import torch

from ..cache.cache import Cache
from ..cache.writer import CachedSequence
from ..errors import KDCacheError
from ..fused import ChunkTerms, rows_of, share
from ..losses import kd_loss, map_targets, uld_loss
from ..models import load_tokenizer
from ..tasks.spans import check_spans, token_spans
from .batching import Batch, collate, draw_estimates, trained_targets
from .casing import (CASINGS, casing_class, context_class, normalises_alike, split_over_variants, variant_scores,
                     variant_table)

SPAN_COLUMNS = ("token_offsets", "text")
RATE_ROWS = 2000  # rows of the cache read to estimate how often each mapped id is right (`estimate_map_rates`)
PATH_TOKENS = 4  # teacher tokens `_along_the_path` follows inside one student token
MEMO_ENTRIES = 1 << 20  # (text, offset) -> student token lookups kept by `_next_pieces` before it starts over
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE writes each byte as a printable stand-in character; this reverses it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins = list(printable)
    for byte in (byte for byte in range(256) if byte not in set(stand_ins)):
        printable.append(byte)
        stand_ins.append(256 + len(stand_ins) - 188)  # 188 bytes are printable as themselves
    return {chr(stand_in): byte for byte, stand_in in zip(printable, stand_ins)}


def drops_whitespace(tokenizer) -> bool:
    """Whether the tokenizer's tokens leave whitespace out (WordPiece, word-level): its word-initial pieces
    then stand for the word after a space, whatever whitespace it was."""
    return json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"] in ("WordPiece", "WordLevel")


def token_texts(tokenizer) -> list[bytes | str | None]:
    """Per id, the text the token stands for (bytes), "special:<name>" for special tokens, None if unknown.

    Needs a fast tokenizer: its backend says which conventions (byte-level, "▁", "##") apply.
    """
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    conventions = json.dumps([state.get("pre_tokenizer"), state.get("decoder")])
    byte_level = '"ByteLevel"' in conventions
    metaspace = '"Metaspace"' in conventions
    drops_spaces = drops_whitespace(tokenizer)
    prefix = model.get("continuing_subword_prefix") or None
    decoder = _byte_decoder()
    added = tokenizer.added_tokens_decoder
    special_ids = set(tokenizer.all_special_ids)
    texts: list[bytes | str | None] = []
    for index, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if index in special_ids or (index in added and added[index].special):
            texts.append(f"special:{token}")
        elif index in added or token is None:  # added tokens are literal text
            texts.append(None if token is None else token.encode())
        elif fallback := _BYTE_FALLBACK.fullmatch(token):
            texts.append(bytes([int(fallback.group(1), 16)]))
        elif byte_level:
            texts.append(bytes(decoder[char] for char in token) if all(char in decoder for char in token) else None)
        elif metaspace:
            texts.append(token.replace("\u2581", " ").encode())
        elif drops_spaces and prefix and token.startswith(prefix) and len(token) > len(prefix):
            texts.append(token[len(prefix):].encode())
        elif drops_spaces and not all(unicodedata.category(char).startswith("P") for char in token):
            texts.append((" " + token).encode())
        else:
            texts.append(token.encode())
    return texts


def vocabulary_map(teacher_tokenizer, student_tokenizer) -> np.ndarray:
    """int64 [2·V_teacher]: the student id of the token with the same text as each teacher id, or -1.

    Entry `V_teacher + i` is teacher id i *at a word start* of the student's: after whitespace the
    teacher has read (a line break, a double space) or, for a student whose pre-tokenizer splits at
    punctuation (BERT's), after punctuation. To a student that drops whitespace, "And" there starts a
    word, its " and", where entry i (glued to a word before) would be its continuation "##and";
    punctuation is the same token either way. For other students the two halves are equal. Teacher
    texts go through the student's normaliser first (lowercasing, accent stripping...), since that is
    how the student sees the text; bytes that are not whole UTF-8 characters are kept as they are.
    """
    student: dict[bytes | str, int] = {}
    for index, text in enumerate(token_texts(student_tokenizer)):
        if text is not None:
            student.setdefault(text, index)
    normalizer = student_tokenizer.backend_tokenizer.normalizer

    def as_student_sees(text: bytes | str | None) -> bytes | str | None:
        if normalizer is None or not isinstance(text, bytes):
            return text
        try:
            return normalizer.normalize_str(text.decode()).encode()
        except UnicodeDecodeError:
            return text

    return np.array([student.get(as_student_sees(text), -1) for text in _teacher_texts(teacher_tokenizer,
                                                                                       student_tokenizer)],
                    dtype=np.int64)


def first_token_map(teacher_tokenizer, student_tokenizer, exact: np.ndarray) -> np.ndarray:
    """`exact` (from `vocabulary_map`) completed: a teacher id without a same-text student token maps to the
    student's first token of its text (`_first_tokens`), unless it continues a word (see there)."""
    texts = _teacher_texts(teacher_tokenizer, student_tokenizer)
    half, drops_spaces = len(texts) // 2, drops_whitespace(student_tokenizer)
    glued_words = np.array([index < half and drops_spaces and _starts_glued_word(text)
                            for index, text in enumerate(texts)], dtype=bool)
    missing = np.flatnonzero((exact < 0) & ~glued_words)
    mapping = exact.copy()
    mapping[missing] = _first_tokens([texts[index] for index in missing], student_tokenizer)
    return mapping


def _teacher_texts(teacher_tokenizer, student_tokenizer) -> list[bytes | str | None]:
    """The teacher's token texts glued to the text before them, then at a word start (`vocabulary_map`)."""
    teacher = token_texts(teacher_tokenizer)
    drops_spaces = drops_whitespace(student_tokenizer)  # serialises the tokenizer: once, not per id
    return teacher + [_at_word_start(text) if drops_spaces else text for text in teacher]


def _at_word_start(text: bytes | str | None) -> bytes | str | None:
    """A teacher text as a whitespace-dropping student reads it at a word start: a word's text follows a space."""
    return b" " + text if _starts_glued_word(text) else text


def _starts_glued_word(text: bytes | str | None) -> bool:
    """Whether `text`, glued to a word before it, continues that word for a whitespace-dropping student."""
    if not isinstance(text, bytes) or not text[:1] or text[:1].isspace():
        return False
    return not unicodedata.category(text.decode(errors="replace")[0]).startswith("P")


def _first_tokens(texts: list[bytes | str | None], student_tokenizer) -> np.ndarray:
    """The student's first token of each text, or -1: what a student predicts next when the teacher predicts it.

    Exact when the text is one or more whole words or punctuation runs for the student ("**" → "*",
    " 'd" → "'", " shalt" → "sha" of "sha ##lt"); an approximation for a word's first piece, whose
    student tokenization may depend on the rest of the word. Word continuations (glued to a word
    before) are not passed in: their first piece depends on the word they continue. The first token
    is kept only if its own text begins the teacher text (a tokenizer that inserts a prefix, such as
    SentencePiece's "▁" at the start of every input, would otherwise map wrongly).
    """
    student_texts = token_texts(student_tokenizer)
    result = np.full(len(texts), -1, dtype=np.int64)
    candidates = [index for index, text in enumerate(texts) if isinstance(text, bytes) and text.strip()]
    decoded = []
    for index in candidates:
        try:
            decoded.append(texts[index].decode())
        except UnicodeDecodeError:
            decoded.append(None)
    encodings = student_tokenizer.backend_tokenizer.encode_batch([text or "" for text in decoded],
                                                                  add_special_tokens=False)
    normalizer = student_tokenizer.backend_tokenizer.normalizer
    for index, text, encoding in zip(candidates, decoded, encodings):
        if text is None or not encoding.ids:
            continue
        first = encoding.ids[0]
        seen = (normalizer.normalize_str(text) if normalizer else text).encode().lstrip()
        token_text = student_texts[first]
        if isinstance(token_text, bytes) and token_text.strip() and seen.startswith(token_text.lstrip()):
            result[index] = first
    return result


def boundaries(spans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions, the character each ends at) of the positions whose next token starts clean text."""
    starts, ends = spans[:, 0], spans[:, 1]
    clean = (starts[1:] >= ends[:-1]) & (ends[1:] > starts[1:])
    positions = np.flatnonzero(clean)
    return positions, ends[positions]


def _token_starting_at(string: str, at: int, encoding) -> int:
    """The id of the first token at or after character `at` of `encoding` (of `string`) with only whitespace
    before it, or -1 when a token straddles `at` or none follows."""
    for token, (start, end) in zip(encoding.ids, encoding.offsets):
        if end <= at:
            continue
        return token if start >= at and not string[at:start].strip() else -1
    return -1


def _widen(array: np.ndarray, width: int, fill: float) -> np.ndarray:
    """`array` [n, k] padded on the right to [n, width] with `fill` (empty slots)."""
    if array.shape[1] == width:
        return array
    return np.concatenate([array, np.full((len(array), width - array.shape[1]), fill, dtype=array.dtype)], axis=1)


def listed_targets(sequence: CachedSequence, targets: str) -> CachedSequence:
    """The row's `targets` as listed ids with log-probs and a tail mass, the one form every step across tokenizers
    works on (in the top-k columns). Top-k targets are that already. Drawn ids join as estimated probabilities:
    after the exact head, each id drawn from the tail gets tail mass · count / draws (head-tail targets); alone,
    count / draws (sampled targets: drawn from the whole distribution, their tail is all of it). No tail is left
    where draws stand for it.

    The estimates are unbiased, and every use of them across tokenizers that is linear in the probabilities
    (the vocabulary map, the chain rule along the text, forward KL at temperature 1) stays so; conditioning
    inside a teacher token divides by the consistent mass, which is a ratio estimate."""
    if targets == "topk":
        return dataclasses.replace(sequence, sampled_ids=None, sampled_counts=None)
    ids = sequence.sampled_ids
    lengths = ids.lengths()
    if targets == "head-tail":
        head_ids, head_logprobs, tail = sequence.topk_ids, sequence.topk_logprobs, sequence.tail_logprob
    else:  # sampled: no head, and the draws estimate all of the mass (log 1)
        head_ids, head_logprobs, tail = np.zeros((len(lengths), 0)), np.zeros((len(lengths), 0)), np.zeros(len(lengths))
    head = head_ids.shape[1]
    position, slot, drawn = draw_estimates(ids, sequence.sampled_counts)
    width = head + int(lengths.max(initial=0))
    topk_ids = _widen(head_ids.astype(np.int64), width, 0)
    topk_logprobs = _widen(head_logprobs.astype(np.float32), width, -np.inf)
    topk_ids[position, head + slot] = ids.values
    tail = tail.astype(np.float64)
    topk_logprobs[position, head + slot] = tail[position] + drawn
    return dataclasses.replace(sequence, topk_ids=topk_ids, topk_logprobs=topk_logprobs,
                               tail_logprob=np.where(lengths > 0, -np.inf, tail).astype(np.float32),
                               sampled_ids=None, sampled_counts=None)


def align(student_spans: np.ndarray, teacher_spans: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(student positions, their teacher positions, number of student boundaries): the rule in the module docstring."""
    student_positions, student_ends = boundaries(student_spans)
    next_starts = student_spans[student_positions + 1, 0]
    teacher_positions, teacher_ends = boundaries(teacher_spans)
    # The last teacher boundary in [end, next start]: ends ascend, so the one before the first end past it.
    index = np.searchsorted(teacher_ends, next_starts, side="right") - 1
    found = index >= 0
    found[found] = teacher_ends[index[found]] >= student_ends[found]
    return student_positions[found], teacher_positions[index[found]], len(student_positions)


def check_cross_tokenizer_cache(cache: Cache) -> None:
    """Refuse a cache that cannot be aligned to another tokenizer, saying why."""
    manifest = cache.manifest
    if not set(SPAN_COLUMNS) <= set(manifest.optional_columns):
        raise KDCacheError(f"cache {cache} has no token offsets, so a student with another tokenizer cannot be "
                           f"aligned to it (dumped before kdcache stored them, from pre-tokenized input_ids, or "
                           f"with a slow tokenizer); dump it again from text with a fast tokenizer")


class CrossTokenizer:
    """A student tokenizer facing a cache: turns cached rows into student batches with aligned targets.

    `targets` (default: the cache's own) are listed as `listed_targets` says: a head-tail cache's head and tail
    draws as estimated probabilities, or with `targets` topk its head and exact tail mass alone; a sampled
    cache's draws. Picklable (tokenizer and arrays), so a prefetching loader worker can collate with it.
    """

    def __init__(self, cache: Cache, student_tokenizer, max_length: int | None = None, token_map: str = "first-token",
                 targets: str | None = None):
        check_cross_tokenizer_cache(cache)
        if not getattr(student_tokenizer, "is_fast", False):
            raise KDCacheError("`student_tokenizer` must be a fast tokenizer (it reports token offsets)")
        self.student_tokenizer = student_tokenizer
        self.max_length = max_length
        self.targets = trained_targets(cache, targets)
        teacher_tokenizer = load_tokenizer(str(cache.tokenizer_dir()), "cache tokenizer")
        self.exact_map = vocabulary_map(teacher_tokenizer, student_tokenizer)
        self.vocabulary_map = (first_token_map(teacher_tokenizer, student_tokenizer, self.exact_map)
                               if token_map == "first-token" else self.exact_map)
        self.teacher_texts = token_texts(teacher_tokenizer)
        student_texts = token_texts(student_tokenizer)
        self.student_glued = np.array([_starts_glued_word(text) for text in student_texts], dtype=bool)
        self.student_casing = np.array([casing_class(text) if isinstance(text, bytes) else len(CASINGS) - 1
                                        for text in student_texts], dtype=np.int64)
        # Case- and normalisation-aware mapping (casing.py): each student token's variants and their prior.
        self.variants = (np.arange(len(student_texts), dtype=np.int64)[:, None]
                         if normalises_alike(teacher_tokenizer, student_tokenizer)
                         else variant_table(teacher_tokenizer, student_texts))
        self.variant_scores = (variant_scores(student_tokenizer, (sequence.text for sequence in itertools.islice(
            cache.sequences(), RATE_ROWS)), self.student_casing) if self.variants.shape[1] > 1 else None)
        self._word_start_after: dict[str, bool] = {}
        self._next_piece: dict[tuple[str, int], int] = {}

    @classmethod
    def from_path(cls, cache: Cache, student_tokenizer: str, max_length: int | None = None,
                  token_map: str = "first-token", targets: str | None = None) -> CrossTokenizer:
        return cls(cache, load_tokenizer(student_tokenizer, "student tokenizer"), max_length, token_map, targets)

    @property
    def student_vocab_size(self) -> int:
        return len(self.student_tokenizer)

    @property
    def target_map(self) -> np.ndarray:
        """int64 [2·V_teacher·G + V_student]: the id space of `student_row`'s targets. Ids below 2·V_teacher are
        teacher ids (the vocabulary map's two halves); id 2·V_teacher + j is student id j, given directly by
        the targets inside a teacher token and along the text (`_inside_targets`, `_follow`); then, when the
        teacher's normaliser removes a distinction the student keeps (G > 1 variants, casing.py), block g of
        2·V_teacher ids: each teacher id's g-th other variant of its mapped student token (`_case_aware`)."""
        variants = [np.where(self.vocabulary_map >= 0, self.variants[np.maximum(self.vocabulary_map, 0), g], -1)
                    for g in range(1, self.variants.shape[1])]
        return np.concatenate([self.vocabulary_map, np.arange(self.student_vocab_size), *variants])

    def _over_targets(self, per_entry: np.ndarray, direct: np.ndarray) -> np.ndarray:
        """A per-entry array of the vocabulary map spread over `target_map`'s space: `direct` for the student ids
        given directly, the entry's own value for each of its variants."""
        return np.concatenate([per_entry, direct, *[per_entry] * (self.variants.shape[1] - 1)])

    def student_row(self, sequence: CachedSequence) -> tuple[CachedSequence, int, int]:
        """The row as the student sees it, its targets moved to the student positions that get one; its number of
        student boundaries (with a target or skipped) and how many of them lie inside a teacher token."""
        sequence = listed_targets(sequence, self.targets)
        teacher_spans, encoded, spans = self._spans(sequence, truncate=True)
        student_ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        student_positions, teacher_positions, boundary_count = align(spans, teacher_spans)
        # Ids past the teacher's vocabulary: the same token at a word start (see `vocabulary_map`).
        ends = teacher_spans[teacher_positions, 1]
        word_start = np.array([self._word_start(sequence.text, end) for end in ends], dtype=bool)
        ids = (sequence.topk_ids[teacher_positions].astype(np.int64)
               + len(self.vocabulary_map) // 2 * word_start[:, None])
        logprobs = sequence.topk_logprobs[teacher_positions].astype(np.float32)
        tails = sequence.tail_logprob[teacher_positions].astype(np.float32)
        ids, logprobs, tails = self._along_the_path(sequence, teacher_spans, spans, student_ids, student_positions,
                                                    teacher_positions, ids, logprobs, tails)
        ids, logprobs = self._case_aware(sequence.text, spans, student_ids, student_positions, ids, logprobs)
        inside_positions, inside_ids, inside_logprobs, inside_tails = self._inside_targets(
            sequence, teacher_spans, spans, student_ids, student_positions)
        positions = np.concatenate([student_positions, inside_positions])
        order = np.argsort(positions, kind="stable")
        width = max(ids.shape[1], inside_ids.shape[1])
        row = CachedSequence(sample_id=sequence.sample_id, input_ids=student_ids.astype(np.int32),
                             topk_ids=np.concatenate([_widen(ids, width, 0), _widen(inside_ids, width, 0)])[order],
                             topk_logprobs=np.concatenate([_widen(logprobs, width, -np.inf),
                                                           _widen(inside_logprobs, width, -np.inf)])[order],
                             tail_logprob=np.concatenate([tails, inside_tails])[order],
                             target_positions=positions[order].astype(np.int32))
        return row, boundary_count, len(inside_positions)

    def _case_aware(self, text: str, spans: np.ndarray, student_ids: np.ndarray, positions: np.ndarray,
                    ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The aligned targets with each teacher id's mass on the variant of its student token that the student
        writes (casing.py `split_over_variants`), largest first; unchanged when no student token has variants."""
        width, entries = self.variants.shape[1], len(self.vocabulary_map)
        if width == 1 or not len(positions):
            return ids, logprobs
        teacher = ids < entries
        mapped = np.where(teacher, self.vocabulary_map[np.where(teacher, ids, 0)], -1)
        contexts = np.array([context_class(text, end) for end in spans[positions, 1].tolist()], dtype=np.int64)
        slots, split = split_over_variants(ids, logprobs, mapped, self.variants, self.variant_scores,
                                           student_ids[positions + 1], contexts)
        base = np.repeat(ids, width, axis=1)
        variant_ids = np.where(np.repeat(teacher, width, axis=1), entries + self.student_vocab_size
                               + (slots - 1) * entries + base, 0)  # slots past 0 of student ids hold nothing
        ids = np.where(slots == 0, base, variant_ids)
        order = np.argsort(-split, axis=1, kind="stable")
        split, ids = np.take_along_axis(split, order, 1), np.take_along_axis(ids, order, 1)
        keep = max(int(np.isfinite(split).sum(1).max()), 1)
        return ids[:, :keep], split[:, :keep]

    def _inside_targets(self, sequence: CachedSequence, teacher_spans: np.ndarray, spans: np.ndarray,
                        student_ids: np.ndarray, aligned: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Targets at the student boundaries inside a teacher token (the student splits " Beatrice" into "beat" and
        "##rice"): (student positions, ids in `target_map`'s space, log-probs [n, k], tail log-probs [n]).

        The teacher position that predicts the token has read less text than the student has ("beat" more).
        Its listed tokens whose text begins with that extra text are the ones consistent with what the student
        read; the others are ruled out. Each consistent token's remainder ("rice" of " Beatrice") is given to the
        student's token that starts there when the student tokenizes its word's text so far plus the remainder
        (`_next_pieces`: "##rice"), or to the rest when no student token starts there; where the student's next
        token goes beyond the teacher's actual token, that token is followed along the text (`_follow`). The
        consistent mass is scaled up to the listed mass, so the tail keeps its share (its tokens are assumed
        consistent as often as the listed ones). A position where no listed token is consistent gets no target.
        """
        width = sequence.topk_ids.shape[1]
        empty = (np.zeros(0, np.int64), np.zeros((0, width), np.int64), np.zeros((0, width), np.float32),
                 np.zeros(0, np.float32))
        positions, _ = boundaries(spans)
        positions = positions[~np.isin(positions, aligned)]
        if len(teacher_spans) < 2 or not len(positions):
            return empty
        next_starts = spans[positions + 1, 0]
        starts, ends = teacher_spans[:, 0], teacher_spans[:, 1]
        covering = np.clip(np.searchsorted(starts, next_starts, side="left") - 1, 1, len(teacher_spans) - 1)
        # The teacher token covering the student's next start, predicted cleanly by the teacher position before it.
        inside = ((starts[covering] < next_starts) & (ends[covering] > next_starts)
                  & (starts[covering] >= ends[covering - 1]) & (ends[covering] > starts[covering]))
        followed, kept = _Followed(), []
        for position, start, token in zip(positions[inside].tolist(), next_starts[inside].tolist(),
                                          covering[inside].tolist()):
            consumed = sequence.text[ends[token - 1]:start].encode()
            listed = [(teacher_id, logprob, self._teacher_text(teacher_id)) for teacher_id, logprob
                      in zip(sequence.topk_ids[token - 1].tolist(), sequence.topk_logprobs[token - 1].tolist())
                      if logprob > -math.inf]
            consistent = [(teacher_id, logprob, text) for teacher_id, logprob, text in listed
                          if text is not None and text.startswith(consumed)]
            if not consistent:
                continue
            row = len(kept)
            kept.append((position, token - 1))
            scale = math.log(sum(math.exp(logprob) for _, logprob, _ in listed)
                             / sum(math.exp(logprob) for _, logprob, _ in consistent))
            word, end = self._word_begins(student_ids, spans, position + 1), int(spans[position + 1, 1])
            for teacher_id, logprob, text in consistent:
                if teacher_id == sequence.input_ids[token] and ends[token] < end:
                    self._follow(sequence, teacher_spans, token, end, word, start - word, logprob + scale, row, followed)
                else:
                    followed.ask(row, (sequence.text[word:start], start - word, text[len(consumed):]), logprob + scale)
        if not kept:
            return empty
        rows, predicting = (np.array(column, dtype=np.int64) for column in zip(*kept))
        ids, logprobs, tails = followed.place(self._next_pieces, len(self.vocabulary_map),
                                              np.zeros((len(rows), 0), np.int64),
                                              np.zeros((len(rows), 0), np.float32),
                                              sequence.tail_logprob[predicting].astype(np.float32), width)
        return rows, ids, logprobs, tails

    def _along_the_path(self, sequence: CachedSequence, teacher_spans: np.ndarray, spans: np.ndarray,
                        student_ids: np.ndarray, student_positions: np.ndarray, teacher_positions: np.ndarray,
                        ids: np.ndarray, logprobs: np.ndarray, tails: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The aligned targets, where the student's next token spans several of the teacher's (" H", "AM", "LET"
        for "hamlet") with the teacher's next token followed along the text (`_follow`): (ids, log-probs,
        tails), widened when any is.

        The teacher's next token alone says little of the student's: its probability belongs to every student
        token that begins with its text, so it is replaced by its continuations.
        """
        ends, student_ends = teacher_spans[:, 1], spans[student_positions + 1, 1]
        topk_ids, topk_logprobs = sequence.topk_ids, sequence.topk_logprobs
        followed = _Followed()
        logprobs = logprobs.copy()
        for row in np.flatnonzero(ends[teacher_positions + 1] < student_ends):
            position = int(teacher_positions[row])
            slot = np.flatnonzero((topk_ids[position] == sequence.input_ids[position + 1])
                                  & np.isfinite(topk_logprobs[position]))
            if len(slot):
                path, logprobs[row, slot[0]] = float(logprobs[row, slot[0]]), -np.inf
                word = self._word_begins(student_ids, spans, int(student_positions[row]) + 1)
                self._follow(sequence, teacher_spans, position + 1, int(student_ends[row]), word,
                             int(spans[student_positions[row] + 1, 0]) - word, path, int(row), followed)
        return followed.place(self._next_pieces, len(self.vocabulary_map), ids, logprobs, tails)

    def _follow(self, sequence: CachedSequence, teacher_spans: np.ndarray, token: int, end: int, word: int, at: int,
                path: float, row: int, followed: _Followed) -> None:
        """Split `path`, the log-mass of teacher token `token` that a student token (from character `word` + `at`
        to `end`) goes beyond, by the teacher's predictions after it (chain rule), into `followed`.

        Each listed continuation's text goes to the student's token that starts where the student's does when
        the student tokenizes its word with that text (`_next_pieces`); the position's tail goes to the rest;
        the continuation the text really takes, if the student's token goes beyond it too, is followed again,
        up to PATH_TOKENS teacher tokens in all, after which its mass goes to the rest.
        """
        starts, ends = teacher_spans[:, 0], teacher_spans[:, 1]
        text, last = sequence.text, len(teacher_spans) - 1
        for _ in range(1, PATH_TOKENS):
            position = token  # the teacher position right after the path's last token predicts the next one
            if position >= last or starts[position + 1] < ends[position] or ends[position + 1] <= starts[position + 1]:
                break
            context, continued = text[word:ends[position]], None
            for teacher_id, logprob in zip(sequence.topk_ids[position].tolist(), sequence.topk_logprobs[position].tolist()):
                if logprob == -math.inf:
                    continue
                if teacher_id == sequence.input_ids[position + 1] and ends[position + 1] < end:
                    continued = path + logprob  # the text goes on past this token too
                else:
                    followed.ask(row, (context, at, self._teacher_text(teacher_id)), path + logprob)
            followed.spill(row, path + float(sequence.tail_logprob[position]))
            if continued is None:
                return
            path, token = continued, position + 1
        followed.spill(row, path)

    def _teacher_text(self, teacher_id: int) -> bytes | None:
        """The teacher token's text, None for special tokens, unknown texts and ids outside the vocabulary."""
        text = self.teacher_texts[teacher_id] if 0 <= teacher_id < len(self.teacher_texts) else None
        return text if isinstance(text, bytes) else None

    def _word_begins(self, student_ids: np.ndarray, spans: np.ndarray, position: int) -> int:
        """Where the student's word that token `position` belongs to begins: its tokens after the first continue it."""
        while position > 0 and self.student_glued[student_ids[position]]:
            position -= 1
        return int(spans[position, 0])

    def _next_pieces(self, requests: list[tuple[str, int, bytes | None]]) -> list[int]:
        """Per (context, at, remainder): the student's token that starts at character `at` (or after whitespace
        there, for a student that drops it) when it tokenizes context + remainder, or -1 when one of its tokens
        straddles that point, none follows, or the remainder is not whole UTF-8 characters. Memoised: words recur."""
        keys: list[tuple[str, int] | None] = []
        for context, at, remainder in requests:
            try:
                keys.append((context + remainder.decode(), at))
            except (UnicodeDecodeError, AttributeError):  # a partial character; no text (special token)
                keys.append(None)
        missing = sorted({key for key in keys if key is not None and key not in self._next_piece})
        if len(self._next_piece) + len(missing) > MEMO_ENTRIES:
            self._next_piece.clear()
        encodings = self.student_tokenizer.backend_tokenizer.encode_batch([string for string, _ in missing],
                                                                          add_special_tokens=False)
        for (string, at), encoding in zip(missing, encodings):
            self._next_piece[(string, at)] = _token_starting_at(string, at, encoding)
        return [-1 if key is None else self._next_piece[key] for key in keys]

    def estimate_map_rates(self, sequences: Iterable[CachedSequence]) -> np.ndarray:
        """float32, one per entry of `target_map`: per entry of the vocabulary map, how often the student's token
        really is the mapped one where the teacher's token occurs in the cache's own text.

        A teacher token that is the first piece of longer words ("Be" of "Beatrice") has the same text as
        a student token ("be") that the student only uses for that very word: mapping all of its mass
        there would teach the student a word it does not write. So at each occurrence of a teacher token
        (at a word start or glued, decided by the text before it, as `student_row` does), the student's
        token at the first non-space character after the previous teacher token is looked up (or, when none
        starts there, the student's token starting right after the previous teacher token, which takes the
        whitespace the teacher's token left out), and the
        entry's rate is (hits + 1) / (occurrences + 1): 1 for entries never seen and for a tokenizer
        facing itself (the identity: every occurrence is a hit), near 0 for prefixes. A variant of the mapped
        token (casing.py: " The" for an uncased teacher's " the") is a hit too, and each variant's entry has its
        teacher id's rate. The loss keeps rate · p on the mapped student id and moves the rest to the unmapped
        mass (`losses.map_targets`). Student ids given directly have rate 1.
        """
        half = len(self.vocabulary_map) // 2
        group = np.where(self.variants >= 0, self.variants, len(self.variants)).min(axis=1)  # one id per variants
        hits = np.zeros(2 * half, dtype=np.int64)
        seen = np.zeros(2 * half, dtype=np.int64)
        for sequence in sequences:
            teacher_spans, encoded, spans = self._spans(sequence, truncate=False)
            student_at = {int(start): int(token) for (start, end), token in zip(spans, encoded["input_ids"])
                          if end > start}
            previous_end = 0  # where the token before ends: the boundary that predicts this token
            for (_, end), token in zip(teacher_spans.tolist(), sequence.input_ids.tolist()):
                segment = sequence.text[previous_end:end]
                visible, context = end - len(segment.lstrip()), previous_end
                previous_end = end
                if visible >= end or not 0 <= token < half:
                    continue
                entry = token + half * self._word_start(sequence.text, context)
                seen[entry] += 1
                # the student's token at the first visible character, or the one taking the whitespace before
                # it (a BPE student's " queen" facing a WordPiece teacher's "queen", which leaves it out)
                student, mapped = student_at.get(visible, student_at.get(context, -1)), self.vocabulary_map[entry]
                hits[entry] += student == mapped or min(student, mapped) >= 0 and group[student] == group[mapped]
        return self._over_targets((hits + 1) / (seen + 1), np.ones(self.student_vocab_size)).astype(np.float32)

    def _spans(self, sequence: CachedSequence, truncate: bool) -> tuple[np.ndarray, dict, np.ndarray]:
        """(checked teacher spans, the student's encoding of the row's text, its normalised spans)."""
        teacher_spans = check_spans(sequence.token_offsets, sequence.text, len(sequence.input_ids), sequence.sample_id)
        encoded = self.student_tokenizer(sequence.text, truncation=truncate and self.max_length is not None,
                                         max_length=self.max_length if truncate else None,
                                         return_offsets_mapping=True, return_special_tokens_mask=True)
        return teacher_spans, encoded, token_spans(encoded["offset_mapping"], encoded["special_tokens_mask"])

    def _word_start(self, text: str, boundary: int) -> bool:
        """Whether what follows character `boundary` of `text` starts a word for the student (which map half)."""
        return boundary > 0 and self.starts_word_after(text[boundary - 1])

    def starts_word_after(self, character: str) -> bool:
        """Whether a letter after `character` starts a word for the student: its own pre-tokenizer is asked
        (whitespace splits words for every student; punctuation does for BERT's), once per character."""
        if character not in self._word_start_after:
            pre_tokenizer = self.student_tokenizer.backend_tokenizer.pre_tokenizer
            pieces = pre_tokenizer.pre_tokenize_str(character + "a") if pre_tokenizer else [("a", (1, 2))]
            self._word_start_after[character] = character.isspace() or pieces[-1][1][0] == 1
        return self._word_start_after[character]

    def collate(self, sequences: list[CachedSequence]) -> Batch:
        """Like `batching.collate`, on the student's tokens: targets sit at the positions that get one (`target_mask`),
        their ids in `target_map`'s space."""
        rows = [self.student_row(sequence)[0] for sequence in sequences]
        width = max(row.topk_ids.shape[1] for row in rows)
        return collate([dataclasses.replace(row, topk_ids=_widen(row.topk_ids, width, 0),
                                            topk_logprobs=_widen(row.topk_logprobs, width, -np.inf)) for row in rows])

    def report(self, sequences: Iterable[CachedSequence]) -> dict:
        """Alignment statistics: shares of student boundaries aligned to a teacher boundary, given a target
        inside a teacher token, and skipped; at the positions with a target, share of the teacher's
        probability mass (tail included, which never maps) that maps exactly (same text) and that maps at all
        (with `token_map` first-token, also to a first token; inside a teacher token, to the student's piece);
        and, by casing class of the student's true next token (casing.py CASINGS), the mean mass its targets put
        on that token (before the map rates) and the share of target positions in the class: where a
        normalising teacher meets a cased student, the figures that show whether capitals are taught."""
        rows = boundary_count = targeted = inside = 0
        exact_mass = mapped_mass = 0.0
        true_mass, true_positions = np.zeros(len(CASINGS)), np.zeros(len(CASINGS))
        exact_map = self._over_targets(self.exact_map, np.full(self.student_vocab_size, -1))
        target_map = self.target_map
        for sequence in sequences:
            row, count, inside_count = self.student_row(sequence)
            rows, boundary_count, inside = rows + 1, boundary_count + count, inside + inside_count
            targeted += len(row.target_positions)
            probabilities = np.exp(row.topk_logprobs.astype(np.float64))
            exact_mass += float((probabilities * (exact_map[row.topk_ids] >= 0)).sum())
            mapped_mass += float((probabilities * (target_map[row.topk_ids] >= 0)).sum())
            actual = row.input_ids[row.target_positions + 1]
            casing = self.student_casing[actual]
            on_true_token = (probabilities * (target_map[row.topk_ids] == actual[:, None])).sum(1)
            true_mass += np.bincount(casing, weights=on_true_token, minlength=len(CASINGS))
            true_positions += np.bincount(casing, minlength=len(CASINGS))
        share = (lambda count: round(count / boundary_count, 4) if boundary_count else 0.0)
        half = len(self.vocabulary_map) // 2
        return {"rows": rows, "student_positions": boundary_count, "aligned_positions": targeted - inside,
                "inside_positions": inside, "aligned_share": share(targeted - inside), "inside_share": share(inside),
                "skipped_share": share(boundary_count - targeted),
                "exact_mass_share": round(exact_mass / max(targeted, 1), 4),
                "mapped_mass_share": round(mapped_mass / max(targeted, 1), 4),
                "exact_vocabulary_share": round(float((self.exact_map[:half] >= 0).mean()), 4),
                "mapped_vocabulary_share": round(float((self.vocabulary_map[:half] >= 0).mean()), 4),
                "true_token_mass": {name: round(float(mass / max(count, 1)), 4)
                                    for name, mass, count in zip(CASINGS, true_mass, true_positions)},
                "true_token_positions": {name: round(float(count / max(targeted, 1)), 4)
                                         for name, count in zip(CASINGS, true_positions)}}


class _Followed:
    """Target entries being built for some target positions of one row: mass waiting for the student's piece of
    a text (looked up for all of them at once) and mass that goes to the rest."""

    def __init__(self):
        self.rows: list[int] = []
        self.requests: list[tuple[str, int, bytes | None]] = []
        self.masses: list[float] = []
        self.spilled: dict[int, list[float]] = collections.defaultdict(list)

    def ask(self, row: int, request: tuple[str, int, bytes | None], logmass: float) -> None:
        self.rows.append(row)
        self.requests.append(request)
        self.masses.append(logmass)

    def spill(self, row: int, logmass: float) -> None:
        self.spilled[row].append(logmass)

    def place(self, pieces_of: Callable[[list], list[int]], offset: int, ids: np.ndarray, logprobs: np.ndarray,
              tails: np.ndarray, width: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`ids` and `logprobs` [n, w] widened by `width` (default w) columns holding each row's entries, largest
        first: the pieces (`pieces_of(requests)`, `CrossTokenizer._next_pieces`) shifted by `offset` into
        `target_map`'s space; `tails` with the spilled mass, the pieces not found and the entries past the width.
        Unchanged when nothing was asked or spilled."""
        if not self.requests and not self.spilled:
            return ids, logprobs, tails
        start = ids.shape[1]
        width = start if width is None else width
        ids, logprobs = _widen(ids, start + width, 0), _widen(logprobs, start + width, -np.inf)
        pieces = np.array(pieces_of(self.requests), dtype=np.int64)
        rows, masses = np.array(self.rows, dtype=np.int64), np.array(self.masses)
        found = np.flatnonzero(pieces >= 0)
        order = found[np.lexsort((-masses[found], rows[found]))]  # by row, largest mass first
        row_of = rows[order]
        rank = np.arange(len(order)) - np.searchsorted(row_of, row_of, side="left")
        placed = order[rank < width]
        ids[rows[placed], start + rank[rank < width]] = offset + pieces[placed]
        logprobs[rows[placed], start + rank[rank < width]] = masses[placed]
        lost = np.ones(len(rows), dtype=bool)
        lost[placed] = False
        spilled_rows = [row for row, values in self.spilled.items() for _ in values]
        spilled = [value for values in self.spilled.values() for value in values]
        rest = (np.exp(tails.astype(np.float64))
                + np.bincount(rows[lost], weights=np.exp(masses[lost]), minlength=len(tails))
                + np.bincount(np.array(spilled_rows, dtype=np.int64), weights=np.exp(spilled), minlength=len(tails)))
        with np.errstate(divide="ignore"):  # no tail at all: log 0 = -inf, an empty rest
            return ids, logprobs, np.log(rest).astype(np.float32)


class CrossTokenizerLoss:
    """The `kd` and `uld` terms of a batch from `CrossTokenizer.collate` (see the module docstring)."""

    def __init__(self, settings, cross: CrossTokenizer, cache: Cache):
        self.settings = settings
        self.target_map = torch.from_numpy(cross.target_map)
        # Estimated here, not by CrossTokenizer: `info --student-tokenizer` needs the map, not the rates.
        self.map_rates = torch.from_numpy(cross.estimate_map_rates(itertools.islice(cache.sequences(), RATE_ROWS)))
        self.vocab_size = cross.student_vocab_size

    def terms(self, batch: Batch) -> ChunkTerms:
        """The terms as chunk shares (kdcache/fused.py) of the student's logits at `batch.targets_at` over its
        vocabulary: the teacher's targets are mapped once for the batch, then each chunk takes its rows."""
        settings = self.settings
        targets = batch.sparse_targets("topk")
        device = targets.ids.device
        target_map, rates = self.target_map.to(device), self.map_rates.to(device)
        mapped = map_targets(targets, target_map, rates) if settings.kd_weight else None
        n = targets.ids.shape[0]

        def terms(logits: torch.Tensor, rows: slice) -> dict[str, torch.Tensor]:
            out = {}
            if mapped is not None:
                out["kd"] = kd_loss(logits, rows_of(mapped, rows), divergence=settings.loss, tail=settings.tail,
                                    temperature=settings.temperature) * share(logits.shape[0], n)
            if settings.uld_weight:
                out["uld"] = uld_loss(logits, rows_of(targets, rows), target_map, rates) * share(logits.shape[0], n)
            return out
        return terms
