"""Bring-your-own-loop: a Hugging Face Trainer on a cache computes train-student's loss, batch for batch."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_llama_config
from transformers import AutoModelForCausalLM, TrainingArguments

import kdcache


@pytest.fixture(scope="module")
def initial_student(tmp_path_factory, tokenizer):
    """A saved 1-layer student as wide as the teacher (hidden 32): hidden matching needs no learned projection,
    so both runs start from exactly the same parameters."""
    directory = tmp_path_factory.mktemp("initial-student")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer), hidden=32, layers=1)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


SETTINGS = dict(batch_size=4, ce_weight=0.5, kd_weight=1.0, hidden_weight=0.3, temperature=2.0, seed=5,
                shuffle_buffer=8)


def test_trainer_loss_equals_train_student_loss_on_the_same_batch(cache_dir, initial_student, tmp_path):
    settings = kdcache.TrainSettings(max_steps=1, log_every=1, **SETTINGS)
    kdcache.train_student(cache_dir, tmp_path / "cli-run", student=str(initial_student), settings=settings,
                          progress=False)
    first = json.loads((tmp_path / "cli-run" / "metrics.jsonl").read_text().splitlines()[0])

    model = AutoModelForCausalLM.from_pretrained(initial_student)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    args = TrainingArguments(str(tmp_path / "trainer"), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                             remove_unused_columns=False, seed=5)
    trainer = kdcache.DistillationTrainer(model=model, args=args, cache=kdcache.open_cache(cache_dir),
                                          settings=kdcache.TrainSettings(**SETTINGS))
    trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert losses[0] == pytest.approx(first["loss"], rel=1e-6), "same weights, same first batch, same loss"
    assert first["loss"] == pytest.approx(0.5 * first["ce"] + first["kd"] + 0.3 * first["hidden"], rel=1e-6)
    assert any(not torch.equal(before[name], value) for name, value in model.state_dict().items()), "it trained"


def test_own_loop_reads_batches_with_targets_from_the_dataset_and_collator(cache_dir):
    """The pieces a hand-written loop uses: rows in train-student's order, padded inputs, sparse targets, hidden states."""
    cache = kdcache.open_cache(cache_dir)
    dataset = kdcache.CacheDataset(cache, hidden_layers=cache.manifest.hidden_layers, seed=1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=kdcache.collate)
    batches = list(loader)
    assert sum(len(batch.sample_ids) for batch in batches) == len(dataset) == 48
    assert sorted(i for batch in batches for i in batch.sample_ids) == list(range(48))
    dataset.set_epoch(1)
    assert [b.sample_ids for b in loader] != [b.sample_ids for b in batches], "a new epoch reshuffles"
    batch = batches[0]
    targets = batch.sparse_targets()
    assert targets.ids.shape == (batch.num_tokens, 8) and targets.tail_logprob.shape == (batch.num_tokens,)
    probability_mass = targets.logprobs.exp().sum(-1) + targets.tail_logprob.exp()
    assert torch.allclose(probability_mass, torch.ones_like(probability_mass), atol=1e-2)
    (layer,) = cache.manifest.hidden_layers
    assert batch.hidden[layer].shape[:2] == batch.input_ids.shape
    rebuilt = kdcache.Batch(**kdcache.collate_inputs([next(iter(dataset))]))
    assert set(rebuilt.model_inputs()) == {"input_ids", "attention_mask"} and rebuilt.topk_ids is not None
