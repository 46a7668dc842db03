"""The figures of ``clipx demo``, ``clipx plot`` and ``clipx sweep``.

PNGs, drawn with matplotlib's object API (no pyplot state).
"""

from __future__ import annotations

import itertools
import math
import pathlib
import re
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _is_finite(value: Any) -> bool:
    """Whether ``value`` is a finite number (a log holds ``NaN`` where a value was not finite)."""
    return value is not None and bool(np.isfinite(value))


def _literal(text: str) -> str:
    """``text`` drawn as written: matplotlib would read ``$…$`` (in a folder name, say) as math."""
    return text.replace("$", r"\$")


def _title(text: str, fig: Figure) -> str:
    """``text`` as a literal title, each line wrapped to the figure's width (10 characters an inch)."""
    width = int(10 * fig.get_figwidth())
    return "\n".join(_literal(textwrap.fill(line, width)) for line in text.split("\n"))  # no \ cut from $


def _styles(labels: Sequence[str]) -> dict[str, tuple[str, str]]:
    """A colour and line style for each label: the ten colours, then again dashed, then dotted."""
    return {label: (f"C{i % 10}", ("-", "--", ":")[i // 10 % 3]) for i, label in enumerate(labels)}


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """The moving mean of ``values`` over ``window`` steps; ``values`` when that would be one point."""
    if len(values) <= window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def _finish_step_plot(
    fig: Figure,
    ax: Any,
    named: Sequence[tuple[Any, str]],
    ylabel: str,
    title: str,
    path: str | pathlib.Path,
    legend_title: str | None = None,
    log_scale: bool = True,
) -> None:
    """y (log scale if ``log_scale``) against training steps, labels, legend and grid; writes the PNG.

    ``named`` pairs the legend's artists with their labels (given, not read
    from the artists: matplotlib leaves out a label that starts with ``_``).
    A line through a single point gets a marker, or it would not show. With
    no positive finite value to show (a run that logged only NaN), the axis
    stays linear and the figure says so.
    """
    ys = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
    if not any(np.any(np.isfinite(y) & (y > 0)) for y in ys):
        log_scale = False
        ax.text(0.5, 0.5, "no positive finite value logged", transform=ax.transAxes, ha="center")
    for line, y in zip(ax.get_lines(), ys, strict=True):
        if np.count_nonzero(np.isfinite(y)) == 1:
            line.set_marker("o")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    low, high = ax.get_xlim()
    if high - low < 2:  # a single step: room for whole-step ticks either side
        ax.set_xlim((low + high) / 2 - 1, (low + high) / 2 + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no tick at 1.25
    ax.set_ylabel(ylabel)
    ax.set_title(_title(title, fig))
    artists, labels = zip(*named, strict=True) if named else ((), ())
    ax.legend(artists, [_literal(label) for label in labels], title=legend_title, title_fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_per_step(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    key: str,
    path: str | pathlib.Path,
    title: str,
    ylabel: str,
) -> None:
    """``key`` per step for each run: faint as logged, solid as a moving mean.

    The mean runs over 1% of the longest run's steps, at least 10. A run whose
    value stops being finite (a diverged run's loss) gets an × on the step
    axis there, and its legend entry says from which step.
    """
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    rows = {label: [r for r in records if key in r] for label, records in runs.items()}
    window = max(10, max(map(len, rows.values()), default=0) // 100)
    named, styles, marked = [], _styles(list(rows)), []
    for label, records in rows.items():
        color, linestyle = styles[label]
        steps = np.array([r["step"] for r in records])
        values = np.array([r[key] for r in records], dtype=float)
        ax.plot(steps, values, color=color, linestyle=linestyle, alpha=0.25, linewidth=0.8)
        smooth = _smooth(values, window)
        (line,) = ax.plot(steps[len(steps) - len(smooth) :], smooth, color=color, linestyle=linestyle)
        broken = np.flatnonzero(~np.isfinite(values))
        if broken.size:  # a diverged run: marked on the step axis, and named in the legend
            first = steps[broken[0]]
            ax.annotate("×", (first, 0), xycoords=ax.get_xaxis_transform(), color=color, ha="center")
            label = f"{label} (not finite from step {first})"
            marked.append(first)
        named.append((line, label))
    if marked:  # the limits cover the finite points only: widened so that every × is inside
        low, high = ax.get_xlim()
        pad = 0.05 * (max(high, *marked) - min(low, *marked))  # matplotlib's own margin
        ax.set_xlim(min(low, min(marked) - pad), max(high, max(marked) + pad))
    # `_smooth` leaves a run of at most the window's steps as logged.
    if max(map(len, rows.values()), default=0) <= window:
        legend_title = "per step"
    elif min(map(len, rows.values())) <= window:
        legend_title = f"faint: per step; solid: {window}-step mean (as logged up to {window} steps)"
    else:
        legend_title = f"faint: per step; solid: {window}-step mean"
    _finish_step_plot(fig, ax, named, ylabel, title, path, legend_title=legend_title)


def plot_losses(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | pathlib.Path, title: str
) -> None:
    """Training loss per step for each run (see `_plot_per_step`)."""
    _plot_per_step(runs, "loss", path, title, "training loss (cross-entropy, nats; log scale)")


def plot_grad_norms(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | pathlib.Path, title: str
) -> None:
    """The global gradient norm before clipping per step for each run (see `_plot_per_step`)."""
    ylabel = "global L2 norm of the gradient\nbefore clipping (log scale)"
    _plot_per_step(runs, "grad_norm", path, title, ylabel)


def threshold_prefix(records: Sequence[Mapping[str, Any]]) -> str | None:
    """The ``clipx.stats`` name of the clipper whose threshold ``records`` log, or ``None``.

    ``"adaptive"`` for records with an ``"adaptive/threshold"`` entry.
    """
    suffix = "/threshold"
    return next((key[: -len(suffix)] for record in records for key in record if key.endswith(suffix)), None)


def plot_threshold(
    records: Sequence[Mapping[str, Any]],
    prefix: str,
    path: str | pathlib.Path,
    title: str,
    measured: str = "gradient norm (before clipping)",
    ylabel: str = "global L2 norm of the gradient (log scale)",
) -> None:
    """The measured norm and the clipper's threshold, per step; clipped steps marked.

    ``prefix`` is the clipper's key in ``clipx.stats`` (``"adaptive"`` reads
    ``"adaptive/norm"``, ``"adaptive/threshold"``, ``"adaptive/clipped"``);
    ``measured`` and ``ylabel`` name what its ``norm`` entry is.
    """
    rows = [r for r in records if f"{prefix}/norm" in r]
    steps = np.array([r["step"] for r in rows])
    norms = np.array([r[f"{prefix}/norm"] for r in rows], dtype=float)
    thresholds = np.array([r.get(f"{prefix}/threshold", math.nan) for r in rows], dtype=float)
    clipped = np.array([bool(r.get(f"{prefix}/clipped", 0.0)) for r in rows], dtype=bool)
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    (norm_line,) = ax.plot(steps, norms, linewidth=0.8)
    # Over long runs the markers would hide the threshold: smaller, fainter, and drawn beneath it.
    dense = len(steps) > 1000
    marks = ax.scatter(
        steps[clipped], norms[clipped], s=2 if dense else 10, alpha=0.4 if dense else 1.0,
        color="red", zorder=3,
    )  # fmt: skip
    (threshold_line,) = ax.plot(steps, thresholds, linewidth=1.5, color="black", zorder=4)
    named = [(norm_line, measured), (marks, "clipped step"), (threshold_line, "threshold")]
    _finish_step_plot(fig, ax, named, ylabel, title, path)


def plot_dev_accuracy(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | pathlib.Path, title: str
) -> None:
    """Dev accuracy (%) at each evaluation of each run."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    named, styles = [], _styles(list(runs))
    for label, records in runs.items():
        color, linestyle = styles[label]
        rows = [r for r in records if _is_finite(r.get("dev_accuracy"))]
        accuracy = [100 * r["dev_accuracy"] for r in rows]
        steps = [r["step"] for r in rows]
        (line,) = ax.plot(steps, accuracy, color=color, linestyle=linestyle, marker="o", markersize=3)
        named.append((line, label))
    _finish_step_plot(fig, ax, named, "dev accuracy (%)", title, path, log_scale=False)


# Every figure `plot_runs` may write for a single run.
ONE_RUN_FIGURES = ("loss.png", "grad_norm.png", "dev_accuracy.png", "threshold.png")


def plot_runs(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], out: str | pathlib.Path, setting: str
) -> list[pathlib.Path]:
    """The figures of ``clipx plot`` for ``runs`` (label → ``log.jsonl`` records); returns their paths.

    Writes into ``out``: ``loss.png``, ``grad_norm.png``, ``dev_accuracy.png``
    (when any run was evaluated) and, for each run whose clipper reports a
    threshold, ``threshold.png`` (one run) or ``threshold_<label>.png`` (each
    run of characters of the label other than letters, digits, ``.``, ``_``
    and ``-`` written ``_``, then ``_2``, ``_3``... where two labels would
    share a file).
    ``setting`` is the titles' second line. Figures of those names already in
    ``out`` are removed first, so none of other runs is left beside these.
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*(out / name for name in ONE_RUN_FIGURES), *out.glob("threshold_*.png")]:
        old.unlink(missing_ok=True)
    written = [out / "loss.png", out / "grad_norm.png"]
    slugs: set[str] = set()
    plot_losses(runs, written[0], f"Training loss\n{setting}")
    plot_grad_norms(runs, written[1], f"Gradient norm before clipping\n{setting}")
    if any(_is_finite(r.get("dev_accuracy")) for records in runs.values() for r in records):
        written.append(out / "dev_accuracy.png")
        plot_dev_accuracy(runs, written[-1], f"Dev accuracy\n{setting}")
    for label, records in runs.items():
        prefix = threshold_prefix(records)
        if prefix is None:
            continue
        slug = base = re.sub(r"[^A-Za-z0-9._-]+", "_", label)
        for number in itertools.count(2):  # labels alike but for punctuation get files of their own
            if slug not in slugs:
                break
            slug = f"{base}_{number}"
        slugs.add(slug)
        name = "threshold.png" if len(runs) == 1 else f"threshold_{slug}.png"
        written.append(out / name)
        plot_threshold(
            records,
            prefix,
            written[-1],
            f"clipx.{prefix}: measured norm vs threshold ({label})\n{setting}",
            measured=f"measured before clipping ({prefix}/norm)",
            ylabel="the clipper's measured norm (global rules:\nthe gradient norm; log scale)",
        )
    return written


def _nan_mask(groups: Any) -> np.ndarray:
    """Whether each value of the sequences ``groups`` is NaN, as one flat array."""
    flat = [np.ravel(np.asarray(values, dtype=float)) for values in groups]
    return np.isnan(np.concatenate(flat or [np.zeros(0)]))


def plot_sweep(
    table: Mapping[str, Mapping[str, Mapping[float, Sequence[float]]]], path: str | pathlib.Path, title: str
) -> None:
    """Dev accuracy against learning rate, one panel per dataset, one line per clipper.

    ``table[dataset][clipper][lr]`` lists the final accuracies of the seeds,
    NaN for a seed that diverged. The line is the mean over the seeds that did
    not diverge and the band spans their minimum and maximum; where every seed
    diverged the line breaks. A strip under each panel marks, for each clipper
    that diverged somewhere, how many of its seeds diverged at each learning
    rate (``2/3``). A clipper has one colour (and line style) in every panel,
    and each panel's legend names the clippers it shows: panels may show
    different ones.
    """
    fig = Figure(figsize=(6 * len(table), 6))
    grid = np.asarray(fig.subplots(2, len(table), sharex="col", height_ratios=[3, 1], squeeze=False))
    styles = _styles(list(dict.fromkeys(clipper for by_clipper in table.values() for clipper in by_clipper)))
    for ax, strip, (dataset, by_clipper) in zip(grid[0], grid[1], table.items(), strict=True):
        diverging = [clipper for clipper, by_lr in by_clipper.items() if _nan_mask(by_lr.values()).any()]
        for clipper, by_lr in by_clipper.items():
            lrs = sorted(by_lr)
            values = [np.asarray(by_lr[lr], dtype=float) for lr in lrs]
            trained = [v[~np.isnan(v)] for v in values]
            means, low, high = (
                [f(v) if v.size else math.nan for v in trained] for f in (np.mean, np.min, np.max)
            )
            color, linestyle = styles[clipper]
            ax.plot(lrs, means, color=color, linestyle=linestyle, marker="o", markersize=3, label=clipper)
            ax.fill_between(lrs, low, high, color=color, alpha=0.12)
            if clipper in diverging:
                row = diverging.index(clipper)
                for lr, v in zip(lrs, values, strict=True):
                    if np.isnan(v).any():
                        strip.plot([lr], [row], color=color, marker="x", linestyle="none")
                        strip.annotate(
                            f"{int(np.isnan(v).sum())}/{v.size}",
                            (lr, row),
                            xytext=(0, 5),
                            textcoords="offset points",
                            ha="center",
                            fontsize="x-small",
                            color=color,
                        )
        if all(_nan_mask(by_lr.values()).all() for by_lr in by_clipper.values()):
            ax.set_ylim(0, 1)
            ax.text(0.5, 0.5, "every run diverged", transform=ax.transAxes, ha="center", va="center")
        ax.set_xscale("log")
        ax.set_ylabel("final dev accuracy")
        ax.set_title(_literal(dataset))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
        strip.set_yticks(
            range(len(diverging)), [_literal(clipper) for clipper in diverging], fontsize="x-small"
        )
        strip.set_ylim(-0.7, max(len(diverging), 1) - 0.3)
        strip.invert_yaxis()
        strip.set_xlabel("learning rate (log scale)")
        strip.set_title("diverged seeds", fontsize="small")
        if not diverging:
            strip.text(0.5, 0.5, "none diverged", transform=strip.transAxes, ha="center", va="center")
    fig.suptitle(_title(title, fig))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
