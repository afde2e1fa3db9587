"""`kdcache export` checked under the peers' own loss formulas.

Neither peer can be installed in CI (DistillKit is not on PyPI; axolotl pins a CUDA stack), so their loss
functions are re-stated below, line for line in their arithmetic, from the files and commits named at each.
Nothing of their code is part of kdcache.
"""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from kdcache import DumpSettings, dump_teacher, kd_loss, open_cache
from kdcache.losses import SparseTargets

from test_sharing import error_line, invoke


def distillkit_sparse_kl(logits, target_ids, target_values, missing: str, eps: float = 1e-8) -> torch.Tensor:
    """Per-position KL of DistillKit's `sparse_kl_div_inner` at T = 1 with log-prob targets
    (arcee-ai/DistillKit a61c2e7d25c2e990d45832e12bd8542bdee9c810, distillkit/lossfuncs/kl.py and
    `get_target_logprobs` in distillkit/lossfuncs/common.py; everything in float32 as there)."""
    student = logits.gather(-1, target_ids) - torch.logsumexp(logits.float(), -1, keepdim=True)
    target = target_values.float()
    if missing == "zero":  # get_target_logprobs: alpha = 1, renormalised over the listed ids
        target = target - torch.logsumexp(target, -1, keepdim=True)
    teacher_probs = target.exp()
    inner = (teacher_probs * (target - student)).sum(-1)
    if missing == "symmetric_uniform":
        log_teacher_missing = torch.log1p(-teacher_probs.float().sum(-1).clamp(min=eps, max=1 - eps))
        log_student_missing = torch.log1p(-student.float().exp().sum(-1).clamp(min=eps, max=1 - eps))
        inner = inner + log_teacher_missing.exp() * (log_teacher_missing - log_student_missing)
    return inner


def axolotl_topk_kl(logits, target_ids, target_logprobs, target_mask, kd_temperature: float) -> torch.Tensor:
    """axolotl's KD trainer loss, forward KL, per labelled position (axolotl-ai-cloud/axolotl
    067b021c8b87a9e5e380b9173c704cf7340e30f5: src/axolotl/integrations/kd/kernels/liger.py
    `distillation_loss_fn` with beta 0 and `kd_normalize_topk` unset, summed over the valid slots, divided by
    the labelled positions in trainer.py `compute_loss`): only the student is divided by `kd_temperature`."""
    student = torch.log_softmax(logits.float() / kd_temperature, -1).gather(-1, target_ids)
    valid = target_mask.bool()
    target = target_logprobs.float()[valid]
    return (target.exp() * (target - student[valid])).sum() / valid.any(-1).sum()


def exported_rows(path, ids_column, logprobs_column):
    rows = datasets.load_from_disk(str(path)).with_format("numpy")
    return [(row["input_ids"], np.stack(row[ids_column]), np.stack(row[logprobs_column]).astype(np.float32))
            for row in rows]


@pytest.fixture(scope="module")
def default_cache(tmp_path_factory, teacher_dir, corpus):
    """dump-teacher's default targets (head 4 + proportional tail draws, compact codec): the cache most users have."""
    out = tmp_path_factory.mktemp("interop") / "default"
    dump_teacher(str(teacher_dir), str(corpus), out, DumpSettings(batch_size=8), progress=False)
    return out


@pytest.mark.parametrize("which", ["cache_dir", "default_cache"])
def test_distillkit_export_trains_finite_and_equals_the_rest_bucket_loss(which, request, tmp_path):
    """Every exported position sums to < 1 in float32 and to 1 − exact tail, rows are sorted descending, and
    DistillKit's symmetric-uniform KL on the export is kdcache's rest-bucket KL on the cache (to float precision);
    its `zero` mode is finite too. Holds for a plain top-k cache and for the default head-tail cache (its head)."""
    cache = request.getfixturevalue(which)
    result = invoke("export", "--format", "distillkit", cache, tmp_path / "dk")
    assert result.returncode == 0, result.stderr
    torch.manual_seed(0)
    for sequence, (tokens, ids, values) in zip(open_cache(cache).sequences(), exported_rows(
            tmp_path / "dk", "token_ids", "top_values")):
        assert (tokens == sequence.input_ids).all()
        assert (np.diff(values, axis=1) <= 0).all()
        mass = np.exp(values).sum(axis=1, dtype=np.float32)
        assert (mass < 1).all()
        np.testing.assert_allclose(mass, np.minimum(-np.expm1(sequence.tail_logprob.astype(np.float64)), 1 - 2**-16),
                                   rtol=2e-3)
        logits = torch.randn(len(tokens), 64) * 3
        head = torch.from_numpy(sequence.topk_logprobs.astype(np.float64))  # 8-bit codes: Σ head + tail ≈ 1 only
        tail = torch.from_numpy(sequence.tail_logprob.astype(np.float64))
        head = head - torch.logsumexp(head, -1, keepdim=True) + torch.log(-torch.expm1(tail)).unsqueeze(-1)
        ours = kd_loss(logits, SparseTargets(torch.from_numpy(sequence.topk_ids.astype(np.int64)), head.float(),
                                             tail.float()))
        ids_t, values_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(values)
        theirs = distillkit_sparse_kl(logits, ids_t, values_t, "symmetric_uniform")
        assert torch.isfinite(theirs).all()
        torch.testing.assert_close(theirs.mean(), ours, rtol=1e-4, atol=1e-5)
        assert torch.isfinite(distillkit_sparse_kl(logits, ids_t, values_t, "zero")).all()


def test_axolotl_export_is_tempered_for_its_kd_temperature(cache_dir, tmp_path):
    """axolotl tempers only the student: exported at `--kd-temperature 2`, its loss at kd_temperature 2 is the
    KL between the top-k renormalised at T = 2 and the student at T = 2; a T = 1 export has twice the log-prob gaps."""
    for temperature in ("1", "2"):
        result = invoke("export", "--format", "axolotl", "--kd-temperature", temperature, cache_dir,
                        tmp_path / temperature)
        assert result.returncode == 0, result.stderr
        assert f"kd_temperature: {temperature}" in result.stdout
    torch.manual_seed(0)
    sequence = next(open_cache(cache_dir).sequences())
    tokens, ids, values = exported_rows(tmp_path / "2", "target_token_ids", "target_logprobs")[0]
    _, _, values_t1 = exported_rows(tmp_path / "1", "target_token_ids", "target_logprobs")[0]
    logits = torch.randn(len(tokens), 64) * 3
    teacher = torch.log_softmax(torch.from_numpy(sequence.topk_logprobs.astype(np.float32)) / 2, -1)
    student = torch.log_softmax(logits / 2, -1).gather(-1, torch.from_numpy(sequence.topk_ids.astype(np.int64)))
    reference = (teacher.exp() * (teacher - student)).sum(-1).mean()
    mask = torch.ones(ids.shape, dtype=torch.bool)
    ids_t = torch.from_numpy(ids.astype(np.int64))
    torch.testing.assert_close(axolotl_topk_kl(logits, ids_t, torch.from_numpy(values), mask, 2.0), reference)
    spread = lambda values: (values[:, 0] - values[:, -1]).mean()  # noqa: E731 - T = 2 halves the log-prob gaps
    assert spread(values) == pytest.approx(spread(values_t1) / 2, rel=1e-4)


def test_export_refusals_are_one_line(cache_dir, teacher_dir, corpus, tmp_path):
    """A top-p cache (ragged rows), a sampled-only cache and a bad temperature are refused naming the cause."""
    dump_teacher(str(teacher_dir), str(corpus), tmp_path / "top-p",
                 DumpSettings(top_k=8, top_p=0.05, batch_size=8, limit=8), progress=False)
    dump_teacher(str(teacher_dir), str(corpus), tmp_path / "sampled",
                 DumpSettings(targets="sampled", batch_size=8, limit=8), progress=False)
    cases = [(("--format", "distillkit", tmp_path / "top-p"), "fixed k per position"),
             (("--format", "axolotl", tmp_path / "top-p"), "fixed k per position"),
             (("--format", "axolotl", tmp_path / "sampled"), "dump with --targets topk or head-tail"),
             (("--format", "axolotl", "--kd-temperature", "0", cache_dir), "must be a positive number"),
             (("--format", "distillkit", "--kd-temperature", "2", cache_dir), "applies to axolotl exports only")]
    for index, (args, message) in enumerate(cases):
        result = invoke("export", *args, tmp_path / f"out{index}")
        assert result.returncode == 1 and message in error_line(result), result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        assert not (tmp_path / f"out{index}").exists()


def test_axolotl_masks_import_as_untrained_positions_and_export_back(cache_dir, student_config, tmp_path):
    """Positions axolotl masks (target_mask 0 from labels -100, e.g. the prompt) become untrained positions of
    the imported cache: no KD or CE term, not scored by `eval`, and masked again when exported back."""
    result = invoke("export", "--format", "axolotl", cache_dir, tmp_path / "ax")
    assert result.returncode == 0, result.stderr
    rows = datasets.load_from_disk(str(tmp_path / "ax")).to_dict()
    for row, (mask, labels) in enumerate(zip(rows["target_mask"], rows["labels"])):
        prompt = 1 + row % 3  # the first tokens are a "prompt" axolotl does not train on
        rows["target_mask"][row] = [[0] * len(slots) if t < prompt else slots for t, slots in enumerate(mask)]
        rows["labels"][row] = [-100 if t < prompt else label for t, label in enumerate(labels)]
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "masked"))
    result = invoke("import", "--format", "axolotl", "--tokenizer", cache_dir / "tokenizer", tmp_path / "masked",
                    tmp_path / "back")
    assert result.returncode == 0, result.stderr
    back = open_cache(tmp_path / "back")
    back.verify(progress=False)
    trained = 0
    for row, sequence in enumerate(back.sequences()):
        prompt = 1 + row % 3
        assert (sequence.target_positions == np.arange(prompt, len(sequence.input_ids))).all()
        assert len(sequence.topk_ids) == len(sequence.target_positions)
        trained += len(sequence.target_positions)

    from kdcache import TrainSettings, evaluate, train_student
    from transformers import AutoModelForCausalLM
    train_student(tmp_path / "back", tmp_path / "student", student_config=str(student_config),
                  settings=TrainSettings(max_steps=2, batch_size=4, ce_weight=1.0), progress=False)
    scores = evaluate(AutoModelForCausalLM.from_pretrained(tmp_path / "student"), back)
    assert scores["positions"] == trained and np.isfinite(scores["kl_to_teacher"])

    result = invoke("export", "--format", "axolotl", tmp_path / "back", tmp_path / "again")
    assert result.returncode == 0, result.stderr
    again = datasets.load_from_disk(str(tmp_path / "again")).to_dict()
    assert again["target_mask"] == rows["target_mask"] and again["labels"] == rows["labels"]
    result = invoke("export", "--format", "distillkit", tmp_path / "back", tmp_path / "dk")
    assert result.returncode == 0, result.stderr
    dk = datasets.load_from_disk(str(tmp_path / "dk")).to_dict()
    assert dk["labels"] == rows["labels"]  # DistillKit masks labels < 0
