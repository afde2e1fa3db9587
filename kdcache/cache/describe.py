"""One description of a manifest — its targets and codec, its fidelity card, where it came from — for
everything that shows a cache to a person: `kdcache info`, the dump's summary, the cache card (README.md),
the report (`info --plot`) and `copy`/`merge`. Written once, so they never disagree.

The manifest may come from anyone: values are formatted, never trusted to have a shape; a malformed
fidelity card raises ValueError for the caller to report as unreadable.
"""

from __future__ import annotations

from dataclasses import dataclass

from .format import Manifest


def describe_targets(manifest: Manifest) -> str:
    """The stored target types, head size, draws and codec in one phrase."""
    settings = manifest.settings
    head = (f"top-{manifest.top_k}" + (f" (mass-adaptive, p {settings['top_p']})" if settings.get("top_p") else "")
            + f" {settings.get('logprob_dtype')} log-probs + exact tail")
    draws = (("up to " if settings.get("sampling") == "proportional" else "")
             + f"{settings.get('samples')} draws/position: {draws_phrase(settings)} at T=1, seed {settings.get('seed')}")
    kinds = {"topk": head, "sampled": f"ids sampled with counts ({draws})",
             "head-tail": f"{head} + ids sampled from the tail ({draws})"}
    codec = manifest.codec
    return (" and ".join(kinds[kind] for kind in manifest.target_types)
            + f"; {codec.layout} codec" + (f", {codec.compression}" if codec.compression != "none" else "")
            + (", ids ranked by frequency" if codec.id_ranking else ""))


def draws_phrase(settings: dict) -> str:
    """How the draws were placed (`sampling`; caches from before the setting hold independent draws)."""
    return {"systematic": "systematic draws", "proportional": "systematic draws in proportion to the tail mass"}.get(
        settings.get("sampling"), "independent draws")


@dataclass(frozen=True)
class FidelityRow:
    """One stored target type's line of the fidelity card (kdcache/teacher/fidelity.py defines the figures)."""

    targets: str       # e.g. "top-32 + tail", "head 4 + 32 tail draws"
    captured_mass: float
    kl: float
    kl_of: str         # what the KL compares the teacher with
    tv: float


def fidelity_rows(manifest: Manifest) -> list[FidelityRow] | None:
    """The fidelity card, one row per stored target type; None when the cache records none."""
    card = manifest.stats.get("fidelity")
    if not card:
        return None
    try:
        rows = []
        if "topk" in card:
            topk = card["topk"]
            rows.append(FidelityRow(f"top-{topk['top_k']} + tail", float(topk["captured_mass"]),
                                    float(topk["kl_rest_bucket"]), "the rest-bucket reconstruction",
                                    float(topk["tv_rest_bucket"])))
        if "sampled" in card:
            sampled = card["sampled"]
            rows.append(FidelityRow(f"sampled ({sampled['draws']} draws, {float(sampled['distinct_ids']):.1f} distinct "
                                    f"ids)", float(sampled["captured_mass"]), float(sampled["kl_on_support"]),
                                    "the draws, on the stored ids", float(sampled["tv"])))
        if "head-tail" in card:
            both = card["head-tail"]
            rows.append(FidelityRow(f"head {both['top_k']} + {both['draws']} tail draws "
                                    f"({float(both['distinct_ids']):.1f} distinct ids)", float(both["captured_mass"]),
                                    float(both["kl_on_support"]), "the estimate, on the stored ids", float(both["tv"])))
    except (KeyError, TypeError) as error:
        raise ValueError(f"malformed fidelity card: {error}") from None
    return rows


def fidelity_scope(manifest: Manifest) -> str:
    """Where and on how many positions the card was measured."""
    card = manifest.stats.get("fidelity") or {}
    where = " of the source cache (a subset that cuts shards cannot split the dump's figures by row)" \
        if card.get("measured_on") == "source" else ""
    return f"measured at dump time on {card.get('positions')} target positions (every {card.get('every')}-th){where}"


def provenance(manifest: Manifest) -> str | None:
    """Which caches this one was cut or merged from, if any."""
    if not manifest.sources:
        return None
    selection = manifest.sources[0].get("selection") if len(manifest.sources) == 1 else None
    return (f"{'a subset of' if selection else 'made from'} {len(manifest.sources)} other cache(s): "
            + ", ".join(str(source.get("location")) for source in manifest.sources)
            + (f" (selection {selection})" if selection else ""))


def describe_augmentation(manifest: Manifest) -> str | None:
    """One line on the teacher-labelled variants a cache holds (dump-teacher `augment`), None without any.

    The values come from an untrusted manifest: shown as they are, never computed with."""
    augmentation = manifest.dataset.get("augmentation")
    if not isinstance(augmentation, dict):
        return None
    methods = augmentation.get("methods")
    methods = ", ".join(map(str, methods)) if isinstance(methods, list) else str(methods)
    return (f"{augmentation.get('variant_rows')} of the rows are teacher-labelled variants "
            f"({augmentation.get('variants_per_row')} per original row, {methods}, rate {augmentation.get('rate')}, "
            f"seed {augmentation.get('seed')}; sample ids from {augmentation.get('original_rows')} on), no gold labels")
