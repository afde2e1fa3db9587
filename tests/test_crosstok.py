"""Cross-tokenizer distillation: spans, alignment, the vocabulary map and the loss against dense references."""

from __future__ import annotations

import dataclasses
import json
import string

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import LANGUAGE, tiny_llama_config, write_jsonl
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import kdcache
from kdcache import CrossTokenizer, SparseTargets, kd_loss, map_targets, uld_loss
from kdcache.cli import main
from kdcache.errors import KDCacheError
from kdcache.student import TrainSettings, train_student
from kdcache.student.batching import collate
from kdcache.student.crosstok import align, first_token_map, token_texts, vocabulary_map
from kdcache.tasks.spans import check_spans, token_spans
from kdcache.teacher import DumpSettings, dump_teacher

CORPUS = ["Hello world, the naïve café sold 日本 tea!", "The World is unbelievable; the world is WIDE, the World is old.",
          "Tush! never tell me; I take it much unkindly"] * 4


def byte_level_bpe(corpus: list[str] = CORPUS) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (spaces glued to the next word, any byte representable)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")


def uncased_wordpiece(corpus: list[str] = CORPUS) -> PreTrainedTokenizerFast:
    """A BERT-style uncased WordPiece ([CLS] ... [SEP], whitespace dropped, "##" continuations), trained."""
    return bert_style(Tokenizer(models.WordPiece(unk_token="[UNK]")),
                      trainer=(corpus, trainers.WordPieceTrainer(vocab_size=120, special_tokens=SPECIAL)))


def listed_wordpiece(pieces: list[str]) -> PreTrainedTokenizerFast:
    """An uncased WordPiece whose vocabulary is the letters, some punctuation and `pieces`, so that which words
    it splits where is decided here (WordPiece training breaks ties differently from run to run)."""
    letters = string.ascii_lowercase
    vocabulary = [*SPECIAL, *letters, *"*.,!?;:'", *(f"##{letter}" for letter in letters), *pieces]
    return bert_style(Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocabulary)}, unk_token="[UNK]")))


SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def bert_style(backend: Tokenizer, trainer: tuple | None = None, normalizer=None) -> PreTrainedTokenizerFast:
    """`backend` (a WordPiece model) with `normalizer` (default BERT's uncased one), BERT's pre-tokenizer and
    [CLS] ... [SEP] template; trained on (corpus, trainer) if given, after the normaliser and pre-tokenizer are
    set (training uses them)."""
    backend.normalizer = normalizer or normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if trainer:
        backend.train_from_iterator(*trainer)
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", pad_token="[PAD]")


def spans_of(tokenizer, text: str) -> tuple[list[str], np.ndarray]:
    encoded = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    return (tokenizer.convert_ids_to_tokens(encoded["input_ids"]),
            token_spans(encoded["offset_mapping"], encoded["special_tokens_mask"]))


# ---- spans and alignment ------------------------------------------------------------------------

def test_special_tokens_become_empty_spans_at_the_previous_end():
    spans = token_spans([(0, 0), (0, 5), (6, 11), (0, 0)], [1, 0, 0, 1])
    assert spans.tolist() == [[0, 0], [0, 5], [6, 11], [11, 11]]


def test_a_word_split_one_to_three_skips_the_inner_student_boundaries():
    # text "unbelievable tea": teacher [BOS] "unbelievable" " tea"; student "un" "believ" "able" "tea"
    teacher = np.array([[0, 0], [0, 12], [12, 16]])
    student = np.array([[0, 2], [2, 8], [8, 12], [13, 16]])
    student_positions, teacher_positions, boundaries = align(student, teacher)
    assert boundaries == 3  # after "un", "believ", "able" (the last token predicts nothing)
    assert student_positions.tolist() == [2] and teacher_positions.tolist() == [1]  # both end at "able"


def test_a_word_split_three_to_one_uses_the_teacher_boundary_at_the_word_end():
    teacher = np.array([[0, 0], [0, 2], [2, 8], [8, 12], [12, 16]])
    student = np.array([[0, 0], [0, 12], [13, 16], [16, 16]])  # [CLS] "unbelievable" "tea" [SEP]
    student_positions, teacher_positions, boundaries = align(student, teacher)
    assert boundaries == 2  # [CLS] -> word, word -> "tea"; "tea" -> [SEP] predicts no text
    assert student_positions.tolist() == [0, 1] and teacher_positions.tolist() == [0, 3]


def test_tokens_splitting_one_character_share_a_boundary_only_after_the_last_of_them():
    # "aé b": byte fallback splits "é" into two byte tokens that both report the character's span
    teacher = np.array([[0, 1], [1, 2], [1, 2], [2, 4]])
    student = np.array([[0, 1], [1, 2], [3, 4]])
    student_positions, teacher_positions, _ = align(student, teacher)
    assert student_positions.tolist() == [0, 1] and teacher_positions.tolist() == [0, 2]


def test_a_student_that_drops_whitespace_is_aligned_after_the_whitespace_the_teacher_reads():
    # "thee  \nAnd": teacher "thee" "ĠĠ" "Ċ" "And"; student [CLS] "thee" "and" [SEP]
    teacher = np.array([[0, 4], [4, 6], [6, 7], [7, 10]])
    student = np.array([[0, 0], [0, 4], [7, 10], [10, 10]])
    student_positions, teacher_positions, _ = align(student, teacher)
    assert student_positions.tolist() == [1] and teacher_positions.tolist() == [2]  # the teacher predicting "And"


@pytest.mark.parametrize("text", ["Hello  world, the naïve café sold 日本 tea!\nnever", "The World is WIDE."])
def test_real_tokenizers_align_at_equal_character_boundaries(text):
    """Byte-level BPE against uncased WordPiece, whitespace, accents and CJK: every aligned pair predicts
    the text after the same prefix, and the teacher's next token starts at that boundary."""
    _, teacher = spans_of(byte_level_bpe(), text)
    _, student = spans_of(uncased_wordpiece(), text)
    student_positions, teacher_positions, boundaries = align(student, teacher)
    assert len(student_positions) >= 0.6 * boundaries > 0
    # only whitespace lies between the student's and the teacher's prefix
    for student_end, teacher_end in zip(student[student_positions, 1], teacher[teacher_positions, 1]):
        assert teacher_end >= student_end and text[student_end:teacher_end].isspace() | (teacher_end == student_end)
    assert (teacher[teacher_positions + 1, 0] >= teacher[teacher_positions, 1]).all()


def test_offsets_outside_the_text_are_refused():
    with pytest.raises(KDCacheError, match="invalid token offsets"):
        check_spans(np.array([[0, 3], [3, 9]]), "abcdef", 2, sample_id=7)
    with pytest.raises(KDCacheError, match="invalid token offsets"):
        check_spans(np.array([[2, 3], [0, 1]]), "abcdef", 2, sample_id=7)


# ---- the vocabulary map -------------------------------------------------------------------------

def test_token_texts_follow_each_tokenizers_conventions():
    bpe, wordpiece = byte_level_bpe(), uncased_wordpiece()
    bpe_texts = dict(zip(bpe.convert_ids_to_tokens(list(range(len(bpe)))), token_texts(bpe)))
    assert bpe_texts["Ġworld"] == b" world" and bpe_texts["<s>"] == "special:<s>"
    assert bpe_texts["Ã"] == b"\xc3"  # one byte of a two-byte character
    wordpiece_texts = dict(zip(wordpiece.convert_ids_to_tokens(list(range(len(wordpiece)))), token_texts(wordpiece)))
    assert wordpiece_texts["world"] == b" world" and wordpiece_texts[","] == b","
    assert wordpiece_texts["[CLS]"] == "special:[CLS]"
    assert any(token.startswith("##") and text == token[2:].encode() for token, text in wordpiece_texts.items())


def test_an_uncased_student_receives_both_cases_and_a_tokenizer_maps_to_itself():
    bpe, wordpiece = byte_level_bpe(), uncased_wordpiece()
    mapping = vocabulary_map(bpe, wordpiece)
    world = wordpiece.convert_tokens_to_ids("world")
    assert mapping[bpe.convert_tokens_to_ids("ĠWorld")] == mapping[bpe.convert_tokens_to_ids("Ġworld")] == world
    # "The" glued to the text before is a continuation; after whitespace it starts the student's word "the"
    assert mapping[len(bpe) + bpe.convert_tokens_to_ids("The")] == wordpiece.convert_tokens_to_ids("the")
    assert (vocabulary_map(bpe, bpe) == np.tile(np.arange(len(bpe)), 2)).all()
    assert (first_token_map(bpe, bpe, vocabulary_map(bpe, bpe)) == np.tile(np.arange(len(bpe)), 2)).all()


def test_punctuation_maps_alike_after_whitespace_and_after_a_word():
    bpe, wordpiece = byte_level_bpe(), uncased_wordpiece()
    comma, semicolon = bpe.convert_tokens_to_ids(","), bpe.convert_tokens_to_ids(";")
    mapping = vocabulary_map(bpe, wordpiece)
    assert mapping[comma] == mapping[len(bpe) + comma] == wordpiece.convert_tokens_to_ids(",")
    assert mapping[semicolon] == mapping[len(bpe) + semicolon] == wordpiece.convert_tokens_to_ids(";")


PLAY = ["**Hamlet.** To be, or not to be: that is the question.", "**Ophelia.** Good my lord, how does your honour?",
        "**Hamlet.** I humbly thank you; well, well, well."] * 8


def test_first_token_map_gives_a_teacher_token_the_students_first_piece_of_its_text():
    bpe, wordpiece = byte_level_bpe(PLAY), uncased_wordpiece(PLAY)
    exact = vocabulary_map(bpe, wordpiece)
    mapped = first_token_map(bpe, wordpiece, exact)
    half = len(bpe)
    assert ((exact < 0) | (mapped == exact)).all(), "exact entries are kept"
    bold = bpe.convert_tokens_to_ids("**")
    star = wordpiece.convert_tokens_to_ids("*")
    assert exact[bold] == exact[half + bold] == -1 and mapped[bold] == mapped[half + bold] == star
    projected = 0
    for teacher_id, token in enumerate(bpe.convert_ids_to_tokens(list(range(half)))):
        if not token.startswith("Ġ") or exact[half + teacher_id] >= 0:
            continue
        pieces = wordpiece.tokenize(bpe.convert_tokens_to_string([token]))
        first = wordpiece.convert_tokens_to_ids(pieces[0]) if pieces else -1  # whitespace alone: nothing to predict
        assert mapped[half + teacher_id] == first, token
        projected += 1
    assert projected > 0
    # a word's continuation without a same-text student token stays unmapped: its first piece depends on the word
    glued = [i for i, token in enumerate(bpe.convert_ids_to_tokens(list(range(half))))
             if token.isalpha() and exact[i] < 0]
    assert glued and (mapped[glued] == -1).all()


# ---- the loss ------------------------------------------------------------------------------------

def dense_reference(student_logits, teacher_probs, mapping, k, rates=None):
    """Forward KL on [mapped, rest] and the ULD distance, position by position in float64 Python."""
    rates = rates or [1.0] * len(mapping)
    kl_values, uld_values = [], []
    for q, p in zip(torch.softmax(student_logits.double(), -1).tolist(), teacher_probs.tolist()):
        listed = sorted(range(len(p)), key=lambda i: -p[i])[:k]
        grouped: dict[int, float] = {}
        for i in listed:
            if mapping[i] >= 0 and rates[i] > 0:
                grouped[mapping[i]] = grouped.get(mapping[i], 0.0) + rates[i] * p[i]
        teacher_rest = 1 - sum(grouped.values())
        student_rest = 1 - sum(q[j] for j in grouped)
        kl_values.append(sum(v * np.log(v / q[j]) for j, v in grouped.items())
                         + teacher_rest * np.log(teacher_rest / student_rest))
        unmapped = sorted([p[i] for i in listed if mapping[i] < 0]
                          + [(1 - rates[i]) * p[i] for i in listed if mapping[i] >= 0 and rates[i] < 1], reverse=True)
        free = sorted((q[j] for j in range(len(q)) if j not in grouped), reverse=True)[:len(unmapped)]
        tail = 1 - sum(p[i] for i in listed)
        free += [0.0] * (len(unmapped) - len(free))  # fewer free student tokens than unmapped entries: zeros
        uld_values.append(sum(abs(a - b) for a, b in zip(unmapped, free))
                          + abs(tail - (sum(q[j] for j in range(len(q)) if j not in grouped) - sum(free))))
    return np.mean(kl_values), np.mean(uld_values)


def test_kd_and_uld_match_a_dense_reference():
    torch.manual_seed(0)
    mapping = [1, 1, -1, 3, -1, 0, 2, -1]  # teacher ids 0 and 1 are one student token (" The", " the")
    teacher_logits, student_logits = torch.randn(5, 8) * 2, torch.randn(5, 6, dtype=torch.float64)
    k = 5
    logprobs, ids = torch.log_softmax(teacher_logits.double(), -1).topk(k)
    tail = torch.log1p(-logprobs.exp().sum(-1))
    targets = SparseTargets(ids=ids, logprobs=logprobs, tail_logprob=tail)
    vocabulary = torch.tensor(mapping)
    kl, uld = dense_reference(student_logits, torch.softmax(teacher_logits.double(), -1), mapping, k)
    assert kd_loss(student_logits, map_targets(targets, vocabulary)).item() == pytest.approx(kl, rel=1e-9)
    assert uld_loss(student_logits, targets, vocabulary).item() == pytest.approx(uld, rel=1e-9)
    rates = [0.5, 1.0, 1.0, 0.0, 1.0, 0.25, 1.0, 1.0]  # a mapped id keeps rate · p on its student id
    kl, uld = dense_reference(student_logits, torch.softmax(teacher_logits.double(), -1), mapping, k, rates)
    rated = torch.tensor(rates, dtype=torch.float64)
    assert kd_loss(student_logits, map_targets(targets, vocabulary, rated)).item() == pytest.approx(kl, rel=1e-9)
    assert uld_loss(student_logits, targets, vocabulary, rated).item() == pytest.approx(uld, rel=1e-9)


def test_with_an_identity_map_the_exact_part_is_same_tokenizer_kd_and_uld_vanishes_at_the_teacher():
    torch.manual_seed(1)
    teacher_logits = torch.randn(6, 10, dtype=torch.float64)
    logprobs, ids = torch.log_softmax(teacher_logits, -1).topk(4)
    targets = SparseTargets(ids=ids, logprobs=logprobs, tail_logprob=torch.log1p(-logprobs.exp().sum(-1)))
    identity = torch.arange(10)
    student_logits = torch.randn(6, 10, dtype=torch.float64)
    assert torch.equal(kd_loss(student_logits, map_targets(targets, identity)), kd_loss(student_logits, targets))
    assert uld_loss(teacher_logits, targets, identity).item() == pytest.approx(0, abs=1e-12)


# ---- training and info ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def student_tokenizer_dir(tmp_path_factory):
    """A WordPiece tokenizer trained on the synthetic language: splits its words differently from the cache's."""
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator(LANGUAGE.sentences(64, seed=3), trainers.WordPieceTrainer(
        vocab_size=40, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    directory = tmp_path_factory.mktemp("student_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                            pad_token="[PAD]").save_pretrained(directory)
    return directory


def test_the_same_tokenizer_through_the_cross_path_gives_same_tokenizer_targets(cache_dir):
    """Every position with a next token aligns to itself and every id maps to itself."""
    cache = kdcache.open_cache(cache_dir)
    cross = CrossTokenizer.from_path(cache, str(cache.tokenizer_dir()))
    assert (cross.vocabulary_map == np.tile(np.arange(cache.manifest.vocab_size), 2)).all()
    sequences = list(cache.sequences(sample_ids=range(6)))
    same, crossed = collate(sequences), cross.collate(sequences)
    assert torch.equal(same.input_ids, crossed.input_ids)
    has_next = same.valid.clone()
    has_next[torch.arange(len(sequences)), same.valid.sum(1) - 1] = False
    assert torch.equal(crossed.target_mask, has_next)
    assert torch.equal(crossed.sparse_targets().logprobs, same.topk_logprobs[has_next])
    assert cross.report(sequences)["aligned_share"] == 1.0
    assert (cross.estimate_map_rates(cache.sequences()) == 1).all(), \
        "a tokenizer facing itself: every mapped id is the student's next token"


def cross_tokenizer_over(tmp_path, play: list[str], teacher, student, top_k: int = 4
                         ) -> tuple[CrossTokenizer, kdcache.Cache]:
    """(`student` facing the cache, the cache) of a tiny random teacher with tokenizer `teacher`, top-k over `play`."""
    from transformers import AutoModelForCausalLM
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    AutoModelForCausalLM.from_config(tiny_llama_config(len(teacher), hidden=16, layers=1)).save_pretrained(teacher_dir)
    teacher.save_pretrained(teacher_dir)
    student.save_pretrained(student_dir)
    cache = tmp_path / "cache"
    dump_teacher(str(teacher_dir), str(write_jsonl(tmp_path / "play.jsonl", play)), cache,
                 DumpSettings(targets="topk", top_k=top_k), progress=False)
    opened = kdcache.open_cache(cache)
    return CrossTokenizer.from_path(opened, str(student_dir)), opened


def test_a_teacher_token_that_begins_longer_student_words_keeps_little_of_its_mass(tmp_path):
    """Teacher "Be" (of "Beatrice") has a same-text student word "be" that the student never writes there."""
    play = ["**Beatrice.** I wonder that you will still be talking, Signior Benedick.",
            "**Benedick.** What, my dear Lady Disdain! are you yet living?"] * 6
    teacher, student = byte_level_bpe(play), uncased_wordpiece(play)
    assert teacher.tokenize(play[0])[:2] == ["**", "Be"] and "beatrice" in student.tokenize(play[0])
    cross, opened = cross_tokenizer_over(tmp_path, play, teacher, student)
    rates = cross.estimate_map_rates(opened.sequences())
    half = len(teacher)
    be, you = teacher.convert_tokens_to_ids("Be"), teacher.convert_tokens_to_ids("Ġyou")
    assert cross.vocabulary_map[half + be] == student.convert_tokens_to_ids("be")  # "Be" after "**" starts a word
    assert rates[half + be] == pytest.approx(1 / 7)  # 6 occurrences, none of them the student's "be"
    assert rates[you] == 1.0


SIGNIOR = ["**Beatrice.** I wonder that you will still be talking, Signior Benedick.",
           "**Beatrice.** Is it possible disdain should die while she hath such meet food to feed it?"] * 6


def signior(tmp_path):
    """(cross tokenizer, teacher tokenizer, student tokenizer, the cache's rows) for a byte-level BPE teacher and a
    small WordPiece student, which splits some words finer than the teacher and others coarser."""
    teacher, student = byte_level_bpe(SIGNIOR), listed_wordpiece(["di", "##in", "st", "##ill", "be", "##ic"])
    cross, opened = cross_tokenizer_over(tmp_path, SIGNIOR, teacher, student)
    return cross, teacher, student, list(opened.sequences())


def with_targets(sequence, teacher, at: int, tokens: list[str], probabilities: list[float]):
    """`sequence` with the teacher's listed tokens and tail at position `at` replaced."""
    topk_ids, topk_logprobs, tail = sequence.topk_ids.copy(), sequence.topk_logprobs.copy(), sequence.tail_logprob.copy()
    topk_ids[at] = teacher.convert_tokens_to_ids(tokens)
    topk_logprobs[at] = np.log(probabilities)
    tail[at] = np.log1p(-sum(probabilities))
    return dataclasses.replace(sequence, topk_ids=topk_ids, topk_logprobs=topk_logprobs, tail_logprob=tail)


def targets_after(cross, student, row, pieces: list[str]) -> tuple[dict, dict, float]:
    """At the student position that `pieces` end with and that predicts their last one: (teacher-id entries,
    student-id entries, tail), as probabilities."""
    tokens = student.convert_ids_to_tokens(row.input_ids.tolist())
    position = next(i for i in range(len(tokens)) if tokens[i:i + len(pieces)] == pieces) + len(pieces) - 2
    slot = row.target_positions.tolist().index(position)
    teacher_entries, student_entries = {}, {}
    half = len(cross.vocabulary_map)
    for index, logprob in zip(row.topk_ids[slot].tolist(), row.topk_logprobs[slot].tolist()):
        if logprob > -np.inf:
            entries, key = (student_entries, index - half) if index >= half else (teacher_entries, index)
            entries[key] = entries.get(key, 0.0) + np.exp(logprob)
    return teacher_entries, student_entries, float(np.exp(row.tail_logprob[slot]))


def test_a_student_boundary_inside_a_teacher_token_gets_the_remainders_of_the_consistent_tokens(tmp_path):
    """Teacher "dain" (after " di", "s") covers the student's boundary between "##d" and "##a": given the "d" the
    student has read, only listed tokens beginning with "d" remain, each giving its remainder's student piece."""
    cross, teacher, student, rows = signior(tmp_path)
    assert "dain" in teacher.tokenize(SIGNIOR[1]) and student.tokenize("disdain") == ["di", "##s", "##d", "##a", "##in"]
    sequence = next(row for row in rows if "disdain" in row.text)
    predicting = sequence.input_ids.tolist().index(teacher.convert_tokens_to_ids("dain")) - 1
    # "Ġsh" and "e" are ruled out by the "d" the student has read
    sequence = with_targets(sequence, teacher, predicting, ["dain", "d", "Ġsh", "e"], [0.4, 0.1, 0.2, 0.05])
    row, _, inside = cross.student_row(sequence)
    teacher_entries, student_entries, tail = targets_after(cross, student, row, ["##s", "##d", "##a"])
    assert inside > 0 and not teacher_entries
    # the consistent mass (0.4 + 0.1) is scaled to the listed mass (0.75); "d" alone leaves its remainder unknown
    assert student_entries == {student.convert_tokens_to_ids("##a"): pytest.approx(0.6, rel=1e-3)}
    assert tail == pytest.approx(0.25 + 0.15, rel=1e-3)


def test_a_student_token_spanning_teacher_tokens_gets_the_teachers_continuations(tmp_path):
    """The student's "st" of "still" is the teacher's " s" then "t": the mass of " s" is split by the teacher's
    prediction after it, each continuation going to the student's first piece of " s" + its text."""
    cross, teacher, student, rows = signior(tmp_path)
    sequence = next(row for row in rows if "still" in row.text)
    assert student.tokenize("will still") == ["w", "##ill", "st", "##ill"]
    ids = sequence.input_ids.tolist()
    predicting = next(i for i in range(len(ids) - 2) if teacher.convert_ids_to_tokens(ids[i:i + 3]) == ["ill", "Ġs", "t"])
    sequence = with_targets(sequence, teacher, predicting, ["Ġs", "Ġt", "e", "o"], [0.5, 0.2, 0.1, 0.1])
    sequence = with_targets(sequence, teacher, predicting + 1, ["t", "e", "ill", "o"], [0.6, 0.2, 0.1, 0.05])
    row, _, _ = cross.student_row(sequence)
    teacher_entries, student_entries, tail = targets_after(cross, student, row, ["##ill", "st"])
    # " s" itself is replaced by its continuations; the position's other listed tokens stay as they are
    assert teacher_entries == pytest.approx({teacher.convert_tokens_to_ids(token): p
                                             for token, p in (("Ġt", 0.2), ("e", 0.1), ("o", 0.1))}, rel=1e-3)
    expected: dict[int, float] = {}
    for word, p in (("st", 0.3), ("se", 0.1), ("sill", 0.05), ("so", 0.025)):
        first = student.convert_tokens_to_ids(student.tokenize(word)[0])
        expected[first] = expected.get(first, 0.0) + p
    assert student.convert_tokens_to_ids("st") in expected and student_entries == pytest.approx(expected, rel=1e-3)
    assert tail == pytest.approx(0.1 + 0.5 * 0.05, rel=1e-3)  # the tails of both positions, the second one's share


def test_inside_a_teacher_token_the_actual_token_is_followed_when_the_students_token_goes_beyond_it(tmp_path):
    """The student reads "bened" of "Benedick" (" Be" "n" "edi" "ck" for the teacher); its next piece "##ic" ends
    inside "ck", so "edi"'s mass is split by the teacher's prediction after it, each continuation giving the
    student's piece at the same place of the word it makes."""
    cross, teacher, student, rows = signior(tmp_path)
    assert student.tokenize("Benedick") == ["be", "##n", "##e", "##d", "##ic", "##k"]
    sequence = next(row for row in rows if "Benedick" in row.text)
    ids = sequence.input_ids.tolist()
    edi = next(i for i in range(len(ids) - 1) if teacher.convert_ids_to_tokens(ids[i - 1:i + 2]) == ["n", "edi", "ck"])
    sequence = with_targets(sequence, teacher, edi - 1, ["edi", "e", "Ġsh", "ee"], [0.5, 0.1, 0.1, 0.1])
    sequence = with_targets(sequence, teacher, edi, ["ck", "t", "e", "o"], [0.6, 0.2, 0.1, 0.05])
    row, _, _ = cross.student_row(sequence)
    teacher_entries, student_entries, tail = targets_after(cross, student, row, ["##e", "##d", "##ic"])

    def piece_at(word: str, at: int) -> int:
        start = 0
        for piece in student.tokenize(word):
            if start == at:
                return student.convert_tokens_to_ids(piece)
            start += len(piece.removeprefix("##"))
        raise AssertionError(f"no piece of {word!r} starts at {at}")

    path = 0.5 * 0.8 / 0.5  # "edi", the one token consistent with "ed", scaled to the listed mass
    expected: dict[int, float] = {}
    for word, p in (("Benedick", 0.6), ("Benedit", 0.2), ("Benedie", 0.1), ("Benedio", 0.05)):
        expected[piece_at(word, 5)] = expected.get(piece_at(word, 5), 0.0) + path * p
    assert not teacher_entries and student.convert_tokens_to_ids("##ic") in expected
    assert student_entries == pytest.approx(expected, rel=1e-3)
    assert tail == pytest.approx(0.2 + path * 0.05, rel=1e-3)  # the tail keeps its share, and the one after "edi"


# ---- a normalising teacher facing a student that keeps the difference --------------------------

KINGS = ["The king is dead. The queen is here, and the king weeps.",
         "THE END. And the Queen said: the king is here.\nThe king weeps, the queen is dead."] * 6
CAFES = ["Le café est naïve. The cafe is here, the café is there.",
         "The naive cafe is here. Le café is there, the naïve café."] * 6


def cased_wordpiece(normalizer, pieces: list[str]) -> PreTrainedTokenizerFast:
    """A WordPiece of both cases' letters, some punctuation and `pieces` behind `normalizer`."""
    letters = string.ascii_letters
    vocabulary = [*SPECIAL, *letters, *"*.,!?;:'", *(f"##{letter}" for letter in letters), *pieces]
    return bert_style(Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocabulary)}, unk_token="[UNK]")),
                      normalizer=normalizer)


NORMALISATIONS = {
    # BERT's uncased WordPiece (lowercasing, accents stripped) facing a cased byte-level BPE
    "uncased": (lambda: cased_wordpiece(normalizers.BertNormalizer(lowercase=True),
                                        ["the", "king", "queen", "is", "dead", "here", "and", "weeps", "end"]),
                KINGS, ["the", "king", "queen", "and"], ["The", "the", "Queen", "queen", "And", "king"]),
    # a cased teacher that strips accents facing a BPE that keeps them
    "accents": (lambda: cased_wordpiece(normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()]),
                                        ["cafe", "naive", "the", "The", "is", "here", "there", "Le", "est"]),
                CAFES, ["cafe", "naive", "is", "The"], ["café", "cafe", "naïve", "naive"]),
    # one byte-level BPE on both sides: nothing to tell apart, the map is the identity
    "identity": (lambda: byte_level_bpe(KINGS), KINGS, ["Ġthe", "Ġking", "Ġqueen", "Ġand"],
                 ["the", "king", "queen"]),
}


def reference_context(left: str) -> int:
    """The context class of the text read so far, as docs/cross_tokenizer.md states it: sentence start, line
    start, after other whitespace, glued to a word."""
    stripped = left.rstrip()
    core = stripped.rstrip("\"'’”)]*_")
    if not core or core[-1] in ".!?":
        return 0
    return 1 if "\n" in left[len(stripped):] else 2 if stripped != left else 3


def reference_casing(text: str) -> int:
    letters = [char for char in text if char.isalpha()]
    return 0 if letters and all(char.islower() for char in letters) else 1 if letters and letters[0].isupper() else 2


def reference_prior(student, texts: list[str]) -> np.ndarray:
    """[context, student id]: count after the context class + (count of its casing class + 1) / (count + 3)."""
    counts = np.zeros((4, len(student)))
    for text in texts:
        encoded = student(text, return_offsets_mapping=True, return_special_tokens_mask=True, add_special_tokens=False)
        boundary = 0
        for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            if end > start:
                counts[reference_context(text[:boundary]), token] += 1
                boundary = end
    casings = np.array([reference_casing(student.decode([token])) for token in range(len(student))])
    prior = counts.copy()
    for context in range(4):
        by_casing = np.bincount(casings, weights=counts[context], minlength=3)
        prior[context] += (by_casing[casings] + 1) / (by_casing.sum() + 3)
    return prior


@pytest.mark.parametrize("case", list(NORMALISATIONS))
def test_a_normalising_teachers_mass_goes_to_the_variant_the_student_writes(tmp_path, case):
    """Dense reference, over the student's whole vocabulary: a listed teacher token's variants are the student
    tokens that the teacher's own normaliser turns into its text; all of its mass goes to the student's true
    next token when that is one of them, else it is split by the prior estimated from the cache's text."""
    make_teacher, play, listed, words = NORMALISATIONS[case]
    teacher, student = make_teacher(), byte_level_bpe(play)
    cross, opened = cross_tokenizer_over(tmp_path, play, teacher, student)
    if case == "identity":
        identity = np.concatenate([np.tile(np.arange(len(teacher)), 2), np.arange(len(student))])
        assert (cross.target_map == identity).all()
    normalizer = teacher.backend_tokenizer.normalizer
    teacher_texts = token_texts(teacher)
    student_texts = [student.decode([token]) for token in range(len(student))]
    prior = reference_prior(student, [sequence.text for sequence in opened.sequences()])
    target_map = cross.target_map
    probabilities = [0.4, 0.2, 0.1, 0.05]
    checked = set()
    for sequence in list(opened.sequences())[:2]:  # the play's two passages
        teacher_spans = sequence.token_offsets
        encoded = student(sequence.text, return_offsets_mapping=True)
        for position, (start, end) in list(enumerate(encoded["offset_mapping"]))[1:]:
            word = sequence.text[start:end].strip()
            predicting = [index for index, (teacher_start, teacher_end) in enumerate(teacher_spans[1:].tolist())
                          if teacher_end == end and sequence.text[teacher_start:end].strip() == word]
            spelled = student.decode([encoded["input_ids"][position]]).strip()
            if (word not in words or not len(predicting) or spelled != word
                    or teacher_spans[predicting[0], 1] < encoded["offset_mapping"][position - 1][1]):
                continue  # checked where a teacher token and the student's both end before the word, both spell it
            row, _, _ = cross.student_row(with_targets(sequence, teacher, int(predicting[0]), listed, probabilities))
            slot = row.target_positions.tolist().index(position - 1)
            got: dict[int, float] = {}
            for index, logprob in zip(row.topk_ids[slot].tolist(), row.topk_logprobs[slot].tolist()):
                if logprob > -np.inf and target_map[index] >= 0:
                    got[int(target_map[index])] = got.get(int(target_map[index]), 0.0) + float(np.exp(logprob))
            actual = encoded["input_ids"][position]
            context = reference_context(sequence.text[:encoded["offset_mapping"][position - 1][1]])
            expected: dict[int, float] = {}
            for token, p in zip(listed, probabilities):
                text = teacher_texts[teacher.convert_tokens_to_ids(token)].decode()
                variants = [index for index, student_text in enumerate(student_texts) if student_text.strip()
                            and (normalizer.normalize_str(student_text) if normalizer else student_text) == text]
                assert variants, (token, text)
                weights = ({actual: 1.0} if actual in variants else
                           {index: prior[context, index] / prior[context, variants].sum() for index in variants})
                for index, weight in weights.items():
                    expected[index] = expected.get(index, 0.0) + p * weight
            assert got == pytest.approx(expected, rel=1e-4, abs=1e-7), (case, sequence.text[:end])
            assert float(np.exp(row.tail_logprob[slot])) == pytest.approx(0.25, rel=1e-4)
            checked.add(word)
    assert checked == set(words)
    if case != "identity":
        assert cross.variants.shape[1] > 1 and len(target_map) > 2 * len(teacher) + len(student)
    if case == "uncased":
        # The map rates count a variant as right (" Queen" for "queen": 12 + 6 occurrences, 19 / 19, not 13 / 19),
        # and find the student's token that takes the space the teacher's token leaves out (not 1 / 19).
        rates, entries = cross.estimate_map_rates(opened.sequences()), 2 * len(teacher)
        assert len(rates) == len(target_map)
        assert rates[teacher.convert_tokens_to_ids("queen")] == 1.0
        assert (rates[entries + len(student):].reshape(-1, entries) == rates[:entries]).all()


def test_info_reports_the_mass_on_the_true_next_token_by_casing(tmp_path):
    """Facing its own tokenizer, the mass on the true next token is the teacher's probability of it; facing a
    cased student, an uncased teacher's capitals get their share (0 before the mapping knew about case)."""
    teacher = byte_level_bpe(KINGS)
    cross, opened = cross_tokenizer_over(tmp_path / "itself", KINGS, teacher, teacher)
    sums, counts = np.zeros(3), np.zeros(3)
    for sequence in opened.sequences():
        for position, token in enumerate(sequence.input_ids[1:].tolist()):
            listed = sequence.topk_ids[position].tolist()
            casing = reference_casing(teacher.decode([token]))
            sums[casing] += np.exp(sequence.topk_logprobs[position][listed.index(token)]) if token in listed else 0.0
            counts[casing] += 1
    report = cross.report(opened.sequences())
    assert counts.all()
    assert [report["true_token_mass"][name] for name in ("lowercase", "capitalised", "other")] == \
        pytest.approx((sums / counts).tolist(), abs=1e-4)
    assert sum(report["true_token_positions"].values()) == pytest.approx(1, abs=1e-3)

    uncased = NORMALISATIONS["uncased"][0]()  # every token listed: the true next token's lowercase form is there
    _, opened = cross_tokenizer_over(tmp_path / "uncased", KINGS, uncased, teacher, top_k=len(uncased))
    result = CliRunner().invoke(main, ["info", str(tmp_path / "uncased" / "cache"), "--student-tokenizer",
                                       str(tmp_path / "uncased" / "student")])
    assert result.exit_code == 0, result.output
    report = CrossTokenizer.from_path(opened, str(tmp_path / "uncased" / "student")).report(opened.sequences())
    assert report["true_token_mass"]["capitalised"] > 0 and report["true_token_positions"]["capitalised"] > 0.05
    assert (f"capitalised {report['true_token_mass']['capitalised']:.1%} "
            f"({report['true_token_positions']['capitalised']:.0%} of positions)") in result.output


def test_training_across_tokenizers(cache_dir, student_tokenizer_dir, tmp_path):
    student = AutoTokenizer.from_pretrained(student_tokenizer_dir)
    config = tmp_path / "student.json"
    config.write_text(tiny_llama_config(len(student), hidden=16, layers=1).to_json_string())
    out = tmp_path / "student"
    summary = train_student(cache_dir, out, student_config=str(config), progress=False,
                            settings=TrainSettings(max_steps=3, batch_size=4, ce_weight=0.5, log_every=1, uld_weight=1.0,
                                                   student_tokenizer=str(student_tokenizer_dir)))
    alignment = summary["cross_tokenizer"]
    assert 0 < alignment["aligned_share"] <= 1 and alignment["skipped_share"] == pytest.approx(
        1 - alignment["aligned_share"] - alignment["inside_share"], abs=1e-4)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert record["loss"] == pytest.approx(0.5 * record["ce"] + record["kd"] + record["uld"], rel=1e-6)
    assert len(AutoTokenizer.from_pretrained(out)) == len(student), "the student ships its own tokenizer"

    result = CliRunner().invoke(main, ["info", str(cache_dir), "--student-tokenizer", str(student_tokenizer_dir)])
    assert result.exit_code == 0 and f"{alignment['aligned_share']:.1%} of student positions aligned" in result.output


@pytest.mark.parametrize("dumped", [{}, {"targets": "sampled", "samples": 8}], ids=["default", "sampled"])
def test_drawn_targets_serve_another_tokenizer_as_estimated_probabilities(teacher_dir, corpus, student_tokenizer_dir,
                                                                          tmp_path, dumped):
    """dump-teacher's default (head + sampled tail) and sampled caches serve a student with another tokenizer
    without flags: each drawn id is listed with probability tail mass · count / draws (all of the mass for
    sampled targets), after the exact head if there is one; `targets` topk keeps a head and exact tail alone.
    Facing its own tokenizer, the loss is same-tokenizer KD on the same targets."""
    cache = tmp_path / "cache"
    dump_teacher(str(teacher_dir), str(corpus), cache, DumpSettings(limit=12, **dumped), progress=False)
    opened = kdcache.open_cache(cache)
    kind = opened.manifest.default_targets
    assert kind == dumped.get("targets", "head-tail")
    sequences = list(opened.sequences())
    # Facing its own tokenizer, every position aligns to itself: the targets are the rows' own, in ids.
    itself = CrossTokenizer.from_path(opened, str(opened.tokenizer_dir()))
    row, _, _ = itself.student_row(sequences[0])
    sequence = sequences[0]
    for position in row.target_positions.tolist():
        drawn = sequence.sampled_ids.values[sequence.sampled_ids.offsets[position]:sequence.sampled_ids.offsets[position + 1]]
        counts = sequence.sampled_counts.values[sequence.sampled_counts.offsets[position]:
                                                sequence.sampled_counts.offsets[position + 1]].astype(float)
        head = ({} if kind == "sampled" else
                {int(i): float(np.exp(p)) for i, p in zip(sequence.topk_ids[position], sequence.topk_logprobs[position])})
        tail = 1.0 if kind == "sampled" else float(np.exp(sequence.tail_logprob[position]))
        expected = {**head, **{int(i): tail * c / counts.sum() for i, c in zip(drawn, counts)}}
        slot = row.target_positions.tolist().index(position)
        got = {int(i): float(np.exp(p)) for i, p in zip(row.topk_ids[slot], row.topk_logprobs[slot]) if p > -np.inf}
        assert got == pytest.approx(expected, rel=1e-5)
        assert float(np.exp(row.tail_logprob[slot])) == (0.0 if len(drawn) else pytest.approx(tail, rel=1e-5))
    crossed, same = itself.collate(sequences), collate(sequences)
    logits = torch.randn(*same.input_ids.shape, opened.manifest.vocab_size)
    identity = torch.from_numpy(itself.target_map)
    with_next = crossed.target_mask[same.valid]  # the cross path targets positions with a next token
    same_targets = same.sparse_targets(kind)
    same_targets = SparseTargets(ids=same_targets.ids[with_next], logprobs=same_targets.logprobs[with_next],
                                 tail_logprob=None)
    assert kd_loss(logits[crossed.targets_at], map_targets(crossed.sparse_targets("topk"), identity)).item() == \
        pytest.approx(kd_loss(logits[crossed.targets_at], same_targets).item(), rel=1e-5)
    student = AutoTokenizer.from_pretrained(student_tokenizer_dir)
    config = tmp_path / "student.json"
    config.write_text(tiny_llama_config(len(student), hidden=16, layers=1).to_json_string())
    for targets in (None, "topk") if kind == "head-tail" else (None,):
        out = tmp_path / f"student-{targets}"
        train_student(cache, out, student_config=str(config), progress=False,
                      settings=TrainSettings(max_steps=2, batch_size=4, log_every=1, targets=targets,
                                             student_tokenizer=str(student_tokenizer_dir)))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert records and all(record["kd"] > 0 for record in records)
    with pytest.raises(KDCacheError, match=f"`targets` both: cache .* holds only {kind} targets"):
        CrossTokenizer.from_path(opened, str(student_tokenizer_dir), targets="both")
    if kind == "head-tail":
        heads_only = CrossTokenizer.from_path(opened, str(student_tokenizer_dir), targets="topk")
        assert heads_only.collate(sequences).sparse_targets("topk").ids.shape[1] == opened.manifest.top_k
        cross = CrossTokenizer.from_path(opened, str(student_tokenizer_dir))
        assert cross.collate(sequences).sparse_targets("topk").ids.shape[1] > opened.manifest.top_k
    with pytest.raises(KDCacheError, match="temperature"):  # draws are estimates at T = 1, as for sampled targets
        train_student(cache, tmp_path / "tempered", student_config=str(config), progress=False,
                      settings=TrainSettings(max_steps=1, temperature=2.0, student_tokenizer=str(student_tokenizer_dir)))


def test_a_different_tokenizer_needs_the_setting_and_a_cache_with_offsets(tmp_path, teacher_dir, cache_dir,
                                                                          student_tokenizer_dir, tokenizer):
    student = AutoTokenizer.from_pretrained(student_tokenizer_dir)
    pretrained = tmp_path / "pretrained"
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_config(tiny_llama_config(len(student), hidden=16, layers=1)).save_pretrained(pretrained)
    student.save_pretrained(pretrained)
    with pytest.raises(KDCacheError, match="set `student_tokenizer`"):
        train_student(cache_dir, tmp_path / "a", student=str(pretrained), progress=False,
                      settings=TrainSettings(max_steps=1))

    ids = write_jsonl(tmp_path / "ids.jsonl", [], column="input_ids")
    ids.write_text("".join(json.dumps({"input_ids": tokenizer(text)["input_ids"]}) + "\n"
                           for text in LANGUAGE.sentences(8, seed=5)))
    pretokenized = tmp_path / "pretokenized"
    dump_teacher(str(teacher_dir), str(ids), pretokenized, DumpSettings(top_k=4), progress=False)
    with pytest.raises(KDCacheError, match="has no token offsets"):
        train_student(pretokenized, tmp_path / "b", student=str(pretrained), progress=False,
                      settings=TrainSettings(max_steps=1, student_tokenizer=str(pretrained)))
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()


def test_the_trainer_integration_refuses_training_across_tokenizers(cache_dir, student_tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from kdcache.student.integration import DistillationTrainer
    model = AutoModelForCausalLM.from_config(tiny_llama_config(64, hidden=16, layers=1))
    with pytest.raises(KDCacheError, match="not yet by DistillationTrainer"):
        DistillationTrainer(model, TrainingArguments(str(tmp_path), max_steps=1, report_to=[]), cache=cache_dir,
                            settings=TrainSettings(student_tokenizer=str(student_tokenizer_dir)))
