"""A recurrent text classifier in Flax linen, and the ``flax-sst2`` preset.

The model reads a batch of padded token ids ``[batch, time]`` with the true
``lengths`` of each row and returns class logits ``[batch, num_classes]``:

    word dropout → embedding → dropout → recurrent layer (lstm | gru | simple,
    optionally bidirectional) → masked pooling (last; or dropout → mean |
    attention) → dropout → head (mlp | linear)

Padding never changes a result: the recurrent layer receives ``seq_lengths``
(so the backward direction starts at each row's last real token and the "last"
state is taken at that token), and every pooling masks positions beyond a
row's length.

Flax **linen** is used rather than NNX because linen keeps parameters as a plain
pytree of arrays: the Optax state (and so every clipx state inside it) is a
plain pytree too, which ``jax.jit`` takes as an argument and
``flax.serialization`` writes to a checkpoint without any module objects.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clipx.workload import _settings

Cell = Literal["lstm", "gru", "simple"]
Pooling = Literal["last", "mean", "attention"]
Head = Literal["mlp", "linear"]

CELLS: tuple[str, ...] = ("lstm", "gru", "simple")
POOLINGS: tuple[str, ...] = ("last", "mean", "attention")
HEADS: tuple[str, ...] = ("mlp", "linear")

UNK_ID = 1
#: The largest float32, the parameters' dtype: a larger setting would be ∞ at the first step.
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of `TextClassifier` (the defaults are a small, fast model).

    Attributes:
      vocab_size: number of token ids (``<pad>`` = 0 and ``<unk>`` = 1 included).
      num_classes: number of output classes.
      embed_dim: embedding width.
      hidden_size: recurrent state width (per direction).
      cell: ``"lstm"`` (``nn.OptimizedLSTMCell``), ``"gru"`` (``nn.GRUCell``) or
        ``"simple"`` (``nn.SimpleCell``, a tanh vanilla RNN: gradients explode
        most easily there).
      bidirectional: run a second recurrent layer right to left and concatenate.
      pooling: ``"last"`` (the state at the last real token; the first token for
        the backward direction), ``"mean"`` over real tokens, or ``"attention"``
        (an MLP scores each position, masked softmax, weighted sum).
      head: ``"mlp"`` (Dense → tanh → dropout → Dense) or ``"linear"``.
      mlp_hidden: width of the MLP head and of the attention scorer.
      dropout: dropout rate on embeddings, on the recurrent outputs before mean
        or attention pooling, on the pooled vector and in the MLP head.
      word_dropout: probability of replacing a token by ``<unk>`` in training.
      embed_init_std: initialise the embedding from ``N(0, embed_init_std²)``;
        ``None`` for ``nn.Embed``'s default (variance ``1 / embed_dim``).
      single_logit: two classes from one logit ``z`` of a bias-free last layer
        (Flax's SST-2 head, trained with sigmoid cross-entropy). The model
        returns ``[0, z]``: its softmax cross-entropy is exactly the sigmoid
        cross-entropy of ``z``, so training and evaluation need no other change.
    """

    vocab_size: int
    num_classes: int = 2
    embed_dim: int = 64
    hidden_size: int = 128
    cell: Cell = "lstm"
    bidirectional: bool = False
    pooling: Pooling = "last"
    head: Head = "linear"
    mlp_hidden: int = 128
    dropout: float = 0.0
    word_dropout: float = 0.0
    embed_init_std: float | None = None
    single_logit: bool = False

    def __post_init__(self):
        for name, allowed in (("cell", CELLS), ("pooling", POOLINGS), ("head", HEADS)):
            object.__setattr__(self, name, _settings.choice(name, getattr(self, name), allowed))
        for name in ("vocab_size", "num_classes", "embed_dim", "hidden_size", "mlp_hidden"):
            size = _settings.integer(name, getattr(self, name))
            if size < 1:
                raise ValueError(f"{name} must be a positive integer; got {size}")
            object.__setattr__(self, name, size)
        for name in ("bidirectional", "single_logit"):
            object.__setattr__(self, name, _settings.flag(name, getattr(self, name)))
        if self.single_logit and self.num_classes != 2:
            raise ValueError(f"single_logit needs num_classes == 2; got {self.num_classes}")
        if self.embed_init_std is not None:
            std = _settings.real("embed_init_std", self.embed_init_std)
            if not 0 < std <= FLOAT32_MAX:
                raise ValueError(f"embed_init_std must be positive and finite in float32, or None; got {std}")
            object.__setattr__(self, "embed_init_std", std)
        for name in ("dropout", "word_dropout"):
            rate = _settings.real(name, getattr(self, name))
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must lie in [0, 1); got {rate}")
            object.__setattr__(self, name, rate)


#: Named presets: keyword arguments of `ModelConfig` (without ``vocab_size``) and
#: the training settings that go with them.
PRESETS: dict[str, dict[str, dict]] = {
    # Flax's examples/sst2 (reported 85.21% SST-2 dev accuracy).
    "flax-sst2": {
        "model": dict(
            embed_dim=300,
            hidden_size=256,
            cell="lstm",
            bidirectional=True,
            pooling="attention",
            head="mlp",
            mlp_hidden=256,
            dropout=0.5,
            word_dropout=0.1,
            embed_init_std=0.1,
            single_logit=True,
        ),
        "train": dict(
            optimizer="momentum",
            learning_rate=0.1,
            momentum=0.9,
            weight_decay=3e-6,
            batch_size=64,
            epochs=10,
            # Flax's pipeline splits the pre-tokenized sentences on whitespace,
            # wraps them in <s> … </s>, keeps words seen at least 3 times, and
            # buckets lengths in steps of 8.
            tokenizer="whitespace",
            boundaries=True,
            min_count=3,
            pad_multiple=8,
        ),
    },
}


def _make_cell(cell: str, hidden_size: int) -> nn.RNNCellBase:
    if cell == "lstm":
        return nn.OptimizedLSTMCell(hidden_size)
    if cell == "gru":
        return nn.GRUCell(hidden_size)
    return nn.SimpleCell(hidden_size)


def _masked_mean(values: jax.Array, mask: jax.Array, lengths: jax.Array) -> jax.Array:
    total = jnp.sum(jnp.where(mask[..., None], values, 0.0), axis=1)
    return total / jnp.maximum(lengths, 1)[:, None].astype(values.dtype)


class AttentionPooling(nn.Module):
    """Masked additive attention pooling: ``softmax(v·tanh(W h_t))`` over real tokens (no biases)."""

    hidden: int

    @nn.compact
    def __call__(self, values: jax.Array, mask: jax.Array) -> jax.Array:
        scores = nn.Dense(1, use_bias=False)(jnp.tanh(nn.Dense(self.hidden, use_bias=False)(values)))[..., 0]
        # exp(-1e9 - max) is exactly 0 in float32: padding gets no weight.
        weights = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
        return jnp.einsum("bt,btd->bd", weights, values)


class TextClassifier(nn.Module):
    """The recurrent classifier described by a `ModelConfig`.

    Call with ``tokens`` (int ``[batch, time]``, ``<pad>`` = 0 past each row's
    length), ``lengths`` (int ``[batch]``, at least 1) and ``train`` (enables
    dropout and word dropout; needs a ``"dropout"`` rng). Returns logits
    ``[batch, num_classes]``.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, lengths: jax.Array, *, train: bool = False) -> jax.Array:
        cfg = self.config
        lengths = jnp.maximum(lengths, 1)
        mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
        if train and cfg.word_dropout > 0:
            drop = jax.random.bernoulli(self.make_rng("dropout"), cfg.word_dropout, tokens.shape)
            tokens = jnp.where(drop & mask, UNK_ID, tokens)
        embed_init = (
            nn.linear.default_embed_init
            if cfg.embed_init_std is None
            else nn.initializers.normal(cfg.embed_init_std)
        )
        x = nn.Embed(cfg.vocab_size, cfg.embed_dim, embedding_init=embed_init)(tokens)
        x = nn.Dropout(cfg.dropout, deterministic=not train)(x)

        # nn.RNN returns only the outputs [batch, time, hidden] here (return_carry is False).
        forward = cast(
            jax.Array, nn.RNN(_make_cell(cfg.cell, cfg.hidden_size), name="forward")(x, seq_lengths=lengths)
        )
        outputs = [forward]
        if cfg.bidirectional:
            backward = cast(
                jax.Array,
                nn.RNN(_make_cell(cfg.cell, cfg.hidden_size), reverse=True, keep_order=True, name="backward")(
                    x, seq_lengths=lengths
                ),
            )
            outputs.append(backward)

        if cfg.pooling == "last":
            last = jnp.take_along_axis(forward, (lengths - 1)[:, None, None], axis=1)[:, 0]
            # The backward direction ends at the first token.
            pooled = jnp.concatenate([last, backward[:, 0]], -1) if cfg.bidirectional else last
        else:
            sequence = nn.Dropout(cfg.dropout, deterministic=not train)(jnp.concatenate(outputs, axis=-1))
            if cfg.pooling == "mean":
                pooled = _masked_mean(sequence, mask, lengths)
            else:
                pooled = AttentionPooling(cfg.mlp_hidden)(sequence, mask)

        pooled = nn.Dropout(cfg.dropout, deterministic=not train)(pooled)
        if cfg.head == "mlp":
            pooled = jnp.tanh(nn.Dense(cfg.mlp_hidden)(pooled))
            pooled = nn.Dropout(cfg.dropout, deterministic=not train)(pooled)
        if cfg.single_logit:
            z = nn.Dense(1, use_bias=False, name="logit")(pooled)
            return jnp.concatenate([jnp.zeros_like(z), z], axis=-1)
        return nn.Dense(cfg.num_classes)(pooled)
