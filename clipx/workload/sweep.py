"""Learning-rate robustness sweep: every clipper × learning rate × seed × dataset.

Each run trains the sweep's model (LSTM(128), embedding 64, last hidden state,
Adam, batch 32, one epoch; the cell and the optimizer can be changed) and
writes one JSON file to the output folder with its settings and outcome; a
restarted sweep skips the runs whose file exists, and refuses a folder whose
runs were made with other settings or with other clipper arguments (each run
records its clipper's arguments, defaults included).
``settings.json`` records the grid, ``results.md`` the table (mean and spread of
final dev accuracy over the seeds that did not diverge, and the number that
diverged) and ``sweep.png`` the accuracy-vs-learning-rate plot.

Clippers are named by their clipx factory and the value of its *first*
argument (``global_norm`` at 1.0 is ``("global_norm", 1.0)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

import clipx
from clipx.workload import _settings, plots
from clipx.workload import data as data_lib
from clipx.workload.model import CELLS
from clipx.workload.train import (
    OPTIMIZER_NAMES,
    OPTIMIZERS,
    SEED_MAX,
    TrainConfig,
    check_folder,
    check_learning_rate,
    check_range,
    json_text,
    load_checked_data,
    train,
)

#: (label, clipx factory, value of its first argument or None for defaults).
CLIPPERS: tuple[tuple[str, str, float | None], ...] = (
    ("none", "none", None),
    ("global_norm 0.25", "global_norm", 0.25),
    ("global_norm 1", "global_norm", 1.0),
    ("global_norm 4", "global_norm", 4.0),
    ("value 0.01", "value", 0.01),
    ("agc", "agc", None),
    ("autoclip", "autoclip", None),
    ("zclip", "zclip", None),
    ("adagc", "adagc", None),
    ("adaptive", "adaptive", None),
)

#: Three Adam learning rates spanning 100×; with the defaults below the full grid
#: (10 clippers × 3 rates × 3 seeds × 2 datasets = 180 runs) measured 25 s (IMDB)
#: and 12 s (task, 50 words) of CPU time per run on a 2-core CPU: about 56 minutes.
#: The task is 50 words long because at 100 words this model learnt it at no
#: learning rate in one epoch; at 50 words, unclipped Adam at 1e-3 reaches 99.8%.
LEARNING_RATES: tuple[float, ...] = (1e-3, 1e-2, 1e-1)

MODEL = dict(embed_dim=64, hidden_size=128, cell="lstm", pooling="last", head="linear")


#: The batch size of every run of the grid.
BATCH_SIZE = 32


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The grid.

    Attributes:
      datasets: ``"imdb"`` (``data_root/imdb``, truncated to ``max_length``
        tokens, the first ``train_limit`` training examples) and/or ``"task"``
        (the embedded temporal-order task, ``task_length`` words).
      clippers: labels from `CLIPPERS`.
      learning_rates: the optimizer's learning rates.
      seeds: how many seeds (0, 1, ...).
      max_steps: cap on steps per run (``None``: one full epoch).
      optimizer: one of ``train.OPTIMIZERS`` (``"adam"`` by default).
      cell: the recurrent cell of `MODEL`, one of ``model.CELLS``.

    Raises:
      ValueError: an unknown name, an empty or repeated entry of ``datasets``,
        ``clippers`` or ``learning_rates`` (each a list or tuple), a setting
        of the wrong type (the counts must be integers, the learning rates
        real numbers), or a setting out of its range (a
        learning rate in [1.2·10⁻³⁸, 3.4·10³⁸], float32's normal range, ``task_length`` in 50..400,
        ``seeds`` in 1..2³², ``train_limit`` and ``task_train`` at least
        `BATCH_SIZE`, the other counts and sizes at least 1).
    """

    data_root: str = "../shared/data"
    datasets: tuple[str, ...] = ("imdb", "task")
    clippers: tuple[str, ...] = tuple(label for label, _, _ in CLIPPERS)
    learning_rates: tuple[float, ...] = LEARNING_RATES
    seeds: int = 3
    max_length: int = 128
    train_limit: int | None = 5000
    dev_limit: int | None = 1000
    task_length: int = 50
    task_train: int = 6000
    max_steps: int | None = None
    optimizer: str = "adam"
    cell: str = "lstm"

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        set_("data_root", _settings.path("data_root", self.data_root))
        set_("datasets", _settings.each("datasets", self.datasets, _settings.choice, ("imdb", "task")))
        labels = tuple(label for label, _, _ in CLIPPERS)
        set_("clippers", _settings.each("clippers", self.clippers, _settings.choice, labels))
        set_("optimizer", _settings.choice("optimizer", self.optimizer, OPTIMIZERS))
        set_("cell", _settings.choice("cell", self.cell, CELLS))
        set_("learning_rates", _settings.each("learning_rates", self.learning_rates, _settings.real))
        for index, lr in enumerate(self.learning_rates):
            check_learning_rate(f"learning_rates[{index}]", lr)
        for name in ("seeds", "max_length", "task_length", "task_train"):
            set_(name, _settings.integer(name, getattr(self, name)))
        for name in ("train_limit", "dev_limit", "max_steps"):
            if getattr(self, name) is not None:
                set_(name, _settings.integer(name, getattr(self, name)))
        # Learning rates as the run files name them: two that print alike would share their runs.
        lr_names = tuple(f"{lr:g}" for lr in self.learning_rates)
        for name, entries in (
            ("datasets", self.datasets),
            ("clippers", self.clippers),
            ("learning_rates", lr_names),
        ):
            if not entries:
                raise ValueError(f"{name} must list at least one entry; got none")
            repeated = next((entry for entry in entries if entries.count(entry) > 1), None)
            if repeated is not None:
                raise ValueError(
                    f"{name} must list each entry once; got {repeated!r} {entries.count(repeated)} times"
                )
        low, high = data_lib.TASK_LENGTHS
        check_range("task_length", self.task_length, low, high, high_open=False)
        for name in ("max_length", "dev_limit", "max_steps"):
            check_range(name, getattr(self, name), 1)
        for name in ("train_limit", "task_train"):  # a run's first batch must fill
            check_range(
                f"{name} (the training examples; the sweep's batches hold {BATCH_SIZE})",
                getattr(self, name),
                BATCH_SIZE,
            )
        check_range("seeds", self.seeds, 1, SEED_MAX + 1, high_open=False)  # seeds 0..SEED_MAX

    @property
    def model(self) -> dict[str, Any]:
        """`MODEL` with this sweep's cell."""
        return {**MODEL, "cell": self.cell}


#: Settings that only say which runs make up the grid; every other setting changes a run's result.
_GRID_EXTENT = ("data_root", "datasets", "clippers", "learning_rates", "seeds")

#: Settings of one dataset's runs: an invocation of the sweep without that dataset
#: neither compares them with the folder's nor changes what ``settings.json`` records.
_DATASET_SETTINGS = {
    "imdb": ("max_length", "train_limit", "dev_limit"),
    "task": ("task_length", "task_train"),
}


def _entry(clipper: str) -> tuple[str, str, float | None]:
    """The `CLIPPERS` entry labelled ``clipper``."""
    return next(c for c in CLIPPERS if c[0] == clipper)


def _clip_args(name: str, value: float | None) -> dict[str, Any]:
    if value is None:
        return {}
    first = next(iter(inspect.signature(getattr(clipx, name)).parameters))
    return {first: value}


def clipper_arguments(clipper: str) -> dict[str, Any]:
    """Every scalar argument the sweep's ``clipper`` is built with, its factory's defaults included.

    Recorded with each run, so a run made by a clipx whose defaults differ is
    recognised instead of being counted as this one's.
    """
    _, name, value = _entry(clipper)
    if name == "none":
        return {}
    bound = inspect.signature(getattr(clipx, name)).bind_partial(**_clip_args(name, value))
    bound.apply_defaults()
    scalar = (bool, int, float, str, type(None))
    return {key: arg for key, arg in bound.arguments.items() if isinstance(arg, scalar)}


def run_config(sweep: SweepConfig, dataset: str, clipper: str, lr: float, seed: int) -> TrainConfig:
    """The `TrainConfig` of one run of the grid."""
    _, name, value = _entry(clipper)
    common: dict[str, Any] = dict(
        model=sweep.model,
        optimizer=sweep.optimizer,
        learning_rate=lr,
        batch_size=BATCH_SIZE,
        epochs=1,
        max_steps=sweep.max_steps,
        clip=name,
        clip_args=_clip_args(name, value),
        seed=seed,
        checkpoint_every=10**9,
    )
    if dataset == "imdb":
        return TrainConfig(
            data=str(pathlib.Path(sweep.data_root) / "imdb"),
            max_length=sweep.max_length,
            pad_multiple=64,
            train_limit=sweep.train_limit,
            dev_limit=sweep.dev_limit,
            **common,
        )
    return TrainConfig(task_length=sweep.task_length, task_train=sweep.task_train, **common)


class RunReport(NamedTuple):
    """What `run_sweep` tells its ``on_run`` after each run of the grid."""

    name: str  # the run's file name
    result: dict[str, Any]  # what the file holds
    position: int  # the run's place in the grid, from 1
    total: int  # the runs of the grid
    skipped: bool  # found finished in the folder, not trained now
    left: int  # runs of the grid still to train after this one


def _run_name(dataset: str, clipper: str, lr: float, seed: int) -> str:
    return f"{dataset}__{clipper.replace(' ', '_')}__lr{lr:g}__seed{seed}.json"


def run_sweep(
    sweep: SweepConfig,
    out_dir: str | pathlib.Path,
    *,
    on_run: Callable[[RunReport], None] | None = None,
) -> dict[str, Any]:
    """Runs every missing run of the grid, then writes the table and plot; returns the aggregate.

    ``on_run`` is called with a `RunReport` after each run of the grid (trained
    now, or skipped as finished before).

    Raises:
      ValueError: another sweep is running in ``out_dir`` (one holds it at a
        time, through an advisory lock where the system has ``fcntl``), or
        the folder holds runs made with other settings.
    """
    out = pathlib.Path(out_dir)
    check_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    with _only_sweep_in(out):
        return _run_grid(sweep, out, on_run)


@contextlib.contextmanager
def _only_sweep_in(folder: pathlib.Path) -> Iterator[None]:
    """Holds an exclusive lock on ``folder`` (where ``fcntl`` exists); a second sweep there is refused."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this system
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another clipx sweep is running in {folder}; wait for it to end, or use another folder"
            ) from None
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _run_grid(
    sweep: SweepConfig, out: pathlib.Path, on_run: Callable[[RunReport], None] | None
) -> dict[str, Any]:
    settings = {"sweep": dataclasses.asdict(sweep), "model": sweep.model}
    _check_same_run_settings(out / "settings.json", settings)
    # Seeds outermost: a sweep stopped early has every cell for its first seeds.
    grid = [
        (dataset, clipper, lr, seed)
        for seed in range(sweep.seeds)
        for dataset in sweep.datasets
        for lr in sweep.learning_rates
        for clipper in sweep.clippers
    ]
    # Every run already in the folder is checked before anything is written.
    done = {}
    for dataset, clipper, lr, seed in grid:
        path = out / _run_name(dataset, clipper, lr, seed)
        if path.is_file():
            done[path] = _read_run(path)
            _check_same_clipper(path, done[path], clipper_arguments(clipper))
            _check_same_config(path, done[path], run_config(sweep, dataset, clipper, lr, seed))
    # And every other file the summary will read (runs beyond this grid, or a stray file): a run of
    # a dataset this invocation runs has its settings; one of another dataset, all but that dataset's,
    # which it shares with the folder's other runs of that dataset.
    first_of: dict[str, tuple[pathlib.Path, dict[str, Any]]] = {}
    for path in sorted(out.glob(_RUN_FILES)):
        if path not in done:
            result = _read_run(path)
            dataset, clipper, lr, seed = (result[key] for key in ("dataset", "clipper", "lr", "seed"))
            unbound = () if dataset in sweep.datasets else _DATASET_SETTINGS[dataset]
            _check_same_clipper(path, result, clipper_arguments(clipper))
            _check_same_config(path, result, run_config(sweep, dataset, clipper, lr, seed), unbound)
            first, first_result = first_of.setdefault(dataset, (path, result))
            details = _differences(
                first_result["config"], result["config"], unbound, (f"in {first.name}", "here")
            )
            if details:
                raise ValueError(
                    f"{path} was made with other settings ({details}); use another output folder"
                )
    # So is the data of every dataset with a run to do: missing data would stop the sweep at
    # its first run on that dataset, after the runs before it.
    for dataset in dict.fromkeys(d for d, c, lr, s in grid if out / _run_name(d, c, lr, s) not in done):
        load_checked_data(run_config(sweep, dataset, sweep.clippers[0], sweep.learning_rates[0], 0))
    (out / "settings.json").write_text(json_text(_extended(out / "settings.json", settings), indent=2))
    left = len(grid) - len(done)
    for index, (dataset, clipper, lr, seed) in enumerate(grid, 1):
        path = out / _run_name(dataset, clipper, lr, seed)
        if path in done:
            result = done[path]
        else:
            config = run_config(sweep, dataset, clipper, lr, seed)
            result = {
                "dataset": dataset,
                "clipper": clipper,
                "lr": lr,
                "seed": seed,
                "config": config.to_json(),
                "clipper_arguments": clipper_arguments(clipper),
                **train(config),
            }
            # Written whole or not at all: a sweep killed here reruns the run.
            partial = path.with_name(path.name + ".partial")
            partial.write_text(json_text(result, indent=2))
            os.replace(partial, path)
            left -= 1
        if on_run is not None:
            on_run(RunReport(path.name, result, index, len(grid), path in done, left))
    return summarize(out)


def _differences(
    old: dict[str, Any], new: dict[str, Any], keys: Sequence[str], where: tuple[str, str] = ("there", "now")
) -> str:
    """``"key: old there, new now"`` for each of ``keys`` whose values differ, joined by ``"; "``."""
    return "; ".join(
        f"{key}: {old.get(key)!r} {where[0]}, {new.get(key)!r} {where[1]}"
        for key in keys
        if old.get(key) != new.get(key)
    )


# The run files, as `_run_name` names them.
_RUN_FILES = "*__*.json"
# What every run file holds (`summarize` reads these).
_RUN_KEYS = ("dataset", "clipper", "lr", "seed", "config", "dev_accuracy", "diverged")


def _read_run(path: pathlib.Path) -> dict[str, Any]:
    """The run recorded in ``path``; ``ValueError`` naming the file if it holds no run record."""
    try:
        result = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a run record ({error}); delete it to run it again") from None
    missing = [key for key in _RUN_KEYS if key not in result] if isinstance(result, dict) else list(_RUN_KEYS)
    if missing:
        raise ValueError(f"{path} is not a run record (no {', '.join(missing)}); delete it to run it again")
    # What the summary looks up: a record of another clipx's grid would stop it after every run.
    clipper, config = result["clipper"], result["config"]
    optimizer = config.get("optimizer") if isinstance(config, dict) else None
    if clipper not in [label for label, _, _ in CLIPPERS] or optimizer not in OPTIMIZER_NAMES:
        raise ValueError(
            f"{path} is not a run record of this sweep's grid (clipper {clipper!r}, optimizer "
            f"{optimizer!r}); delete it to run it again"
        )
    try:
        _check_record_types(result)
    except ValueError as error:
        raise ValueError(f"{path} is not a run record ({error}); delete it to run it again") from None
    named = _run_name(result["dataset"], clipper, result["lr"], result["seed"])
    if path.name != named:  # a copy, or a file renamed: the summary would count its run twice
        raise ValueError(f"{path} records the run of {named}; delete it, or name it so")
    return result


def _check_record_types(result: dict[str, Any]) -> None:
    """Raises ``ValueError`` if a value the summary reads is of the wrong type."""
    _settings.choice("dataset", result["dataset"], ("imdb", "task"))
    lr, seed = _settings.real("lr", result["lr"]), _settings.integer("seed", result["seed"])
    check_learning_rate("lr", lr)
    check_range("seed", seed, 0, SEED_MAX, high_open=False)
    if not _settings.flag("diverged", result["diverged"]):
        accuracy = _settings.real("dev_accuracy", result["dev_accuracy"])
        check_range("dev_accuracy", accuracy, 0, 1, high_open=False)


def _check_same_config(
    path: pathlib.Path, result: dict[str, Any], config: TrainConfig, unbound: Sequence[str] = ()
) -> None:
    """Raises ``ValueError`` if the run in ``path`` recorded settings other than ``config``'s.

    Settings an older file does not record are not compared, nor are the data
    folder (the sweep's ``data_root`` may move) and the settings ``unbound``.
    """
    recorded, expected = result["config"], json.loads(json.dumps(config.to_json()))
    pairs = [(recorded, expected, "")]
    if isinstance(recorded.get("model"), dict):
        pairs.append((recorded["model"], expected["model"], "model."))
    details = "; ".join(
        f"{prefix}{key}: {old[key]!r} there, {new.get(key)!r} now"
        for old, new, prefix in pairs
        for key in old
        if key not in ("data", "model", *unbound) and old[key] != new.get(key)
    )
    if details:
        raise ValueError(f"{path} was made with other settings ({details}); use another output folder")


def _check_same_clipper(path: pathlib.Path, result: dict[str, Any], arguments: dict[str, Any]) -> None:
    """Raises ``ValueError`` if the run in ``path`` recorded clipper arguments other than ``arguments``.

    Runs written before the arguments were recorded carry none and are kept.
    """
    recorded = result.get("clipper_arguments")
    if recorded is not None and recorded != arguments:
        details = _differences(recorded, arguments, sorted({*recorded, *arguments}))
        raise ValueError(
            f"{path} was made with other {result['clipper']!r} arguments ({details}), as by another "
            "clipx version's defaults; use another output folder"
        )


def _check_same_run_settings(path: pathlib.Path, settings: dict[str, Any]) -> None:
    """Raises ``ValueError`` if ``path`` records runs made with settings other than ``settings``.

    Only the grid's extent may change between invocations on one folder (more
    seeds, learning rates, clippers), and the settings of a dataset the
    invocation does not run, or whose runs the folder does not hold yet; a
    setting missing from an older file had its default value. Settings
    recorded beside no run (an invocation that failed before its first, say
    on missing data) bind nothing.
    """
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        recorded = None
    problem = _sweep_settings_problem(recorded)
    if problem:
        raise ValueError(f"{path} is not a sweep settings file ({problem}); move it or use another folder")
    if not _holds_runs(path.parent):
        return
    old = {**dataclasses.asdict(SweepConfig()), **recorded.get("sweep", {}), "model": recorded.get("model")}
    new = {**settings["sweep"], "model": settings["model"]}
    unbound = _GRID_EXTENT + _settings_of_other_datasets(path.parent, new["datasets"])
    details = _differences(old, new, [key for key in new if key not in unbound])
    if details:
        raise ValueError(
            f"{path.parent} holds sweep runs made with other settings ({details}); "
            "use another output folder, or the same settings to extend that sweep"
        )


def _sweep_settings_problem(recorded: Any) -> str:
    """Why ``recorded`` is not a JSON object of `SweepConfig` settings and a model's; ``""`` if it is."""
    if not isinstance(recorded, dict):
        return "not a JSON object"
    if not isinstance(recorded.get("sweep", {}), dict) or not isinstance(recorded.get("model", {}), dict):
        return "its sweep or model is not a JSON object"
    try:
        SweepConfig(**recorded.get("sweep", {}))
    except (TypeError, ValueError) as error:
        return str(error)
    return ""


def _holds_runs(folder: pathlib.Path, dataset: str = "*") -> bool:
    """Whether ``folder`` holds a run file (the files `summarize` reads), of ``dataset`` if given."""
    return any(folder.glob(_RUN_FILES.replace("*", dataset, 1)))


def _settings_of_other_datasets(folder: pathlib.Path, datasets: Sequence[str]) -> tuple[str, ...]:
    """The settings that bind none of ``folder``'s runs for ``datasets``: those of the other datasets,
    and those of a listed dataset the folder holds no run of yet."""
    return tuple(
        key
        for dataset, keys in _DATASET_SETTINGS.items()
        if dataset not in datasets or not _holds_runs(folder, dataset)
        for key in keys
    )


def _extended(path: pathlib.Path, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with its grid widened to cover the one recorded in ``path`` (if any).

    A folder's ``settings.json`` then describes every run the folder holds
    (the runs `summarize` tables), not only those of the latest invocation;
    a grid recorded beside no run is replaced.
    """
    if not path.is_file() or not _holds_runs(path.parent):
        return settings
    recorded = {**dataclasses.asdict(SweepConfig()), **json.loads(path.read_text()).get("sweep", {})}
    sweep = dict(settings["sweep"])
    for dataset, keys in _DATASET_SETTINGS.items():
        if dataset not in sweep["datasets"]:  # this invocation ran none of its runs: keep what made them
            sweep.update({key: recorded[key] for key in keys})
    for key in ("datasets", "clippers"):
        sweep[key] = [*recorded[key], *(item for item in sweep[key] if item not in recorded[key])]
    # By their names in the run files: two rates that print alike are one (the recorded one kept).
    named = {f"{lr:g}": lr for lr in (*sweep["learning_rates"], *recorded["learning_rates"])}
    sweep["learning_rates"] = sorted(named.values())
    sweep["seeds"] = max(recorded["seeds"], sweep["seeds"])
    return {**settings, "sweep": sweep}


def summarize(out_dir: str | pathlib.Path) -> dict[str, Any]:
    """Aggregates the run files in ``out_dir``; writes ``results.md``, ``results.json`` and ``sweep.png``."""
    out = pathlib.Path(out_dir)
    results = [_read_run(p) for p in sorted(out.glob(_RUN_FILES))]
    table: dict[str, dict[str, dict[float, list[float]]]] = {}
    rows = []
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["clipper"], r["lr"]), []).append(r)
    order = [label for label, _, _ in CLIPPERS]
    for (dataset, clipper, lr), runs in sorted(
        groups.items(), key=lambda g: (g[0][0], order.index(g[0][1]), g[0][2])
    ):
        accuracies = [r["dev_accuracy"] for r in runs if not r["diverged"]]
        row = {
            "dataset": dataset,
            "clipper": clipper,
            "lr": lr,
            "runs": len(runs),
            "diverged": sum(r["diverged"] for r in runs),
            "mean": float(np.mean(accuracies)) if accuracies else None,
            "min": float(np.min(accuracies)) if accuracies else None,
            "max": float(np.max(accuracies)) if accuracies else None,
        }
        rows.append(row)
        seeds = [math.nan if r["diverged"] else r["dev_accuracy"] for r in runs]
        table.setdefault(dataset, {}).setdefault(clipper, {})[lr] = seeds
    (out / "results.json").write_text(json_text(rows, indent=2))
    (out / "results.md").write_text(_markdown(rows))
    if table:
        optimizers = "/".join(sorted({OPTIMIZER_NAMES[r["config"]["optimizer"]] for r in results}))
        title = (
            f"Final dev accuracy vs {optimizers} learning rate "
            "(mean, min–max over the seeds that did not diverge)"
        )
        plots.plot_sweep(table, out / "sweep.png", title)
    return {"rows": rows}


def _markdown(rows: Sequence[dict[str, Any]]) -> str:
    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}"

    lines = [
        "| dataset | clipper | lr | runs | diverged | mean acc % | min % | max % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['clipper']} | {r['lr']:g} | {r['runs']} | {r['diverged']} | "
            f"{pct(r['mean'])} | {pct(r['min'])} | {pct(r['max'])} |"
        )
    return "\n".join(lines) + "\n"
