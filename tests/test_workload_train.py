"""The training loop: clipper lookup, logging, divergence, checkpoints and exact resumption."""

import dataclasses
import json
import re

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clipx
from clipx.workload import data as data_lib
from clipx.workload import train as train_lib
from clipx.workload.train import TrainConfig, load_data, make_clipper, read_log, train

TINY = dict(
    task_length=50,
    task_train=64,
    task_dev=32,
    model=dict(cell="simple", embed_dim=8, hidden_size=8),
    batch_size=16,
    epochs=2,
    checkpoint_every=3,
)


def _write_data_folder(folder):
    """train.tsv and dev.tsv of 20 sentences each."""
    for name in ("train.tsv", "dev.tsv"):
        rows = "".join(f"{'good' if i % 2 else 'bad'} film {i}\t{i % 2}\n" for i in range(20))
        (folder / name).write_text("sentence\tlabel\n" + rows)


def test_one_logit_with_more_than_two_classes_names_the_data(tmp_path):
    _write_data_folder(tmp_path)
    with (tmp_path / "train.tsv").open("a") as train_file:
        train_file.write("fine\t2\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\t2\n")
    config = TrainConfig(data=str(tmp_path), model=dict(TINY["model"], single_logit=True), batch_size=4)
    with pytest.raises(
        ValueError, match=f"single_logit needs two classes .* labels of {tmp_path} go up to 2"
    ):
        train(config)


def test_unknown_clipper_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown clipper 'nope'; available: none, .*global_norm"):
        make_clipper("nope")


def test_clipper_arguments_are_checked_against_the_signature():
    with pytest.raises(ValueError, match=r"bad arguments for clipx\.global_norm"):
        make_clipper("global_norm", {"threshold_typo": 1.0})
    assert make_clipper("none") is None


def test_clipper_values_it_refuses_are_value_errors():
    # clipx's own check raises TypeError for a value of the wrong type; the CLI prints ValueErrors.
    with pytest.raises(ValueError, match=r"^clipx\.value: max_delta must be a real number"):
        make_clipper("value", {"max_delta": "abc"})


def test_config_rejects_unknown_tokenizer():
    with pytest.raises(ValueError, match="tokenizer must be one of words, whitespace; got 'chars'"):
        TrainConfig(tokenizer="chars")


NAN, INF = float("nan"), float("inf")
BAD_SETTINGS = [
    ("learning_rate", -1.0, "learning_rate must lie in [1.17549e-38, 3.40282e+38]; got -1.0"),
    ("learning_rate", 0.0, "learning_rate must lie in [1.17549e-38, 3.40282e+38]; got 0.0"),
    (
        "learning_rate",
        1e-50,
        "learning_rate must lie in [1.17549e-38, 3.40282e+38]; got 1e-50",
    ),  # 0 in float32
    ("learning_rate", NAN, "learning_rate must lie in [1.17549e-38, 3.40282e+38]; got nan"),
    ("learning_rate", INF, "learning_rate must lie in [1.17549e-38, 3.40282e+38]; got inf"),
    (
        "learning_rate",
        1e39,
        "learning_rate must lie in [1.17549e-38, 3.40282e+38]; got 1e+39",
    ),  # ∞ in float32
    ("momentum", 1.5, "momentum must lie in [0, 1); got 1.5"),
    ("momentum", 1.0, "momentum must lie in [0, 1); got 1.0"),
    ("momentum", -0.1, "momentum must lie in [0, 1); got -0.1"),
    ("momentum", NAN, "momentum must lie in [0, 1); got nan"),
    ("weight_decay", -1.0, "weight_decay must lie in [0, 3.40282e+38]; got -1.0"),
    ("weight_decay", NAN, "weight_decay must lie in [0, 3.40282e+38]; got nan"),
    ("weight_decay", INF, "weight_decay must lie in [0, 3.40282e+38]; got inf"),
    ("weight_decay", 1e39, "weight_decay must lie in [0, 3.40282e+38]; got 1e+39"),
    ("max_steps", -3, "max_steps must be at least 1; got -3"),
    ("max_steps", 0, "max_steps must be at least 1; got 0"),
    ("eval_every", 0, "eval_every must be at least 1; got 0"),
    ("train_limit", 0, "train_limit must be at least 1; got 0"),
    ("dev_limit", 0, "dev_limit must be at least 1; got 0"),
    ("max_length", 0, "max_length must be at least 1; got 0"),
    ("pad_multiple", 0, "pad_multiple must be at least 1; got 0"),
    ("task_train", 0, "task_train must be at least 1; got 0"),
    ("task_dev", 0, "task_dev must be at least 1; got 0"),
    ("task_length", 49, "task_length must lie in [50, 400]; got 49"),
    ("task_length", 401, "task_length must lie in [50, 400]; got 401"),
    ("min_count", 0, "min_count must be at least 1; got 0"),
    ("seed", -1, "seed must lie in [0, 4294967295]; got -1"),
    ("seed", 2**32, "seed must lie in [0, 4294967295]; got 4294967296"),  # JAX's key of seed 0
    ("seed", 10**20, "seed must lie in [0, 4294967295]; got 100000000000000000000"),
    ("max_vocab", 1, "max_vocab must be at least 2; got 1"),
    ("max_vocab", 0, "max_vocab must be at least 2; got 0"),
]


@pytest.mark.parametrize(
    "name, value, message", BAD_SETTINGS, ids=[f"{name}={value}" for name, value, _ in BAD_SETTINGS]
)
def test_config_rejects_settings_out_of_range(name, value, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        TrainConfig(**{name: value})


def test_config_accepts_the_edges_of_the_ranges():
    TrainConfig(learning_rate=1e-30, momentum=0.0, weight_decay=0.0, seed=0, max_steps=1, eval_every=1)
    TrainConfig(task_length=50, train_limit=1, dev_limit=1, max_length=1, pad_multiple=1, task_dev=1)
    TrainConfig(task_length=400, momentum=0.999, seed=2**32 - 1, max_vocab=2)
    TrainConfig(boundaries=True, max_vocab=4)


def test_max_vocab_counts_the_boundary_tokens():
    with pytest.raises(ValueError, match=r"^max_vocab must be at least 4; got 3$"):
        TrainConfig(boundaries=True, max_vocab=3)


def test_train_rejects_stop_after_below_1_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"^stop_after must be at least 1; got 0$"):
        train(TrainConfig(**TINY), tmp_path / "run", stop_after=0)
    assert not (tmp_path / "run").exists()


def test_train_refuses_an_output_path_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(ValueError, match=r"file exists and is not a folder$"):
            train(TrainConfig(**TINY), out)


def test_resume_without_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^nothing to resume: no checkpoint\.msgpack in "):
        train(TrainConfig(**TINY), tmp_path, resume=True)
    (tmp_path / "checkpoint.msgpack").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"^nothing to resume: no config\.json in "):
        train(TrainConfig(**TINY), tmp_path, resume=True)


@pytest.mark.parametrize("name", ["agc", "zclip", "adaptive"])
def test_adaptive_and_relative_clippers_train(name):
    """Under strict dtype promotion too: with momentum, as optax.adam does not pass it (optax 0.2.8)."""
    with jax.numpy_dtype_promotion("strict"):
        summary = train(TrainConfig(**{**TINY, "max_steps": 2}, clip=name, optimizer="momentum"))
    assert summary["steps"] == 2


def test_logs_stats_every_step_and_evaluates(tmp_path):
    config = TrainConfig(**TINY, clip="global_norm", clip_args={"max_norm": 0.5})
    summary = train(config, tmp_path)
    records = read_log(tmp_path)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(r["global_norm/threshold"] == 0.5 for r in steps)
    assert [r["step"] for r in records if "dev_accuracy" in r] == [4, 8]
    assert summary["finished"] and not summary["diverged"] and 0.0 <= summary["dev_accuracy"] <= 1.0
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 8


@pytest.mark.parametrize(
    "clip, clip_args",
    [("global_norm", {"max_norm": 1.0}), ("adaptive", {"warmup_factor": 1.0, "direction_rate": 0.2})],
    ids=["global_norm", "adaptive_direction"],  # the latter keeps a parameter-sized gradient in its state
)
def test_resume_gives_exactly_the_uninterrupted_run(tmp_path, clip, clip_args):
    config = TrainConfig(**TINY, optimizer="momentum", clip=clip, clip_args=clip_args)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(config, whole)
    stopped = train(config, parts, stop_after=5)
    assert stopped["steps"] == 5 and not stopped["finished"]
    assert not (parts / "summary.json").exists()
    train(config, parts, resume=True)
    assert read_log(parts) == read_log(whole)
    a = flax.serialization.msgpack_restore((whole / "checkpoint.msgpack").read_bytes())
    b = flax.serialization.msgpack_restore((parts / "checkpoint.msgpack").read_bytes())
    assert a.pop("seconds") > 0 and b.pop("seconds") > 0  # wall times: the rest is the run
    for x, y in zip(
        flax.traverse_util.flatten_dict(a).values(), flax.traverse_util.flatten_dict(b).values(), strict=True
    ):
        np.testing.assert_array_equal(x, y)


def test_a_resumed_run_counts_the_time_of_its_earlier_part(tmp_path, monkeypatch):
    """Before, a resumed run's summary gave the time of the resumed part alone."""
    readings = []

    def perf_counter():  # each part of the run takes 1000 s
        readings.append(None)
        return 0.0 if len(readings) == 1 else 1000.0

    monkeypatch.setattr(train_lib, "time", type("Clock", (), {"perf_counter": staticmethod(perf_counter)}))
    config = TrainConfig(**TINY)
    assert train(config, tmp_path, stop_after=3)["seconds"] == 1000.0
    readings.clear()
    assert train(config, tmp_path, resume=True)["seconds"] == 2000.0


def test_resume_takes_a_checkpoint_written_before_it_kept_the_time(tmp_path):
    config = TrainConfig(**TINY)
    train(config, tmp_path / "parts", stop_after=2)
    checkpoint = tmp_path / "parts" / "checkpoint.msgpack"
    saved = flax.serialization.msgpack_restore(checkpoint.read_bytes())
    del saved["seconds"]
    checkpoint.write_bytes(flax.serialization.msgpack_serialize(saved))
    assert train(config, tmp_path / "parts", resume=True)["finished"]
    train(config, tmp_path / "whole")
    assert read_log(tmp_path / "parts") == read_log(tmp_path / "whole")


def test_resume_refuses_other_settings(tmp_path):
    train(TrainConfig(**TINY), tmp_path, stop_after=2)
    with pytest.raises(ValueError, match="differs from the requested settings"):
        train(TrainConfig(**{**TINY, "seed": 1}), tmp_path, resume=True)


def test_resume_takes_an_older_config_that_lacks_a_setting(tmp_path):
    """Before, a config.json written before a setting existed was refused as other settings."""
    config = TrainConfig(**TINY)
    train(config, tmp_path, stop_after=2)
    recorded = json.loads((tmp_path / "config.json").read_text())
    del recorded["pad_multiple"]  # at its default
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    assert train(train_lib.read_config(tmp_path / "config.json"), tmp_path, resume=True)["finished"]


def test_resume_refuses_a_checkpoint_whose_state_does_not_fit(tmp_path):
    # A checkpoint of the previous adaptive defaults (no direction state) under the current ones.
    previous = TrainConfig(**TINY, clip="adaptive", clip_args={"direction_rate": None, "warmup_factor": 4.0})
    train(previous, tmp_path, stop_after=2)
    config = json.loads((tmp_path / "config.json").read_text())
    config["clip_args"] = {}  # as recorded by a clipx whose adaptive() had those defaults
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not fit this run's parameters and optimizer state.*defaults"):
        train(TrainConfig(**TINY, clip="adaptive"), tmp_path, resume=True)
    # Same tree, other shapes: flax would restore it silently.
    other = tmp_path / "other"
    train(TrainConfig(**TINY), other, stop_after=2)
    wider = TrainConfig(**{**TINY, "model": {**TINY["model"], "hidden_size": 16}})
    config = json.loads((other / "config.json").read_text())
    config["model"]["hidden_size"] = 16
    (other / "config.json").write_text(json.dumps(config))
    shapes = r"holds float32\[8, 2\] at .*\['kernel'\] where this run has float32\[16, 2\]"
    with pytest.raises(ValueError, match=shapes):
        train(wider, other, resume=True)


def test_non_finite_loss_marks_the_run_diverged(tmp_path, monkeypatch):
    # An infinite step makes the parameters infinite or NaN, on any processor (a merely huge
    # one, 1e30, left the loss finite but near 1e30 on some: the saturated tanh RNN absorbs it).
    # TrainConfig refuses an infinite learning rate, so the optimizer is replaced.
    monkeypatch.setattr(train_lib, "make_optimizer", lambda config: optax.sgd(float("inf")))
    summary = train(TrainConfig(**TINY), tmp_path)
    assert summary["diverged"] and summary["dev_accuracy"] is None
    assert summary["steps"] < 8


@pytest.mark.parametrize("max_steps", [1, 4])
def test_a_last_step_that_breaks_the_weights_is_a_divergence(tmp_path, monkeypatch, max_steps):
    # The first step's loss is finite, its update is not: with one step the run ends before any
    # training loss shows it, and only the final evaluation does (with 4 steps per epoch, the
    # epoch's evaluation or the next step's loss).
    monkeypatch.setattr(train_lib, "make_optimizer", lambda config: optax.sgd(float("inf")))
    summary = train(TrainConfig(**{**TINY, "max_steps": max_steps}), tmp_path)
    assert summary["diverged"] and summary["finished"]
    assert summary["dev_accuracy"] is None and summary["dev_loss"] is None
    assert json.loads((tmp_path / "summary.json").read_text())["diverged"]


def test_reads_a_data_folder(tmp_path):
    _write_data_folder(tmp_path)
    summary = train(TrainConfig(**{**TINY, "data": str(tmp_path), "batch_size": 8}))
    assert summary["steps"] == 4


def test_flax_head_and_boundaries_train_on_a_data_folder(tmp_path):
    _write_data_folder(tmp_path)
    model = {**TINY["model"], "single_logit": True}
    config = TrainConfig(
        **{**TINY, "data": str(tmp_path), "batch_size": 8, "boundaries": True, "model": model}
    )
    data = load_data(config)
    assert data.vocab.tokens[2:4] == ["<s>", "</s>"]
    assert all(ids[0] == 2 and ids[-1] == 3 for ids in data.train.ids)
    summary = train(config)
    assert summary["steps"] == 4 and summary["finished"] and np.isfinite(summary["train_loss"])


def _strict_json(text):
    """``json.loads`` that refuses NaN and infinities, as JSON parsers other than Python's do."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _diverges_on_the_dev_set(monkeypatch):
    # The first step's loss is finite, its update is not: the first evaluation's loss is not finite.
    monkeypatch.setattr(train_lib, "make_optimizer", lambda config: optax.sgd(float("inf")))
    return TrainConfig(**{**TINY, "eval_every": 1})


def test_a_run_stopped_by_its_dev_loss_stays_stopped_on_resume(tmp_path, monkeypatch):
    config = _diverges_on_the_dev_set(monkeypatch)
    summary = train(config, tmp_path)
    assert summary["diverged"] and summary["steps"] == 1
    log = (tmp_path / "log.jsonl").read_text()
    assert train(config, tmp_path, resume=True)["steps"] == 1
    assert (tmp_path / "log.jsonl").read_text() == log


def test_run_files_are_strict_json(tmp_path, monkeypatch):
    train(_diverges_on_the_dev_set(monkeypatch), tmp_path)
    records = [_strict_json(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records[-1]["dev_loss"] is None  # not finite
    _strict_json((tmp_path / "summary.json").read_text())
    _strict_json((tmp_path / "config.json").read_text())
    assert np.isnan(read_log(tmp_path)[-1]["dev_loss"])  # read back as NaN


def test_a_run_stopped_early_is_not_judged_on_an_evaluation_the_whole_run_does_not_make(
    tmp_path, monkeypatch
):
    # The first step breaks the weights; the whole run finds it at step 2, from its training loss.
    monkeypatch.setattr(train_lib, "make_optimizer", lambda config: optax.sgd(float("inf")))
    whole = train(TrainConfig(**TINY), tmp_path / "whole")
    assert whole["diverged"] and whole["steps"] == 2
    # Before, the summary of the run stopped after step 1 said diverged and finished, and its
    # resume trained on all the same.
    stopped = train(TrainConfig(**TINY), tmp_path / "parts", stop_after=1)
    assert not stopped["diverged"] and not stopped["finished"] and stopped["dev_accuracy"] is None
    assert not (tmp_path / "parts" / "summary.json").exists()
    resumed = train(TrainConfig(**TINY), tmp_path / "parts", resume=True)
    assert {k: resumed[k] for k in ("steps", "diverged", "finished")} == {
        k: whole[k] for k in ("steps", "diverged", "finished")
    }
    assert (tmp_path / "parts" / "log.jsonl").read_text() == (tmp_path / "whole" / "log.jsonl").read_text()


@pytest.mark.parametrize(
    ("args", "kept"),
    [
        ({"max_norm": 0.01, "ord": float("inf")}, {"max_norm": 0.01, "ord": "inf"}),
        ({"max_norm": np.float32(0.5)}, {"max_norm": 0.5}),
        ({"max_norm": jnp.asarray(2.0)}, {"max_norm": 2.0}),
        ({"max_norm": np.int64(3)}, {"max_norm": 3}),
    ],
    ids=["ord-inf", "numpy", "jax", "numpy-int"],
)
def test_clipper_arguments_set_in_python_come_back_from_the_config_file(tmp_path, args, kept):
    """Before, ord=inf was written as null (a resume from the command line clipped by the L2
    norm), and a NumPy or JAX scalar failed to be written, after the folder's checkpoint had been
    removed."""
    config = TrainConfig(**TINY, clip="global_norm", clip_args=args)
    assert config.clip_args == kept and all(type(config.clip_args[k]) is type(v) for k, v in kept.items())
    train(config, tmp_path, stop_after=2)
    assert train_lib.read_config(tmp_path / "config.json") == config
    assert train(config, tmp_path, resume=True)["finished"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"max_norm": float("inf")}, "clip_args max_norm=inf: not a finite number"),
        ({"max_norm": 1e39}, "clip_args max_norm=1e+39: beyond float32's range"),
        ({"axis": (0, float("nan"))}, "clip_args axis=(0, nan): not a finite number"),
        ({"max_norm": object}, "clip_args max_norm=<class 'object'>: a type, not a number, string"),
        ({"max_norm": np.ones(2)}, "clip_args max_norm=array([1., 1.]): a ndarray, not a number"),
        ({1: 2.0}, "clip_args must be a dict of argument names to values; got {1: 2.0}"),
    ],
    ids=["inf", "past-float32", "nan-in-tuple", "class", "array", "key"],
)
def test_clipper_arguments_json_cannot_keep_are_refused_when_the_config_is_made(tmp_path, args, message):
    train(TrainConfig(**TINY), tmp_path, stop_after=2)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        TrainConfig(**TINY, clip="global_norm", clip_args=args)
    assert (tmp_path / "checkpoint.msgpack").exists()  # the run in the folder is intact


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("epochs", 1.5, "epochs must be an integer; got 1.5"),
        ("max_steps", 2.5, "max_steps must be an integer; got 2.5"),
        ("batch_size", 16.0, "batch_size must be an integer; got 16.0"),
        ("seed", True, "seed must be an integer; got True"),
        ("epochs", None, "epochs must be an integer; got None"),
        ("learning_rate", True, "learning_rate must be a real number; got True"),
        ("momentum", "0.9", "momentum must be a real number; got '0.9'"),
        ("learning_rate", 10**400, "learning_rate must lie in [1.17549e-38, 3.40282e+38]; got inf"),
        ("boundaries", "no", "boundaries must be True or False; got 'no'"),
        ("boundaries", 0, "boundaries must be True or False; got 0"),
        ("data", 3, "data must be a path; got 3"),
        ("clip", "clip_by_norm", "unknown clipper 'clip_by_norm'; available: none, adagc, "),
        ("clip", ["value"], "unknown clipper ['value']; available: none, adagc, "),
        ("optimizer", ["adam"], "optimizer must be one of sgd, "),
        ("model", [], "model must be a dict of ModelConfig settings; got []"),
        ("model", {"vocab_size": 10}, "model settings a run does not take: vocab_size (vocab_size and"),
        ("model", {"hidden": 10}, "model settings a run does not take: hidden (vocab_size and"),
        ("model", {"hidden_size": 64.5}, "model: hidden_size must be an integer; got 64.5"),
        ("model", {"hidden_size": 0}, "model: hidden_size must be a positive integer; got 0"),
        ("model", {"bidirectional": "yes"}, "model: bidirectional must be True or False; got 'yes'"),
        ("model", {"cell": "LSTM"}, "model: cell must be one of lstm, gru, simple; got 'LSTM'"),
        ("model", {"dropout": "0.5"}, "model: dropout must be a real number; got '0.5'"),
        ("model", {"embed_init_std": True}, "model: embed_init_std must be a real number; got True"),
    ],
)
def test_settings_of_the_wrong_type_are_refused(setting, value, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        TrainConfig(**{**TINY, setting: value})


def test_numpy_settings_become_python_values(tmp_path):
    model = {"hidden_size": np.int64(8), "bidirectional": np.bool_(True), "dropout": np.float32(0.25)}
    numpy = {"epochs": np.int64(2), "learning_rate": np.float32(0.5), "boundaries": np.bool_(True)}
    config = TrainConfig(**{**TINY, **numpy, "model": model, "data": tmp_path})
    assert type(config.epochs) is int and type(config.learning_rate) is float and config.boundaries is True
    assert config.model == {"hidden_size": 8, "bidirectional": True, "dropout": 0.25}
    assert [type(v) for v in config.model.values()] == [int, bool, float]
    assert config.data == str(tmp_path)
    assert TrainConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


@pytest.mark.parametrize("damage", ["extra-byte", "cut-short", "empty", "dtype-name"])
def test_a_corrupt_checkpoint_is_named_as_such_in_a_short_message(tmp_path, damage):
    train(TrainConfig(**TINY), tmp_path, stop_after=2)
    checkpoint = tmp_path / "checkpoint.msgpack"
    data = checkpoint.read_bytes()
    damaged = {
        "extra-byte": data + b"x",
        "cut-short": data[:-5],
        "empty": b"",
        "dtype-name": data.replace(b"float32", b"floXt32", 1),  # flax raises a TypeError
    }[damage]
    assert damaged != data
    checkpoint.write_bytes(damaged)
    with pytest.raises(ValueError, match="is not a whole checkpoint: corrupt or cut short") as error:
        train(TrainConfig(**TINY), tmp_path, resume=True)
    assert len(str(error.value)) < 400  # before, msgpack's ExtraData quoted the whole checkpoint


def test_a_tuple_clipper_argument_survives_the_config_file(tmp_path):
    config = TrainConfig(**TINY, clip="agc", clip_args={"axis": (0,)})
    train(config, tmp_path, stop_after=2)
    recorded = TrainConfig.from_json(json.loads((tmp_path / "config.json").read_text()))
    assert recorded == config
    assert train(recorded, tmp_path, resume=True)["finished"]


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        (((0, 1), [2]), ((0, 1), (2,))),
        ([[0], (np.int64(1),)], ((0,), (1,))),
        ((np.float32(0.5), [None, "a"]), (0.5, (None, "a"))),
    ],
    ids=["list", "lists", "numpy"],
)
def test_nested_clipper_arguments_read_back_the_same(value, kept):
    """Before, a list inside a tuple stayed a list and came back a tuple of lists; a NumPy integer
    inside a tuple was refused."""
    config = TrainConfig(**TINY, clip="agc", clip_args={"axis": value})
    assert config.clip_args["axis"] == kept and type(config.clip_args["axis"][1]) is tuple
    assert TrainConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def test_an_interrupted_run_checkpoints_its_last_step_and_resumes_exactly(tmp_path, monkeypatch):
    config = TrainConfig(**{**TINY, "checkpoint_every": 200})  # no periodic checkpoint in 8 steps
    train(config, tmp_path / "whole")
    to_python, calls = train_lib._to_python, []

    def interrupted_at_step_6(metrics):
        calls.append(None)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return to_python(metrics)

    monkeypatch.setattr(train_lib, "_to_python", interrupted_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "parts")
    monkeypatch.undo()
    saved = flax.serialization.msgpack_restore((tmp_path / "parts" / "checkpoint.msgpack").read_bytes())
    assert int(saved["step"]) == 5  # the last completed step
    train(config, tmp_path / "parts", resume=True)
    assert read_log(tmp_path / "parts") == read_log(tmp_path / "whole")


@pytest.mark.parametrize(("max_steps", "evaluations"), [(6, [4, 6]), (8, [4, 8])])
def test_the_summary_evaluation_is_in_the_log(tmp_path, max_steps, evaluations):
    """A run ending between evaluations (step 6 of epochs of 4) logs the evaluation its summary
    reports; one ending at an epoch's evaluation does not log it twice."""
    summary = train(TrainConfig(**{**TINY, "max_steps": max_steps}), tmp_path)
    dev = [r for r in read_log(tmp_path) if "dev_accuracy" in r]
    assert [r["step"] for r in dev] == evaluations
    assert dev[-1]["dev_accuracy"] == summary["dev_accuracy"]
    assert dev[-1]["epoch"] == (max_steps - 1) // 4


def test_resume_drops_a_last_log_line_cut_short(tmp_path):
    """A write interrupted mid-record (a full disk, a power cut) leaves a last line without its
    newline, after the checkpoint's step: resuming drops it; a broken line before it is refused."""
    config = TrainConfig(**TINY)
    train(config, tmp_path / "whole")
    train(config, tmp_path / "parts", stop_after=4)
    log = tmp_path / "parts" / "log.jsonl"
    whole_lines = (tmp_path / "whole" / "log.jsonl").read_text().splitlines()
    log.write_text(log.read_text() + whole_lines[len(log.read_text().splitlines())][:20])
    train(config, tmp_path / "parts", resume=True)
    assert read_log(tmp_path / "parts") == read_log(tmp_path / "whole")
    log.write_text('{"step": 1, "lo\n' + log.read_text())
    with pytest.raises(ValueError, match="line 1: not a JSON record"):
        read_log(tmp_path / "parts")


def test_workload_clippers_take_no_axis_name():
    with pytest.raises(ValueError, match="axis_name is for steps mapped over devices"):
        make_clipper("global_norm", {"max_norm": 1.0, "axis_name": "batch"})


def test_clipper_arguments_must_be_finite():
    with pytest.raises(ValueError, match=r"'max_norm=1e999': not a finite number"):
        train_lib.parse_clip_args(["max_norm=1e999"])


@pytest.mark.parametrize(
    "text",
    ["max_norm=1e39", "max_norm=-3.5e38", f"max_norm={10**39}", "axis=(0, 1e39)"],
    ids=["float", "negative", "int", "in_a_tuple"],
)
def test_clipper_arguments_must_be_finite_in_float32(text):
    with pytest.raises(ValueError, match=rf"^clipper argument '{re.escape(text)}': beyond float32's range"):
        train_lib.parse_clip_args([text])


@pytest.mark.parametrize("text", ["ord=inf", "ord=1e999", "ord=math.inf"])
def test_global_norm_order_may_be_infinite(text):
    args = train_lib.parse_clip_args(["max_norm=1.0", text])
    assert json.loads(json.dumps(args, allow_nan=False)) == {"max_norm": 1.0, "ord": "inf"}
    tx = make_clipper("global_norm", args)
    _, state = tx.update({"w": jnp.array([3.0, -4.0])}, tx.init({"w": jnp.zeros(2)}))
    assert float(clipx.stats(state)["global_norm/norm"]) == 4.0  # the largest entry


def test_clipper_arguments_up_to_float32_largest_are_kept():
    largest = float(np.finfo(np.float32).max)
    assert train_lib.parse_clip_args([f"max_norm={largest!r}"]) == {"max_norm": largest}


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ('{"lr": ', "(Expecting value"),
        ("[1, 2]", "(not a JSON object)"),
        ('{"lr": 0.1, "seed": 0}', "(settings this clipx does not take: lr)"),
        ('{"model": {"cells": "lstm"}}', "(settings this clipx does not take: model.cells)"),
        ('{"clip_args": [1]}', "(clip_args is not a JSON object)"),
        ('{"seed": 4294967296}', "(seed must lie in [0, 4294967295]; got 4294967296)"),
        ('{"learning_rate": "fast"}', "(learning_rate must be a real number; got 'fast')"),
    ],
    ids=["corrupt", "not_an_object", "unknown", "unknown_model", "clip_args", "out_of_range", "wrong_type"],
)
def test_a_config_file_that_holds_no_settings_is_named(tmp_path, content, why):
    config_file = tmp_path / "config.json"
    config_file.write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"{config_file} is not a run's settings {why}")):
        train_lib.read_config(config_file)


def test_resume_names_a_corrupt_config_file(tmp_path):
    train(TrainConfig(**TINY), tmp_path, stop_after=1)
    config_file = tmp_path / "config.json"
    config_file.write_text('{"lr": ')
    with pytest.raises(ValueError, match=re.escape(f"{config_file} is not a run's settings (Expecting")):
        train(TrainConfig(**TINY), tmp_path, resume=True)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"step": 2, "loss": "abc"}', "not a log record ('loss' is 'abc', not a number or null)"),
        ('{"step": 2, "grad_norm": [1.0]}', "not a log record ('grad_norm' is [1.0], not a number or null)"),
        ('{"step": 2, "loss": true}', "not a log record ('loss' is True, not a number or null)"),
        ('{"step": true, "loss": 0.5}', "not a log record (an object with an integer 'step' within int64)"),
        # Integers past float64 (or int64, for the step) failed later, in the plots, with an OverflowError.
        (
            '{"step": 2, "loss": 1' + "0" * 400 + "}",
            "not a log record ('loss' is 1" + "0" * 17 + "..." + "0" * 19 + ", not a number or null)",
        ),
        (
            '{"step": 1' + "0" * 30 + ', "loss": 0.5}',
            "not a log record (an object with an integer 'step' within int64)",
        ),
    ],
    ids=["string", "list", "bool", "bool_step", "huge_integer", "huge_step"],
)
def test_a_log_line_of_other_values_than_numbers_is_named(tmp_path, line, message):
    log_file = tmp_path / "log.jsonl"
    log_file.write_text('{"step": 1, "epoch": 0, "loss": 0.5, "dev_loss": null}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"^{re.escape(f'{log_file}, line 2: {message}')}$"):
        read_log(tmp_path)


def _write_labelled(folder, train_labels, dev_labels):
    """train.tsv and dev.tsv whose examples carry ``train_labels`` and ``dev_labels``."""
    for name, labels in (("train.tsv", train_labels), ("dev.tsv", dev_labels)):
        rows = "".join(f"film {i}\t{label}\n" for i, label in enumerate(labels))
        (folder / name).write_text("sentence\tlabel\n" + rows)


def test_a_dev_label_no_training_example_has_names_the_dev_line(tmp_path):
    _write_labelled(tmp_path, [0, 1, 0, 2], [0, 1, 1, 3, 4])
    config = TrainConfig(data=str(tmp_path), model=TINY["model"], batch_size=2)
    message = (
        f"{tmp_path / 'dev.tsv'}:5: label 3 is not among the labels of {tmp_path / 'train.tsv'} (0, 1, 2)"
    )
    with pytest.raises(data_lib.DataError, match=f"^{re.escape(message)}"):
        load_data(config)
    with pytest.raises(ValueError, match=re.escape(message)):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_dev_label_beyond_the_training_limit_is_named(tmp_path):
    _write_labelled(tmp_path, [0, 0, 1, 1], [0, 1])
    config = TrainConfig(data=str(tmp_path), model=TINY["model"], batch_size=2, train_limit=2)
    message = (
        f"dev.tsv:3: label 1 is not among the labels of the first 2 examples of {tmp_path / 'train.tsv'} (0)"
    )
    with pytest.raises(data_lib.DataError, match=re.escape(message)):
        load_data(config)
    assert load_data(dataclasses.replace(config, train_limit=3)).num_classes == 2


def test_a_class_beyond_the_training_limit_is_named_as_missing_from_the_limit(tmp_path):
    # Before, the message said that no training example had label 1, which line 4 has.
    _write_labelled(tmp_path, [0, 2, 1, 0], [0])
    config = TrainConfig(data=str(tmp_path), model=TINY["model"], batch_size=1, train_limit=2)
    where = f"the first 2 examples of {tmp_path / 'train.tsv'}"
    message = f"train.tsv:3: label 2, but label 1 occurs nowhere in {where};"
    with pytest.raises(data_lib.DataError, match=re.escape(message)):
        load_data(config)
    assert load_data(dataclasses.replace(config, train_limit=3)).num_classes == 3


def test_the_classes_are_the_training_labels(tmp_path):
    _write_labelled(tmp_path, [0, 2, 1, 2], [2, 0, 0])
    assert load_data(TrainConfig(data=str(tmp_path), batch_size=2)).num_classes == 3
    _write_labelled(tmp_path, [0, 0], [0])  # one class: still two outputs, as before
    assert load_data(TrainConfig(data=str(tmp_path), batch_size=2)).num_classes == 2


@pytest.mark.parametrize("task_train", [1, 2, 64])
def test_the_embedded_task_has_two_classes_however_small(task_train):
    data = load_data(TrainConfig(task_train=task_train, task_length=50, task_dev=32))
    assert data.num_classes == 2 and set(data.dev.labels.tolist()) == {0, 1}


@pytest.mark.parametrize(("name", "dev"), [("sst2", "dev.tsv"), ("imdb", "test.tsv")])
def test_the_shared_data_loads_with_two_classes(data_dir, name, dev):
    config = TrainConfig(data=str(data_dir / name), train_limit=5000, dev_limit=1000, max_length=8)
    assert load_data(config).num_classes == 2


@pytest.mark.parametrize(
    ("labels", "line", "label", "absent"), [([0, 1, 0, 5000000], 5, 5000000, 2), ([0, 10, 1], 3, 10, 2)]
)
def test_a_class_without_training_examples_below_the_largest_label_is_refused(
    tmp_path, labels, line, label, absent
):
    # Before, a typo of 10 for 1 made an 11-class head and a stray label 5000000 one of 5000001 classes.
    _write_labelled(tmp_path, labels, [0, 1])
    train_file = tmp_path / "train.tsv"
    message = f"{train_file}:{line}: label {label}, but label {absent} occurs nowhere in {train_file};"
    with pytest.raises(data_lib.DataError, match=f"^{re.escape(message)}"):
        load_data(TrainConfig(data=str(tmp_path), batch_size=2))
    _write_labelled(tmp_path, [1, 1], [1])  # two outputs whatever the binary labels seen
    assert load_data(TrainConfig(data=str(tmp_path), batch_size=2)).num_classes == 2


def test_a_log_that_is_not_utf8_is_named_with_its_line(tmp_path):
    config = TrainConfig(**TINY, max_steps=2)
    train(config, tmp_path / "run")
    with open(tmp_path / "run" / "log.jsonl", "ab") as log:
        log.write(b'\xff\xfe{"step": 3}\n')
    lines = (tmp_path / "run" / "log.jsonl").read_bytes().count(b"\n")
    with pytest.raises(data_lib.DataError, match=rf"log.jsonl:{lines}: not UTF-8 text \(byte 0xff\)"):
        read_log(tmp_path / "run")


def test_resume_drops_the_log_records_after_the_checkpoint(tmp_path):
    """A process killed between checkpoints has logged steps its checkpoint does not hold: resuming
    from the checkpoint drops those records and logs the steps again, once each."""
    config = TrainConfig(**{**TINY, "checkpoint_every": 2})
    train(config, tmp_path / "whole")
    parts = tmp_path / "parts"
    train(config, parts, stop_after=4)
    at_step_4 = (parts / "checkpoint.msgpack").read_bytes()
    train(config, parts, stop_after=7)
    (parts / "checkpoint.msgpack").write_bytes(at_step_4)  # as if killed after logging step 7
    train(config, parts, resume=True)
    assert read_log(parts) == read_log(tmp_path / "whole")
