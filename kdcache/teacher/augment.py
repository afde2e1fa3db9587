"""Teacher-labelled variants of the training rows: what offline distillation makes cheap.

The anchors' largest gains come from *more text labelled by the teacher* (TextBrewer's CoNLL-2003
student: 87.5 F1 with KD, 90.0 with KD on augmented text; TinyBERT multiplies its task data ~20x). An
offline cache pays the teacher once per variant and every student reuses it, so `dump-teacher
--augment N` writes N variants of every row after the rows themselves:

- `mentions` (token classification with gold tags): each entity mention is replaced, with probability
  1/2, by another mention of the same type seen in the data (a PER by a PER, ...);
- `substitute`: each other word, with probability `augment_rate`, by one of its 8 nearest neighbours
  in the teacher's own input-embedding space (TinyBERT's substitution, from the teacher's embeddings
  rather than a separate word-vector file); the replacement keeps the word's capitalisation pattern;
- `mask`: each other word, with probability `augment_rate`, by the tokenizer's mask token.

A variant's gold labels are never kept: the words changed, so the original's labels would be wrong
for it. Variants are written with null labels (token/sequence classification: targets from the
teacher, no gold, so CE skips them) and, for a causal LM, the manifest's `original_rows` tells
training that rows from that sample id on are variants, whose next-token labels are not the text's.

Everything is seeded by (`seed`, row, variant): the same settings give the same variants on any
machine, and an interrupted dump resumes on the same rows. Variant `v` (1..N) of row `i` of `n` rows
has sample id `v * n + i`, so the original rows keep the ids they have without augmentation.
"""

from __future__ import annotations

import re

import datasets
import numpy as np
import torch

from ..errors import KDCacheError
from ..tasks import CAUSAL_LM, TOKEN_CLASSIFICATION
from .settings import Augmentation

NEIGHBOURS = 8
MENTION_SWAP_PROBABILITY = 0.5
_WORD = re.compile(r"[^\W_]+")  # letters and digits: the words substitution and masking may touch
ATTEMPTS = 8  # draws of a variant before one that differs from its row is given up on
_PIECES = re.compile(r"\s+|\S+")


class EmbeddingNeighbours:
    """Whole-word tokens of the teacher's vocabulary and their nearest neighbours by cosine similarity of
    the teacher's input embeddings: a word that is one token can be swapped for a word the teacher
    itself places nearby (TinyBERT's substitution, without a separate embedding file)."""

    def __init__(self, tokenizer, embeddings: torch.Tensor):
        self.tokenizer = tokenizer
        self.embeddings = embeddings.detach().float().cpu()
        spelled = [(token_id, self._spelling(token_id)) for token_id in range(len(tokenizer))]
        words = [(token_id, word) for token_id, word in spelled if word is not None]
        if not words:
            raise KDCacheError("`augment_methods` substitute: the teacher's vocabulary has no whole-word tokens to "
                               "substitute; use mask")
        round_trip = self._word_ids([word for _, word in words])
        self.candidates = np.array([token_id for (token_id, _), back in zip(words, round_trip) if back == token_id])
        self.spelling = {int(token_id): word for token_id, word in words}
        self.normalised = torch.nn.functional.normalize(self.embeddings[torch.as_tensor(self.candidates)], dim=1)
        self._cache: dict[int, np.ndarray] = {}

    def _spelling(self, token_id: int) -> str | None:
        text = self.tokenizer.decode([token_id]).strip()
        return text if _WORD.fullmatch(text) else None

    def _word_ids(self, words: list[str]) -> list[int | None]:
        """The one token id of each word as the tokenizer reads it after a space, or None."""
        encoded = self.tokenizer([" " + word for word in words], add_special_tokens=False)["input_ids"]
        return [ids[0] if len(ids) == 1 else None for ids in encoded]

    def neighbours(self, word: str) -> np.ndarray:
        """Candidate replacement words' token ids, nearest first (empty: the word is not one token)."""
        token_id = self._word_ids([word])[0]
        if token_id is None:
            return np.empty(0, dtype=np.int64)
        if token_id not in self._cache:
            query = torch.nn.functional.normalize(self.embeddings[token_id], dim=0)
            order = torch.argsort(self.normalised @ query, descending=True, stable=True)[:NEIGHBOURS + 1].numpy()
            nearest = self.candidates[order]
            self._cache[token_id] = nearest[nearest != token_id][:NEIGHBOURS]
        return self._cache[token_id]

    def replacement(self, word: str, rng: np.random.Generator) -> str | None:
        options = self.neighbours(word)
        if not len(options):
            return None
        return same_case(word, self.spelling[int(options[rng.integers(len(options))])])


def same_case(model: str, word: str) -> str:
    """`word` with `model`'s capitalisation pattern (all caps, capitalised, or as it is)."""
    if model.isupper() and len(model) > 1:
        return word.upper()
    if model[:1].isupper():
        return word[:1].upper() + word[1:].lower()
    return word.lower() if model.islower() else word


def mentions_of(words: list[str], tags: list[str]) -> list[tuple[int, int, str]]:
    """(start, stop, type) of each IOB2 mention; an I- tag without its B- starts one too (as seqeval reads it)."""
    spans, start, kind = [], None, None
    for index, tag in enumerate([*tags, "O"]):
        prefix, _, name = tag.partition("-")
        if start is not None and (prefix != "I" or name != kind):
            spans.append((start, index, kind))
            start = None
        if prefix in ("B", "I") and start is None:
            start, kind = index, name
    return spans


class _Variants:
    """Makes the variants of one dataset's rows: the mention inventory is built once from the gold rows."""

    def __init__(self, augmentation: Augmentation, neighbours: EmbeddingNeighbours | None, mask_token: str | None,
                 tagged_rows: list[tuple[list[str], list[str]]]):
        self.augmentation = augmentation
        self.neighbours = neighbours
        self.mask_token = mask_token
        inventory: dict[str, set[tuple[str, ...]]] = {}
        for words, tags in tagged_rows:
            for start, stop, kind in mentions_of(words, tags):
                inventory.setdefault(kind, set()).add(tuple(words[start:stop]))
        self.inventory = {kind: sorted(mentions) for kind, mentions in sorted(inventory.items())}

    def variant(self, row: dict, index: int, variant: int, make) -> dict:
        """`make(row, rng)` drawn again (seeded by row, variant and attempt) until it differs from `row`: an
        unchanged copy would cost a teacher pass and cache bytes for nothing. A row that cannot change
        (no word to touch) is kept as it is."""
        for attempt in range(ATTEMPTS):
            new = make(row, np.random.default_rng([self.augmentation.seed, index, variant, attempt]))
            if new != row:
                break
        return new

    def change_word(self, word: str, rng: np.random.Generator) -> str:
        if not _WORD.fullmatch(word) or rng.random() >= self.augmentation.rate:
            return word
        if "mask" in self.augmentation.methods:
            return self.mask_token
        if "substitute" in self.augmentation.methods:
            return self.neighbours.replacement(word, rng) or word
        return word

    def words(self, words: list[str], tags: list[str] | None, rng: np.random.Generator) -> list[str]:
        """A variant of a word list; mentions (where tags are known) are swapped whole, other words one by one."""
        spans = mentions_of(words, tags) if tags is not None else []
        out, position = [], 0
        for start, stop, kind in [*spans, (len(words), len(words), None)]:
            out += [self.change_word(word, rng) for word in words[position:start]]
            if kind is not None:
                mention = words[start:stop]
                if "mentions" in self.augmentation.methods and rng.random() < MENTION_SWAP_PROBABILITY:
                    choices = [other for other in self.inventory.get(kind, []) if list(other) != mention]
                    mention = list(choices[rng.integers(len(choices))]) if choices else mention
                out += mention
            position = stop
        return out

    def text(self, text: str, rng: np.random.Generator) -> str:
        """A variant of running text: words changed in place, spacing and punctuation kept."""
        return "".join(piece if piece.isspace() else self._text_piece(piece, rng) for piece in _PIECES.findall(text))

    def _text_piece(self, piece: str, rng: np.random.Generator) -> str:
        head = len(piece) - len(piece.lstrip(".,;:!?'\"()[]"))
        tail = len(piece.rstrip(".,;:!?'\"()[]"))
        core = piece[head:tail] if tail > head else ""
        return piece[:head] + self.change_word(core, rng) + piece[tail:] if core else piece


def augment_rows(rows: datasets.Dataset, task_name: str, tokenizer, embeddings: torch.Tensor,
                 classes: list[str], augmentation: Augmentation, *, text_column: str, tokens_column: str,
                 labels_column: str | None, label_column: str | None) -> datasets.Dataset:
    """`rows` followed by `augmentation.variants` variants of each, labels of the variants null."""
    if augmentation.variants == 0:
        return rows
    methods = augmentation.methods
    if "mentions" in methods and (task_name != TOKEN_CLASSIFICATION or labels_column is None):
        raise KDCacheError("`augment_methods` mentions needs token classification data with gold tags "
                           "(entity mentions are swapped by type)")
    if "mask" in methods and tokenizer.mask_token is None:
        raise KDCacheError("`augment_methods` mask needs a tokenizer with a mask token; use substitute")
    if task_name == CAUSAL_LM and text_column not in rows.column_names:
        raise KDCacheError(f"augmentation needs text: the data has no '{text_column}' column (pre-tokenized "
                           f"input_ids cannot be varied word by word)")
    neighbours = EmbeddingNeighbours(tokenizer, embeddings) if "substitute" in methods else None
    tag_names = _tag_names(rows, labels_column, classes) if task_name == TOKEN_CLASSIFICATION and labels_column else None
    tagged = [(words, tag_names(tags)) for words, tags in zip(rows[tokens_column], rows[labels_column])
              if tags is not None] if tag_names else []
    maker = _Variants(augmentation, neighbours, tokenizer.mask_token, tagged)
    label_of = labels_column if task_name == TOKEN_CLASSIFICATION else label_column

    def make(row: dict, rng: np.random.Generator) -> dict:
        new = dict(row)
        if task_name == TOKEN_CLASSIFICATION:
            tags = row[labels_column] if labels_column else None
            new[tokens_column] = maker.words(row[tokens_column], tag_names(tags) if tags is not None else None, rng)
        else:
            new[text_column] = maker.text(row[text_column], rng)
        return new

    originals = rows.to_list()
    variants = []
    for variant in range(1, augmentation.variants + 1):
        for index, row in enumerate(originals):
            new = maker.variant(row, index, variant, make)
            if label_of is not None and label_of in new:
                new[label_of] = None
            variants.append(new)
    extra = datasets.Dataset.from_list(variants, features=rows.features)
    return datasets.concatenate_datasets([rows, extra])


def _tag_names(rows: datasets.Dataset, column: str, classes: list[str]):
    """A function from one row's gold tags (names, ids or ClassLabel ids) to tag names."""
    feature = rows.features[column]
    inner = getattr(feature, "feature", None) or getattr(feature, "dtype", None)
    names = getattr(inner, "names", None)

    def tag_names(tags: list) -> list[str]:
        return [tag if isinstance(tag, str) else (names or classes)[int(tag)] for tag in tags]

    return tag_names
