"""Text classification data: TSV files, tokenizer, vocabulary, padded batches, and a synthetic task.

**Files.** `read_tsv` reads UTF-8 TSV with the header ``sentence<TAB>label`` and
one example per line, lines ending in ``\n`` or ``\r\n`` (integer labels from 0,
ASCII digits). Every problem raises `DataError`
naming the file and, where there is one, the line: ``train.tsv:17: ...``.

**Tokens.** `tokenize` lowercases and, in its default ``"words"`` style, keeps
maximal runs of letters and digits with their combining marks (Unicode-aware,
after NFC normalisation: ``café`` is one word however its accent is encoded;
everything else separates tokens); the ``"whitespace"`` style splits on whitespace only, for text that is
already tokenized (SST-2 writes ``it 's`` and ``does n't``), and keeps
punctuation tokens such as ``!`` and ``?``. `Vocabulary` maps tokens to
ids with ``<pad>`` = 0 and ``<unk>`` = 1 (then ``<s>`` = 2 and ``</s>`` = 3
when built with ``boundaries=True``), keeping tokens seen at least
``min_count`` times, most frequent first (ties alphabetical), at most
``max_size`` ids in all. `encode` with ``boundaries=True`` wraps every
example in ``<s> … </s>``, as Flax's SST-2 pipeline does: the recurrent
layers then start and end every sentence on the same learnt inputs.

**Batches.** `batches` shuffles, groups examples of similar length (bucketing),
pads each batch with ``<pad>`` to a multiple of ``pad_multiple`` (few distinct
shapes, so few jit compilations) and returns true lengths; padding rows carry
weight 0.

**Synthetic task.** `temporal_order` is the temporal-order problem of Hochreiter
& Schmidhuber (1997), used by Pascanu, Mikolov & Bengio (2013) to study
exploding gradients, in a two-symbol form rendered as words: a sentence of
random filler words in which the markers ``x`` and ``y`` each appear once, one
in the first 10–20% of the sentence and the other in 50–60%; the label is 0
when ``x`` comes first and 1 when ``y`` does. Only a model that carries the
first marker across the whole sentence can solve it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import pathlib
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

PAD, UNK = "<pad>", "<unk>"
BOS, EOS = "<s>", "</s>"
HEADER = ("sentence", "label")


@functools.cache
def _word() -> re.Pattern[str]:
    """A letter or digit, then letters, digits and combining marks (accents, vowel signs)."""
    code_points = itertools.chain(range(0x20000), range(0xE0100, 0xE01F0))  # every mark Unicode has
    marks = "".join(re.escape(chr(c)) for c in code_points if unicodedata.category(chr(c)).startswith("M"))
    return re.compile(rf"[^\W_](?:[^\W_]|[{marks}])*")


TOKENIZERS: tuple[str, ...] = ("words", "whitespace")


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Split:
    """Sentences and integer labels of one split."""

    sentences: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.sentences)


def read_utf8(path: pathlib.Path) -> str:
    """The text of the file ``path``; `DataError` naming the line of its first byte that is not UTF-8.

    A byte-order mark, which some editors write, is skipped.
    """
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        bad_line = raw[: error.start].count(b"\n") + 1
        raise DataError(f"{path}:{bad_line}: not UTF-8 text (byte {raw[error.start]:#04x})") from None


def quoted(text: str, limit: int = 60) -> str:
    """``repr(text)``, cut to its first ``limit`` characters (an error message quotes it)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}… ({len(text)} characters)"


def read_tsv(path: str | pathlib.Path) -> Split:
    """Reads a ``sentence<TAB>label`` TSV file.

    Raises:
      DataError: the file is missing, empty or not UTF-8, the header is not
        exactly ``sentence<TAB>label``, a line does not have exactly two
        tab-separated fields, a label is not a non-negative integer of ASCII
        digits below 2³¹, or there is no example.
        The message starts with ``<file>:<line>:``.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = read_utf8(path)
    # Lines end at "\n" (or "\r\n") only: str.splitlines would also split a sentence at
    # characters such as U+2028 or U+0085, which web text holds.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if lines[-1] == "":
        lines.pop()  # after the last line's end
    if not lines:
        raise DataError(f"{path}:1: file is empty; expected the header 'sentence<TAB>label'")
    header = tuple(lines[0].split("\t"))
    if header != HEADER:
        if "\r" in lines[0]:
            raise DataError(f"{path}:1: lines end in CR alone; expected LF or CRLF line ends")
        raise DataError(f"{path}:1: header is {quoted(lines[0])}; expected 'sentence<TAB>label'")
    sentences, labels = [], []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 2:
            raise DataError(
                f"{path}:{number}: expected 2 tab-separated fields (sentence, label), found {len(fields)}"
            )
        sentence, label = fields
        digits = label.strip(" ")
        if re.fullmatch(r"-[0-9]+", digits):
            raise DataError(f"{path}:{number}: label {digits} is negative; labels start at 0")
        if not re.fullmatch(r"[0-9]+", digits):
            raise DataError(f"{path}:{number}: label {quoted(label)} is not an integer (digits 0-9)")
        value = int(digits)
        if value > np.iinfo(np.int32).max:
            raise DataError(f"{path}:{number}: label {value} is too large (at most {np.iinfo(np.int32).max})")
        sentences.append(sentence)
        labels.append(value)
    if not sentences:
        raise DataError(f"{path}:2: no examples after the header")
    return Split(sentences, np.asarray(labels, np.int32))


def tokenize(text: str, style: str = "words") -> list[str]:
    """Lowercases ``text`` and splits it into tokens (see the module docstring).

    >>> tokenize("It's a GREAT film -- 10/10!")
    ['it', 's', 'a', 'great', 'film', '10', '10']
    >>> tokenize("it 's a great film !", "whitespace")
    ['it', "'s", 'a', 'great', 'film', '!']
    """
    if style == "words":
        return _word().findall(unicodedata.normalize("NFC", text.lower()))
    if style == "whitespace":
        return text.lower().split()
    raise ValueError(f"tokenizer style must be one of {', '.join(TOKENIZERS)}; got {style!r}")


def special_tokens(boundaries: bool = False) -> list[str]:
    """The tokens a vocabulary starts with: ``<pad>``, ``<unk>``, and ``<s>``, ``</s>`` with ``boundaries``.

    >>> special_tokens(boundaries=True)
    ['<pad>', '<unk>', '<s>', '</s>']
    """
    return [PAD, UNK, BOS, EOS] if boundaries else [PAD, UNK]


class Vocabulary:
    """Token ↔ id mapping with ``<pad>`` = 0 and ``<unk>`` = 1.

    Build one with `Vocabulary.build`; ``tokens[i]`` is the token of id ``i``.

    >>> vocab = Vocabulary.build([["a", "b", "a"], ["c", "a", "b"]], min_count=2)
    >>> vocab.tokens, vocab.encode(["a", "c", "b"])
    (['<pad>', '<unk>', 'a', 'b'], [2, 1, 3])
    >>> Vocabulary.build([["a"]], boundaries=True).tokens
    ['<pad>', '<unk>', '<s>', '</s>', 'a']
    """

    def __init__(self, tokens: Sequence[str]):
        if list(tokens[:2]) != [PAD, UNK]:
            raise ValueError(f"a vocabulary starts with {PAD!r}, {UNK!r}; got {list(tokens[:2])}")
        self.tokens = list(tokens)
        self._ids = {token: i for i, token in enumerate(self.tokens)}

    @classmethod
    def build(
        cls,
        tokenized: Iterable[Sequence[str]],
        *,
        min_count: int = 1,
        max_size: int | None = None,
        boundaries: bool = False,
    ) -> Vocabulary:
        """The vocabulary of tokens seen at least ``min_count`` times, at most ``max_size`` ids.

        With ``boundaries``, ``<s>`` and ``</s>`` follow ``<unk>`` (see `encode`).
        """
        specials = special_tokens(boundaries)
        if min_count < 1:
            raise ValueError(f"min_count must be at least 1; got {min_count}")
        if max_size is not None and max_size < len(specials):
            raise ValueError(
                f"max_size must be at least {len(specials)} (for {', '.join(specials)}); got {max_size}"
            )
        counts = collections.Counter(token for tokens in tokenized for token in tokens)
        kept = sorted(
            (t for t, c in counts.items() if c >= min_count and t not in specials),
            key=lambda t: (-counts[t], t),
        )
        if max_size is not None:
            kept = kept[: max_size - len(specials)]
        return cls([*specials, *kept])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """The ids of ``tokens``, ``<unk>`` for tokens not in the vocabulary."""
        return [self._ids.get(token, 1) for token in tokens]


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A split as token-id arrays (each at least one id long) and labels."""

    ids: list[np.ndarray]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def encode(
    split: Split,
    vocab: Vocabulary,
    *,
    max_length: int | None = None,
    tokenizer: str = "words",
    boundaries: bool = False,
) -> Encoded:
    """Tokenizes (`tokenize` style ``tokenizer``) and encodes ``split``, cut to ``max_length`` tokens.

    With ``boundaries``, each example becomes ``<s>`` + its tokens + ``</s>``
    (``max_length`` counts the tokens, not the two markers; ``vocab`` must have
    been built with ``boundaries=True``). Otherwise an empty sentence becomes a
    single ``<unk>``, so every example has length ≥ 1.
    """
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be at least 1; got {max_length}")
    if boundaries and vocab.tokens[2:4] != [BOS, EOS]:
        raise ValueError(
            f"boundaries=True needs a vocabulary built with boundaries=True (ids 2, 3 = {BOS}, {EOS})"
        )
    bos, eos = vocab.encode([BOS, EOS])
    ids = []
    for sentence in split.sentences:
        row = vocab.encode(tokenize(sentence, tokenizer))[:max_length]
        row = [bos, *row, eos] if boundaries else row or [1]
        ids.append(np.asarray(row, np.int32))
    return Encoded(ids, split.labels)


class Batch(NamedTuple):
    """One padded batch: ``tokens`` [B, T], ``lengths`` [B], ``labels`` [B], ``weights`` [B]."""

    tokens: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    weights: np.ndarray


def _pad(data: Encoded, rows: np.ndarray, batch_size: int, pad_multiple: int) -> Batch:
    lengths = np.ones(batch_size, np.int32)
    lengths[: len(rows)] = [len(data.ids[i]) for i in rows]
    width = pad_multiple * math.ceil(int(lengths.max()) / pad_multiple)
    tokens = np.zeros((batch_size, width), np.int32)
    for slot, i in enumerate(rows):
        tokens[slot, : lengths[slot]] = data.ids[i]
    labels = np.zeros(batch_size, np.int32)
    labels[: len(rows)] = data.labels[rows]
    weights = np.zeros(batch_size, np.float32)
    weights[: len(rows)] = 1.0
    return Batch(tokens, lengths, labels, weights)


def batches(
    data: Encoded,
    batch_size: int,
    *,
    rng: np.random.Generator | None = None,
    drop_remainder: bool = False,
    bucket_batches: int = 20,
    pad_multiple: int = 16,
) -> Iterator[Batch]:
    """Padded batches of ``data``, shuffled and length-bucketed when ``rng`` is given.

    With ``rng``, examples are shuffled, cut into pools of ``bucket_batches``
    batches, each pool sorted by length and cut into batches, and the batch
    order shuffled again. Without ``rng``, examples keep their order. Every
    batch has ``batch_size`` rows; a short last batch is padded with rows of
    weight 0, or dropped with ``drop_remainder``. Shuffled, the short batch
    holds the longest examples of the last pool: each epoch drops up to
    ``batch_size − 1`` of them, other ones every epoch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    order = np.arange(len(data))
    if rng is not None:
        order = rng.permutation(order)
        pool = batch_size * bucket_batches
        lengths = np.array([len(x) for x in data.ids])
        order = np.concatenate(
            [
                chunk[np.argsort(lengths[chunk], kind="stable")]
                for chunk in np.split(order, range(pool, len(order), pool))
            ]
        )
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_remainder and groups and len(groups[-1]) < batch_size:
        groups.pop()
    if rng is not None:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    for rows in groups:
        yield _pad(data, rows, batch_size, pad_multiple)


FILLERS = ("a", "b", "c", "d", "e", "f", "g", "h")


#: The shortest and the longest sentence of `temporal_order`, in words.
TASK_LENGTHS: tuple[int, int] = (50, 400)


def temporal_order(num_examples: int, length: int = 100, *, seed: int = 0) -> Split:
    """The two-symbol temporal-order task as sentences (see the module docstring).

    Deterministic for a given ``(num_examples, length, seed)``; labels are balanced
    in expectation. ``length`` (words per sentence) must lie in 50–400.

    >>> split = temporal_order(2, 50, seed=0)
    >>> len(split.sentences[0].split()), sorted(set(split.labels.tolist()) | {0, 1})
    (50, [0, 1])
    """
    low, high = TASK_LENGTHS
    if not low <= length <= high:
        raise ValueError(f"length must lie in {low}..{high}; got {length}")
    if num_examples < 1:
        raise ValueError(f"num_examples must be at least 1; got {num_examples}")
    rng = np.random.default_rng(seed)
    words = np.asarray(FILLERS)[rng.integers(0, len(FILLERS), size=(num_examples, length))]
    labels = rng.integers(0, 2, size=num_examples).astype(np.int32)
    first = rng.integers(length // 10, length // 5, size=num_examples)
    second = rng.integers(length // 2, (3 * length) // 5, size=num_examples)
    rows = np.arange(num_examples)
    words[rows, first] = np.where(labels == 0, "x", "y")
    words[rows, second] = np.where(labels == 0, "y", "x")
    return Split([" ".join(row) for row in words], labels)
