"""Data loading: every malformed file names file and line; tokenizer, vocabulary, batches, synthetic task."""

import unicodedata

import numpy as np
import pytest

from clipx.workload import data


def _write(tmp_path, text, name="train.tsv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_a_good_file(tmp_path):
    split = data.read_tsv(_write(tmp_path, "sentence\tlabel\ngood film\t1\nbad one\t0\n"))
    assert split.sentences == ["good film", "bad one"]
    assert split.labels.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("", ":1:", "file is empty"),
        ("text\tlabel\nx\t1\n", ":1:", "header is 'text\\\\tlabel'"),
        ("sentence\tlabel\textra\nx\t1\n", ":1:", "header is 'sentence\\\\tlabel\\\\textra'"),
        ("sentence\tlabel\n", ":2:", "no examples"),
        ("sentence\tlabel\nfine\t1\nbad\tone\n", ":3:", "label 'one' is not an integer"),
        ("sentence\tlabel\nfine\t1\nno label here\n", ":3:", "expected 2 tab-separated fields .* found 1"),
        ("sentence\tlabel\na\tb\t1\n", ":2:", "found 3"),
        ("sentence\tlabel\na\t-1\n", ":2:", "negative"),
        ("sentence\tlabel\na\t1_0\n", ":2:", "label '1_0' is not an integer"),
        ("sentence\tlabel\na\t+1\n", ":2:", "label '\\+1' is not an integer"),
        ("sentence\tlabel\na\t\u0661\n", ":2:", "is not an integer \\(digits 0-9\\)"),
        ("sentence\tlabel\na\t\uff11\n", ":2:", "is not an integer"),
        ("sentence\tlabel\na\t99999999999\n", ":2:", "label 99999999999 is too large"),
        ("sentence\tlabel\rgood\t1\rbad\t0\r", ":1:", "^[^\\t]*: lines end in CR alone; expected LF or CRLF"),
        (
            "s" * 5000 + "\tlabel\nx\t1\n",
            ":1:",
            "^.{0,200}header is 's{60}'… \\(5006 characters\\); expected",
        ),
        (
            "sentence\tlabel\na\t" + "1x" * 3000 + "\n",
            ":2:",
            "^.{0,200}label '(1x){30}'… \\(6000 characters\\) is",
        ),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, text, where, message):
    path = _write(tmp_path, text)
    with pytest.raises(data.DataError, match=message) as error:
        data.read_tsv(path)
    assert str(error.value).startswith(f"{path}{where}")


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_bytes(b"sentence\tlabel\ngood\t1\nb\xffad\t0\n")
    with pytest.raises(data.DataError) as error:
        data.read_tsv(path)
    assert str(error.value) == f"{path}:3: not UTF-8 text (byte 0xff)"


def test_lines_end_only_at_newlines_and_a_byte_order_mark_is_skipped(tmp_path):
    sentences = ["foo\u2028bar", "a\u0085b", "form\x0cfeed", "lone\rcr", "tab\x0bvertical"]
    body = "".join(f"{s}\t{i % 2}\r\n" for i, s in enumerate(sentences))
    path = tmp_path / "data.tsv"
    path.write_bytes(("\ufeffsentence\tlabel\r\n" + body).encode("utf-8"))
    split = data.read_tsv(path)
    assert split.sentences == sentences
    assert split.labels.tolist() == [0, 1, 0, 1, 0]


def test_labels_may_carry_spaces_around_their_digits(tmp_path):
    assert data.read_tsv(_write(tmp_path, "sentence\tlabel\na\t 1\nb\t0 \n")).labels.tolist() == [1, 0]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(data.DataError, match="file not found") as error:
        data.read_tsv(tmp_path / "nope.tsv")
    assert str(tmp_path / "nope.tsv") in str(error.value)


def test_vocabulary_limits_and_unknowns():
    tokenized = [data.tokenize("b a a c"), data.tokenize("A B d")]
    vocab = data.Vocabulary.build(tokenized, max_size=4)
    assert vocab.tokens == ["<pad>", "<unk>", "a", "b"]
    assert vocab.encode(["a", "zzz"]) == [2, 1]


def test_boundaries_wrap_every_example():
    split = data.Split(["a b", "", "b c a"], np.array([0, 1, 0], np.int32))
    tokenized = [data.tokenize(s) for s in split.sentences]
    vocab = data.Vocabulary.build([*tokenized, ["<s>", "</s>"]], boundaries=True)
    # Specials are never added twice, even when the text holds them.
    assert vocab.tokens == ["<pad>", "<unk>", "<s>", "</s>", "a", "b", "c"]
    encoded = data.encode(split, vocab, boundaries=True, max_length=2)
    assert [x.tolist() for x in encoded.ids] == [[2, 4, 5, 3], [2, 3], [2, 5, 6, 3]]
    with pytest.raises(ValueError, match="needs a vocabulary built with boundaries=True"):
        data.encode(split, data.Vocabulary.build(tokenized), boundaries=True)
    with pytest.raises(ValueError, match="max_size must be at least 4"):
        data.Vocabulary.build(tokenized, boundaries=True, max_size=3)


def test_tokenizer_styles():
    text = "It 's not a GREAT film -- 10/10 !"
    assert data.tokenize(text) == ["it", "s", "not", "a", "great", "film", "10", "10"]
    assert data.tokenize("snake_case 10_000") == ["snake", "case", "10", "000"]  # "_" separates words
    assert data.tokenize(text, "whitespace") == ["it", "'s", "not", "a", "great", "film", "--", "10/10", "!"]
    split = data.Split(["a !", "b ?"], np.array([0, 1], np.int32))
    vocab = data.Vocabulary.build(data.tokenize(s, "whitespace") for s in split.sentences)
    assert [x.tolist() for x in data.encode(split, vocab, tokenizer="whitespace").ids] == [[4, 2], [5, 3]]
    with pytest.raises(ValueError, match="tokenizer style must be one of words, whitespace; got 'bpe'"):
        data.tokenize(text, "bpe")


def test_batches_pad_bucket_and_weight():
    split = data.Split(["a b c", "a", "b c", "c c c c c"], np.array([0, 1, 0, 1], np.int32))
    vocab = data.Vocabulary.build(data.tokenize(s) for s in split.sentences)
    encoded = data.encode(split, vocab, max_length=4)
    assert [len(x) for x in encoded.ids] == [3, 1, 2, 4]
    batches = list(data.batches(encoded, 3, pad_multiple=4))
    assert [b.tokens.shape for b in batches] == [(3, 4), (3, 4)]
    assert batches[1].weights.tolist() == [1.0, 0.0, 0.0]
    first = batches[0]
    assert first.lengths.tolist() == [3, 1, 2]
    assert (first.tokens[1, 1:] == 0).all()
    shuffled = list(data.batches(encoded, 2, rng=np.random.default_rng(0), drop_remainder=True))
    seen = sorted(int(label) for b in shuffled for label in b.labels)
    assert len(shuffled) == 2 and seen == [0, 0, 1, 1]


def test_temporal_order_task_is_deterministic_and_correct():
    split = data.temporal_order(64, 120, seed=3)
    again = data.temporal_order(64, 120, seed=3)
    assert split.sentences == again.sentences
    for sentence, label in zip(split.sentences, split.labels, strict=True):
        words = sentence.split()
        assert len(words) == 120
        assert words.index("x") < words.index("y") if label == 0 else words.index("y") < words.index("x")
    with pytest.raises(ValueError, match=r"50\.\.400"):
        data.temporal_order(4, 20)


def test_reads_the_shared_data(data_dir):
    split = data.read_tsv(data_dir / "sst2" / "dev.tsv")
    assert len(split) == 872 and set(split.labels.tolist()) == {0, 1}


def test_words_keep_their_combining_marks_however_accents_are_encoded():
    composed = "Café résumé"
    decomposed = unicodedata.normalize("NFD", composed)
    assert data.tokenize(decomposed) == data.tokenize(composed) == ["café", "résumé"]
    assert data.tokenize("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # vowel signs are marks, not separators
