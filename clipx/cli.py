"""The ``clipx`` command: ``clipx demo``, ``clipx train``, ``clipx plot`` and ``clipx sweep``.

- ``clipx demo``: trains one small recurrent model on the embedded
  temporal-order task with no clipping, value, global-norm and adaptive
  clipping, at a learning rate where the unclipped run is unstable (a vanilla
  RNN with plain SGD by default); prints a table and writes loss curves,
  gradient norms per clipper and the adaptive clipper's norm-vs-threshold plot
  to ``--out``.
- ``clipx train``: one run with any clipx clipper (``--clip NAME --clip-arg
  key=value ...``), any of the optimizers, on the embedded task or ``--data
  DIR``; logs, checkpoints, ``--resume``; writes the plots of ``clipx plot``.
- ``clipx plot``: training loss, gradient norm, dev accuracy and the
  clipper's threshold of one or more ``clipx train`` runs, as PNGs.
- ``clipx sweep``: the learning-rate robustness sweep of `clipx.workload.sweep`.

Needs the ``workload`` extra (flax, matplotlib, rich).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import os
import pathlib
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import rich.console
import rich.table

import clipx
from clipx.workload import model as model_lib
from clipx.workload import plots, sweep
from clipx.workload.train import (
    OPTIMIZER_NAMES,
    TrainConfig,
    check_folder,
    check_range,
    clear_stop,
    parse_clip_args,
    read_config,
    read_log,
    read_settings,
    request_stop,
    resume_file,
    stop_requested,
    train,
)

_console = rich.console.Console(markup=False)  # paths, data lines and labels may hold [brackets]
_PACKAGE = pathlib.Path(clipx.__file__).resolve().parent  # where clipx's own checks raise

# Model flags: (flag, ModelConfig field, type, help); the default shown is ModelConfig's.
_MODEL_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--cell", "cell", str, f"recurrent cell, one of {', '.join(model_lib.CELLS)} (simple: a tanh RNN)"),
    ("--pooling", "pooling", str, f"pooling over time, one of {', '.join(model_lib.POOLINGS)}"),
    ("--head", "head", str, f"classifier head, one of {', '.join(model_lib.HEADS)}"),
    ("--embed-dim", "embed_dim", int, "embedding width"),
    ("--hidden-size", "hidden_size", int, "recurrent state width per direction"),
    ("--mlp-hidden", "mlp_hidden", int, "width of the MLP head and the attention scorer"),
    ("--dropout", "dropout", float, "dropout rate on embeddings, recurrent outputs and the head"),
    ("--word-dropout", "word_dropout", float, "probability of replacing a training token by <unk>"),
    ("--embed-init-std", "embed_init_std", float, "initial embeddings N(0, std²) (default: var 1/embed_dim)"),
)
# Training flags: (flag, TrainConfig field, type, help); the default shown is TrainConfig's.
_TRAIN_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--data", "data", str, "folder with train.tsv and dev.tsv (or test.tsv); the embedded task if absent"),
    ("--task-length", "task_length", int, "words per sentence of the embedded task (50-400)"),
    ("--task-train", "task_train", int, "training sentences of the embedded task"),
    ("--train-limit", "train_limit", int, "use only the first N training examples"),
    ("--dev-limit", "dev_limit", int, "use only the first N dev examples"),
    ("--max-length", "max_length", int, "truncate every example to N tokens (default: no truncation)"),
    ("--tokenizer", "tokenizer", str, "words, or whitespace for pre-tokenized text"),
    ("--min-count", "min_count", int, "keep training words seen at least N times"),
    ("--max-vocab", "max_vocab", int, "largest vocabulary"),
    ("--optimizer", "optimizer", str, f"one of {', '.join(OPTIMIZER_NAMES)}"),
    ("--lr", "learning_rate", float, "learning rate"),
    ("--momentum", "momentum", float, "momentum of the momentum optimizer"),
    ("--weight-decay", "weight_decay", float, "L2 penalty added to the clipped gradient"),
    ("--batch-size", "batch_size", int, "examples per step"),
    ("--epochs", "epochs", int, "passes over the training split"),
    ("--max-steps", "max_steps", int, "stop after N steps"),
    ("--seed", "seed", int, "seed of initialisation, data order, dropout and task sentences, 0 to 2³²−1"),
    ("--eval-every", "eval_every", int, "evaluate every N steps besides each epoch's end"),
    ("--checkpoint-every", "checkpoint_every", int, "write a checkpoint every N steps"),
)


# On/off flags of `clipx train` (argparse destinations; None when not given).
_SWITCHES = ("bidirectional", "single_logit", "boundaries")


def _field_defaults(config_class: type) -> dict[str, Any]:
    fields = dataclasses.fields(config_class)
    return {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}


def _add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train the reference classifier with a clipx clipper")
    p.add_argument(
        "--preset",
        choices=sorted(model_lib.PRESETS),
        help="named model and training settings; flags given override them",
    )
    defaults = {**_field_defaults(model_lib.ModelConfig), **_field_defaults(TrainConfig)}
    for flag, field, kind, text in _MODEL_FLAGS + _TRAIN_FLAGS:
        shown = "" if defaults[field] is None else f" (default: {defaults[field]})"
        p.add_argument(flag, dest=field, type=kind, default=None, help=text + shown)
    p.add_argument(
        "--bidirectional",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add a right-to-left recurrent layer (default: off)",
    )
    p.add_argument(
        "--single-logit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="two classes from one bias-free logit, sigmoid cross-entropy (default: off)",
    )
    p.add_argument(
        "--boundaries",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap every example in <s> … </s> (default: off)",
    )
    p.add_argument("--clip", help="a clipx factory name, or none (default)")
    p.add_argument(
        "--clip-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="argument of the clipper (repeatable)",
    )
    p.add_argument("--out", default="clipx-run", help="output folder (default: ./clipx-run)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out with its saved settings")
    p.add_argument("--stop-after", type=int, help="stop with a checkpoint after this many steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _train_config(args: argparse.Namespace) -> TrainConfig:
    preset = model_lib.PRESETS[args.preset] if args.preset else {"model": {}, "train": {}}
    model = dict(preset["model"])
    model.update(
        {field: getattr(args, field) for _, field, _, _ in _MODEL_FLAGS if getattr(args, field) is not None}
    )
    for field in ("bidirectional", "single_logit"):
        if getattr(args, field) is not None:
            model[field] = getattr(args, field)
    settings = dict(preset["train"])
    settings.update(
        {field: getattr(args, field) for _, field, _, _ in _TRAIN_FLAGS if getattr(args, field) is not None}
    )
    if args.boundaries is not None:
        settings["boundaries"] = args.boundaries
    if settings.get("data") is not None:  # recorded absolute: --resume works from any folder
        settings["data"] = str(pathlib.Path(settings["data"]).resolve())
    clip = "none" if args.clip is None else args.clip
    return TrainConfig(model=model, clip=clip, clip_args=parse_clip_args(args.clip_arg), **settings)


def _settings_given(args: argparse.Namespace) -> list[str]:
    """The flags of ``clipx train`` given on the command line that set the run's settings."""
    flags = [flag for flag, field, _, _ in _MODEL_FLAGS + _TRAIN_FLAGS if getattr(args, field) is not None]
    flags += [f"--{name.replace('_', '-')}" for name in _SWITCHES if getattr(args, name) is not None]
    flags += ["--preset"] * (args.preset is not None) + ["--clip"] * (args.clip is not None)
    return flags + ["--clip-arg"] * bool(args.clip_arg)


def _cmd_train(args: argparse.Namespace) -> int:
    out = pathlib.Path(args.out)
    if args.resume:
        if given := _settings_given(args):
            raise ValueError(
                f"--resume continues the run in {out} with its saved settings; {', '.join(given)} "
                "would change them. Leave them out, or start a new run in another --out."
            )
        config = read_config(resume_file(out, "config.json"))
    else:
        config = _train_config(args)
    summary = train(config, out, resume=args.resume, stop_after=args.stop_after, progress=not args.quiet)
    table = rich.table.Table(title=f"clipx train → {out}")
    table.add_column("key")
    table.add_column("value")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    _console.print(table)
    # Redrawn from the whole log. `train` removed an earlier run's figures when this run
    # started; a resumed run's own, drawn from fewer steps, go now.
    for name in plots.ONE_RUN_FIGURES:
        (out / name).unlink(missing_ok=True)
    if any("loss" in record for record in read_log(out)):
        _console.print(f"plots: {', '.join(map(str, _plot_runs([out], None, out)))}")
    return 0


# ---------------------------------------------------------------------------
# plot

_CELL_NAMES = {"simple": "vanilla RNN", "lstm": "LSTM", "gru": "GRU"}


def _setting_parts(config_file: pathlib.Path) -> list[str]:
    """A run's settings as short phrases for plot titles: data, cell, optimizer, clipper, seed."""
    recorded = read_settings(config_file)
    config = {**_field_defaults(TrainConfig), "model": {}, "clip_args": {}, **recorded}
    try:
        cell = {**_field_defaults(model_lib.ModelConfig), **config["model"]}["cell"]
        optimizer = OPTIMIZER_NAMES.get(config["optimizer"], config["optimizer"])
        if config["optimizer"] == "momentum":
            optimizer = f"SGD+momentum {config['momentum']:g}"
        clip_args = ", ".join(f"{key}={value}" for key, value in config["clip_args"].items())
        data = config["data"]
        return [
            f"data {pathlib.Path(data).name}" if data else f"{config['task_length']}-word temporal order",
            _CELL_NAMES.get(cell, cell),
            f"{optimizer} lr {config['learning_rate']:g}",
            "no clipping" if config["clip"] == "none" else f"clipx.{config['clip']}({clip_args})",
            f"seed {config['seed']}",
        ]
    except (TypeError, ValueError, AttributeError) as error:  # a setting of the wrong type
        raise ValueError(f"{config_file} is not a run's settings ({error})") from None


def _plot_runs(
    folders: Sequence[pathlib.Path], labels: Sequence[str] | None, out: pathlib.Path
) -> list[pathlib.Path]:
    """Reads the ``clipx train`` runs in ``folders`` and writes `plots.plot_runs`'s figures to ``out``."""
    if labels is None:
        names = [folder.resolve().name for folder in folders]
        labels = names if len(set(names)) == len(names) else [str(folder) for folder in folders]
    if len(labels) != len(folders):
        raise ValueError(f"{len(folders)} runs but {len(labels)} --label values")
    if len(set(labels)) != len(labels):
        raise ValueError(f"every run needs its own label; got {', '.join(labels)}")
    runs: dict[str, list[dict[str, Any]]] = {}
    parts = []
    for label, folder in zip(labels, folders, strict=True):
        if not (folder / "log.jsonl").is_file():
            raise FileNotFoundError(f"{folder}: no log.jsonl here; give folders written by clipx train")
        runs[label] = read_log(folder)
        if not any("loss" in record for record in runs[label]):
            raise ValueError(f"{folder / 'log.jsonl'}: no training step logged")
        if (folder / "config.json").is_file():  # a log copied alone has none
            parts.append(_setting_parts(folder / "config.json"))
    if not parts:
        return plots.plot_runs(runs, out, "settings not recorded")
    shared = [part for part in parts[0] if all(part in other for other in parts[1:])]
    return plots.plot_runs(runs, out, ", ".join(shared) or "settings differ: see the legend")


def _add_plot_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plot", help="plot clipx train runs: loss, gradient norm, dev accuracy, the clipper's threshold"
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="folders written by clipx train")
    p.add_argument(
        "--out",
        help="folder for the PNGs (default: the run's own folder for one run, ./clipx-plots for several)",
    )
    p.add_argument(
        "--label", action="append", help="legend label of each run, in order (default: the folder names)"
    )


def _cmd_plot(args: argparse.Namespace) -> int:
    folders = [pathlib.Path(run) for run in args.runs]
    default_out = folders[0] if len(folders) == 1 else pathlib.Path("clipx-plots")
    out = pathlib.Path(args.out) if args.out else default_out
    check_folder(out)
    _console.print(f"plots: {', '.join(map(str, _plot_runs(folders, args.label, out)))}")
    return 0


# ---------------------------------------------------------------------------
# demo

#: The demo model: a vanilla (tanh) RNN reading the whole sentence and classifying
#: from its last state, the setting in which gradients explode (Pascanu et al. 2013).
DEMO_MODEL: dict[str, Any] = dict(cell="simple", embed_dim=32, hidden_size=64, pooling="last", head="linear")
#: (label, clipx factory, value of its first argument or None for defaults). The fixed
#: thresholds are common first choices, not tuned to the demo; adaptive keeps its defaults.
DEMO_CLIPPERS: tuple[tuple[str, str, float | None], ...] = (
    ("no clipping", "none", None),
    ("value 0.1", "value", 0.1),
    ("global_norm 1.0", "global_norm", 1.0),
    ("adaptive", "adaptive", None),
)


def _add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="compare clippers on the embedded task at an unstable learning rate"
    )
    p.add_argument(
        "--out", default="clipx-demo", help="folder for the plots and run logs (default: ./clipx-demo)"
    )
    p.add_argument("--steps", type=int, default=400, help="training steps per clipper (default: 400)")
    p.add_argument(
        "--optimizer",
        choices=sorted(OPTIMIZER_NAMES),
        default="sgd",
        help="optimizer (default: sgd, plain SGD)",
    )
    p.add_argument("--lr", type=float, default=0.05, help="learning rate (default: 0.05)")
    p.add_argument("--task-length", type=int, default=50, help="words per sentence, 50-400 (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run, 0 to 2³²−1 (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _cmd_demo(args: argparse.Namespace) -> int:
    check_range("--steps", args.steps, 1)
    out = pathlib.Path(args.out)
    check_folder(out)
    configs: dict[str, TrainConfig] = {}  # all built (and so checked) before anything is written
    for label, name, value in DEMO_CLIPPERS:
        clip_args = {}
        if value is not None:
            clip_args = {next(iter(inspect.signature(getattr(clipx, name)).parameters)): value}
        configs[label] = TrainConfig(
            task_length=args.task_length,
            model=DEMO_MODEL,
            optimizer=args.optimizer,
            learning_rate=args.lr,
            batch_size=32,
            epochs=10**6,
            max_steps=args.steps,
            clip=name,
            clip_args=clip_args,
            seed=args.seed,
            checkpoint_every=10**9,
        )
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    for label, config in configs.items():
        run_dir = out / "runs" / config.clip
        summaries[label] = train(config, run_dir, progress=not args.quiet, description=f"{label:>16}")
        runs[label] = read_log(run_dir)

    cell = _CELL_NAMES.get(str(DEMO_MODEL["cell"]), str(DEMO_MODEL["cell"]))
    setting = (
        f"{cell}, {args.task_length}-word temporal order, "
        f"{OPTIMIZER_NAMES[args.optimizer]} lr {args.lr:g}, seed {args.seed}"
    )
    table = rich.table.Table(title=f"clipx demo: {setting}")
    for column in (
        "clipper",
        "diverged",
        "final train loss",
        "dev accuracy",
        "max grad norm",
        "steps clipped",
    ):
        table.add_column(column, justify="right" if column != "clipper" else "left")
    for label, summary in summaries.items():
        records = [r for r in runs[label] if "loss" in r]
        clipped_keys = [k for k in records[0] if k.endswith("/clipped")] if records else []
        clipped = sum(r[clipped_keys[0]] for r in records) if clipped_keys else 0
        accuracy = summary["dev_accuracy"]
        table.add_row(
            label,
            "yes" if summary["diverged"] else "no",
            f"{summary['train_loss']:.4f}",
            "–" if accuracy is None else f"{100 * accuracy:.1f}%",
            f"{max(r['grad_norm'] for r in records):.3g}",
            f"{int(clipped)}/{len(records)}" if clipped_keys else "–",
        )
    _console.print(table)

    plots.plot_losses(runs, out / "loss.png", f"Training loss per clipper\n{setting}")
    plots.plot_grad_norms(runs, out / "grad_norm.png", f"Gradient norm per clipper\n{setting}")
    written = [out / "loss.png", out / "grad_norm.png"]
    if "adaptive" in runs:
        plots.plot_threshold(
            runs["adaptive"],
            plots.threshold_prefix(runs["adaptive"]) or "adaptive",
            out / "adaptive_threshold.png",
            f"clipx.adaptive(): gradient norm vs threshold\n{setting}",
        )
        written.append(out / "adaptive_threshold.png")
    _console.print(f"plots: {', '.join(map(str, written))}  ({time.perf_counter() - started:.0f} s)")
    return 0


# ---------------------------------------------------------------------------
# sweep


def _add_sweep_parser(subparsers) -> None:
    defaults = sweep.SweepConfig()
    p = subparsers.add_parser("sweep", help="learning-rate robustness sweep over clippers (resumable)")
    p.add_argument(
        "--out",
        default="clipx-sweep",
        help="folder for one JSON per run, table and plot (default: ./clipx-sweep)",
    )
    p.add_argument(
        "--data-root",
        default=defaults.data_root,
        help=f"folder holding imdb/ (default: {defaults.data_root})",
    )
    p.add_argument(
        "--datasets",
        default=",".join(defaults.datasets),
        help="comma-separated, of: imdb, task (default: both)",
    )
    p.add_argument(
        "--clippers",
        default=",".join(defaults.clippers),
        help="comma-separated, of: " + ", ".join(label for label, _, _ in sweep.CLIPPERS) + " (default: all)",
    )
    p.add_argument(
        "--lrs",
        default=",".join(f"{x:g}" for x in defaults.learning_rates),
        help=f"comma-separated (default: {','.join(f'{x:g}' for x in defaults.learning_rates)})",
    )
    for flag, field, text in (
        ("--seeds", "seeds", "seeds 0..N-1 per cell"),
        ("--train-limit", "train_limit", "first N IMDB training examples"),
        ("--dev-limit", "dev_limit", "first N IMDB test examples"),
        ("--max-length", "max_length", "truncate IMDB reviews to N tokens"),
        ("--task-length", "task_length", "words per sentence of the embedded task"),
        ("--task-train", "task_train", "training sentences of the embedded task"),
    ):
        value = getattr(defaults, field)
        p.add_argument(flag, type=int, default=value, help=f"{text} (default: {value})")
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps per run (default: none)")
    p.add_argument(
        "--optimizer",
        choices=sorted(OPTIMIZER_NAMES),
        default=defaults.optimizer,
        help=f"optimizer of every run (default: {defaults.optimizer})",
    )
    p.add_argument(
        "--cell",
        choices=model_lib.CELLS,
        default=defaults.cell,
        help=f"recurrent cell of the sweep's model (default: {defaults.cell})",
    )


def _numbers(flag: str, text: str) -> tuple[float, ...]:
    """The comma-separated numbers of option ``flag``; ``ValueError`` naming it for one that is not."""
    numbers = []
    for item in text.split(","):
        try:
            numbers.append(float(item))
        except ValueError:
            raise ValueError(f"{flag}: {item!r} is not a number") from None
    return tuple(numbers)


def _duration(seconds: float) -> str:
    """``seconds`` for a person: "40 s", "12 min", "2.5 h"."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _cmd_sweep(args: argparse.Namespace) -> int:
    config = sweep.SweepConfig(
        data_root=args.data_root,
        datasets=tuple(args.datasets.split(",")),
        clippers=tuple(args.clippers.split(",")),
        learning_rates=_numbers("--lrs", args.lrs),
        seeds=args.seeds,
        train_limit=args.train_limit,
        dev_limit=args.dev_limit,
        max_length=args.max_length,
        task_length=args.task_length,
        task_train=args.task_train,
        max_steps=args.max_steps,
        optimizer=args.optimizer,
        cell=args.cell,
    )

    trained: list[float] = []  # wall seconds of the runs trained by this invocation, data loading included
    reported = [time.perf_counter()]

    def report(run: sweep.RunReport) -> None:
        result, now = run.result, time.perf_counter()
        shown = "diverged" if result["diverged"] else f"{100 * result['dev_accuracy']:.1f}%"
        if run.skipped:
            when = "done before"
        else:
            trained.append(now - reported[0])
            when = f"{trained[-1]:.0f} s"
            if run.left:
                when += f"; about {_duration(sum(trained) / len(trained) * run.left)} left"
        reported[0] = now
        width = len(str(run.total))
        _console.print(f"[{run.position:>{width}}/{run.total}] {run.name}: {shown} ({when})")

    sweep.run_sweep(config, args.out, on_run=report)
    _console.print((pathlib.Path(args.out) / "results.md").read_text())
    return 0


# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``clipx`` command."""
    description = "clipx reference workload: demo, train, plot, sweep"
    parser = argparse.ArgumentParser(prog="clipx", description=description)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo_parser(subparsers)
    _add_train_parser(subparsers)
    _add_plot_parser(subparsers)
    _add_sweep_parser(subparsers)
    return parser


@contextlib.contextmanager
def _signals_stop_training() -> Iterator[None]:
    """Ctrl-C (SIGINT) or SIGTERM stops training after the step in progress; a second one at once.

    A run then checkpoints its last step and the command ends with status 130.
    During training the first signal only asks for the stop
    (`clipx.workload.train.request_stop`): a ``KeyboardInterrupt`` raised inside
    an XLA compile could be lost (the run went on to the end) or crash the
    interpreter at exit. Outside training (plotting, a final evaluation) a
    signal interrupts at once. A signal ignored when clipx started (SIGINT of a
    background job) stays ignored.
    """

    def stop(signum, frame):
        if stop_requested() or not request_stop():
            raise KeyboardInterrupt(f"signal {signum}")

    clear_stop()
    handled = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    try:
        previous = {s: signal.signal(s, stop) for s in handled}
    except ValueError:  # not the main thread: signals stay as they are
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        clear_stop()


def _is_bad_input(error: ValueError | OSError) -> bool:
    """Whether ``error`` reports bad settings or data rather than a fault.

    Bad input is an ``OSError`` (a file that cannot be read, a folder that
    cannot be written) or a ``ValueError`` raised by clipx's own checks. A
    ``ValueError`` raised inside JAX, NumPy or another library (say a
    ``TypePromotionError`` while tracing) is a fault: it keeps its traceback.
    """
    if isinstance(error, OSError):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and pathlib.Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE)


def _negative_numbers_attached(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--lr -1e-3`` written ``--lr=-1e-3``: argparse takes ``-1e-3`` for an option.

    (It knows ``-1`` and ``-0.5`` as numbers, not exponents; the value then gets
    the option's range error, not "expected one argument".)
    """
    attached: list[str] = []
    for token in argv:
        previous = attached[-1] if attached else ""
        if "--" in attached:  # the end of the options: what follows is positional
            attached.append(token)
        elif (
            previous.startswith("--") and "=" not in previous and token.startswith("-") and _is_number(token)
        ):
            attached[-1] = f"{previous}={token}"
        else:
            attached.append(token)
    return attached


def _is_number(text: str) -> bool:
    """Whether ``text`` reads as a float (or a comma-separated list of them, as ``--lrs`` takes)."""
    try:
        [float(part) for part in text.split(",")]
    except ValueError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``clipx <command>``; returns the exit status (errors in settings give 2 and a message)."""
    args = build_parser().parse_args(_negative_numbers_attached(sys.argv[1:] if argv is None else argv))
    commands = {"demo": _cmd_demo, "train": _cmd_train, "plot": _cmd_plot, "sweep": _cmd_sweep}
    try:
        with _signals_stop_training():
            return commands[args.command](args)
    except KeyboardInterrupt:
        _console.print(
            f"clipx {args.command}: interrupted "
            "(a train run continues with --resume, a sweep when run again)",
            style="red",
        )
        return 130
    except (ValueError, OSError) as error:
        if not _is_bad_input(error):
            raise
        _console.print(f"clipx {args.command}: {error}", style="red")
        return 2


def run() -> None:
    """The ``clipx`` command: `main`, ended without the interpreter's teardown after an interrupt.

    An interrupt that lands inside an XLA compile can leave jaxlib so that the
    interpreter's shutdown crashes (a segmentation fault, exit status 139 instead
    of 130; measured with jax 0.10.2, without clipx too). By then the run has
    written its checkpoint, so the process ends at once, with status 130. An
    interrupt after the command's work is done ends the process without a
    traceback (killed by the signal, as by default).
    """
    status = main()
    if status == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    # The command's work is done. JAX clears its caches at exit, where an interrupt printed a
    # KeyboardInterrupt traceback; it now ends the process as the signal does by default.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(status)


if __name__ == "__main__":
    run()
