"""The clipx command: train, demo and sweep on tiny settings, and its errors."""

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipx
from clipx import cli
from clipx.workload import train as train_lib

TINY_TRAIN = [
    "--task-length", "50", "--task-train", "48", "--cell", "simple", "--embed-dim", "8",
    "--hidden-size", "8", "--batch-size", "16", "--epochs", "1", "--quiet",
]  # fmt: skip


def test_train_runs_and_resumes(tmp_path):
    out = tmp_path / "run"
    argv = ["train", *TINY_TRAIN, "--clip", "global_norm", "--clip-arg", "max_norm=0.5", "--out", str(out)]
    assert cli.main([*argv, "--stop-after", "1"]) == 0
    assert cli.main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["finished"]
    config = json.loads((out / "config.json").read_text())
    assert config["clip_args"] == {"max_norm": 0.5} and config["model"]["cell"] == "simple"


def test_a_new_run_in_a_used_folder_leaves_nothing_of_the_old_one(tmp_path):
    out = tmp_path / "run"
    argv = ["train", *TINY_TRAIN, "--out", str(out)]
    assert cli.main([*argv, "--clip", "global_norm", "--clip-arg", "max_norm=0.5"]) == 0
    assert {"summary.json", "threshold.png"} <= {p.name for p in out.iterdir()}
    assert cli.main([*argv, "--seed", "3", "--stop-after", "1"]) == 0
    left = {p.name for p in out.iterdir()}
    assert "summary.json" not in left and "threshold.png" not in left  # unfinished, and no clipper
    assert json.loads((out / "config.json").read_text())["seed"] == 3
    assert len((out / "log.jsonl").read_text().splitlines()) == 1


def _interrupt_at_step(monkeypatch, step):
    """Makes the next `train` stop at its ``step``-th step as at Ctrl-C."""
    to_python, calls = train_lib._to_python, []

    def interrupted(metrics):
        calls.append(None)
        if len(calls) == step:
            raise KeyboardInterrupt
        return to_python(metrics)

    monkeypatch.setattr(train_lib, "_to_python", interrupted)


def test_an_interrupted_new_run_leaves_no_figure_of_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = ["train", *TINY_TRAIN, "--eval-every", "1", "--out", str(out)]
    assert cli.main([*argv, "--clip", "global_norm", "--clip-arg", "max_norm=0.5"]) == 0
    figures = set(cli.plots.ONE_RUN_FIGURES)
    assert figures <= {p.name for p in out.iterdir()}
    _interrupt_at_step(monkeypatch, 2)
    assert cli.main([*argv, "--seed", "3"]) == 130
    assert not figures & {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["seed"] == 3


def test_an_interrupted_resumed_run_keeps_its_own_figures(tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = ["train", *TINY_TRAIN, "--clip", "global_norm", "--clip-arg", "max_norm=0.5", "--out", str(out)]
    assert cli.main([*argv, "--stop-after", "1"]) == 0
    drawn = sorted(p.name for p in out.glob("*.png"))
    assert "threshold.png" in drawn
    _interrupt_at_step(monkeypatch, 1)
    assert cli.main(["train", "--resume", "--out", str(out), "--quiet"]) == 130
    assert sorted(p.name for p in out.glob("*.png")) == drawn  # of its own first step


def test_train_preset_sets_defaults_and_flags_override():
    args = cli.build_parser().parse_args(["train", "--preset", "flax-sst2", "--lr", "0.3", "--epochs", "1"])
    config = cli._train_config(args)
    assert config.learning_rate == 0.3 and config.epochs == 1 and config.momentum == 0.9
    assert config.model["hidden_size"] == 256 and config.model["bidirectional"]
    assert config.model["single_logit"] and config.boundaries
    args = cli.build_parser().parse_args(
        ["train", "--preset", "flax-sst2", "--no-single-logit", "--no-boundaries"]
    )
    config = cli._train_config(args)
    assert not config.model["single_logit"] and not config.boundaries


def test_every_option_has_help_and_shown_defaults_are_the_real_ones():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.choices and "train" in a.choices).choices
    for name, command in commands.items():
        for action in command._actions:
            assert action.help, f"clipx {name} {action.option_strings} has no help"
    train_help = commands["train"].format_help()
    assert "(default: 0.001)" in train_help and "(default: 30000)" in train_help
    assert "(default: None)" not in train_help


def test_unknown_clipper_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["train", *TINY_TRAIN, "--clip", "nope", "--out", str(tmp_path)]) == 2
    printed = capsys.readouterr().out
    assert "unknown clipper 'nope'" in printed and "global_norm" in printed


def _raises_inside_jax(args):
    del args
    with jax.numpy_dtype_promotion("strict"):
        return jnp.ones(2, jnp.bfloat16) * jnp.ones(2, jnp.float32)  # a TypePromotionError


def test_a_value_error_raised_inside_jax_is_a_fault_not_bad_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_cmd_train", _raises_inside_jax)
    with pytest.raises(jax.dtypes.TypePromotionError):  # its traceback kept, not exit 2 and one line
        cli.main(["train", *TINY_TRAIN, "--out", str(tmp_path / "run")])
    assert "bfloat16" not in capsys.readouterr().out


def test_a_value_error_from_clipx_checks_is_bad_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_cmd_train", lambda args: clipx.global_norm(-1.0))
    assert cli.main(["train", *TINY_TRAIN, "--out", str(tmp_path / "run")]) == 2
    assert "max_norm" in capsys.readouterr().out


@pytest.mark.parametrize("wrapper", ["skip_nonfinite", "skip_spikes", "without_stats"])
def test_wrappers_of_another_transformation_are_not_offered_as_clippers(tmp_path, capsys, wrapper):
    assert cli.main(["train", *TINY_TRAIN, "--clip", wrapper, "--out", str(tmp_path / "run")]) == 2
    printed = capsys.readouterr().out
    assert f"unknown clipper {wrapper!r}" in printed
    assert "available: none, adagc, adaptive," in printed
    assert printed.count("block_rms") == 1  # listed once
    assert not (tmp_path / "run").exists()


def _named_by_flags(*cases):
    """``(flags, message)`` cases as pytest parameters named by their flags."""
    return [pytest.param(flags, message, id=" ".join(flags)) for flags, message in cases]


def _named_by_settings(*cases):
    """``(settings, message)`` cases as pytest parameters named by their settings."""
    return [
        pytest.param(settings, message, id=",".join(f"{k}={v}" for k, v in settings.items()))
        for settings, message in cases
    ]


def _printed(capsys, message):
    """Whether ``message`` was printed (rich wraps long lines: whitespace is ignored)."""
    return "".join(message.split()) in "".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    "flags, message",
    _named_by_flags(
        (["--lr", "-1"], "learning_rate must lie in [1.17549e-38, 3.40282e+38]; got -1.0"),
        (["--lr", "nan"], "learning_rate must lie in [1.17549e-38, 3.40282e+38]; got nan"),
        (["--lr", "-1e-3"], "learning_rate must lie in [1.17549e-38, 3.40282e+38]; got -0.001"),
        (["--optimizer", "momentum", "--momentum", "1.5"], "momentum must lie in [0, 1); got 1.5"),
        (["--weight-decay", "-1"], "weight_decay must lie in [0, 3.40282e+38]; got -1.0"),
        (["--weight-decay", "nan"], "weight_decay must lie in [0, 3.40282e+38]; got nan"),
        (["--max-steps", "-3"], "max_steps must be at least 1; got -3"),
        (["--max-steps", "0"], "max_steps must be at least 1; got 0"),
        (["--eval-every", "0"], "eval_every must be at least 1; got 0"),
        (["--train-limit", "0"], "train_limit must be at least 1; got 0"),
        (["--dev-limit", "0"], "dev_limit must be at least 1; got 0"),
        (["--stop-after", "0"], "stop_after must be at least 1; got 0"),
        (["--seed", "-1"], "seed must lie in [0, 4294967295]; got -1"),
        (["--seed", "4294967296"], "seed must lie in [0, 4294967295]; got 4294967296"),
        (["--seed", "99999999999999999999"], "seed must lie in [0, 4294967295]; got 99999999999999999999"),
        (["--max-vocab", "0"], "max_vocab must be at least 2; got 0"),
        (["--boundaries", "--max-vocab", "3"], "max_vocab must be at least 4; got 3"),
        (["--clip", "value", "--clip-arg", "max_delta=abc"], "clipx.value: max_delta must be a real number"),
        (
            ["--clip", "global_norm", "--clip-arg", "max_norm=1e39"],
            "clipper argument 'max_norm=1e39': beyond float32's range (at most 3.402823466e+38 in size;",
        ),
    ),
)
def test_train_refuses_bad_settings_before_training(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY_TRAIN, *flags, "--out", str(out)]) == 2
    assert _printed(capsys, f"clipx train: {message}")
    assert not out.exists()  # refused before anything was written


def test_plot_of_a_log_copied_alone_says_its_settings_are_not_recorded(tmp_path, monkeypatch):
    """Before, its title said "settings differ: see the legend", for one run."""
    assert cli.main(["train", *TINY_TRAIN, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    (tmp_path / "copied").mkdir()
    (tmp_path / "copied" / "log.jsonl").write_text((tmp_path / "run" / "log.jsonl").read_text())
    titles = []
    monkeypatch.setattr(cli.plots, "plot_runs", lambda runs, out, title: titles.append(title) or [])
    assert cli.main(["plot", str(tmp_path / "copied")]) == 0
    assert cli.main(["plot", str(tmp_path / "copied"), str(tmp_path / "run")]) == 0
    assert titles[0] == "settings not recorded"
    assert titles[1] != "settings differ: see the legend"  # the recorded run's settings


def test_train_writes_plots_and_plot_overlays_runs(tmp_path, capsys):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run, clip in zip(runs, ("adaptive", "none"), strict=True):
        argv = ["train", *TINY_TRAIN, "--clip", clip, "--eval-every", "1", "--out", str(run)]
        assert cli.main(argv) == 0
    for name in ("loss.png", "grad_norm.png", "dev_accuracy.png", "threshold.png"):
        assert (runs[0] / name).stat().st_size > 0
    assert not (runs[1] / "threshold.png").exists()  # no clipper, no threshold

    out = tmp_path / "both"
    argv = ["plot", *map(str, runs), "--label", "adaptive run", "--label", "unclipped", "--out", str(out)]
    assert cli.main(argv) == 0
    written = sorted(path.name for path in out.iterdir())
    assert written == ["dev_accuracy.png", "grad_norm.png", "loss.png", "threshold_adaptive_run.png"]
    assert "threshold_adaptive_run.png" in capsys.readouterr().out.replace("\n", "")
    # Plotted again without the clipped run: its threshold figure goes; other files stay.
    (out / "notes.txt").write_text("mine")
    assert cli.main(["plot", str(runs[1]), "--out", str(out)]) == 0
    written = sorted(path.name for path in out.iterdir())
    assert written == ["dev_accuracy.png", "grad_norm.png", "loss.png", "notes.txt"]


def test_plot_draws_diverged_and_long_runs(tmp_path):
    run = tmp_path / "diverged"
    run.mkdir()
    values = [0.7, float("nan"), float("inf"), 0.0, 1e38] * 500  # 2500 steps: the dense style
    with (run / "log.jsonl").open("w") as log:
        for step, value in enumerate(values, start=1):
            stats = {"global_norm/norm": value, "global_norm/threshold": 1.0, "global_norm/clipped": 1.0}
            log.write(json.dumps({"step": step, "loss": value, "grad_norm": value, **stats}) + "\n")
        log.write(json.dumps({"step": len(values), "dev_accuracy": None, "dev_loss": None}) + "\n")
    assert cli.main(["plot", str(run)]) == 0
    assert sorted(path.name for path in run.glob("*.png")) == ["grad_norm.png", "loss.png", "threshold.png"]


def test_plot_labels_alike_but_for_punctuation_get_a_threshold_figure_each(tmp_path, capsys):
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        run.mkdir()
        stats = {"global_norm/norm": 2.0, "global_norm/threshold": 1.0, "global_norm/clipped": 1.0}
        (run / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5, "grad_norm": 2.0, **stats}) + "\n")
        runs.append(str(run))
    out = tmp_path / "plots"
    assert cli.main(["plot", *runs, "--label", "gn 0.5", "--label", "gn/0.5", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("threshold_*.png")) == [
        "threshold_gn_0.5.png",
        "threshold_gn_0.5_2.png",
    ]


def test_plot_titles_name_the_settings_the_runs_share(tmp_path):
    argv = ["train", *TINY_TRAIN, "--optimizer", "momentum", "--lr", "0.3", "--max-steps", "1"]
    cli.main([*argv, "--clip", "global_norm", "--clip-arg", "max_norm=0.5", "--out", str(tmp_path / "a")])
    parts = cli._setting_parts(tmp_path / "a" / "config.json")
    expected = [
        "50-word temporal order", "vanilla RNN", "SGD+momentum 0.9 lr 0.3",
        "clipx.global_norm(max_norm=0.5)", "seed 0",
    ]  # fmt: skip
    assert parts == expected


def test_plot_bad_inputs_are_clear_errors(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *TINY_TRAIN, "--max-steps", "1", "--out", str(run)]) == 0
    capsys.readouterr()

    def error(*argv):
        assert cli.main(["plot", *argv, "--out", str(tmp_path / "plots")]) == 2
        return capsys.readouterr().out.replace("\n", "")

    assert "no log.jsonl here" in error(str(tmp_path / "absent"))
    assert "2 runs but 1 --label values" in error(str(run), str(run), "--label", "x")
    assert "every run needs its own label" in error(str(run), str(run))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "log.jsonl").write_text('{"step": 1, "epoch": 0, "dev_accuracy": 0.5}\n')
    assert "no training step logged" in error(str(empty))
    (empty / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n')
    assert "line 2: not a JSON record" in error(str(empty))
    (empty / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n[1, 2]\n')
    assert "line 2: not a log record" in error(str(empty))
    (empty / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": "abc"}\n')
    assert f"{empty / 'log.jsonl'}, line 2: not a log record ('loss' is 'abc'" in error(str(empty))
    squeezed = lambda text: "".join(text.split())  # noqa: E731  # rich wraps long lines
    (run / "config.json").write_text('{"model": {"cell"')
    assert squeezed(f"{run / 'config.json'} is not a run's settings (Expecting") in squeezed(error(str(run)))
    (run / "config.json").write_text("[1]")
    assert squeezed("is not a run's settings (not a JSON object)") in squeezed(error(str(run)))
    wrong_types = (
        '{"model": null}',
        '{"momentum": null, "optimizer": "momentum"}',
        '{"learning_rate": "0.1"}',
    )
    for wrong_type in wrong_types:
        (run / "config.json").write_text(wrong_type)
        assert squeezed(f"{run / 'config.json'} is not a run's settings (") in squeezed(error(str(run)))
    (run / "config.json").write_text("{}")  # every setting at its default
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "plots")]) == 0


TINY_MODEL = dict(cell="simple", embed_dim=4, hidden_size=4, pooling="last", head="linear")


def test_demo_writes_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "DEMO_MODEL", TINY_MODEL)
    monkeypatch.setattr(cli, "DEMO_CLIPPERS", (cli.DEMO_CLIPPERS[0], cli.DEMO_CLIPPERS[-1]))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--steps", "3", "--out", str(out), "--quiet"]) == 0
    assert (out / "loss.png").stat().st_size > 0 and (out / "grad_norm.png").stat().st_size > 0
    assert (out / "adaptive_threshold.png").exists()


def test_demo_flags_reach_the_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "DEMO_MODEL", TINY_MODEL)
    monkeypatch.setattr(cli, "DEMO_CLIPPERS", cli.DEMO_CLIPPERS[:1])
    out = tmp_path / "demo"
    argv = ["demo", "--steps", "2", "--optimizer", "momentum", "--lr", "0.3", "--task-length", "60"]
    assert cli.main([*argv, "--seed", "1", "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "runs" / "none" / "config.json").read_text())
    assert (config["optimizer"], config["learning_rate"], config["task_length"]) == ("momentum", 0.3, 60)
    assert config["seed"] == 1 and config["max_steps"] == 2


def test_demo_defaults():
    args = cli.build_parser().parse_args(["demo"])
    assert (args.optimizer, args.lr, args.steps, args.task_length) == ("sgd", 0.05, 400, 50)
    assert cli.DEMO_MODEL["cell"] == "simple"


def test_sweep_is_resumable(tmp_path, monkeypatch):
    monkeypatch.setattr(cli.sweep, "MODEL", TINY_MODEL)
    argv = [
        "sweep", "--out", str(tmp_path), "--datasets", "task", "--clippers", "none,global_norm 1",
        "--lrs", "0.01", "--seeds", "1", "--task-length", "50", "--task-train", "64", "--max-steps", "2",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    runs = sorted(p.name for p in tmp_path.glob("task__*.json"))
    assert len(runs) == 2
    assert (tmp_path / "sweep.png").exists() and "global_norm 1" in (tmp_path / "results.md").read_text()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("task__*.json")}
    assert cli.main(argv) == 0
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.glob("task__*.json")}


def test_sweep_optimizer_and_cell_reach_the_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(cli.sweep, "MODEL", {**TINY_MODEL, "cell": "lstm"})
    argv = [
        "sweep", "--out", str(tmp_path), "--datasets", "task", "--clippers", "none", "--lrs", "0.1",
        "--seeds", "1", "--task-train", "32", "--max-steps", "1", "--optimizer", "sgd", "--cell", "gru",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    (run,) = tmp_path.glob("task__*.json")
    config = json.loads(run.read_text())["config"]
    assert config["optimizer"] == "sgd" and config["model"]["cell"] == "gru"
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["sweep"]["optimizer"] == "sgd" and settings["model"]["cell"] == "gru"


def test_sweep_refuses_a_folder_of_runs_with_other_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli.sweep, "MODEL", TINY_MODEL)

    def sweep(*extra, lrs="0.1"):
        return cli.main([
            "sweep", "--out", str(tmp_path), "--datasets", "task", "--clippers", "none", "--lrs", lrs,
            "--seeds", "1", "--task-train", "32", "--max-steps", "1", *extra,
        ])  # fmt: skip

    assert sweep() == 0
    capsys.readouterr()
    # Anything that changes a run is refused; more seeds, rates or clippers extend the sweep.
    assert sweep("--optimizer", "sgd") == 2
    printed = capsys.readouterr().out
    assert "other settings" in printed and "optimizer: 'adam' there, 'sgd' now" in printed
    assert sweep("--task-length", "60") == 2
    assert len(list(tmp_path.glob("task__*.json"))) == 1
    assert sweep(lrs="0.1,0.2") == 0
    assert len(list(tmp_path.glob("task__*.json"))) == 2


def test_sweep_refuses_a_run_made_with_other_clipper_arguments(tmp_path, monkeypatch, capsys):
    # A run recorded under other defaults of its clipper (another clipx version) is not counted as this one's.
    monkeypatch.setattr(cli.sweep, "MODEL", TINY_MODEL)
    argv = [
        "sweep", "--out", str(tmp_path), "--datasets", "task", "--clippers", "adaptive", "--lrs", "0.1",
        "--seeds", "1", "--task-train", "32", "--max-steps", "1",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    (run,) = tmp_path.glob("task__*.json")
    result = json.loads(run.read_text())
    arguments = result["clipper_arguments"]
    assert arguments["direction_rate"] == 0.1 and arguments["num_stds"] == 1.0
    result["clipper_arguments"] = {**arguments, "warmup_factor": 4.0, "direction_rate": None}
    run.write_text(json.dumps(result))
    capsys.readouterr()
    assert cli.main(argv) == 2
    printed = capsys.readouterr().out.replace("\n", "")
    assert "other 'adaptive' arguments" in printed and "direction_rate: None there, 0.1 now" in printed
    del result["clipper_arguments"]  # written before the arguments were recorded: kept as it is
    run.write_text(json.dumps(result))
    assert cli.main(argv) == 0
    assert "clipper_arguments" not in json.loads(run.read_text())


def _tiny_sweep_argv(out, *extra):
    return ["sweep", "--out", str(out), *TINY_SWEEP, *extra]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is not a run record (Expecting value: line 1 column 1 (char 0)); delete it to run it again"),
        ('{"dataset": "task", "clipper"', "is not a run record (Expecting"),
        ("{}", "is not a run record (no dataset, clipper, lr, seed, config, dev_accuracy, diverged)"),
        ("[1, 2]", "is not a run record (no dataset,"),
    ],
    ids=["empty", "truncated", "empty-object", "list"],
)
def test_sweep_names_a_run_file_that_holds_no_run(tmp_path, monkeypatch, capsys, content, message):
    monkeypatch.setattr(cli.sweep, "MODEL", TINY_MODEL)
    assert cli.main(_tiny_sweep_argv(tmp_path)) == 0
    (run,) = tmp_path.glob("task__*.json")
    run.write_text(content)
    capsys.readouterr()
    assert cli.main(_tiny_sweep_argv(tmp_path)) == 2
    assert _printed(capsys, f"clipx sweep: {run} {message}")
    assert not list(tmp_path.glob("*.partial"))


def test_sweep_refuses_a_stray_run_file_before_training(tmp_path, monkeypatch, capsys):
    """Before, a file named like a run but holding none stopped the sweep after all its runs."""
    monkeypatch.setattr(cli.sweep, "MODEL", TINY_MODEL)
    stray = tmp_path / "my__notes.json"
    stray.write_text('{"note": "lr 1e-2 looked best"}')
    assert cli.main(_tiny_sweep_argv(tmp_path)) == 2
    assert _printed(capsys, f"clipx sweep: {stray} is not a run record (no dataset,")
    assert not list(tmp_path.glob("task__*.json")) and not (tmp_path / "settings.json").exists()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"clipper": "global_norm 0.5"}, "clipper 'global_norm 0.5'"),
        ({"optimizer": "adamw"}, "optimizer 'adamw'"),
    ],
    ids=["clipper", "optimizer"],
)
def test_sweep_refuses_a_run_record_of_another_grid_before_training(
    tmp_path, monkeypatch, capsys, change, named
):
    """Before, a record whose clipper or optimizer this clipx does not know stopped the summary after
    every run (a list lookup's error, or a KeyError's traceback)."""
    monkeypatch.setattr(cli.sweep, "MODEL", TINY_MODEL)
    assert cli.main(_tiny_sweep_argv(tmp_path)) == 0
    (run,) = tmp_path.glob("task__*.json")
    record = json.loads(run.read_text())
    record["clipper"] = change.get("clipper", record["clipper"])
    record["config"]["optimizer"] = change.get("optimizer", record["config"]["optimizer"])
    other = tmp_path / "task__other__lr0.1__seed0.json"
    other.write_text(json.dumps(record))
    capsys.readouterr()
    assert cli.main(_tiny_sweep_argv(tmp_path, "--lrs", "0.01,0.02")) == 2
    printed = "".join(capsys.readouterr().out.split())  # rich wraps long lines
    refused = f"clipx sweep: {other} is not a run record of this sweep's grid (clipper"
    assert "".join(refused.split()) in printed
    assert "".join(named.split()) in printed
    assert len(list(tmp_path.glob("task__*.json"))) == 2  # nothing trained


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"diverged": "false"}, "diverged must be True or False; got 'false'"),
        ({"dev_accuracy": None}, "dev_accuracy must be a real number; got None"),
        ({"dev_accuracy": 1.5}, "dev_accuracy must lie in [0, 1]; got 1.5"),
        ({"lr": "0.1"}, "lr must be a real number; got '0.1'"),
        ({"seed": 0.0}, "seed must be an integer; got 0.0"),
        ({"dataset": "sst2"}, "dataset must be one of imdb, task; got 'sst2'"),
    ],
    ids=["diverged", "no-accuracy", "accuracy", "lr", "seed", "dataset"],
)
def test_sweep_refuses_a_run_record_of_wrong_types_before_training(
    tmp_path, monkeypatch, capsys, change, message
):
    """Before, these stopped the summary after every run with a TypeError's traceback, or were counted."""
    monkeypatch.setattr(cli.sweep, "MODEL", TINY_MODEL)
    assert cli.main(_tiny_sweep_argv(tmp_path)) == 0
    (run,) = tmp_path.glob("task__*.json")
    run.write_text(json.dumps({**json.loads(run.read_text()), **change}))
    capsys.readouterr()
    assert cli.main(_tiny_sweep_argv(tmp_path, "--lrs", "0.1,0.2")) == 2
    assert _printed(capsys, f"clipx sweep: {run} is not a run record ({message}); delete it to run it again")
    assert len(list(tmp_path.glob("task__*.json"))) == 1  # nothing trained


def test_sweep_refuses_a_run_file_named_for_another_run(tmp_path, monkeypatch, capsys):
    """Before, a copy of a run file was a second seed in the summary."""
    monkeypatch.setattr(cli.sweep, "MODEL", TINY_MODEL)
    assert cli.main(_tiny_sweep_argv(tmp_path)) == 0
    (run,) = tmp_path.glob("task__*.json")
    copy = tmp_path / f"{run.stem} (copy).json"
    copy.write_text(run.read_text())
    capsys.readouterr()
    assert cli.main(_tiny_sweep_argv(tmp_path)) == 2
    assert _printed(capsys, f"clipx sweep: {copy} records the run of {run.name}; delete it, or name it so")


def test_sweep_refuses_a_run_beyond_its_grid_made_with_other_settings(tmp_path, monkeypatch, capsys):
    """Before, only the runs of this invocation's grid were compared: the table mixed Adam and SGD."""
    monkeypatch.setattr(cli.sweep, "MODEL", TINY_MODEL)
    assert cli.main(_tiny_sweep_argv(tmp_path)) == 0
    (run,) = tmp_path.glob("task__*.json")
    record = json.loads(run.read_text())
    record["lr"] = record["config"]["learning_rate"] = 0.2
    other = tmp_path / "task__none__lr0.2__seed0.json"
    other.write_text(json.dumps({**record, "config": {**record["config"], "optimizer": "sgd"}}))
    capsys.readouterr()
    assert cli.main(_tiny_sweep_argv(tmp_path)) == 2
    assert _printed(
        capsys, f"clipx sweep: {other} was made with other settings (optimizer: 'sgd' there, 'adam'"
    )
    # A run of a dataset this invocation does not run shares that dataset's settings with the folder's others.
    other.write_text(json.dumps({**record, "config": {**record["config"], "task_length": 60}}))
    capsys.readouterr()
    argv = _tiny_sweep_argv(tmp_path, "--datasets", "imdb", "--data-root", str(tmp_path / "absent"))
    assert cli.main(argv) == 2
    assert _printed(
        capsys, f"clipx sweep: {other} was made with other settings (task_length: 50 in {run.name}, 60 here)"
    )


def test_sweep_compares_each_run_with_its_settings_without_settings_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli.sweep, "MODEL", TINY_MODEL)
    assert cli.main(_tiny_sweep_argv(tmp_path)) == 0
    (tmp_path / "settings.json").unlink()
    capsys.readouterr()
    assert cli.main(_tiny_sweep_argv(tmp_path, "--task-length", "60")) == 2
    (run,) = tmp_path.glob("task__*.json")
    assert _printed(
        capsys, f"clipx sweep: {run} was made with other settings (task_length: 50 there, 60 now)"
    )
    assert not (tmp_path / "settings.json").exists()  # refused before anything was written
    assert cli.main(_tiny_sweep_argv(tmp_path, "--cell", "gru")) == 2  # the model's settings too
    assert _printed(capsys, f"{run} was made with other settings (model.cell: 'lstm' there, 'gru' now)")
    assert cli.main(_tiny_sweep_argv(tmp_path)) == 0  # the settings it was made with: counted


def test_sweep_settings_written_before_optimizer_and_cell_mean_adam_and_lstm(tmp_path, monkeypatch):
    lstm_model = {**TINY_MODEL, "cell": "lstm"}
    monkeypatch.setattr(cli.sweep, "MODEL", lstm_model)
    settings = dataclasses.asdict(cli.sweep.SweepConfig(datasets=("task",), task_train=32, max_steps=1))
    del settings["optimizer"], settings["cell"]
    recorded = {"sweep": settings, "model": lstm_model}
    argv = [
        "sweep", "--out", str(tmp_path), "--datasets", "task", "--clippers", "none", "--lrs", "0.1",
        "--seeds", "1", "--task-train", "32", "--max-steps", "1",
    ]  # fmt: skip
    assert cli.main(argv) == 0  # a run of Adam and an LSTM, recorded as before those settings existed:
    (tmp_path / "settings.json").write_text(json.dumps(recorded))
    other_runs = [*argv, "--lrs", "0.2"]  # settings.json alone tells what the folder's runs were made with
    assert cli.main([*other_runs, "--optimizer", "sgd"]) == 2
    assert cli.main([*other_runs, "--cell", "gru"]) == 2
    assert cli.main(other_runs) == 0


def test_learning_rates_that_print_alike_are_recorded_once(tmp_path):
    """Before, a folder's settings.json could record 0.001 and 0.0010000001 (run on two datasets),
    which the next invocation refused as a repeated learning rate."""
    recorded = cli.sweep.SweepConfig(datasets=("task",), learning_rates=(0.001, 0.1))
    (tmp_path / "settings.json").write_text(json.dumps({"sweep": dataclasses.asdict(recorded), "model": {}}))
    (tmp_path / "task__none__lr0.001__seed0.json").write_text("{}")  # a run: the grid is extended
    now = cli.sweep.SweepConfig(datasets=("imdb",), learning_rates=(0.0010000001, 0.01))
    extended = cli.sweep._extended(
        tmp_path / "settings.json", {"sweep": dataclasses.asdict(now), "model": {}}
    )
    assert extended["sweep"]["learning_rates"] == [0.001, 0.01, 0.1]
    cli.sweep.SweepConfig(**extended["sweep"])  # what the next invocation reads back


def test_a_negative_number_after_the_end_of_the_options_stays_positional():
    assert cli._negative_numbers_attached(["plot", "--out", "o", "--", "-1e3"]) == [
        "plot",
        "--out",
        "o",
        "--",
        "-1e3",
    ]
    assert cli._negative_numbers_attached(["train", "--lr", "-1e-3"]) == ["train", "--lr=-1e-3"]


def test_sweep_refuses_a_corrupt_settings_file(tmp_path, capsys):
    argv = ["sweep", "--out", str(tmp_path), "--datasets", "task", "--clippers", "none", "--seeds", "1"]
    wrong_types = [{"sweep": []}, {"sweep": {"seeds": "1"}}, {"sweep": {"clippers": "none"}}, {"model": []}]
    for text in ("{not json", "[1, 2]", *map(json.dumps, wrong_types)):
        (tmp_path / "settings.json").write_text(text)
        assert cli.main(argv) == 2
        assert "settings.json is not a sweep settings file" in capsys.readouterr().out.replace("\n", "")
    assert not list(tmp_path.glob("task__*.json"))


def test_a_sweep_that_made_no_run_binds_no_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli.sweep, "MODEL", TINY_MODEL)
    failed = ["--datasets", "imdb", "--data-root", str(tmp_path / "absent"), "--max-length", "64"]
    assert cli.main(_tiny_sweep_argv(tmp_path / "sweep", *failed)) == 2
    assert _printed(capsys, f"clipx sweep: {tmp_path / 'absent' / 'imdb' / 'train.tsv'}: file not found")
    assert cli.main(_tiny_sweep_argv(tmp_path / "sweep")) == 0  # other settings, and no run to mix them with
    recorded = json.loads((tmp_path / "sweep" / "settings.json").read_text())["sweep"]
    assert recorded["datasets"] == ["task"] and recorded["max_length"] == 128


@pytest.mark.parametrize(
    "settings, message",
    _named_by_settings(
        ({"optimizer": "lamb"}, "optimizer must be one of sgd, momentum, rmsprop, adam; got 'lamb'"),
        ({"cell": "transformer"}, "cell must be one of lstm, gru, simple; got 'transformer'"),
        ({"seeds": 1.5}, "seeds must be an integer; got 1.5"),
        ({"max_steps": 2.0}, "max_steps must be an integer; got 2.0"),
        ({"task_train": True}, "task_train must be an integer; got True"),
        ({"datasets": "task"}, "datasets must be a list or tuple; got 'task'"),
        ({"datasets": ("task", "sst2")}, "datasets[1] must be one of imdb, task; got 'sst2'"),
        ({"clippers": ("none", ["value"])}, "clippers[1] must be one of none, "),
        ({"learning_rates": 0.1}, "learning_rates must be a list or tuple; got 0.1"),
        ({"learning_rates": ("0.1",)}, "learning_rates[0] must be a real number; got '0.1'"),
        ({"data_root": None}, "data_root must be a path; got None"),
    ),
)
def test_sweep_settings_of_the_wrong_type_are_refused(settings, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        cli.sweep.SweepConfig(**settings)


def test_sweep_settings_become_python_values(tmp_path):
    config = cli.sweep.SweepConfig(
        data_root=tmp_path, datasets=["task"], learning_rates=[np.float32(0.5)], seeds=np.int64(2)
    )
    assert config.data_root == str(tmp_path) and config.datasets == ("task",)
    assert config.learning_rates == (0.5,) and type(config.learning_rates[0]) is float
    assert type(config.seeds) is int


@pytest.mark.parametrize(
    "settings, message",
    _named_by_settings(
        (
            {"learning_rates": (0.1, -1.0)},
            "learning_rates[1] must lie in [1.17549e-38, 3.40282e+38]; got -1.0",
        ),
        (
            {"learning_rates": (float("nan"),)},
            "learning_rates[0] must lie in [1.17549e-38, 3.40282e+38]; got nan",
        ),
        ({"learning_rates": (1e-50,)}, "learning_rates[0] must lie in [1.17549e-38, 3.40282e+38]; got 1e-50"),
        ({"learning_rates": (0.01, 0.01)}, "learning_rates must list each entry once; got '0.01' 2 times"),
        ({"learning_rates": (0.01, 0.0100000001)}, "learning_rates must list each entry once"),
        ({"learning_rates": ()}, "learning_rates must list at least one entry; got none"),
        ({"clippers": ("none", "none")}, "clippers must list each entry once; got 'none' 2 times"),
        ({"clippers": ()}, "clippers must list at least one entry; got none"),
        ({"datasets": ("task", "task")}, "datasets must list each entry once; got 'task' 2 times"),
        ({"datasets": ()}, "datasets must list at least one entry; got none"),
        ({"seeds": 0}, "seeds must lie in [1, 4294967296]; got 0"),
        ({"seeds": 2**32 + 1}, "seeds must lie in [1, 4294967296]; got 4294967297"),  # seed 2³² is 0's
        ({"max_steps": 0}, "max_steps must be at least 1; got 0"),
        ({"train_limit": 0}, "train_limit (the training examples; the sweep's batches hold 32) must be"),
        ({"train_limit": 31}, "train_limit (the training examples; the sweep's batches hold 32) must be"),
        ({"dev_limit": 0}, "dev_limit must be at least 1; got 0"),
        ({"max_length": 0}, "max_length must be at least 1; got 0"),
        ({"task_train": 16}, "task_train (the training examples; the sweep's batches hold 32) must be"),
        ({"task_length": 10}, "task_length must lie in [50, 400]; got 10"),
    ),
)
def test_sweep_settings_out_of_range_or_repeated_are_refused(settings, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        cli.sweep.SweepConfig(**settings)


TINY_SWEEP = [
    "--datasets", "task", "--clippers", "none", "--lrs", "0.1", "--seeds", "1", "--task-train", "32",
    "--max-steps", "1",
]  # fmt: skip


@pytest.mark.parametrize(
    "flags, message",
    _named_by_flags(
        (["--lrs", "-1"], "learning_rates[0] must lie in [1.17549e-38, 3.40282e+38]; got -1.0"),
        (["--lrs", "nan"], "learning_rates[0] must lie in [1.17549e-38, 3.40282e+38]; got nan"),
        (["--lrs", "-1e-3,0.1"], "learning_rates[0] must lie in [1.17549e-38, 3.40282e+38]; got -0.001"),
        (["--lrs", "0.1,abc"], "--lrs: 'abc' is not a number"),
        (["--seeds", "0"], "seeds must lie in [1, 4294967296]; got 0"),
        (["--max-steps", "0"], "max_steps must be at least 1; got 0"),
        (["--clippers", "none,none"], "clippers must list each entry once; got 'none' 2 times"),
        (["--lrs", "0.01,0.01"], "learning_rates must list each entry once; got '0.01' 2 times"),
        (["--datasets", "task,task"], "datasets must list each entry once; got 'task' 2 times"),
        (["--train-limit", "0"], "train_limit (the training examples; the sweep's batches hold 32) must"),
        (["--dev-limit", "0"], "dev_limit must be at least 1; got 0"),
        (["--max-length", "0"], "max_length must be at least 1; got 0"),
        (["--task-train", "0"], "task_train (the training examples; the sweep's batches hold 32) must be at"),
        (["--task-train", "31"], "task_train (the training examples; the sweep's batches hold 32) must"),
        (["--task-length", "10"], "task_length must lie in [50, 400]; got 10"),
    ),
)
def test_sweep_refuses_bad_settings_before_running(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(cli.sweep, "MODEL", TINY_MODEL)
    out = tmp_path / "sweep"
    assert cli.main(["sweep", *TINY_SWEEP, *flags, "--out", str(out)]) == 2
    assert _printed(capsys, f"clipx sweep: {message}")
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, message",
    _named_by_flags(
        (["--steps", "0"], "--steps must be at least 1; got 0"),
        (["--steps", "-5"], "--steps must be at least 1; got -5"),
        (["--seed", "-1"], "seed must lie in [0, 4294967295]; got -1"),
        (["--seed", "4294967296"], "seed must lie in [0, 4294967295]; got 4294967296"),
        (["--seed", "99999999999999999999"], "seed must lie in [0, 4294967295]; got 99999999999999999999"),
        (["--lr", "-1"], "learning_rate must lie in [1.17549e-38, 3.40282e+38]; got -1.0"),
        (["--lr", "nan"], "learning_rate must lie in [1.17549e-38, 3.40282e+38]; got nan"),
        (["--task-length", "10"], "task_length must lie in [50, 400]; got 10"),
    ),
)
def test_demo_refuses_bad_settings_before_training(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(cli, "DEMO_MODEL", TINY_MODEL)
    monkeypatch.setattr(cli, "DEMO_CLIPPERS", cli.DEMO_CLIPPERS[:1])
    out = tmp_path / "demo"
    assert cli.main(["demo", "--steps", "2", *flags, "--out", str(out), "--quiet"]) == 2
    assert _printed(capsys, f"clipx demo: {message}")
    assert not out.exists()


def _out_is_a_file_argv(command, out):
    tiny = {
        "train": ["train", *TINY_TRAIN],
        "resume": ["train", "--resume"],
        "demo": ["demo", "--steps", "1", "--quiet"],
        "sweep": [
            "sweep", "--datasets", "task", "--clippers", "none", "--lrs", "0.1", "--seeds", "1",
            "--task-train", "32", "--max-steps", "1",
        ],
    }  # fmt: skip
    return [*tiny[command], "--out", str(out)]


@pytest.mark.parametrize("command", ["train", "resume", "demo", "sweep"])
@pytest.mark.parametrize("below", [False, True], ids=["file", "below_a_file"])
def test_an_out_path_that_is_a_file_is_refused(tmp_path, capsys, monkeypatch, command, below):
    monkeypatch.setattr(cli, "DEMO_MODEL", TINY_MODEL)
    monkeypatch.setattr(cli, "DEMO_CLIPPERS", cli.DEMO_CLIPPERS[:1])
    monkeypatch.setattr(cli.sweep, "MODEL", TINY_MODEL)
    file = tmp_path / "file"
    file.write_text("")
    assert cli.main(_out_is_a_file_argv(command, file / "run" if below else file)) == 2
    shown = "train" if command == "resume" else command
    assert _printed(capsys, f"clipx {shown}: {file} exists and is not a folder")
    assert file.read_text() == ""


def test_resume_without_a_run_says_there_is_nothing_to_resume(tmp_path, capsys):
    absent = tmp_path / "absent"
    assert cli.main(["train", "--resume", "--out", str(absent), "--quiet"]) == 2
    assert _printed(capsys, f"clipx train: nothing to resume: no config.json in {absent}")


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--lr", "0.5", "--max-steps", "3"], "--lr, --max-steps"),
        (["--clip", "value", "--clip-arg", "max_delta=1"], "--clip, --clip-arg"),
        (["--no-bidirectional", "--preset", "flax-sst2"], "--bidirectional, --preset"),
        (["--seed", "7"], "--seed"),
    ],
)
def test_resume_refuses_settings_given_beside_it(tmp_path, capsys, flags, named):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")  # never read: the flags are refused first
    assert cli.main(["train", "--resume", "--out", str(out), "--quiet", *flags]) == 2
    assert _printed(
        capsys,
        f"clipx train: --resume continues the run in {out} with its saved settings; "
        f"{named} would change them.",
    )
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ('{"lr": ', "(Expecting value"),
        ("[1]", "(not a JSON object)"),
        ('{"lr": 0.1, "max_length": 100}', "(settings this clipx does not take: lr)"),
    ],
    ids=["corrupt", "not_an_object", "unknown_setting"],
)
def test_resume_names_a_config_file_that_holds_no_settings(tmp_path, capsys, content, why):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(content)
    assert cli.main(["train", "--resume", "--out", str(out), "--quiet"]) == 2
    assert _printed(capsys, f"clipx train: {out / 'config.json'} is not a run's settings {why}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_import_clipx_does_not_import_the_workload_dependencies():
    code = "import sys, clipx; print(sorted(m for m in ('flax', 'matplotlib', 'rich') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_resume_refuses_clip_none_given_beside_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY_TRAIN, "--clip", "adaptive", "--stop-after", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--clip", "none", "--out", str(out), "--quiet"]) == 2
    assert _printed(capsys, "--clip would change them")


def test_train_records_the_data_folder_absolute(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (data / name).write_text("sentence\tlabel\n" + "".join(f"word {i}\t{i % 2}\n" for i in range(16)))
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--data", "data", "--cell", "simple", "--embed-dim", "4", "--hidden-size", "4"]
    assert cli.main([*argv, "--batch-size", "4", "--stop-after", "1", "--out", "run", "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == str(data)
    monkeypatch.chdir(tmp_path / "run")  # resumed from another folder
    assert cli.main(["train", "--resume", "--out", ".", "--quiet"]) == 0


def test_plot_out_that_is_a_file_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *TINY_TRAIN, "--max-steps", "1", "--out", str(run)]) == 0
    file = tmp_path / "file"
    file.write_text("")
    capsys.readouterr()
    assert cli.main(["plot", str(run), "--out", str(file)]) == 2
    assert _printed(capsys, f"clipx plot: {file} exists and is not a folder")


def test_a_folder_that_cannot_be_written_is_a_clear_error(tmp_path, capsys, monkeypatch):
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(cli, "_plot_runs", refused)
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert _printed(capsys, f"clipx plot: [Errno 13] Permission denied: '{tmp_path / 'ro'}'")


def test_an_interrupt_ends_with_status_130_and_says_how_to_continue(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "train", interrupted)
    assert cli.main(["train", *TINY_TRAIN, "--out", str(tmp_path / "run")]) == 130
    assert _printed(capsys, "clipx train: interrupted (a train run continues with --resume")


def _main_thread_only():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can be set in the main thread only")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_in_training_a_signal_asks_for_a_stop_and_a_second_one_interrupts(signum, monkeypatch):
    _main_thread_only()
    before = signal.getsignal(signum)
    monkeypatch.setattr(train_lib, "_looping", threading.Event())
    train_lib._looping.set()  # as inside train's loop
    with pytest.raises(KeyboardInterrupt), cli._signals_stop_training():
        os.kill(os.getpid(), signum)
        time.sleep(0.1)  # the handler runs at the next bytecode
        assert train_lib.stop_requested()
        os.kill(os.getpid(), signum)
        time.sleep(5)  # never reached
    assert signal.getsignal(signum) is before
    assert not train_lib.stop_requested()


def test_outside_training_a_signal_interrupts_at_once(tmp_path, monkeypatch):
    """`clipx plot`, or a run's final evaluation, has no step to stop after: status 130 at once."""
    _main_thread_only()
    run = tmp_path / "run"
    assert cli.main(["train", *TINY_TRAIN, "--out", str(run)]) == 0
    draw = cli._plot_runs

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return draw(*args, **kwargs)

    monkeypatch.setattr(cli, "_plot_runs", interrupted)
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "plots")]) == 130
    assert not (tmp_path / "plots").exists() or not list((tmp_path / "plots").glob("*.png"))


def test_a_signal_ignored_at_the_start_stays_ignored():
    """A background job of a non-interactive shell starts with SIGINT ignored."""
    _main_thread_only()
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with cli._signals_stop_training():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("epochs", ["2", "1"], ids=["mid-run", "last step"])
def test_a_stop_request_ends_training_after_the_step_in_progress(tmp_path, monkeypatch, epochs):
    """As a signal during step 3 would: step 3 ends, is checkpointed, and the command ends (130),
    also when step 3 is the run's last."""
    to_python, calls = train_lib._to_python, []

    def asks_at_step_3(metrics):
        calls.append(None)
        if len(calls) == 3:
            train_lib.request_stop()
        return to_python(metrics)

    monkeypatch.setattr(train_lib, "_to_python", asks_at_step_3)
    out = tmp_path / "run"
    monkeypatch.setattr(train_lib, "_looping", threading.Event())
    assert cli.main(["train", *TINY_TRAIN, "--epochs", epochs, "--out", str(out)]) == 130  # 3 steps an epoch
    assert [r["step"] for r in train_lib.read_log(out) if "loss" in r] == [1, 2, 3]
    saved = flax.serialization.msgpack_restore((out / "checkpoint.msgpack").read_bytes())
    assert int(saved["step"]) == 3
    assert not train_lib.stop_requested()


def test_the_clipx_command_ends_an_interrupted_run_without_the_interpreter_teardown(monkeypatch):
    exits = []
    monkeypatch.setattr(cli, "main", lambda: 130)
    monkeypatch.setattr(cli.os, "_exit", exits.append)  # returns, where os._exit ends the process
    with pytest.raises(SystemExit):
        cli.run()
    assert exits == [130]
    monkeypatch.setattr(cli, "main", lambda: 0)
    _main_thread_only()
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.run()
    finally:
        signal.signal(signal.SIGINT, before)  # run() hands an interrupt at exit to the default action
    assert exit_info.value.code == 0


def test_an_interrupt_while_the_finished_command_exits_prints_no_traceback():
    """JAX clears its caches at exit: an interrupt there printed a KeyboardInterrupt traceback and
    ended with status 0. It now ends the process as SIGINT does by default."""
    script = (
        "import atexit, os, signal, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # as in an interactive shell\n"
        "from clipx import cli\n"
        "cli.main = lambda: 0\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(2)))  # runs first\n"
        "cli.run()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr) == (-signal.SIGINT, "")


def test_a_second_sweep_in_the_same_folder_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.sweep, "MODEL", TINY_MODEL)
    with cli.sweep._only_sweep_in(tmp_path):
        assert cli.main(_tiny_sweep_argv(tmp_path)) == 2
    assert _printed(capsys, f"clipx sweep: another clipx sweep is running in {tmp_path}")
    assert not list(tmp_path.iterdir())
    assert cli.main(_tiny_sweep_argv(tmp_path)) == 0  # the lock ends with the sweep holding it


def test_sweep_settings_cover_every_run_in_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(cli.sweep, "MODEL", TINY_MODEL)
    assert cli.main(_tiny_sweep_argv(tmp_path)) == 0  # none at 0.1, one seed
    assert cli.main(_tiny_sweep_argv(tmp_path, "--clippers", "adaptive", "--lrs", "0.01")) == 0
    recorded = json.loads((tmp_path / "settings.json").read_text())["sweep"]
    assert recorded["clippers"] == ["none", "adaptive"] and recorded["learning_rates"] == [0.01, 0.1]
    assert recorded["seeds"] == 1
    table = (tmp_path / "results.md").read_text()
    assert "| task | none | 0.1 |" in table and "| task | adaptive | 0.01 |" in table


def test_plot_of_a_run_that_logged_only_nan_and_of_a_short_run(tmp_path):
    run = tmp_path / "nan"
    run.mkdir()
    lines = [json.dumps({"step": step, "loss": None, "grad_norm": None}) for step in (1, 2, 3)]
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    assert cli.main(["plot", str(run)]) == 0
    assert sorted(p.name for p in run.glob("*.png")) == ["grad_norm.png", "loss.png"]


def test_plot_of_a_log_missing_a_threshold_draws_it_as_a_gap(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"step": 1, "loss": 0.5, "adaptive/norm": 2.0, "adaptive/threshold": 1.0, "adaptive/clipped": 1.0},
        {"step": 2, "loss": 0.4, "adaptive/norm": 0.5},  # written by hand, or by another tool
    ]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli.main(["plot", str(run)]) == 0
    assert (run / "threshold.png").is_file()


@pytest.mark.parametrize(
    ("lengths", "legend"),
    [
        ((5, 3), "per step"),
        ((40, 3), "faint: per step; solid: 10-step mean (as logged up to 10 steps)"),
        ((40, 10), "faint: per step; solid: 10-step mean (as logged up to 10 steps)"),
        ((10,), "per step"),  # a 10-step mean of 10 steps is one point: no line
        ((40, 12), "faint: per step; solid: 10-step mean"),
    ],
)
def test_the_legend_says_which_runs_are_smoothed(tmp_path, monkeypatch, lengths, legend):
    shown = {}
    finish = lambda *args, legend_title, **kwargs: shown.update(t=legend_title)  # noqa: E731
    monkeypatch.setattr(cli.plots, "_finish_step_plot", finish)
    runs = {f"run{n}": [{"step": s, "loss": 1.0 / s} for s in range(1, n + 1)] for n in lengths}
    cli.plots.plot_losses(runs, tmp_path / "loss.png", "title")
    assert shown["t"] == legend


def test_step_axes_of_a_short_run_tick_whole_steps_only(tmp_path, monkeypatch):
    ticks = []
    finish = cli.plots._finish_step_plot

    def spy(fig, ax, *args, **kwargs):
        finish(fig, ax, *args, **kwargs)
        ticks.extend(ax.get_xticks())

    monkeypatch.setattr(cli.plots, "_finish_step_plot", spy)
    runs = {"run": [{"step": step, "loss": 1.0 / step} for step in (1, 2, 3)]}
    cli.plots.plot_losses(runs, tmp_path / "loss.png", "title")
    assert ticks and all(float(tick).is_integer() for tick in ticks), ticks


def _saved_figures(monkeypatch):
    figures = []
    monkeypatch.setattr(cli.plots.Figure, "savefig", lambda fig, *args, **kwargs: figures.append(fig))
    return figures


def _records(steps):
    return [
        {"step": s, "loss": 1.0 / s, "grad_norm": 2.0, "dev_accuracy": 0.5, "adaptive/norm": 2.0,
         "adaptive/threshold": 1.0, "adaptive/clipped": 1.0}
        for s in range(1, steps + 1)
    ]  # fmt: skip


def test_plot_labels_and_titles_are_drawn_as_written(tmp_path, monkeypatch):
    """Before, a folder named `a$x^$` crashed matplotlib's math parser after training, and a label
    starting with `_` (a folder `_baseline`) was left out of every legend."""
    figures = _saved_figures(monkeypatch)
    runs = {"_baseline": _records(30), "a$x^$": _records(30), "cost $1 vs $2": _records(30)}
    cli.plots.plot_runs(runs, tmp_path, "data $HOME, seed 0")
    assert len(figures) == 6  # loss, grad norm, dev accuracy, three thresholds
    for fig in figures[:3]:
        (ax,) = fig.axes
        legend = [text.get_text() for text in ax.get_legend().get_texts()]
        assert legend == ["_baseline", r"a\$x^\$", r"cost \$1 vs \$2"]
        assert ax.get_title().endswith(r"data \$HOME, seed 0")
    for fig in figures:
        fig.canvas.draw()  # what crashed: the text's layout


def test_long_plot_titles_are_wrapped_to_the_figure(tmp_path, monkeypatch):
    figures = _saved_figures(monkeypatch)
    setting = ", ".join(["50-word temporal order", "LSTM", "SGD+momentum 0.9 lr 0.1"] + ["max_norm=0.5"] * 8)
    cli.plots.plot_losses({"run": _records(30)}, tmp_path / "loss.png", f"Training loss\n{setting}")
    (fig,) = figures
    lines = fig.axes[0].get_title().split("\n")
    assert len(lines) > 2 and all(len(line) <= 80 for line in lines)
    assert " ".join(lines[1:]) == setting


def test_a_one_step_run_is_drawn_on_whole_steps(tmp_path, monkeypatch):
    """Before, a line through one point drew nothing, and the step ticks were 0.945, 0.960..."""
    figures = _saved_figures(monkeypatch)
    cli.plots.plot_runs({"run": _records(1)}, tmp_path, "setting")
    for fig in figures:
        (ax,) = fig.axes
        assert all(line.get_marker() not in (None, "None", "") for line in ax.get_lines())
        fig.canvas.draw()
        assert all(float(tick).is_integer() for tick in ax.get_xticks()), ax.get_xticks()


def test_eleven_runs_or_more_are_told_apart_by_line_style(tmp_path, monkeypatch):
    figures = _saved_figures(monkeypatch)
    runs = {f"run{i}": _records(30) for i in range(12)}
    cli.plots.plot_losses(runs, tmp_path / "loss.png", "title")
    cli.plots.plot_dev_accuracy(runs, tmp_path / "dev.png", "title")
    for fig in figures:
        legend = fig.axes[0].get_legend()
        styles = [(handle.get_color(), handle.get_linestyle()) for handle in legend.legend_handles]
        assert len(set(styles)) == 12


def test_step_plots_mark_where_a_run_diverged(tmp_path, monkeypatch):
    """Before, a diverged run's curve just ended, as if the run had stopped."""
    figures = []
    monkeypatch.setattr(cli.plots.Figure, "savefig", lambda fig, *args, **kwargs: figures.append(fig))
    runs = {
        "a": [{"step": i, "loss": 1.0 / i if i < 4 else None} for i in range(1, 6)],
        "b": [{"step": i, "loss": 0.5} for i in range(1, 6)],
    }
    cli.plots.plot_losses(runs, tmp_path / "loss.png", "title")
    (ax,) = figures[0].axes
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["a (not finite from step 4)", "b"]
    (mark,) = ax.texts
    assert mark.get_text() == "×" and mark.xy[0] == 4


@pytest.mark.parametrize("diverged_at", [2, 6, 22])
def test_the_mark_of_an_early_divergence_is_inside_the_axes(tmp_path, monkeypatch, diverged_at):
    """Before, the limits covered the finite points only: an × at step 6 or 11 fell past the right edge."""
    figures = _saved_figures(monkeypatch)
    records = [{"step": i, "loss": 0.7 if i < diverged_at else None} for i in range(1, diverged_at + 1)]
    cli.plots.plot_losses({"a": records}, tmp_path / "loss.png", "title")
    (ax,) = figures[0].axes
    (mark,) = ax.texts
    low, high = ax.get_xlim()
    assert low + 0.02 * (high - low) <= mark.xy[0] == diverged_at <= high - 0.02 * (high - low)


def test_sweep_plot_shows_every_divergence(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(cli.plots.Figure, "savefig", lambda fig, *args, **kwargs: figures.append(fig))
    nan = math.nan
    table = {
        "imdb": {
            "none": {1e-3: [0.8, 0.9, 0.85], 1e-2: [nan, 0.7, nan], 1e-1: [nan, nan, nan]},
            "adaptive": {1e-3: [0.8, 0.8, 0.8], 1e-2: [0.8, 0.8, 0.8], 1e-1: [0.7, 0.7, 0.7]},
        },
        "task": {"none": {1e-3: [nan]}},
    }
    cli.plots.plot_sweep(table, tmp_path / "sweep.png", "title")
    (fig,) = figures
    imdb, task, imdb_strip, task_strip = fig.axes
    (none, _) = imdb.get_lines()
    np.testing.assert_allclose(none.get_ydata(), [0.85, 0.7, nan])  # the line breaks where all diverged
    assert [tick.get_text() for tick in imdb_strip.get_yticklabels()] == ["none"]
    assert [text.get_text() for text in imdb_strip.texts] == ["2/3", "3/3"]
    assert [line.get_xdata()[0] for line in imdb_strip.get_lines()] == [1e-2, 1e-1]
    assert [text.get_text() for text in task.texts] == ["every run diverged"]
    assert [text.get_text() for text in task_strip.texts] == ["1/1"]


def test_sweep_plot_gives_a_clipper_one_colour_in_every_panel(tmp_path, monkeypatch):
    # The panels may show different clippers (a folder extended clipper by clipper).
    figures = []
    monkeypatch.setattr(cli.plots.Figure, "savefig", lambda fig, *args, **kwargs: figures.append(fig))
    table = {
        "imdb": {"none": {0.1: [0.5]}, "global_norm 1": {0.1: [0.6]}, "adaptive": {0.1: [0.7]}},
        "task": {"none": {0.1: [0.5]}, "adaptive": {0.1: [0.9]}},
    }
    cli.plots.plot_sweep(table, tmp_path / "sweep.png", "title")
    (fig,) = figures
    colours = {}
    for ax, (dataset, by_clipper) in zip(fig.axes[: len(table)], table.items(), strict=True):
        legend = [text.get_text() for text in ax.get_legend().get_texts()]
        assert legend == list(by_clipper), dataset  # each panel names what it shows
        for line in ax.get_lines():
            colour = colours.setdefault(line.get_label(), line.get_color())
            assert colour == line.get_color(), line.get_label()
    assert len(set(colours.values())) == 3


def test_brackets_in_data_and_paths_are_printed_as_they_are(tmp_path, capsys):
    # Printed as rich markup before: "[/sic]" closed no tag and the error handler itself raised
    # a MarkupError; a run in a folder named "run[/b]" crashed on its table after training.
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text('sentence\tlabel\ngood\t1\nthe "best" [sic] film\t1 [/sic]\n')
    (data / "dev.tsv").write_text("sentence\tlabel\ngood\t1\n")
    assert cli.main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert _printed(capsys, "train.tsv:3: label '1 [/sic]' is not")
    out = tmp_path / "run[/b]"
    assert cli.main(["train", *TINY_TRAIN, "--max-steps", "1", "--out", str(out)]) == 0
    assert _printed(capsys, f"clipx train → {out}")


def test_duplicate_and_unknown_clipper_arguments_are_named(tmp_path, capsys):
    argv = ["train", *TINY_TRAIN, "--out", str(tmp_path / "run"), "--clip", "global_norm"]
    assert cli.main([*argv, "--clip-arg", "max_norm=1", "--clip-arg", "max_norm=2"]) == 2
    assert _printed(capsys, "clipper argument 'max_norm' is given twice")
    assert cli.main([*argv, "--clip-arg", "foo=1"]) == 2
    assert _printed(capsys, "has no argument 'foo'")  # not "missing a required argument: 'max_norm'"


def test_sweep_checks_the_data_of_every_dataset_before_its_first_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli.sweep, "MODEL", TINY_MODEL)
    argv = [
        "sweep", "--out", str(tmp_path / "sweep"), "--datasets", "task,imdb", "--clippers", "none",
        "--lrs", "0.1", "--seeds", "1", "--task-train", "32", "--max-steps", "1",
        "--data-root", str(tmp_path / "nowhere"),
    ]  # fmt: skip
    assert cli.main(argv) == 2
    assert _printed(capsys, f"{tmp_path / 'nowhere' / 'imdb' / 'train.tsv'}: file not found")
    assert not list((tmp_path / "sweep").glob("task__*.json"))  # no task run before the refusal


def test_one_datasets_half_of_a_sweep_extends_without_the_other_halfs_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli.sweep, "MODEL", TINY_MODEL)
    imdb = tmp_path / "data" / "imdb"
    imdb.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        (imdb / name).write_text("sentence\tlabel\n" + "".join(f"word {i} w\t{i % 2}\n" for i in range(40)))
    out = tmp_path / "sweep"
    argv = [*_tiny_sweep_argv(out, "--data-root", str(tmp_path / "data")), "--max-length", "16"]
    assert cli.main([*argv, "--datasets", "imdb,task"]) == 0
    more_seeds = _tiny_sweep_argv(out, "--data-root", str(tmp_path / "data"), "--seeds", "2")
    assert cli.main(more_seeds) == 0  # the task half alone: IMDB's --max-length binds none of its runs
    recorded = json.loads((out / "settings.json").read_text())["sweep"]
    assert recorded["datasets"] == ["imdb", "task"]
    assert recorded["max_length"] == 16  # still the setting of IMDB's runs
    assert len(list(out.glob("task__*.json"))) == 2 and len(list(out.glob("imdb__*.json"))) == 1
    capsys.readouterr()
    assert cli.main([*more_seeds, "--datasets", "imdb"]) == 2  # the IMDB half without its settings
    assert _printed(capsys, "max_length: 16 there, 128 now")
    assert cli.main([*more_seeds, "--datasets", "imdb", "--max-length", "16"]) == 0
    assert cli.main([*more_seeds, "--task-length", "60"]) == 2  # the task half's own settings still bind


def test_sweep_reports_each_runs_place_in_the_grid_and_the_time_left(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli.sweep, "MODEL", TINY_MODEL)
    assert cli.main(_tiny_sweep_argv(tmp_path, "--clippers", "none,value 0.01")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    first = r"\[1/2\] task__none__lr0\.1__seed0\.json: [\d.]+% \(\d+ s; about \d+ s left\)"
    assert re.fullmatch(first, lines[0])
    assert re.fullmatch(r"\[2/2\] task__value_0\.01__lr0\.1__seed0\.json: [\d.]+% \(\d+ s\)", lines[1])
    assert cli.main(_tiny_sweep_argv(tmp_path, "--clippers", "none,value 0.01", "--seeds", "2")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert [line.split(": ")[1].split(" (")[1] for line in lines[:2]] == ["done before)", "done before)"]
    assert lines[2].startswith("[3/4] task__none__lr0.1__seed1.json") and "left)" in lines[2]
    assert lines[3].startswith("[4/4] ") and "left" not in lines[3]


def test_durations_read_as_a_person_would_say_them():
    assert [cli._duration(s) for s in (4.2, 59, 60, 750, 5399, 5400, 9000)] == [
        "4 s", "59 s", "1 min", "12 min", "90 min", "1.5 h", "2.5 h"
    ]  # fmt: skip


def _plotted(monkeypatch):
    """The axes each plot function hands to `_finish_step_plot`."""
    axes = []
    monkeypatch.setattr(cli.plots, "_finish_step_plot", lambda fig, ax, *args, **kwargs: axes.append(ax))
    return axes


def test_the_plots_draw_what_they_say(tmp_path, monkeypatch):
    axes = _plotted(monkeypatch)
    records = [
        {"step": s, "loss": 1.0 / s, "grad_norm": 10.0 * s, "adaptive/norm": 2.0 * s,
         "adaptive/threshold": 3.0, "adaptive/clipped": float(2.0 * s > 3.0)}
        for s in (1, 2, 3)
    ] + [{"step": 3, "dev_accuracy": 0.75}]  # fmt: skip
    cli.plots.plot_grad_norms({"run": records}, tmp_path / "g.png", "title")
    np.testing.assert_array_equal(axes[-1].lines[0].get_ydata(), [10.0, 20.0, 30.0])
    cli.plots.plot_dev_accuracy({"run": records}, tmp_path / "d.png", "title")
    np.testing.assert_array_equal(axes[-1].lines[0].get_ydata(), [75.0])  # in percent
    cli.plots.plot_threshold(records, "adaptive", tmp_path / "t.png", "title")
    (marked,) = axes[-1].collections
    np.testing.assert_array_equal(marked.get_offsets(), [[2.0, 4.0], [3.0, 6.0]])  # the clipped steps only
