"""What every distillation task provides, and the causal-LM defaults the classification tasks override.

A cache row always holds the tokens the teacher saw (`input_ids` [L], and hidden states per
token); the *targets* (top-k class ids and log-probs, tail, gold labels) sit at the task's target
positions, and range over the task's classes:

| task | model class | classes | targets at |
|---|---|---|---|
| `causal-lm` | AutoModelForCausalLM | tokenizer vocabulary | every position t (the token after t) |
| `token-classification` | AutoModelForTokenClassification | config.id2label | the first sub-token of each word |
| `sequence-classification` | AutoModelForSequenceClassification | config.id2label | position 0 (one target per row) |

Each task reads and tokenizes its own rows (`batches`), so the dump loop never branches on the
task: it asks the task for (sample ids, token lists, annotations) and runs the teacher.

Packed documents (causal LM). Long-context data is usually packed: several documents cut into
windows of exactly `max_length` tokens, so no compute goes to padding. Naive packing lets each
document attend to the one before it in the window, so the teacher's targets for a document
depend on whatever happened to precede it, and the next-token label at a boundary is the other
document's first token. A pre-tokenized row may therefore carry `position_ids` next to
`input_ids`, restarting at 0 at each document's first token (a window that starts inside a
document may continue its count). Then, on both sides:

- the model gets `position_ids`, no attention mask and `use_cache=False`, from which transformers'
  masking utilities build a block-diagonal causal mask (`find_packed_sequence_indices`; they look for
  packing only without a mask and a KV cache): a document sees only its own tokens, with its own
  positions, so each target equals what the teacher gives that document alone (tested);
- padding continues with positions 0, 1, ... of its own, i.e. it is one more document nobody sees;
- no next-token label (CE, NLL) and no teacher NLL crosses a boundary: the last token of a
  document keeps its KD target (the teacher's distribution after that document) but has no label.

The positions are cached (`position_ids` column) so that the student trains under the same mask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import KDCacheError
from .names import CAUSAL_LM
from .spans import covered_text, token_spans


# (sample ids, token id lists, annotations or None) for one batch of dataset rows.
TokenizedBatch = tuple[list[int], list[list[int]], list["Annotation"] | None]


@dataclasses.dataclass
class Annotation:
    """What a row carries beyond its tokens (numpy arrays, as cached; see `OPTIONAL_COLUMNS`)."""

    target_positions: np.ndarray | None = None  # int32 [T], ascending (classification); None: every token
    labels: np.ndarray | None = None      # int32 [T], gold class per target
    token_type_ids: np.ndarray | None = None  # int8 [L], text pairs only
    token_offsets: np.ndarray | None = None   # int32 [L, 2], spans in `text` (causal LM, see tasks/spans.py)
    text: str | None = None                   # the text the tokens cover
    position_ids: np.ndarray | None = None    # int32 [L], packed documents (causal LM)


class Task:
    """The causal-LM task; the classification tasks (tasks/classification.py) override what differs."""

    name = CAUSAL_LM
    auto_class_name = "AutoModelForCausalLM"
    architecture_suffixes: tuple[str, ...] = ("ForCausalLM", "LMHeadModel")
    # Sampled targets are draws from the next-token distribution; classification caches store every label.
    supports_sampled_targets = True
    # The classes are the tokenizer's vocabulary (False: the teacher's labels).
    classes_are_vocabulary = True

    @property
    def auto_class(self):
        """The transformers Auto class for this task (imported on use: the CLI starts without transformers)."""
        import transformers
        return getattr(transformers, self.auto_class_name)

    def class_names(self, config) -> list[str]:
        """Class names by id; empty when the classes are the tokenizer's vocabulary."""
        return []

    def top_k(self, requested: int, num_classes: int) -> int:
        return requested

    # ---- reading the dump's rows ---------------------------------------------------------------
    def check_rows(self, rows, settings, source: str) -> None:
        """Refuse data that cannot be read (missing columns, packed positions that describe no documents),
        before anything is written."""
        column = _text_or_ids_column(rows, settings.text_column, source)
        if column == "input_ids" and "position_ids" in rows.column_names:
            _check_document_positions(rows.data.column("input_ids"), rows.data.column("position_ids"))

    def dataset_columns(self, settings) -> dict:
        """The columns a dump reads, recorded in the manifest's dataset description."""
        return {}

    def batches(self, rows, rows_range: range, tokenizer, classes: list[str], settings, source: str
                ) -> Iterator[TokenizedBatch]:
        """Tokenize `rows_range` in batches of `settings.batch_size`; rows with no token are skipped.

        A causal LM reads a text column, or an `input_ids` column when the data is pre-tokenized,
        with `position_ids` when it packs documents (see "Packed documents" above).
        Blank text (a `.txt` corpus's empty lines) is skipped too, whether or not the tokenizer adds a
        BOS token: such a row would only repeat the teacher's guess of a first token. From text with a
        fast tokenizer, each row also carries its text and token spans, so a student with another
        tokenizer can be aligned to the cache later (tasks/spans.py); pre-tokenized data and slow
        tokenizers (no offsets) give caches for students of the same tokenizer only.
        """
        column = _text_or_ids_column(rows, settings.text_column, source)
        packed = column == "input_ids" and "position_ids" in rows.column_names
        for start in range(rows_range.start, rows_range.stop, settings.batch_size):
            stop = min(start + settings.batch_size, rows_range.stop)
            chunk = rows[start:stop]
            annotations = None
            if column == "input_ids":
                token_lists = [list(ids)[:settings.max_length] for ids in chunk[column]]
            else:
                texts = chunk[column]
                if any(not isinstance(text, str) for text in texts):
                    raise KDCacheError(f"column '{column}' must hold strings; row {start} onwards has "
                                       f"{type(next(t for t in texts if not isinstance(t, str))).__name__}")
                spans = {"return_offsets_mapping": True, "return_special_tokens_mask": True} if tokenizer.is_fast else {}
                encoded = tokenizer(texts, truncation=True, max_length=settings.max_length, **spans)
                token_lists = encoded["input_ids"]
                if spans:
                    annotations = [text_annotation(text, offsets, special) for text, offsets, special
                                   in zip(texts, encoded["offset_mapping"], encoded["special_tokens_mask"])]
            if packed:
                annotations = [Annotation(position_ids=document_positions(positions, len(ids)))
                               for ids, positions in zip(token_lists, chunk["position_ids"])]
            blank = [column != "input_ids" and not text.strip() for text in chunk[column]]
            kept = [index for index, ids in enumerate(token_lists) if len(ids) > 0 and not blank[index]]
            if kept:
                yield ([start + index for index in kept], [token_lists[index] for index in kept],
                       None if annotations is None else [annotations[index] for index in kept])

    def drop_reason(self, row: dict, settings) -> str:
        """Why `batches` skipped `row` (the dataset row, a dict): the manifest lists dropped rows by reason."""
        if "input_ids" in row:
            return "empty input_ids"
        return "blank text" if not row[settings.text_column].strip() else "no token after tokenization"

    # ---- the teacher's and the student's logits ------------------------------------------------
    def target_logits(self, logits: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor,
                      annotations: list[Annotation] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher logits at the target positions [N, C] and the gold class at each (-1: none, also
        where the next token starts another packed document)."""
        has_next = valid[:, 1:]
        if packed(annotations):
            has_next = has_next & (pad_positions([a.position_ids for a in annotations], input_ids.shape[1],
                                                 input_ids.device)[:, 1:] != 0)
        next_ids = torch.full_like(input_ids, -1)
        next_ids[:, :-1] = torch.where(has_next, input_ids[:, 1:], -1)
        return logits[valid], next_ids[valid]

    def model_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     annotations: list[Annotation] | None) -> dict:
        """What the teacher's forward takes: packed rows get their positions instead of a mask."""
        if not packed(annotations):
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        return {"input_ids": input_ids, "use_cache": False,
                "position_ids": pad_positions([a.position_ids for a in annotations], input_ids.shape[1],
                                              input_ids.device)}

    def teacher_output_size(self, model) -> int:
        """How many classes the teacher's output rows cover (padded vocabularies included)."""
        from ..models import output_vocab_size
        return output_vocab_size(model)

    def student_logits(self, logits: torch.Tensor, batch, num_classes: int) -> torch.Tensor:
        """Student logits [N, C] in the order of `batch.sparse_targets()` (imported caches may leave
        positions untrained: `target_positions`)."""
        return logits[batch.targets_at][:, :num_classes]

    def gold_labels(self, batch) -> torch.Tensor:
        """Gold class per target [N] for the cross-entropy term (-100: none)."""
        return batch.next_token_labels()

    def check_gold_labels(self, manifest) -> None:
        """Raise unless the cache has what `gold_labels` needs (the text is its own label for a causal LM)."""

    def check_student(self, model, manifest) -> None:
        """Raise unless the student's output can represent the cache's classes."""
        from ..models import output_vocab_size
        if output_vocab_size(model) < manifest.vocab_size:
            raise KDCacheError(f"student vocabulary ({output_vocab_size(model)}) is smaller than the cache's "
                               f"tokenizer ({manifest.vocab_size} tokens): the student cannot represent the "
                               f"teacher's targets")

    def student_config_overrides(self, manifest) -> dict:
        """Config values a fresh student must take from the cache."""
        return {}


def text_annotation(text: str, offsets, special_mask) -> Annotation:
    """A causal-LM row's text and normalised token spans (tasks/spans.py)."""
    spans = token_spans(offsets, special_mask)
    return Annotation(token_offsets=spans, text=covered_text(text, spans))


def _text_or_ids_column(rows, text_column: str, source: str) -> str:
    """The column a causal LM reads: 'input_ids' when pre-tokenized, else `text_column`."""
    if len(rows) == 0:
        raise KDCacheError(f"dataset {source} is empty")
    if "input_ids" in rows.column_names:
        return "input_ids"
    if text_column not in rows.column_names:
        raise KDCacheError(f"text column '{text_column}' not in dataset {source} "
                           f"(columns: {', '.join(rows.column_names)}); set `text_column`")
    return text_column


def packed(annotations: list[Annotation] | None) -> bool:
    return annotations is not None and annotations[0].position_ids is not None


def _check_document_positions(input_ids, position_ids) -> None:
    """Every row's `position_ids` describe documents: as many as its input ids, each next position +1 or
    0 (a new document). A row may start at any position ≥ 0: a document continued from the previous
    window keeps counting. Checked on the whole column at once (Arrow buffers, no Python loop per row)."""
    lengths = input_ids.combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
    column = position_ids.combine_chunks()
    counts = column.value_lengths().fill_null(-1).to_numpy(zero_copy_only=False)
    wrong = np.flatnonzero(counts != lengths)
    if len(wrong):
        raise KDCacheError(f"row {wrong[0]}: {max(counts[wrong[0]], 0)} position_ids for {lengths[wrong[0]]} input_ids")
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])[:-1]
    good = np.ones(len(flat), dtype=bool)
    good[1:] = (np.diff(flat) == 1) | (flat[1:] == 0)
    good[starts[counts > 0]] = flat[starts[counts > 0]] >= 0
    if not good.all():
        row = int(np.searchsorted(starts, np.flatnonzero(~good)[0], side="right") - 1)
        raise KDCacheError(f"row {row}: position_ids must count up by 1 from a non-negative start, restarting at 0 "
                           f"where a packed document starts")


def document_positions(positions, length: int) -> np.ndarray:
    """A packed row's `position_ids` (checked by `check_rows`), cut to its `length` tokens, as int32."""
    return np.asarray(positions, dtype=np.int32)[:length]


def pad_positions(rows: list[np.ndarray], length: int, device) -> torch.Tensor:
    """int64 [B, length]: each row's positions, then 0, 1, ... over its padding, which thus forms a
    document of its own that no real token attends to (transformers' packed-sequence mask)."""
    out = torch.arange(length).repeat(len(rows), 1)
    for row, positions in enumerate(rows):
        out[row, :len(positions)] = torch.from_numpy(positions.astype(np.int64))
        out[row, len(positions):] = torch.arange(length - len(positions))
    return out.to(device)


def generic_names(names: list[str]) -> bool:
    """True for transformers' placeholder names (LABEL_0, LABEL_1, ...): the ids carry no names to check."""
    return all(name == f"LABEL_{index}" for index, name in enumerate(names))


def pooler(model):
    """The encoder's pooler (BERT-style: dense + tanh on the first token), or a one-line error."""
    module = getattr(model.base_model, "pooler", None)
    if module is None:
        raise KDCacheError(f"{type(model).__name__} has no pooler (pooled output exists for BERT-style "
                           f"sequence classifiers and bare encoders)")
    return module


def target_mask(annotations: list[Annotation], shape: tuple[int, int], device) -> torch.Tensor:
    """bool [B, L]: True where a row has a target."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for row, annotation in enumerate(annotations):
        mask[row, torch.from_numpy(annotation.target_positions.astype(np.int64))] = True
    return mask.to(device)
