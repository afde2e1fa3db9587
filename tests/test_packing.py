"""Packed documents: rows with `position_ids` restarting at each document (kdcache/tasks/base.py).

The check that matters: a document packed into a window with others gets exactly the targets it
gets alone, on the teacher's side (dump) and on the student's (eval), and no label crosses a boundary.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_llama_config
from kdcache import open_cache
from kdcache.errors import KDCacheError
from kdcache.student import TrainSettings, evaluate, train_student
from kdcache.teacher import DumpSettings, dump_teacher

DOCUMENTS = [[5, 9, 14, 3, 22, 8], [7, 7, 30, 2], [11, 40, 41, 12, 13], [6, 19]]


def write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pack(documents, length):
    """GPT-style windows of `length` tokens with per-document positions; the last window may be short."""
    ids = [token for document in documents for token in document]
    positions = [position for document in documents for position in range(len(document))]
    return [{"input_ids": ids[start:start + length], "position_ids": positions[start:start + length]}
            for start in range(0, len(ids), length)]


@pytest.fixture(scope="module")
def caches(tmp_path_factory, teacher_dir):
    """(packed cache, the same pieces one per row): windows of 8 split documents 0 and 2 across rows; a
    window starting inside a document continues its positions (RoPE: same as starting at 0)."""
    work = tmp_path_factory.mktemp("packing")
    rows = pack(DOCUMENTS, 8)
    pieces = [row["input_ids"][start:stop] for row in rows
              for start, stop in _documents(row["position_ids"])]
    settings = DumpSettings(top_k=6, batch_size=2, hidden_layers=(-1,))
    packed = dump_teacher(str(teacher_dir), str(write(work / "packed.jsonl", rows)), work / "packed", settings,
                          progress=False)
    alone = dump_teacher(str(teacher_dir), str(write(work / "alone.jsonl", [{"input_ids": p} for p in pieces])),
                         work / "alone", settings, progress=False)
    return (work / "packed", packed), (work / "alone", alone)


def _documents(positions):
    """(start, stop) of each document piece in a row: the row's start, and wherever a position is 0."""
    starts = sorted({0} | {index for index, position in enumerate(positions) if position == 0}) + [len(positions)]
    return list(zip(starts, starts[1:]))


def test_a_packed_document_gets_the_targets_it_gets_alone(caches):
    (packed_dir, packed), (alone_dir, alone) = caches
    assert packed.columns["optional"] == ["position_ids"]
    pieces = list(open_cache(alone_dir).sequences(hidden_layers=[2]))
    index = 0
    for row in open_cache(packed_dir).sequences(hidden_layers=[2]):
        for start, stop in _documents(row.position_ids.tolist()):
            piece = pieces[index]
            index += 1
            assert row.input_ids[start:stop].tolist() == piece.input_ids.tolist()
            assert row.topk_ids[start:stop].tolist() == piece.topk_ids.tolist()
            np.testing.assert_allclose(row.topk_logprobs[start:stop].astype(np.float32),
                                       piece.topk_logprobs.astype(np.float32), atol=2e-3)
            np.testing.assert_allclose(row.hidden[2][start:stop].astype(np.float32),
                                       piece.hidden[2].astype(np.float32), atol=1e-2)
    assert index == len(pieces) > len(DOCUMENTS), "some documents must start mid-window"
    # no teacher NLL across a boundary: the same labels are scored as with one document per row
    assert packed.stats["teacher_nll"] == pytest.approx(alone.stats["teacher_nll"], abs=1e-4)


def test_a_student_scores_packed_documents_as_if_alone(tmp_path, caches, tokenizer):
    (packed_dir, _), (alone_dir, _) = caches
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer) + 4, hidden=16, layers=1))
    on_packed, on_alone = evaluate(student, packed_dir), evaluate(student, alone_dir)
    for name in ("kl_to_teacher", "top1_agreement", "nll", "positions"):
        assert on_packed[name] == pytest.approx(on_alone[name], rel=1e-4), name
    summary = train_student(packed_dir, tmp_path / "s", student_config=_config(tmp_path, tokenizer), progress=False,
                            settings=TrainSettings(max_steps=2, batch_size=2, ce_weight=1.0))
    assert np.isfinite(summary["final"]["ce"]) and np.isfinite(summary["final"]["kd"])


def _config(tmp_path, tokenizer) -> str:
    path = tmp_path / "student.json"
    path.write_text(tiny_llama_config(len(tokenizer), hidden=16, layers=1).to_json_string())
    return str(path)


@pytest.mark.parametrize("positions, fragment", [
    ([-1, 0, 1], "must count up by 1 from a non-negative start"),
    ([0, 1, 3], "must count up by 1 from a non-negative start, restarting at 0"),
    ([0, 1], "2 position_ids for 3 input_ids"),
])
def test_bad_position_ids_are_one_line_errors(tmp_path, teacher_dir, positions, fragment):
    data = write(tmp_path / "bad.jsonl", [{"input_ids": [5, 6, 7], "position_ids": positions}])
    with pytest.raises(KDCacheError, match=fragment):
        dump_teacher(str(teacher_dir), str(data), tmp_path / "out", DumpSettings(top_k=4), progress=False)
    assert not (tmp_path / "out").exists()
