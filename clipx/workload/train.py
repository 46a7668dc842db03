"""Training the reference classifier with any clipx clipper: logs, checkpoints, exact resumption.

`train` runs a `TrainConfig`: it loads the data (the embedded temporal-order
task, or ``train.tsv`` and ``dev.tsv``/``test.tsv`` from a folder), builds the
model, chains the clipper before the optimizer with ``optax.chain``, and runs a
jitted train step. With an output folder it writes

- ``config.json``: the settings;
- ``log.jsonl``: one record per step (``loss``, ``accuracy``, ``grad_norm`` before
  clipping, and every entry of ``clipx.stats(opt_state)``) and one per evaluation
  (``dev_accuracy``, ``dev_loss``: each epoch's end, every ``eval_every`` steps,
  and the last step of a finished run);
- ``checkpoint.msgpack``: params, optimizer state, step and rng
  (``flax.serialization``), every ``checkpoint_every`` steps and at the end;
- ``summary.json``: the outcome.

The files are strict JSON: a number that is not finite (a diverged loss) is
written as ``null``. Interrupting a run (Ctrl-C, or `request_stop`, which lets
the step in progress end) writes a checkpoint of the last completed step first.

Resuming loads the checkpoint and replays nothing: the batch order of every
epoch and the dropout key of every step are pure functions of the seed, the
epoch and the step, so a resumed run ends with exactly the parameters and log of
an uninterrupted one. A non-finite loss, on a training batch or on the dev
set (the last update made the weights non-finite), marks the run diverged and
stops it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import pathlib
import reprlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

import clipx
from clipx.workload import _settings
from clipx.workload import data as data_lib
from clipx.workload.model import FLOAT32_MAX, ModelConfig, TextClassifier

#: The optimizers by name, with the name shown in tables and plots (momentum at its default 0.9).
OPTIMIZER_NAMES: dict[str, str] = {
    "sgd": "SGD",
    "momentum": "SGD+momentum 0.9",
    "rmsprop": "RMSprop",
    "adam": "Adam",
}
OPTIMIZERS: tuple[str, ...] = tuple(OPTIMIZER_NAMES)


def _finite_or_none(value: Any) -> Any:
    """``value``, with every float that is not finite replaced by ``None`` (JSON has no NaN or ∞)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def json_text(value: Any, indent: int | None = None) -> str:
    """``value`` as strict JSON (a float that is not finite as ``null``), with a final newline."""
    return json.dumps(_finite_or_none(value), indent=indent, allow_nan=False) + "\n"


#: The largest seed: JAX's keys take 32 bits of it (2³² would give the key of 0).
SEED_MAX = 2**32 - 1

#: The smallest normal float32: a smaller learning rate is 0 in float32, or keeps few of its digits.
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def check_learning_rate(name: str, value: float) -> None:
    """Raises ``ValueError`` unless ``value`` is a normal float32, in [1.2e-38, 3.4e38]."""
    check_range(name, value, FLOAT32_TINY, FLOAT32_MAX, high_open=False)


def check_range(
    name: str,
    value: float | None,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = True,
) -> None:
    """Raises ``ValueError`` naming the setting and its range unless ``low ≤ value < high``.

    ``low_open`` excludes ``low``, ``high_open=False`` includes ``high``. NaN
    never lies in the range, nor does infinity unless ``high`` is included.
    ``None`` (an optional setting left unset) passes.

    >>> check_range("epochs", 0, 1)
    Traceback (most recent call last):
    ValueError: epochs must be at least 1; got 0
    >>> check_range("learning_rate", float("nan"), 0, low_open=True)
    Traceback (most recent call last):
    ValueError: learning_rate must be finite and above 0; got nan
    >>> check_range("momentum", 1.5, 0, 1)
    Traceback (most recent call last):
    ValueError: momentum must lie in [0, 1); got 1.5
    >>> check_range("seed", 2**32, 0, SEED_MAX, high_open=False)
    Traceback (most recent call last):
    ValueError: seed must lie in [0, 4294967295]; got 4294967296
    """
    if value is None:
        return
    above_low = value > low if low_open else value >= low
    below_high = value < high if high_open else value <= high
    if above_low and below_high:
        return

    def shown(bound: float) -> str:  # an integer in full, not as 4.29497e+09
        return str(bound) if isinstance(bound, int) else f"{bound:g}"

    if high == math.inf and high_open:
        bound = f"{'above' if low_open else 'at least'} {shown(low)}"
        allowed = f"be {bound}" if isinstance(value, int) else f"be finite and {bound}"
    else:
        allowed = f"lie in {'(' if low_open else '['}{shown(low)}, {shown(high)}{')' if high_open else ']'}"
    raise ValueError(f"{name} must {allowed}; got {value}")


def check_folder(path: str | pathlib.Path) -> None:
    """Raises ``ValueError`` if ``path``, or a folder above it, exists and is not a folder."""
    for where in (pathlib.Path(path), *pathlib.Path(path).parents):
        if where.exists() and not where.is_dir():
            raise ValueError(f"{where} exists and is not a folder")


def resume_file(out_dir: str | pathlib.Path | None, name: str) -> pathlib.Path:
    """``out_dir/name``, a file of the run to resume.

    Raises:
      ValueError: ``out_dir`` exists and is not a folder.
      FileNotFoundError: there is no such file (``nothing to resume: ...``).
    """
    if out_dir is None:
        raise FileNotFoundError("nothing to resume: no output folder given")
    check_folder(out_dir)
    path = pathlib.Path(out_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: no {name} in {out_dir}")
    return path


# The settings of `TrainConfig` that count or size something (at least 1), all its integer settings,
# and those of them that may be None.
_COUNTS = (
    "task_train",
    "task_dev",
    "train_limit",
    "dev_limit",
    "max_length",
    "pad_multiple",
    "min_count",
    "batch_size",
    "epochs",
    "max_steps",
    "eval_every",
    "checkpoint_every",
)
_INTEGER_SETTINGS = ("task_length", *_COUNTS, "max_vocab", "seed")
_OPTIONAL_SETTINGS = ("train_limit", "dev_limit", "max_length", "max_vocab", "max_steps", "eval_every")


def _unknown_model_settings(model: dict[str, Any]) -> list[str]:
    """The keys of ``model`` that are not `ModelConfig` settings a run chooses (the data sets the sizes)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size", "num_classes"}
    return sorted(set(model) - fields)


def _checked_model(model: Any) -> dict[str, Any]:
    """``model``, `ModelConfig` keyword arguments, checked as it checks them and with its Python values."""
    if not isinstance(model, dict) or not all(isinstance(key, str) for key in model):
        raise ValueError(f"model must be a dict of ModelConfig settings; got {model!r}")
    unknown = _unknown_model_settings(model)
    if unknown:
        raise ValueError(
            f"model settings a run does not take: {', '.join(unknown)} (vocab_size and num_classes "
            "come from the data)"
        )
    try:
        checked = ModelConfig(vocab_size=1, **model)  # single_logit meets the data's classes later
    except ValueError as error:
        raise ValueError(f"model: {error}") from None
    return {name: getattr(checked, name) for name in model}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run.

    Attributes:
      data: a folder with ``train.tsv`` and ``dev.tsv`` (or ``test.tsv``), or
        ``None`` for the embedded temporal-order task.
      task_length, task_train, task_dev: words per sentence and split sizes of
        the embedded task.
      train_limit, dev_limit: use only the first examples of each file.
      max_length: truncate every example to this many tokens.
      tokenizer: the `clipx.workload.data.tokenize` style, ``"words"`` or
        ``"whitespace"`` (for pre-tokenized text such as SST-2).
      boundaries: wrap every example in ``<s> … </s>`` (Flax's SST-2 pipeline
        does); ``max_length`` counts the tokens between them.
      pad_multiple: batches are padded to a multiple of this many tokens (each
        distinct width costs one jit compilation).
      min_count, max_vocab: vocabulary built from the training split
        (``max_vocab`` counts ``<pad>`` and ``<unk>``, and ``<s>``, ``</s>``
        with ``boundaries``).
      model: keyword arguments of `ModelConfig` (``vocab_size`` and
        ``num_classes`` come from the data).
      optimizer: ``sgd``, ``momentum`` (SGD with momentum), ``rmsprop`` or ``adam``.
      learning_rate, momentum, weight_decay: optimizer settings (weight decay
        is ``optax.add_decayed_weights`` between the clipper and the optimizer:
        ``λθ`` is added to the clipped gradient, an L2 penalty that goes
        through the momentum or Adam's normalisation).
      batch_size, epochs: training length; ``max_steps`` caps the step count.
      clip, clip_args: the name of a clipx factory (``"none"`` for no clipping)
        and its keyword arguments.
      seed: seeds initialisation, data order and dropout, and draws the embedded
        task's training and dev sentences (each seed has its own); in [0, 2³² − 1].
      eval_every: evaluate on the dev split every this many steps (besides the
        end of each epoch); ``None`` for epoch ends only.
      checkpoint_every: write a checkpoint every this many steps.

    Raises:
      ValueError: a setting is of the wrong type or out of its range (the
        message names it and the range): the counts and sizes must be
        integers of at least 1, the rates real numbers, ``boundaries`` a
        bool, ``data`` a path or ``None``, ``model`` settings `ModelConfig`
        takes (of its types and ranges), ``clip`` one of
        `available_clippers`, the clipper's
        arguments what `checked_clip_arg` keeps, ``max_vocab`` at
        least its special tokens (2, or 4 with ``boundaries``), ``seed`` in
        [0, 2³² − 1], ``task_length`` in 50..400, ``learning_rate`` a normal
        float32 (in [1.2e-38, 3.4e38]), ``momentum`` in [0, 1), ``weight_decay`` finite and at
        least 0.
    """

    data: str | None = None
    task_length: int = 100
    task_train: int = 2000
    task_dev: int = 500
    train_limit: int | None = None
    dev_limit: int | None = None
    max_length: int | None = None
    tokenizer: str = "words"
    boundaries: bool = False
    pad_multiple: int = 16
    min_count: int = 1
    max_vocab: int | None = 30000
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 1
    max_steps: int | None = None
    clip: str = "none"
    clip_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    eval_every: int | None = None
    checkpoint_every: int = 200

    def __post_init__(self):
        for name in _INTEGER_SETTINGS:
            value = getattr(self, name)
            if value is not None or name not in _OPTIONAL_SETTINGS:
                object.__setattr__(self, name, _settings.integer(name, value))
        for name in ("learning_rate", "momentum", "weight_decay"):
            object.__setattr__(self, name, _settings.real(name, getattr(self, name)))
        object.__setattr__(self, "boundaries", _settings.flag("boundaries", self.boundaries))
        if self.data is not None:
            object.__setattr__(self, "data", _settings.path("data", self.data))
        object.__setattr__(self, "model", _checked_model(self.model))
        if not isinstance(self.clip_args, dict) or not all(isinstance(key, str) for key in self.clip_args):
            raise ValueError(f"clip_args must be a dict of argument names to values; got {self.clip_args!r}")
        clip_args = {}
        for key, value in self.clip_args.items():
            try:
                clip_args[key] = checked_clip_arg(key, value)
            except ValueError as error:
                raise ValueError(f"clip_args {key}={value!r}: {error}") from None
        object.__setattr__(self, "clip_args", clip_args)
        for name, allowed in (("optimizer", OPTIMIZERS), ("tokenizer", data_lib.TOKENIZERS)):
            object.__setattr__(self, name, _settings.choice(name, getattr(self, name), allowed))
        check_clipper_name(self.clip)
        low, high = data_lib.TASK_LENGTHS
        check_range("task_length", self.task_length, low, high, high_open=False)
        for name in _COUNTS:
            check_range(name, getattr(self, name), 1)
        check_learning_rate("learning_rate", self.learning_rate)
        check_range("momentum", self.momentum, 0, 1)
        check_range("weight_decay", self.weight_decay, 0, FLOAT32_MAX, high_open=False)
        check_range("seed", self.seed, 0, SEED_MAX, high_open=False)
        check_range("max_vocab", self.max_vocab, len(data_lib.special_tokens(self.boundaries)))

    def to_json(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, recorded: dict[str, Any]) -> TrainConfig:
        """The settings `to_json` gave, read back from JSON (``clip_args``' lists become tuples again).

        Raises:
          ValueError: ``recorded`` names a setting this clipx does not take (as
            the settings of another clipx version may), ``model`` or
            ``clip_args`` is not an object, or a setting is out of its range.
        """
        for name in ("model", "clip_args"):
            if not isinstance(recorded.get(name, {}), dict):
                raise ValueError(f"{name} is not a JSON object")
        unknown = sorted(set(recorded) - {f.name for f in dataclasses.fields(cls)})
        unknown += [f"model.{name}" for name in _unknown_model_settings(recorded.get("model", {}))]
        if unknown:
            raise ValueError(f"settings this clipx does not take: {', '.join(unknown)}")
        return cls(**recorded)  # `checked_clip_arg` turns the lists back into tuples


def read_settings(path: pathlib.Path) -> dict[str, Any]:
    """The JSON object in ``path``, a run's ``config.json``; ``ValueError`` naming the file otherwise."""
    try:
        recorded = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a run's settings ({error})") from None
    if not isinstance(recorded, dict):
        raise ValueError(f"{path} is not a run's settings (not a JSON object)")
    return recorded


def read_config(path: pathlib.Path) -> TrainConfig:
    """The `TrainConfig` recorded in ``path``, a run's ``config.json``.

    Raises:
      ValueError: ``path`` is not JSON, or not settings this clipx takes (the
        message names the file and why).
    """
    recorded = read_settings(path)
    try:
        return TrainConfig.from_json(recorded)
    except (TypeError, ValueError) as error:  # TypeError: a value of the wrong type met a range check
        raise ValueError(f"{path} is not a run's settings ({error})") from None


# ---------------------------------------------------------------------------
# Clippers and optimizers


def available_clippers() -> list[str]:
    """Names of the clipx factories that return a gradient transformation, plus ``"none"``.

    The per-example (DP-SGD) clippers are left out: they need per-example
    gradients, which this workload does not compute. So are the wrappers of
    another transformation (``skip_nonfinite``, ``skip_spikes``,
    ``without_stats``: their ``inner`` cannot be given as a ``--clip-arg``).
    """
    names = []
    for name in clipx.__all__:
        obj = getattr(clipx, name, None)
        if name.startswith("per_example") or not inspect.isfunction(obj):
            continue
        signature = inspect.signature(obj)
        if (
            "GradientTransformation" in str(signature.return_annotation)
            and "inner" not in signature.parameters
        ):
            names.append(name)
    return ["none", *sorted(names)]


def check_clipper_name(name: Any) -> str:
    """``name`` if it is one of `available_clippers`; ``ValueError`` listing them otherwise."""
    available = available_clippers()
    if not isinstance(name, str) or name not in available:
        raise ValueError(f"unknown clipper {name!r}; available: {', '.join(available)}")
    return name


def make_clipper(name: str, args: dict[str, Any] | None = None) -> optax.GradientTransformation | None:
    """``clipx.<name>(**args)``, or ``None`` for ``"none"``.

    Raises:
      ValueError: ``name`` is not a clipx clipper (the message lists those that
        exist), the arguments do not fit its signature, or the clipper refuses
        their values (``clipx.<name>: <its message>``).
    """
    args = dict(args or {})
    if args.get("ord") == "inf":  # as `parse_clip_args` keeps it
        args["ord"] = math.inf
    check_clipper_name(name)
    if name == "none":
        if args:
            raise ValueError(f"--clip none takes no arguments; got {sorted(args)}")
        return None
    if "axis_name" in args:
        raise ValueError("axis_name is for steps mapped over devices; this workload trains on one device")
    factory = getattr(clipx, name)
    signature = inspect.signature(factory)
    unknown = sorted(set(args) - set(signature.parameters))
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise ValueError(f"bad arguments for clipx.{name}{signature}: it has no argument {names}")
    try:
        signature.bind(**args)
    except TypeError as error:
        raise ValueError(f"bad arguments for clipx.{name}{signature}: {error}") from None
    try:
        return factory(**args)
    except (TypeError, ValueError) as error:  # a value of the wrong type or out of range
        raise ValueError(f"clipx.{name}: {error}") from None


def _literals(value: Any) -> Iterator[Any]:
    """``value``, or the items of a tuple ``value`` (nested tuples too)."""
    if isinstance(value, tuple):
        for item in value:
            yield from _literals(item)
    else:
        yield value


def _plain(value: Any) -> Any:
    """``value`` with NumPy and JAX scalars as Python's, and lists as tuples, at any depth."""
    if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0:
        return value.item()
    if isinstance(value, (list, tuple)):
        return tuple(_plain(item) for item in value)
    return value


def checked_clip_arg(key: str, value: Any) -> Any:
    """A clipper argument as a run's settings keep it, valid JSON that reads back the same.

    A NumPy or JAX scalar becomes its Python number and a list a tuple, at
    any depth; ``ord=inf`` (`clipx.global_norm`'s largest-entry norm) becomes
    the string ``"inf"``. Raises ``ValueError`` for anything but numbers
    finite in float32 (where the clippers compute: a larger one would be ∞
    there), strings, bools, ``None`` and tuples of them.
    """
    value = _plain(value)
    for item in _literals(value):
        if item is not None and not isinstance(item, (bool, int, float, str)):
            raise ValueError(f"a {type(item).__name__}, not a number, string, bool, None or tuple of them")
    if key == "ord" and value in (math.inf, "inf", "math.inf"):
        return "inf"
    sizes = [x for x in _literals(value) if isinstance(x, (int, float)) and not isinstance(x, bool)]
    if any(isinstance(x, float) and not math.isfinite(x) for x in sizes):
        raise ValueError("not a finite number (--clip none does not clip)")
    if any(abs(x) > FLOAT32_MAX for x in sizes):
        raise ValueError(
            f"beyond float32's range (at most {FLOAT32_MAX:.10g} in size; --clip none does not clip)"
        )
    return value


def parse_clip_args(items: list[str]) -> dict[str, Any]:
    """Parses ``["max_norm=1.0", "mode=zscore"]`` into ``{"max_norm": 1.0, "mode": "zscore"}``.

    Values are Python literals (numbers, ``True``, ``None``, tuples) when they
    parse as such, otherwise strings, checked by `checked_clip_arg`: numbers
    must be finite in float32, and the one infinite value is ``ord=inf``,
    kept as the string ``"inf"`` so that the run's settings stay valid JSON.

    >>> parse_clip_args(["max_norm=1", "mode=zscore", "max_grad_norm=None", "ord=inf"])
    {'max_norm': 1, 'mode': 'zscore', 'max_grad_norm': None, 'ord': 'inf'}
    """
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"clipper argument {item!r} is not of the form key=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        key = key.strip()
        if key in parsed:
            raise ValueError(f"clipper argument {key!r} is given twice")
        try:
            parsed[key] = checked_clip_arg(key, value)
        except ValueError as error:
            raise ValueError(f"clipper argument {item!r}: {error}") from None
    return parsed


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """``optax.chain(clipper, add_decayed_weights, optimizer)`` for ``config``."""
    lr = config.learning_rate
    optimizer = {
        "sgd": lambda: optax.sgd(lr),
        "momentum": lambda: optax.sgd(lr, momentum=config.momentum),
        "rmsprop": lambda: optax.rmsprop(lr),
        "adam": lambda: optax.adam(lr),
    }[config.optimizer]()
    parts = [make_clipper(config.clip, config.clip_args)]
    if config.weight_decay:
        parts.append(optax.add_decayed_weights(config.weight_decay))
    parts.append(optimizer)
    return optax.chain(*[p for p in parts if p is not None])


# ---------------------------------------------------------------------------
# Data


@dataclasses.dataclass(frozen=True)
class Data:
    """Encoded training and dev splits with their vocabulary."""

    train: data_lib.Encoded
    dev: data_lib.Encoded
    vocab: data_lib.Vocabulary
    num_classes: int


def _dev_file(folder: pathlib.Path) -> pathlib.Path:
    for name in ("dev.tsv", "test.tsv"):
        if (folder / name).is_file():
            return folder / name
    raise data_lib.DataError(f"{folder}: found neither dev.tsv nor test.tsv")


def _check_labels(
    train: data_lib.Split, dev: data_lib.Split, train_file: str, where: str, dev_file: str
) -> None:
    """Raises `DataError` unless the labels are classes ``0, 1, …, K − 1`` the training examples all show.

    The classifier has ``K`` outputs, one more than the largest training
    label (at least 2): a stray large label (a typo, say, of ``10`` for ``1``)
    would silently add a class for every number below it. So a class below
    the largest with no training example is refused where ``K > 2``, naming
    the first line of ``train_file`` above it, as is a dev label that no
    training example has. ``train`` and ``dev`` are the starts of
    ``train_file`` and ``dev_file`` (first example on line 2), ``where``
    says which part of ``train_file`` ``train`` is.
    """
    labels = np.unique(train.labels)  # sorted: the first class absent is the first i with labels[i] > i
    gaps = np.flatnonzero(labels != np.arange(labels.size))
    if labels[-1] >= 2 and gaps.size:
        absent = int(gaps[0])
        index = int(np.flatnonzero(train.labels > absent)[0])
        raise data_lib.DataError(
            f"{train_file}:{index + 2}: label {train.labels[index]}, but label {absent} occurs nowhere in "
            f"{where}; the labels must be the classes 0, 1, ..., K-1, each with training examples"
        )
    unseen = np.flatnonzero(~np.isin(dev.labels, labels))
    if unseen.size:
        index = int(unseen[0])
        raise data_lib.DataError(
            f"{dev_file}:{index + 2}: label {dev.labels[index]} is not among the labels of {where} "
            f"({', '.join(map(str, labels.tolist()))}); every dev label must occur in training"
        )


def load_checked_data(config: TrainConfig) -> Data:
    """`load_data`, and ``ValueError`` if the data cannot train ``config``'s model.

    That is: fewer training examples than ``batch_size``, or ``single_logit``
    with other than two classes.
    """
    data = load_data(config)
    if len(data.train) < config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(data.train)} training examples")
    if config.model.get("single_logit") and data.num_classes != 2:
        raise ValueError(
            f"single_logit needs two classes (labels 0 and 1); the labels of {config.data} "
            f"go up to {data.num_classes - 1}"
        )
    return data


def load_data(config: TrainConfig) -> Data:
    """Reads (or generates) and encodes the data ``config`` names.

    Raises:
      DataError: a file is missing or malformed, a class below the largest
        training label has no training example (more than two classes), or
        a dev label is not one of the training labels (the message names the
        file and line).
    """
    if config.data is None:
        train = data_lib.temporal_order(config.task_train, config.task_length, seed=10_000 + config.seed)
        dev = data_lib.temporal_order(config.task_dev, config.task_length, seed=20_000 + config.seed)
    else:
        folder = pathlib.Path(config.data)
        train = data_lib.read_tsv(folder / "train.tsv")
        dev = data_lib.read_tsv(_dev_file(folder))
    limited = config.train_limit is not None and config.train_limit < len(train)
    train = data_lib.Split(train.sentences[: config.train_limit], train.labels[: config.train_limit])
    dev = data_lib.Split(dev.sentences[: config.dev_limit], dev.labels[: config.dev_limit])
    num_classes = 2  # the task's two orders, whichever of them a small split happens to hold
    if config.data is not None:
        train_file = folder / "train.tsv"
        where = f"the first {len(train)} examples of {train_file}" if limited else str(train_file)
        _check_labels(train, dev, str(train_file), where, str(_dev_file(folder)))
        num_classes = max(int(train.labels.max()) + 1, 2)
    vocab = data_lib.Vocabulary.build(
        (data_lib.tokenize(s, config.tokenizer) for s in train.sentences),
        min_count=config.min_count,
        max_size=config.max_vocab,
        boundaries=config.boundaries,
    )

    def encode(split: data_lib.Split) -> data_lib.Encoded:
        return data_lib.encode(
            split,
            vocab,
            max_length=config.max_length,
            tokenizer=config.tokenizer,
            boundaries=config.boundaries,
        )

    return Data(encode(train), encode(dev), vocab, num_classes)


def _epoch_batches(config: TrainConfig, train: data_lib.Encoded, epoch: int) -> Iterator[data_lib.Batch]:
    rng = np.random.default_rng([config.seed, epoch])
    return data_lib.batches(
        train, config.batch_size, rng=rng, drop_remainder=True, pad_multiple=config.pad_multiple
    )


# ---------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class TrainState:
    """What a checkpoint holds."""

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    seconds: float = 0.0  # wall time of the training up to ``step``, summed over resumes


def _state_dict(state: TrainState) -> dict[str, Any]:
    return {
        "params": state.params,
        "opt_state": state.opt_state,
        "step": state.step,
        "rng": state.rng,
        "seconds": np.asarray(state.seconds, np.float32),
    }


def save_checkpoint(path: pathlib.Path, state: TrainState) -> None:
    """Writes ``state`` as msgpack (atomically: a temporary file, then a rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(flax.serialization.to_bytes(_state_dict(state)))
    tmp.replace(path)


def _array_kind(x: Any) -> str:
    """``float32[3, 4]``: the dtype and shape of an array or scalar."""
    return f"{jnp.result_type(x)}{list(jnp.shape(x))}"


def load_checkpoint(path: pathlib.Path, template: TrainState) -> TrainState:
    """Reads a checkpoint written by `save_checkpoint` into the structure of ``template``.

    Raises:
      ValueError: the file is not whole msgpack (corrupt or cut short), or
        the checkpoint's tree, shapes or dtypes differ from ``template``'s (as
        when the clipper's defaults, and with them its state, changed between
        clipx versions).
    """
    hint = "was it written with other settings, or by a clipx whose clipper defaults differ?"
    target = _state_dict(template)

    def why(error: Exception) -> str:  # msgpack's ExtraData holds the whole file in its repr
        return f"{type(error).__name__}: {data_lib.quoted(str(error), 200)}"

    try:
        encoded = flax.serialization.msgpack_restore(path.read_bytes())
    except (ValueError, TypeError) as error:  # msgpack's errors, and flax's for a garbled dtype name
        raise ValueError(f"{path} is not a whole checkpoint: corrupt or cut short ({why(error)})") from None
    if isinstance(encoded, dict):  # written before checkpoints kept the time: resumes as if it took none
        encoded.setdefault("seconds", target["seconds"])
    try:
        restored = flax.serialization.from_state_dict(target, encoded)
    except (ValueError, TypeError, KeyError, AttributeError) as error:  # flax's, by where the trees part
        raise ValueError(
            f"{path} does not fit this run's parameters and optimizer state ({why(error)}); {hint}"
        ) from None
    expected = jax.tree_util.tree_leaves_with_path(target)
    got = jax.tree.leaves(restored)
    for (where, want), have in zip(expected, got, strict=True):
        want_kind, have_kind = _array_kind(want), _array_kind(have)
        if want_kind != have_kind:
            raise ValueError(
                f"{path} holds {have_kind} at {jax.tree_util.keystr(where)} where this run has "
                f"{want_kind}; {hint}"
            )
    return TrainState(**{**restored, "seconds": float(restored["seconds"])})


def _to_python(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in jax.device_get(metrics).items()}


def _make_steps(model: TextClassifier, tx: optax.GradientTransformation) -> tuple[Callable, Callable]:
    def loss_fn(params, batch, key):
        logits = model.apply(
            {"params": params}, batch.tokens, batch.lengths, train=True, rngs={"dropout": key}
        )
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels)
        total = jnp.maximum(batch.weights.sum(), 1.0)
        correct = jnp.where(jnp.argmax(logits, -1) == batch.labels, batch.weights, 0)
        return (losses * batch.weights).sum() / total, correct.sum() / total

    @jax.jit
    def train_step(params, opt_state, batch, key):
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads)}
        return params, opt_state, {**metrics, **clipx.stats(opt_state)}

    @jax.jit
    def eval_step(params, batch):
        logits = model.apply({"params": params}, batch.tokens, batch.lengths)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels)
        correct = jnp.where(jnp.argmax(logits, -1) == batch.labels, batch.weights, 0)
        return (losses * batch.weights).sum(), correct.sum(), batch.weights.sum()

    return train_step, eval_step


def evaluate(
    eval_step: Callable, params: Any, dev: data_lib.Encoded, batch_size: int, pad_multiple: int
) -> dict[str, float]:
    """Dev-set ``dev_accuracy`` and ``dev_loss`` (mean over examples)."""
    totals = np.zeros(3)
    for batch in data_lib.batches(dev, batch_size, pad_multiple=pad_multiple):
        totals += np.asarray(jax.device_get(eval_step(params, batch)), np.float64)
    loss, correct, count = totals
    return {"dev_accuracy": correct / count, "dev_loss": loss / count}


class _Progress:
    """A rich progress bar, or nothing when ``enabled`` is false."""

    def __init__(self, enabled: bool, total: int, completed: int, description: str):
        self._bar = None
        if enabled:
            import rich.progress

            self._bar = rich.progress.Progress(
                rich.progress.TextColumn("{task.description}", markup=False),
                rich.progress.BarColumn(),
                rich.progress.MofNCompleteColumn(),
                rich.progress.TimeRemainingColumn(),
                rich.progress.TextColumn("{task.fields[info]}", markup=False),
            )
            self._task = self._bar.add_task(description, total=total, completed=completed, info="")

    def __enter__(self):
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()

    def update(self, info: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, info=info)


def _is_number(value: Any, kind: type | tuple[type, ...] = (int, float)) -> bool:
    """Whether ``value`` is a JSON number of ``kind`` a float64 can hold (``true`` and ``false``
    are not numbers, nor is an integer of 400 digits; ``Infinity`` and ``NaN`` are)."""
    too_large = isinstance(value, int) and abs(value) > sys.float_info.max
    return isinstance(value, kind) and not isinstance(value, bool) and not too_large


def _read_log(path: pathlib.Path, up_to_step: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    text = data_lib.read_utf8(path)
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):  # cut short by a write that never ended
                break
            raise ValueError(f"{path}, line {number}: not a JSON record ({error.msg})") from None
        if not isinstance(record, dict) or not (
            _is_number(record.get("step"), int) and abs(record["step"]) < 2**63
        ):
            raise ValueError(
                f"{path}, line {number}: not a log record (an object with an integer 'step' within int64)"
            )
        key = next((key for key, value in record.items() if not (value is None or _is_number(value))), None)
        if key is not None:
            raise ValueError(
                f"{path}, line {number}: not a log record ({key!r} is {reprlib.repr(record[key])}, "
                "not a number or null)"
            )
        records.append({key: math.nan if value is None else value for key, value in record.items()})
    return [r for r in records if r["step"] <= up_to_step]


# A stop asked for by a signal handler (`request_stop`), taken while a training loop runs.
_stop = threading.Event()
_looping = threading.Event()


def request_stop() -> bool:
    """Asks the running `train` loop to stop before its next step, as an interrupt does: it
    checkpoints and raises ``KeyboardInterrupt``. Returns whether a loop runs to take it.

    Safe to call from a signal handler. A ``KeyboardInterrupt`` raised wherever the signal
    lands can fall inside an XLA compile, where jaxlib may lose it or crash at exit; this stop
    waits for the step in progress. Outside a training loop nothing is asked (False): the
    caller interrupts otherwise. A request holds until `clear_stop`.
    """
    if not _looping.is_set():
        return False
    _stop.set()
    return True


def stop_requested() -> bool:
    """Whether `request_stop` was called since the last `clear_stop`."""
    return _stop.is_set()


def clear_stop() -> None:
    """Withdraws a `request_stop`."""
    _stop.clear()


def train(
    config: TrainConfig,
    out_dir: str | pathlib.Path | None = None,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = False,
    description: str = "train",
) -> dict[str, Any]:
    """Trains ``config``; returns the summary (also written to ``out_dir/summary.json``).

    Args:
      config: the run.
      out_dir: where config, log, checkpoint and summary go (``None``: nowhere).
      resume: continue from ``out_dir/checkpoint.msgpack``; ``config`` must equal
        the saved ``config.json``.
      stop_after: stop (with a checkpoint) once this many steps (at least 1)
        are done, as if interrupted; a later ``resume`` finishes the run.
      progress: show a rich progress bar.
      description: the progress bar's label.

    Returns:
      ``{"steps", "diverged", "dev_accuracy", "dev_loss", "train_loss", "seconds", "finished"}``:
      ``dev_*`` from the final evaluation (``None`` when the run diverged),
      ``train_loss`` the mean loss of the last 20 steps, ``seconds`` the wall
      time of this call (after a resume, of the resumed part), ``finished`` whether the
      run is over: it completed its steps or diverged (only a finished run
      writes ``summary.json``).

    Raises:
      ValueError: ``stop_after`` is below 1, ``out_dir`` is not a folder, the
        ``config.json`` to resume is not a run's settings, or the data are
        missing or malformed (`DataError`, see `load_data`).
      FileNotFoundError: ``resume`` without a run in ``out_dir``.
    """
    check_range("stop_after", stop_after, 1)
    out = pathlib.Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_folder(out)
    if resume:
        resume_file(out, "checkpoint.msgpack")
        config_file = resume_file(out, "config.json")
        # As read back: a setting an older file lacks has its default.
        if read_config(config_file) != config:
            raise ValueError(f"{config_file} differs from the requested settings; resume with the same ones")

    data = load_checked_data(config)
    model = TextClassifier(
        ModelConfig(vocab_size=len(data.vocab), num_classes=data.num_classes, **config.model)
    )
    tx = make_optimizer(config)
    train_step, eval_step = _make_steps(model, tx)

    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(config.seed))
    example = next(data_lib.batches(data.train, config.batch_size))
    params = model.init(init_key, example.tokens, example.lengths)["params"]
    state = TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), dropout_key)

    steps_per_epoch = len(data.train) // config.batch_size
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    end = total if stop_after is None else min(total, stop_after)

    log_records: list[dict[str, Any]] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            state = load_checkpoint(out / "checkpoint.msgpack", state)
            log_records = _read_log(out / "log.jsonl", int(state.step))
        else:  # a fresh run replaces whatever run the folder held, its figures too
            from clipx.workload import plots  # matplotlib: only for a run written to a folder

            settings = json_text(config.to_json(), indent=2)  # before anything is removed: it may fail
            # Removed now, not when the run ends: an interrupted run leaves no figure of
            # another run beside its own log. A resumed run keeps its figures, of its own
            # earlier steps, until `clipx train` redraws them at the end.
            for name in ("summary.json", "checkpoint.msgpack", *plots.ONE_RUN_FIGURES):
                (out / name).unlink(missing_ok=True)
            (out / "config.json").write_text(settings)
        (out / "log.jsonl").write_text("".join(json_text(r) for r in log_records))
        log_file = (out / "log.jsonl").open("a")

    def log(record: dict[str, Any]) -> None:
        log_records.append(record)
        if out is not None:
            log_file.write(json_text(record))

    def checkpoint() -> None:
        if out is not None:
            log_file.flush()
            save_checkpoint(out / "checkpoint.msgpack", state)

    step = int(state.step)
    diverged = any(not math.isfinite(r.get(key, 0.0)) for r in log_records for key in ("loss", "dev_loss"))
    started = time.perf_counter() - state.seconds  # a resumed run counts its earlier time
    params, opt_state = state.params, state.opt_state
    _looping.set()
    try:
        with _Progress(progress, total, step, description) as bar:
            while step < end and not diverged:
                epoch, skip = divmod(step, steps_per_epoch)
                for batch in _epoch_batches(config, data.train, epoch):
                    if _stop.is_set():
                        raise KeyboardInterrupt("stop requested")
                    if skip:
                        skip -= 1
                        continue
                    key = jax.random.fold_in(state.rng, step)
                    params, opt_state, metrics = train_step(params, opt_state, batch, key)
                    step += 1
                    record = {"step": step, "epoch": epoch, **_to_python(metrics)}
                    log(record)
                    diverged = not math.isfinite(record["loss"])
                    bar.update(f"loss {record['loss']:.4f}  acc {record['accuracy']:.3f}")
                    epoch_end = step % steps_per_epoch == 0
                    if not diverged and (epoch_end or (config.eval_every and step % config.eval_every == 0)):
                        scores = evaluate(eval_step, params, data.dev, config.batch_size, config.pad_multiple)
                        log({"step": step, "epoch": epoch, **scores})
                        # A non-finite dev loss: the step made the weights non-finite.
                        diverged = not math.isfinite(scores["dev_loss"])
                    seconds = time.perf_counter() - started
                    state = TrainState(params, opt_state, jnp.asarray(step, jnp.int32), state.rng, seconds)
                    if diverged or step >= end:
                        break
                    if step % config.checkpoint_every == 0:
                        checkpoint()
        if _stop.is_set():  # asked for during the last step
            raise KeyboardInterrupt("stop requested")
    except KeyboardInterrupt:  # Ctrl-C: --resume continues from the last completed step
        checkpoint()
        raise
    finally:
        _looping.clear()
    checkpoint()

    final = (
        None if diverged else evaluate(eval_step, params, data.dev, config.batch_size, config.pad_multiple)
    )
    if final is not None and not math.isfinite(final["dev_loss"]):  # the last step broke the weights
        # A run stopped early (stop_after) is not judged on an evaluation the whole run would not
        # make: its resume trains on, as the whole run does, and finds the divergence in its log.
        diverged, final = step >= total, None
    finished = diverged or step >= total
    # A run that ends between evaluations (--max-steps mid-epoch) logs the summary's evaluation.
    evaluated = any(r["step"] == step and "dev_accuracy" in r for r in log_records)
    if finished and final is not None and not evaluated:
        log({"step": step, "epoch": (step - 1) // steps_per_epoch, **final})
    if out is not None:
        log_file.close()
    losses = [r["loss"] for r in log_records if "loss" in r][-20:]
    summary = {
        "steps": step,
        "diverged": diverged,
        "dev_accuracy": None if final is None else float(final["dev_accuracy"]),
        "dev_loss": None if final is None else float(final["dev_loss"]),
        "train_loss": float(np.mean(losses)) if losses else None,
        "seconds": time.perf_counter() - started,
        "finished": finished,
    }
    if out is not None and finished:
        (out / "summary.json").write_text(json_text(summary, indent=2))
    return summary


def read_log(out_dir: str | pathlib.Path) -> list[dict[str, Any]]:
    """The records of ``out_dir/log.jsonl``."""
    return _read_log(pathlib.Path(out_dir) / "log.jsonl", up_to_step=2**62)
