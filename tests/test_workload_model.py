"""The reference classifier: shapes, every cell and pooling, padding invariance, the preset."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clipx.workload.model import CELLS, POOLINGS, PRESETS, ModelConfig, TextClassifier


def _model(**overrides):
    settings = dict(vocab_size=30, embed_dim=8, hidden_size=8, mlp_hidden=8, num_classes=3)
    return TextClassifier(ModelConfig(**{**settings, **overrides}))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_never_changes_the_logits(cell, pooling, bidirectional):
    model = _model(cell=cell, pooling=pooling, bidirectional=bidirectional, head="mlp")
    sentences = np.array([[5, 6, 7, 8, 9], [3, 4, 0, 0, 0]])
    lengths = jnp.array([5, 2])
    params = model.init(jax.random.PRNGKey(0), sentences, lengths)
    logits = model.apply(params, sentences, lengths)
    assert logits.shape == (2, 3)
    for width in (7, 16):
        padded = np.zeros((2, width), np.int32)
        padded[:, :5] = sentences
        np.testing.assert_allclose(model.apply(params, padded, lengths), logits, atol=1e-6)
    # Alone in its batch and without padding, the short sentence gives the same logits.
    alone = model.apply(params, sentences[1:, :2], lengths[1:])
    np.testing.assert_allclose(alone, logits[1:], atol=1e-6)


def test_dropout_only_in_training():
    model = _model(dropout=0.5, word_dropout=0.5, head="mlp")
    tokens, lengths = jnp.ones((4, 6), jnp.int32) * 7, jnp.full((4,), 6)
    params = model.init(jax.random.PRNGKey(0), tokens, lengths)
    np.testing.assert_array_equal(model.apply(params, tokens, lengths), model.apply(params, tokens, lengths))
    a = model.apply(params, tokens, lengths, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    b = model.apply(params, tokens, lengths, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(a, b)


def test_flax_sst2_preset_matches_the_flax_example():
    preset = PRESETS["flax-sst2"]
    config = ModelConfig(vocab_size=100, **preset["model"])
    assert (config.embed_dim, config.hidden_size, config.cell, config.bidirectional) == (
        300,
        256,
        "lstm",
        True,
    )
    assert (config.pooling, config.head, config.dropout, config.word_dropout) == (
        "attention",
        "mlp",
        0.5,
        0.1,
    )
    assert preset["train"] == dict(
        optimizer="momentum",
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=3e-6,
        batch_size=64,
        epochs=10,
        tokenizer="whitespace",
        boundaries=True,
        min_count=3,
        pad_multiple=8,
    )
    assert config.embed_init_std == 0.1
    assert config.single_logit


def test_single_logit_is_sigmoid_cross_entropy():
    model = _model(num_classes=2, single_logit=True, head="mlp")
    tokens, lengths = jnp.array([[5, 6, 7], [8, 9, 0]]), jnp.array([3, 2])
    params = model.init(jax.random.PRNGKey(0), tokens, lengths)
    # The last layer is one bias-free output.
    assert jax.tree.map(jnp.shape, params["params"]["logit"]) == {"kernel": (8, 1)}
    logits = model.apply(params, tokens, lengths)
    np.testing.assert_array_equal(logits[:, 0], 0.0)
    labels = jnp.array([1, 0])
    softmax_ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    sigmoid_ce = optax.sigmoid_binary_cross_entropy(logits[:, 1], labels.astype(jnp.float32))
    np.testing.assert_allclose(softmax_ce, sigmoid_ce, rtol=1e-6)
    with pytest.raises(ValueError, match="single_logit needs num_classes == 2; got 3"):
        ModelConfig(vocab_size=10, num_classes=3, single_logit=True)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cell", "lstmx", "cell must be one of"),
        ("pooling", "max", "pooling must be"),
        ("dropout", 1.0, "dropout"),
        ("embed_init_std", 0.0, "embed_init_std must be positive"),
        ("embed_init_std", float("inf"), "embed_init_std must be positive and finite in float32"),
        ("embed_init_std", 1e39, "embed_init_std must be positive and finite in float32"),  # ∞ in float32
    ],
)
def test_bad_settings_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(vocab_size=10, **{field: value})


def test_last_pooling_of_a_bidirectional_model_reads_the_backward_state_at_the_first_token():
    """The backward direction ends at token 0, having read the whole sentence: with the head
    reading the backward half alone, a change of token 0 reaches the logits."""
    model = _model(cell="gru", pooling="last", bidirectional=True, head="linear")
    tokens, lengths = np.array([[5, 6, 7, 8, 9, 0]]), jnp.array([5])
    params = model.init(jax.random.PRNGKey(0), tokens, lengths)
    head = params["params"]["Dense_0"]
    forward_unread = {**head, "kernel": head["kernel"].at[:8].set(0.0)}  # rows of the forward half
    params = {"params": {**params["params"], "Dense_0": forward_unread}}
    first_changed = np.array([[3, 6, 7, 8, 9, 0]])
    assert not np.allclose(model.apply(params, first_changed, lengths), model.apply(params, tokens, lengths))
