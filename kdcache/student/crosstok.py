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
   (zero-width tokens) the last, which has seen the most tokens, is used. Where the spans
   do not line up one-to-one the rule *skips*: a student boundary inside a teacher token (a word
   the student splits 1→3) has no target; teacher boundaries inside a student token (3→1) are not
   used. Student positions that are not boundaries (before [SEP], inside a split character) have
   no target either. `alignment_report` gives the share skipped.
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
4. **Loss** (objective.py): `kd` is the chosen divergence on [mapped ids, rest], the rest holding the
   unmapped listed mass and the tail (`losses.map_targets`); `uld` (weight `uld_weight`) is the
   ULD-style sorted-probability distance on the mass that does not map, tail included
   (`losses.uld_loss`). With the same tokenizer on both sides, every position aligns, the map is the
   identity and `kd` is exactly same-tokenizer KD. The student's own next-token CE is unchanged.
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from collections.abc import Iterable

import numpy as np
import torch

from ..cache.cache import Cache
from ..cache.writer import CachedSequence
from ..errors import KDCacheError
from ..losses import kd_loss, map_targets, uld_loss
from ..models import load_tokenizer
from ..tasks.spans import check_spans, token_spans
from .batching import Batch, collate

SPAN_COLUMNS = ("token_offsets", "text")
RATE_ROWS = 2000  # rows of the cache read to estimate how often each mapped id is right (`estimate_map_rates`)
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
    if not {"topk", "head-tail"} & set(manifest.target_types):
        raise KDCacheError(f"cache {cache} holds no top-k targets: training across tokenizers needs top-k "
                           f"targets with their tail (dump with `targets` topk or head-tail)")


class CrossTokenizer:
    """A student tokenizer facing a cache: turns cached rows into student batches with aligned targets.

    Picklable (tokenizer and arrays), so a prefetching loader worker can collate with it.
    """

    def __init__(self, cache: Cache, student_tokenizer, max_length: int | None = None, token_map: str = "first-token"):
        check_cross_tokenizer_cache(cache)
        if not getattr(student_tokenizer, "is_fast", False):
            raise KDCacheError("`student_tokenizer` must be a fast tokenizer (it reports token offsets)")
        self.student_tokenizer = student_tokenizer
        self.max_length = max_length
        teacher_tokenizer = load_tokenizer(str(cache.tokenizer_dir()), "cache tokenizer")
        self.exact_map = vocabulary_map(teacher_tokenizer, student_tokenizer)
        self.vocabulary_map = (first_token_map(teacher_tokenizer, student_tokenizer, self.exact_map)
                               if token_map == "first-token" else self.exact_map)
        self._word_start_after: dict[str, bool] = {}

    @classmethod
    def from_path(cls, cache: Cache, student_tokenizer: str, max_length: int | None = None,
                  token_map: str = "first-token") -> CrossTokenizer:
        return cls(cache, load_tokenizer(student_tokenizer, "student tokenizer"), max_length, token_map)

    @property
    def student_vocab_size(self) -> int:
        return len(self.student_tokenizer)

    def student_row(self, sequence: CachedSequence) -> tuple[CachedSequence, int]:
        """The row as the student sees it, its targets moved to the aligned student positions; and its number
        of student boundaries (aligned or skipped)."""
        teacher_spans, encoded, spans = self._spans(sequence, truncate=True)
        student_positions, teacher_positions, boundary_count = align(spans, teacher_spans)
        # Ids past the teacher's vocabulary: the same token at a word start (see `vocabulary_map`).
        ends = teacher_spans[teacher_positions, 1]
        word_start = np.array([self._word_start(sequence.text, end) for end in ends], dtype=bool)
        row = CachedSequence(sample_id=sequence.sample_id, input_ids=np.asarray(encoded["input_ids"], dtype=np.int32),
                             topk_ids=(sequence.topk_ids[teacher_positions].astype(np.int64)
                                       + len(self.vocabulary_map) // 2 * word_start[:, None]),
                             topk_logprobs=sequence.topk_logprobs[teacher_positions],
                             tail_logprob=sequence.tail_logprob[teacher_positions],
                             target_positions=student_positions.astype(np.int32))
        return row, boundary_count

    def estimate_map_rates(self, sequences: Iterable[CachedSequence]) -> np.ndarray:
        """float32 [2·V_teacher]: per entry of the vocabulary map, how often the student's token really is the
        mapped one where the teacher's token occurs in the cache's own text.

        A teacher token that is the first piece of longer words ("Be" of "Beatrice") has the same text as
        a student token ("be") that the student only uses for that very word: mapping all of its mass
        there would teach the student a word it does not write. So at each occurrence of a teacher token
        (at a word start or glued, decided by the text before it, as `student_row` does), the student's
        token at the first non-space character after the previous teacher token is looked up, and the
        entry's rate is (hits + 1) / (occurrences + 1): 1 for entries never seen and for a tokenizer
        facing itself (the identity: every occurrence is a hit), near 0 for prefixes. The loss keeps
        rate · p on the mapped student id and moves the rest to the unmapped mass (`losses.map_targets`).
        """
        half = len(self.vocabulary_map) // 2
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
                hits[entry] += student_at.get(visible, -1) == self.vocabulary_map[entry]
        return ((hits + 1) / (seen + 1)).astype(np.float32)

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
        """Like `batching.collate`, on the student's tokens: targets sit at the aligned positions (`target_mask`)."""
        return collate([self.student_row(sequence)[0] for sequence in sequences])

    def report(self, sequences: Iterable[CachedSequence]) -> dict:
        """Alignment statistics: share of student boundaries aligned; at the aligned positions, share of the
        teacher's probability mass (tail included, which never maps) that maps exactly (same text) and that
        maps at all (with `token_map` first-token, also to a first token)."""
        rows = boundary_count = aligned = 0
        exact_mass = mapped_mass = 0.0
        for sequence in sequences:
            row, count = self.student_row(sequence)
            rows, boundary_count, aligned = rows + 1, boundary_count + count, aligned + len(row.target_positions)
            probabilities = np.exp(row.topk_logprobs.astype(np.float64))
            exact_mass += float((probabilities * (self.exact_map[row.topk_ids] >= 0)).sum())
            mapped_mass += float((probabilities * (self.vocabulary_map[row.topk_ids] >= 0)).sum())
        aligned_share = aligned / boundary_count if boundary_count else 0.0
        half = len(self.vocabulary_map) // 2
        return {"rows": rows, "student_positions": boundary_count, "aligned_positions": aligned,
                "aligned_share": round(aligned_share, 4),
                "skipped_share": round(1 - aligned_share, 4) if boundary_count else 0.0,
                "exact_mass_share": round(exact_mass / max(aligned, 1), 4),
                "mapped_mass_share": round(mapped_mass / max(aligned, 1), 4),
                "exact_vocabulary_share": round(float((self.exact_map[:half] >= 0).mean()), 4),
                "mapped_vocabulary_share": round(float((self.vocabulary_map[:half] >= 0).mean()), 4)}


class CrossTokenizerLoss:
    """The `kd` and `uld` terms of a batch from `CrossTokenizer.collate` (see the module docstring)."""

    def __init__(self, settings, cross: CrossTokenizer, cache: Cache):
        self.settings = settings
        self.vocabulary_map = torch.from_numpy(cross.vocabulary_map)
        # Estimated here, not by CrossTokenizer: `info --student-tokenizer` needs the map, not the rates.
        self.map_rates = torch.from_numpy(cross.estimate_map_rates(itertools.islice(cache.sequences(), RATE_ROWS)))
        self.vocab_size = cross.student_vocab_size

    def __call__(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        settings = self.settings
        student = logits[batch.targets_at][:, :self.vocab_size]
        targets = batch.sparse_targets("topk")
        vocabulary_map, rates = self.vocabulary_map.to(student.device), self.map_rates.to(student.device)
        terms = {}
        if settings.kd_weight:
            terms["kd"] = kd_loss(student, map_targets(targets, vocabulary_map, rates), divergence=settings.loss,
                                  tail=settings.tail, temperature=settings.temperature)
        if settings.uld_weight:
            terms["uld"] = uld_loss(student, targets, vocabulary_map, rates)
        return terms
