"""The fused head losses (kdcache/fused.py) equal the losses on full logits: value and gradients, every case."""

import math

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaForCausalLM

from conftest import tiny_llama_config
from kdcache import (DistillationLoss, DumpSettings, KDCacheError, KDCacheWarning, SparseTargets, TrainSettings, collate,
                     dump_teacher, fused_kd_loss, kd_loss, next_token_ce, open_cache, output_head)
from kdcache.cache.format import Manifest
from kdcache.fused import OutputHead
from kdcache.models import model_from_config
from kdcache.losses import DIVERGENCES, TAIL_MODES, map_targets

N, D, V, K = 37, 12, 50, 6
CLOSE = dict(rtol=1e-5, atol=1e-7)


def _case(seed=0, bias=False, pad=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).requires_grad_(True)
    weight = (torch.randn(V + pad, D, generator=g) * 0.5).requires_grad_(True)
    b = (torch.randn(V + pad, generator=g) * 0.1).requires_grad_(True) if bias else None
    teacher = torch.log_softmax(torch.randn(N, V, generator=g) * 2, -1)
    values, ids = teacher.topk(K, -1)
    values[3, -2:] = -math.inf  # padded slots with a real id
    tail = teacher.scatter(1, ids, -math.inf).logsumexp(-1)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100  # masked positions (padding, document ends)
    return hidden, weight, b, SparseTargets(ids, values, tail), labels


def _sampled(targets):
    """Sampled-form targets: counts over the listed ids (no tail)."""
    counts = torch.arange(K, 0, -1, dtype=torch.float32).expand(N, K)
    logprobs = (counts / counts.sum(-1, keepdim=True)).log().masked_fill(targets.logprobs == -math.inf, -math.inf)
    return SparseTargets(targets.ids, logprobs - logprobs.logsumexp(-1, keepdim=True), None)


def _compare(head, hidden, targets, labels, chunk_size=5, **options):
    params = [t for t in (hidden, head.weight, head.bias) if t is not None]
    logits = head.logits(hidden)[:, :V]
    unfused = 0.7 * kd_loss(logits, targets, **options) + (0.3 * next_token_ce(logits, labels) if labels is not None
                                                           else 0.0)
    expected = torch.autograd.grad(unfused, params)
    sliced = OutputHead(head.weight[:V], None if head.bias is None else head.bias[:V], head.scale, head.softcap)
    fused = fused_kd_loss(hidden, sliced, targets, labels=labels, kd_weight=0.7, ce_weight=0.3,
                          chunk_size=chunk_size, **options)
    got = torch.autograd.grad(fused, params)
    torch.testing.assert_close(fused, unfused, **CLOSE)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **CLOSE)


@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_divergence_and_tail_mode_matches_the_unfused_loss(divergence, tail):
    hidden, weight, _, targets, labels = _case()
    _compare(OutputHead(weight), hidden, targets, labels, divergence=divergence, tail=tail, temperature=2.0)


@pytest.mark.parametrize("divergence", ["forward_kl", "hard"])
def test_sampled_and_head_tail_targets_match(divergence):
    hidden, weight, _, targets, labels = _case(1)
    _compare(OutputHead(weight), hidden, _sampled(targets), labels, divergence=divergence)


def test_cross_tokenizer_targets_match():
    hidden, weight, _, targets, labels = _case(2)
    vocabulary_map = torch.arange(V) // 2  # two teacher ids per student id, summed into one slot
    vocabulary_map[::7] = -1  # unmapped ids join the rest bucket
    _compare(OutputHead(weight), hidden, map_targets(targets, vocabulary_map), None)


@pytest.mark.parametrize("head", [dict(softcap=3.0), dict(scale=0.25), dict(bias=True)])
def test_softcap_scale_bias_and_padded_vocabulary_rows(head):
    hidden, weight, b, targets, labels = _case(3, bias=head.pop("bias", False), pad=4)
    _compare(OutputHead(weight, b, **head), hidden, targets, labels, divergence="jsd", temperature=1.5)


@pytest.mark.parametrize("chunk_size", [1, 8, 1000])
def test_chunk_size_changes_nothing(chunk_size):
    hidden, weight, _, targets, labels = _case(4)
    _compare(OutputHead(weight), hidden, targets, labels, chunk_size=chunk_size)


def test_a_linear_module_is_a_head_and_no_grad_mode_computes_the_value():
    hidden, weight, _, targets, _ = _case(5)
    linear = torch.nn.Linear(D, V, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
        expected = kd_loss(linear(hidden), targets)
        got = fused_kd_loss(hidden, linear, targets, chunk_size=4)
    torch.testing.assert_close(got, expected, **CLOSE)


def test_empty_input_is_a_connected_zero_and_bad_options_raise():
    hidden, weight, _, targets, _ = _case(6)
    empty = SparseTargets(targets.ids[:0], targets.logprobs[:0], targets.tail_logprob[:0])
    loss = fused_kd_loss(hidden[:0], OutputHead(weight), empty)
    loss.backward()
    assert loss.item() == 0 and weight.grad is not None and not weight.grad.any()
    with pytest.raises(ValueError, match="sampled targets"):
        fused_kd_loss(hidden, OutputHead(weight), _sampled(targets), divergence="reverse_kl")



# ---- train-student's loss (DistillationLoss): fused by default, the same as --no-fused-loss ----------------


def _step(settings, cache, model, batch):
    """(loss, terms, gradient of every parameter) of one DistillationLoss step, and whether it ran fused."""
    model.zero_grad()
    torch.manual_seed(0)  # the same feature projections on both paths
    loss_of = DistillationLoss(settings, cache, model)
    loss, terms = loss_of(model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), {name: value.detach() for name, value in terms.items()}, grads, loss_of.fused is not None


def assert_fused_equals_unfused(cache, model, batch, **settings):
    loss, terms, grads, fused = _step(TrainSettings(**settings), cache, model, batch)
    ref_loss, ref_terms, ref_grads, unfused = _step(TrainSettings(fused_loss=False, **settings), cache, model, batch)
    assert fused and not unfused
    torch.testing.assert_close(loss, ref_loss, **CLOSE)
    assert terms.keys() == ref_terms.keys()
    for name in terms:
        torch.testing.assert_close(terms[name], ref_terms[name], **CLOSE)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-5 * float(ref_grads[name].abs().max()))


@pytest.fixture(scope="module")
def padded_batch(cache_dir):
    """Rows of different lengths: the shorter ones are padded, and padding enters no loss."""
    cache = open_cache(cache_dir)
    sequences = list(cache.sequences(sample_ids=range(5), hidden_layers=cache.manifest.hidden_layers))
    assert len({len(s.input_ids) for s in sequences}) > 1
    return cache, collate(sequences)


@pytest.fixture()
def student(student_config):
    torch.manual_seed(0)
    return model_from_config(str(student_config), 0)


@pytest.mark.parametrize("settings", [
    {},
    {"ce_weight": 0.5, "loss": "jsd", "tail": "ignore", "temperature": 2.0},
    {"ce_weight": 1.0, "kd_weight": 0.0},
    {"loss": "akl", "tail": "renormalize", "hidden_weight": 1.0},
    {"ce_weight": 0.3, "loss": "hard"},
])
def test_train_student_loss_is_the_same_fused(padded_batch, student, settings):
    cache, batch = padded_batch
    assert_fused_equals_unfused(cache, student, batch, **settings)


def test_sampled_and_head_tail_caches_train_the_same_fused(tmp_path, teacher_dir, corpus, student):
    out = tmp_path / "both"
    dump_teacher(str(teacher_dir), str(corpus), out, DumpSettings(top_k=4, limit=6, targets="head-tail", samples=16),
                 progress=False)
    cache = open_cache(out)
    batch = collate(list(cache.sequences()))
    assert_fused_equals_unfused(cache, student, batch, ce_weight=0.5)  # head-tail: the cache's own
    assert_fused_equals_unfused(cache, student, batch, targets="topk")


def test_across_tokenizers_the_loss_is_the_same_fused(padded_batch, student):
    """Through the cross-tokenizer path (here with the cache's own tokenizer): CE takes every token, KD and ULD
    the aligned positions only."""
    cache, _ = padded_batch
    settings = TrainSettings(student_tokenizer=str(cache.tokenizer_dir()), ce_weight=0.5, uld_weight=1.0)
    cross = DistillationLoss(settings, cache, student).cross
    batch = cross.collate(list(cache.sequences(sample_ids=range(5))))
    assert not torch.equal(batch.targets_at, batch.valid)
    assert_fused_equals_unfused(cache, student, batch, student_tokenizer=str(cache.tokenizer_dir()),
                                ce_weight=0.5, uld_weight=1.0)


def test_gemma_soft_capping_and_tied_weights_train_the_same_fused(padded_batch, tokenizer):
    cache, batch = padded_batch
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer) + 4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5)
    model = Gemma3ForCausalLM(config)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert output_head(model).softcap == 0.5
    assert_fused_equals_unfused(cache, model, batch, ce_weight=0.5, temperature=2.0)


class ScaledLlama(LlamaForCausalLM):
    """A model that does something to its logits that its config does not say."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 2
        return output


def test_a_model_whose_logits_the_head_does_not_explain_keeps_the_full_logits(padded_batch, tokenizer):
    cache, batch = padded_batch
    model = ScaledLlama(tiny_llama_config(len(tokenizer), hidden=16, layers=1))
    with pytest.raises(KDCacheError, match="transforms them in a way kdcache does not know"):
        output_head(model)
    with pytest.warns(KDCacheWarning, match="`fused_loss` off.*not its output layer applied"):
        loss_of = DistillationLoss(TrainSettings(), cache, model)
    assert loss_of.fused is None
    assert torch.isfinite(loss_of(model, batch)[0])



# ---- dump-teacher: fused logits write the same cache ------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_teacher_dir(tmp_path_factory, tokenizer):
    """A tiny Gemma-3 teacher: soft-capped logits, output layer tied to the input embeddings."""
    torch.manual_seed(1)
    directory = tmp_path_factory.mktemp("gemma_teacher")
    Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                       final_logit_softcapping=0.5)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("teacher, settings", [
    ("llama", {}),  # the default: compact codec, head-tail targets
    ("llama", {"codec": "plain", "top_k": 8, "hidden_layers": (-1,)}),
    ("llama", {"codec": "plain", "targets": "both", "samples": 20, "sampling": "independent"}),
    ("gemma", {"targets": "topk", "top_k": 6, "top_p": 0.8}),
])
def test_the_fused_dump_writes_the_same_bytes(tmp_path, teacher_dir, gemma_teacher_dir, corpus, teacher, settings):
    source = str(teacher_dir if teacher == "llama" else gemma_teacher_dir)
    manifests = {}
    for fused in (True, False):
        dump_teacher(source, str(corpus), tmp_path / str(fused),
                     DumpSettings(limit=12, batch_size=5, shard_rows=6, fidelity_every=1, fused_logits=fused, **settings),
                     progress=False)
        manifests[fused] = Manifest.load(tmp_path / str(fused))
    fused, unfused = manifests[True], manifests[False]
    assert [shard.file for shard in fused.shards] == [shard.file for shard in unfused.shards]
    for shard in fused.shards:
        assert (tmp_path / "True" / shard.file).read_bytes() == (tmp_path / "False" / shard.file).read_bytes()
    timing = ("seconds", "tokens_per_second")
    assert {name: value for name, value in fused.stats.items() if name not in timing} == \
        {name: value for name, value in unfused.stats.items() if name not in timing}
    assert fused.dump_fingerprint == unfused.dump_fingerprint
