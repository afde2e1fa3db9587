"""Pictures of a cache (`kdcache info --plot`) and of a training run (`curves.png`), for people who would
rather look than read JSON.

matplotlib is an optional extra (`pip install 'kdcache[plots]'`). Figures are drawn on
`matplotlib.figure.Figure` objects, never through pyplot: nothing global changes in a caller's
process (a notebook keeps its backend) and no display is needed; PNG goes through the Agg canvas.
An HTML report is one self-contained file: the figure as an embedded PNG, the figures' numbers as
embedded JSON (`<script id="kdcache-report">`), and the fidelity card as a table.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np

from .cache.cache import Cache, as_cache
from .cache.describe import fidelity_rows, fidelity_scope
from .cache.format import Manifest, write_bytes_atomic
from .errors import KDCacheError

PLOTS_HINT = "pip install 'kdcache[plots]'"
CURVES_FILE = "curves.png"
# Captured mass by position is averaged over the first this many sequences: enough for a smooth
# profile, and a report of a billion-token cache still reads only a few MB of it.
PROFILE_SEQUENCES = 2000


def plots_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float):
    if not plots_available():
        raise KDCacheError(f"plots need matplotlib, which is not installed: {PLOTS_HINT}")
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------- cache report


def cache_report_data(cache: Cache | str | Path) -> dict:
    """The numbers a cache report shows: the captured-mass histogram recorded at dump time, captured
    mass by position (top-k causal-LM caches, from the first `PROFILE_SEQUENCES` sequences), the
    fidelity card, and the stored bytes of each column (Arrow buffers, summed over the shards)."""
    cache = as_cache(cache)
    manifest = cache.manifest
    column_bytes: dict[str, int] = {}
    for shard in manifest.shards:
        table = cache.open_shard(shard).read_all()
        for name, column in zip(table.column_names, table.columns):
            column_bytes[name] = column_bytes.get(name, 0) + column.nbytes
    return {"cache": str(cache), "task": manifest.task, "teacher": manifest.teacher.get("name_or_path"),
            "tokens": manifest.total_tokens, "sequences": manifest.total_rows, "file_bytes": manifest.total_bytes,
            "captured_mass": manifest.stats.get("captured_mass"), "fidelity": manifest.stats.get("fidelity"),
            "captured_mass_by_position": _captured_by_position(cache), "column_bytes": column_bytes}


def _captured_by_position(cache: Cache) -> dict | None:
    """Mean top-k captured mass at each token position; None where positions are not tokens or no tail is kept."""
    manifest = cache.manifest
    if manifest.labels or "topk" not in manifest.trainable_targets:  # a head-tail cache keeps its exact tail too
        return None
    # sized by the rows read, not by `settings.max_length`: caches from elsewhere (imports) may not record it
    sums, counts = np.zeros(0), np.zeros(0)
    read = 0
    for read, sequence in enumerate(cache.sequences(), start=1):
        mass = -np.expm1(sequence.tail_logprob.astype(np.float64))
        if len(mass) > len(sums):
            sums, counts = (np.pad(array, (0, len(mass) - len(array))) for array in (sums, counts))
        sums[:len(mass)] += mass
        counts[:len(mass)] += 1
        if read == PROFILE_SEQUENCES:
            break
    used = int(np.count_nonzero(counts))
    return {"sequences": read, "mean": (sums[:used] / counts[:used]).round(6).tolist(),
            "count": counts[:used].astype(int).tolist()}


def _draw_cache(data: dict):
    figure = _figure(15, 4.2)
    histogram_axes, position_axes, bytes_axes = figure.subplots(1, 3)
    mass = data["captured_mass"] or {}
    if "histogram" in mass:
        counts = np.asarray(mass["histogram"], dtype=float)
        edges = np.linspace(0, 1, len(counts) + 1)
        histogram_axes.bar(edges[:-1], counts / counts.sum(), width=edges[1] - edges[0], align="edge",
                           color="#4c72b0")
        histogram_axes.axvline(mass["mean"], color="#c44e52", linestyle="--", label=f"mean {mass['mean']:.3f}")
        histogram_axes.legend(loc="upper left")
        histogram_axes.set_xlim(0, 1)
    else:
        histogram_axes.text(0.5, 0.5, "not recorded in this cache", ha="center", va="center")
    histogram_axes.set(title="captured mass Σ top-k p per position", xlabel="captured mass",
                       ylabel="share of positions")

    profile = data["captured_mass_by_position"]
    if profile:
        position_axes.plot(np.arange(len(profile["mean"])), profile["mean"], color="#4c72b0")
        position_axes.set(ylim=(0, 1.02))
        position_axes.set_title(f"captured mass by position ({profile['sequences']} sequences)")
    else:
        position_axes.text(0.5, 0.5, "targets are classes, not tokens" if data["task"] != "causal-lm"
                           else "no exact tail in this cache", ha="center", va="center")
        position_axes.set_title("captured mass by position")
    position_axes.set(xlabel="token position", ylabel="mean captured mass")

    columns = sorted(data["column_bytes"].items(), key=lambda item: item[1])
    per_token = [size / max(data["tokens"], 1) for _, size in columns]
    bars = bytes_axes.barh([name for name, _ in columns], per_token, color="#55a868")
    bytes_axes.bar_label(bars, labels=[f"{value:.1f}" for value in per_token], padding=2)
    bytes_axes.set(title=f"bytes/token by column, decoded\n({data['file_bytes'] / max(data['tokens'], 1):.1f} on disk)",
                   xlabel="bytes per token")
    bytes_axes.margins(x=0.2)
    # the manifest's strings are data, not markup: no math-text (`$...$` would be parsed, and may not parse)
    figure.suptitle(f"{data['cache']}: {data['task']}, teacher {data['teacher']}, {data['sequences']} sequences, "
                    f"{data['tokens']} tokens", parse_math=False)
    return figure


def _fidelity_table(manifest: Manifest) -> str:
    try:
        rows = fidelity_rows(manifest)
    except ValueError:
        return "<p>Fidelity card: unreadable (malformed statistics in the manifest).</p>"
    if rows is None:
        return "<p>Fidelity card: not recorded.</p>"
    cells = "".join(f"<tr><td>{_escaped(row.targets)}</td><td>{row.captured_mass:.4f}</td><td>{row.kl:.4f} "
                    f"({_escaped(row.kl_of)})</td><td>{row.tv:.4f}</td></tr>" for row in rows)
    return (f"<h2>Fidelity card</h2><p>{_escaped(fidelity_scope(manifest))}</p><table><tr><th>targets</th>"
            f"<th>captured mass</th><th>KL(teacher ‖ ·), nats</th><th>TV</th></tr>{cells}</table>")


def _escaped(value) -> str:
    """Any value from a manifest as HTML text: the page must not run what a cache wrote into it."""
    return html.escape(str(value))


def write_cache_report(cache: Cache | str | Path, out: Path | str) -> dict:
    """Write a report of `cache` to `out`: a self-contained `.html` page or a `.png` figure. Returns its numbers."""
    out = Path(out)
    if out.suffix not in (".html", ".png"):
        raise KDCacheError(f"report {out}: the file name must end in .html or .png")
    if not out.parent.is_dir():
        raise KDCacheError(f"report {out}: directory {out.parent} does not exist")
    cache = as_cache(cache)
    data = cache_report_data(cache)
    image = _png(_draw_cache(data))
    if out.suffix == ".png":
        write_bytes_atomic(out, image)
        return data
    # no "</script>" can end the block early, no "<!--" can open a comment
    embedded = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>kdcache report: {_escaped(data['cache'])}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:left}} img{{max-width:100%}}</style></head>
<body><h1>kdcache cache report</h1>
<p>{_escaped(data['cache'])}: {_escaped(data['task'])}, teacher {_escaped(data['teacher'])},
{_escaped(data['sequences'])} sequences, {_escaped(data['tokens'])} tokens, {data['file_bytes']:,} bytes.</p>
<img alt="captured mass, captured mass by position, bytes per column" src="data:image/png;base64,{base64.b64encode(image).decode()}">
{_fidelity_table(cache.manifest)}
<script type="application/json" id="kdcache-report">{embedded}</script>
</body></html>
"""
    write_bytes_atomic(out, page.encode())
    return data


# ---------------------------------------------------------------------------------------- training curves


def write_training_curves(metrics_file: Path, out: Path) -> None:
    """Plot a run's metrics.jsonl: every loss term by step and, when the run validated, the held-out scores."""
    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    training = [record for record in records if "loss" in record]
    held_out = [record for record in records if "val_kl_to_teacher" in record]
    figure = _figure(11 if held_out else 6, 4)
    axes = figure.subplots(1, 2 if held_out else 1, squeeze=False)[0]
    terms = [name for name in ("loss", "kd", "ce", "hidden", "pooled") if any(name in record for record in training)]
    for name in terms:
        points = [(record["step"], record[name]) for record in training if math.isfinite(record.get(name, math.nan))]
        if points:
            axes[0].plot(*zip(*points), label=name, marker="." if len(points) < 30 else None)
    axes[0].set(title="training loss (weighted total) and its terms (unweighted)", xlabel="step", ylabel="loss")
    axes[0].legend()
    if held_out:
        steps = [record["step"] for record in held_out]
        lines = axes[1].plot(steps, [record["val_kl_to_teacher"] for record in held_out], marker=".",
                             label="KL(teacher ‖ student)")
        if "val_top1_agreement" in held_out[0]:  # causal LMs; on a second scale, in [0, 1]
            twin = axes[1].twinx()
            lines += twin.plot(steps, [record["val_top1_agreement"] for record in held_out], marker=".",
                               color="#c44e52", label="top-1 agreement")
            twin.set_ylabel("top-1 agreement")
        axes[1].set(title="held-out split", xlabel="step", ylabel="KL (nats)")
        axes[1].legend(handles=lines, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    for panel in axes:
        panel.xaxis.get_major_locator().set_params(integer=True)
    write_bytes_atomic(Path(out), _png(figure))
