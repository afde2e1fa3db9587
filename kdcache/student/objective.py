"""The loss of one batch: the single definition `train-student` and the Trainer integration share.

`loss = ce_weight·CE + kd_weight·KD + hidden_weight·hidden + pooled_weight·pooled` (plus
`uld_weight·ULD` across tokenizers, see crosstok.py), with no other term; KD is already scaled by
T² inside `kd_loss`. Keeping it in one place is what makes a Hugging Face `Trainer` run
(integration.py) compute exactly what `train-student` computes.
"""

from __future__ import annotations

import torch

from ..cache.cache import Cache
from ..errors import KDCacheError
from ..losses import SparseTargets, kd_loss, mix_targets, next_token_ce
from ..tasks import CAUSAL_LM, get_task, pooler
from .batching import Batch, trained_targets
from .crosstok import CrossTokenizer, CrossTokenizerLoss, check_cross_tokenizer_cache
from .projections import FeatureProjections, parse_layer_map
from .settings import TrainSettings


def check_loss_settings(settings: TrainSettings, cache: Cache) -> str:
    """The target type to train on (`targets`, default the cache's own); refuse, before any training, a
    type the cache lacks or a loss it cannot compute.

    The divergence/tail rules live in `kd_loss`; it is asked on zero positions, so they are stated once.
    """
    manifest = cache.manifest
    targets = trained_targets(cache, settings.targets)
    if settings.ce_weight:
        get_task(manifest.task).check_gold_labels(manifest)
    if settings.pooled_weight and manifest.pooled_size is None:
        raise KDCacheError("`pooled_weight` > 0 but the cache holds no pooled output (dump with `pooled`)")
    if settings.student_tokenizer:
        check_cross_tokenizer_settings(settings, cache)
    if settings.teachers:
        check_ensemble_settings(settings, cache, targets)
    if not settings.kd_weight:
        return targets
    probe = SparseTargets(ids=torch.zeros(0, 1, dtype=torch.long), logprobs=torch.zeros(0, 1),
                          tail_logprob=torch.zeros(0) if targets == "topk" else None)
    try:
        kd_loss(torch.zeros(0, manifest.num_classes), probe, divergence=settings.loss, tail=settings.tail,
                temperature=settings.temperature)
    except ValueError as error:
        raise KDCacheError(f"`loss` {settings.loss}, `tail` {settings.tail}, `temperature` {settings.temperature:g} "
                           f"with `targets` {targets}: {error}") from None
    return targets


def check_ensemble_settings(settings: TrainSettings, cache: Cache, targets: str) -> None:
    """`teachers` must name teachers of a multi-teacher cache, each holding the target type trained on."""
    names = cache.manifest.teacher_names
    unknown = [name for name in settings.teacher_weights() if name not in names]
    if unknown:
        raise KDCacheError(f"`teachers` names {', '.join(unknown)}, but cache {cache} has "
                           + (f"the teachers {', '.join(names)}" if names else "one teacher (join caches of several "
                              "with `merge --teachers`)"))
    if settings.student_tokenizer:
        raise KDCacheError("`teachers` and `student_tokenizer` cannot be combined (the teachers of one cache share "
                           "its tokenizer; train across tokenizers from a single teacher)")
    for name, teacher in cache.teacher_caches().items():
        if name in settings.teacher_weights() and targets not in teacher.manifest.trainable_targets:
            raise KDCacheError(f"`targets` {targets}: teacher {name} of cache {cache} holds only "
                               f"{'/'.join(teacher.manifest.target_types)} targets")


def check_cross_tokenizer_settings(settings: TrainSettings, cache: Cache) -> None:
    """Training across tokenizers aligns next-token targets only: refuse what it cannot align."""
    if cache.manifest.task != CAUSAL_LM:
        raise KDCacheError(f"`student_tokenizer` is for causal-LM caches; cache {cache} is {cache.manifest.task}")
    check_cross_tokenizer_cache(cache)
    for name in ("hidden_weight", "pooled_weight", "val_fraction"):
        if getattr(settings, name):
            raise KDCacheError(f"`{name}` is not supported with `student_tokenizer` (teacher and student "
                               f"positions differ)")


class DistillationLoss:
    """The weighted loss of one batch for `model`, as set up by `settings` for `cache`.

    Holds what the terms need besides the batch: the task (which logits face the targets), the
    layer map and the learned feature projections (FitNets; their parameters must be trained with
    the model's), and the student's pooler. Calling it returns `(loss, terms)`, the terms unweighted.
    """

    def __init__(self, settings: TrainSettings, cache: Cache, model: torch.nn.Module):
        self.targets = check_loss_settings(settings, cache)
        manifest = cache.manifest
        self.settings = settings
        self.task = get_task(manifest.task)
        self.num_classes = manifest.num_classes
        self.layer_map = (parse_layer_map(settings.layer_map, manifest, model.config.num_hidden_layers)
                          if settings.hidden_weight > 0 else {})
        self.pooler = pooler(model) if settings.pooled_weight else None
        self.projections: torch.nn.Module = FeatureProjections(
            self.layer_map, model.config.hidden_size, manifest.hidden_sizes, settings.hidden_loss,
            manifest.pooled_size if settings.pooled_weight else None)
        # Several teachers (`teachers`): the KD target is the mixture of theirs (`mix_targets`); the first teacher's
        # targets are the batch's own, the others' are read along (`Batch.teachers`).
        self.mixture = settings.teacher_weights()
        self.own_teacher = manifest.teacher_names[0] if manifest.teacher_names else None
        self.weights = {"ce": settings.ce_weight, "kd": settings.kd_weight, "hidden": settings.hidden_weight,
                        "pooled": settings.pooled_weight, "uld": settings.uld_weight}
        # Across tokenizers: batches come from `cross.collate`, the student's logits range over its own vocabulary.
        # Draws join as estimated probabilities (after a head-tail cache's head, unless `targets` topk asks for the
        # head and exact tail alone).
        self.cross = (CrossTokenizer.from_path(cache, settings.student_tokenizer,
                                               getattr(model.config, "max_position_embeddings", None),
                                               settings.token_map, targets=self.targets)
                      if settings.student_tokenizer else None)
        if self.cross is not None:
            self.num_classes = self.cross.student_vocab_size
            self.cross_terms = CrossTokenizerLoss(settings, self.cross, cache)

    @property
    def other_teachers(self) -> tuple[str, ...]:
        """The teachers whose rows the batches must carry besides the cache's own (`Cache.sequences(teachers=...)`)."""
        return tuple(name for name in self.mixture if name != self.own_teacher)

    def kd_targets(self, batch: Batch, logits: torch.Tensor) -> SparseTargets:
        """The KD target of a batch: the cache's own teacher's, or the mixture of the `teachers`."""
        if not self.mixture:
            return batch.sparse_targets(self.targets)
        targets = [(batch if name == self.own_teacher else batch.teachers[name]).sparse_targets(self.targets)
                   for name in self.mixture]
        return mix_targets(targets, list(self.mixture.values()), logits)

    @property
    def teacher_layers(self) -> list[int]:
        """The cached hidden layers the batches must carry (`Cache.sequences(hidden_layers=...)`)."""
        return sorted(set(self.layer_map.values()))

    @property
    def matches_features(self) -> bool:
        """Whether hidden or pooled states are matched (then the projections are part of the student)."""
        return bool(self.layer_map) or self.pooler is not None

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        settings = self.settings
        output = model(**batch.model_inputs(), output_hidden_states=self.matches_features)
        logits = self.task.student_logits(output.logits, batch, self.num_classes)
        terms = {}
        if settings.ce_weight:
            terms["ce"] = next_token_ce(logits, self.task.gold_labels(batch))
        if self.cross is not None:
            terms |= self.cross_terms(output.logits, batch)
        elif settings.kd_weight:
            terms["kd"] = kd_loss(logits, self.kd_targets(batch, logits), divergence=settings.loss,
                                  tail=settings.tail, temperature=settings.temperature)
        if self.matches_features:
            pooled = self.pooler(output.hidden_states[-1]) if self.pooler is not None else None
            terms |= self.projections(output.hidden_states, pooled, batch)
        return sum(self.weights[name] * value for name, value in terms.items()), terms
