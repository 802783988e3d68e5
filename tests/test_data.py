"""moemerge.data: reading every input format, seeded selection, tokenisation, errors and batching."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from moemerge.data import DataError, DataOptions, SampleSource, batches, load_domain

WORDS = "the cat sat on a mat dog ran far away user assistant system : hello world one two three four five six"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'tool' %}{{ raise_exception('tool turns are not supported') }}{% endif %}"
    "{{ m['role'] }} : {{ m['content'] }} {{ eos_token }}{% endfor %}"
)


def make_tokenizer(chat_template: str | None = TEMPLATE, model_max_length: int | None = None):
    """A word-level tokenizer whose post-processor adds BOS, like most LLM tokenizers."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    tok.train_from_iterator([WORDS, " ".join(f"row{i}" for i in range(50))], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        **kwargs,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "the cat sat"}]


def numbered_texts(tmp_path: Path, n: int) -> Path:
    """n text rows whose first word after BOS is unique, so a sample's id tells which row it is."""
    return write_jsonl(tmp_path / "n.jsonl", [{"text": f"row{i} the cat"} for i in range(n)])


def lines_of(domain) -> list[int]:
    return [s.line for s in domain.sources]


# --- input formats -----------------------------------------------------------------------------------


def test_jsonl_text_rows_use_tokenizer_special_tokens(tmp_path, tokenizer):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "the cat sat"}\n\n{"text": "a dog ran far away"}\n')
    calibration, heldout = load_domain("d", [path], tokenizer)
    assert heldout is None
    by_line = dict(zip(lines_of(calibration), calibration.samples, strict=True))
    assert sorted(by_line) == [1, 3]  # the blank line is skipped but still counted
    assert by_line[1].tolist() == tokenizer("the cat sat")["input_ids"]
    assert by_line[1][0].item() == tokenizer.bos_token_id
    assert by_line[3].tolist() == tokenizer("a dog ran far away")["input_ids"]
    assert all(s.dtype == torch.long and s.dim() == 1 for s in calibration.samples)
    assert calibration.num_tokens == 4 + 6
    assert calibration.name == "d" and calibration.split == "calibration"
    assert all(s.path == path for s in calibration.sources)


def test_chat_rows_equal_apply_chat_template_tokens(tmp_path, tokenizer):
    rows = [{"messages": chat(i)} for i in range(3)]
    calibration, _ = load_domain("d", [write_jsonl(tmp_path / "c.jsonl", rows)], tokenizer)
    for source, sample in zip(calibration.sources, calibration.samples, strict=True):
        expected = tokenizer.apply_chat_template(rows[source.line - 1]["messages"], tokenize=True, return_dict=False)
        assert sample.tolist() == list(expected)
        # the template writes BOS itself: the tokenizer must not add a second one
        assert (sample == tokenizer.bos_token_id).sum().item() == 1


def test_chat_template_without_bos_gets_none_added(tmp_path):
    tokenizer = make_tokenizer(chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}")
    calibration, _ = load_domain("d", [write_jsonl(tmp_path / "c.jsonl", [{"messages": chat(0)}])], tokenizer)
    assert calibration.samples[0].tolist() == tokenizer("hello 0 the cat sat", add_special_tokens=False)["input_ids"]


def test_row_with_messages_and_text_uses_messages(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "b.jsonl", [{"messages": chat(1), "text": "a dog ran"}])
    calibration, _ = load_domain("d", [path], tokenizer)
    expected = tokenizer.apply_chat_template(chat(1), tokenize=True, return_dict=False)
    assert calibration.samples[0].tolist() == list(expected)


def test_json_array_rows_know_their_line(tmp_path, tokenizer):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"text": "the cat"},\n\n  {"messages": [{"role": "user", "content": "hello"}]}\n]\n')
    calibration, _ = load_domain("d", [path], tokenizer)
    assert sorted(lines_of(calibration)) == [2, 4]
    by_line = dict(zip(lines_of(calibration), calibration.samples, strict=True))
    assert by_line[2].tolist() == tokenizer("the cat")["input_ids"]
    hello = [{"role": "user", "content": "hello"}]
    assert by_line[4].tolist() == list(tokenizer.apply_chat_template(hello, tokenize=True, return_dict=False))


def test_empty_json_array_is_an_empty_domain(tmp_path, tokenizer):
    path = tmp_path / "a.json"
    path.write_text(" [ ] \n")
    with pytest.raises(DataError, match=r"domain 'd': no samples in .*a\.json"):
        load_domain("d", [path], tokenizer)


def test_txt_file_is_one_sample(tmp_path, tokenizer):
    path = tmp_path / "doc.txt"
    path.write_text("the cat sat\n\non a mat\n")
    calibration, _ = load_domain("d", [path], tokenizer)
    assert lines_of(calibration) == [1]
    assert calibration.samples[0].tolist() == tokenizer("the cat sat\n\non a mat\n")["input_ids"]


def test_txt_paragraphs(tmp_path, tokenizer):
    path = tmp_path / "doc.txt"
    path.write_text("\nthe cat sat\non a mat\n   \n\ndog ran\n")
    options = DataOptions(txt_split_paragraphs=True)
    calibration, _ = load_domain("d", [path], tokenizer, options)
    by_line = dict(zip(lines_of(calibration), calibration.samples, strict=True))
    assert sorted(by_line) == [2, 6]
    assert by_line[2].tolist() == tokenizer("the cat sat\non a mat")["input_ids"]
    assert by_line[6].tolist() == tokenizer("dog ran")["input_ids"]


def test_several_files_make_one_domain(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "the cat"}, {"messages": chat(2)}])
    b = tmp_path / "b.txt"
    b.write_text("dog ran")
    calibration, _ = load_domain("d", [a, str(b)], tokenizer)
    assert sorted((s.path.name, s.line) for s in calibration.sources) == [
        ("a.jsonl", 1),
        ("a.jsonl", 2),
        ("b.txt", 1),
    ]
    assert str(SampleSource(a, 2)) == f"{a}:2"


def test_blank_text_samples_are_dropped_with_a_warning(tmp_path, tokenizer, caplog):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat"}, {"text": "  \n"}, {"text": ""}])
    calibration, _ = load_domain("d", [path], tokenizer)
    assert lines_of(calibration) == [1]
    assert "dropped 2 empty text sample(s)" in caplog.text and f"{path}:2" in caplog.text


# --- selection ---------------------------------------------------------------------------------------


def test_max_samples_count_and_fraction(tmp_path, tokenizer):
    path = numbered_texts(tmp_path, 20)
    assert len(load_domain("d", [path], tokenizer, DataOptions(max_samples=7))[0]) == 7
    assert len(load_domain("d", [path], tokenizer, DataOptions(max_samples=0.25))[0]) == 5
    assert len(load_domain("d", [path], tokenizer, DataOptions(max_samples=0.29))[0]) == 5  # rounds down
    assert len(load_domain("d", [path], tokenizer, DataOptions(max_samples=0.01))[0]) == 1  # at least 1
    assert len(load_domain("d", [path], tokenizer, DataOptions(max_samples=100))[0]) == 20
    assert len(load_domain("d", [path], tokenizer)[0]) == 20


def test_fraction_is_of_the_samples_left_after_heldout(tmp_path, tokenizer):
    path = numbered_texts(tmp_path, 20)
    calibration, heldout = load_domain("d", [path], tokenizer, DataOptions(heldout=10, max_samples=0.5))
    assert (len(calibration), len(heldout)) == (5, 10)


def test_seeded_shuffle_is_reproducible_and_seed_dependent(tmp_path, tokenizer):
    path = numbered_texts(tmp_path, 30)

    def order(seed: int, **kw) -> list[int]:
        return lines_of(load_domain("d", [path], tokenizer, DataOptions(seed=seed, **kw))[0])

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == list(range(1, 31))
    assert order(0) != list(range(1, 31))  # shuffled, not file order
    assert order(3, max_samples=10) == order(3)[:10]
    assert set(order(0, max_samples=10)) != set(order(1, max_samples=10))


def test_heldout_is_disjoint_and_seeded(tmp_path, tokenizer):
    path = numbered_texts(tmp_path, 30)
    options = DataOptions(heldout=8, max_samples=15, seed=4)
    calibration, heldout = load_domain("d", [path], tokenizer, options)
    assert heldout is not None and heldout.split == "heldout" and heldout.name == "d"
    assert (len(calibration), len(heldout)) == (15, 8)
    assert not set(lines_of(calibration)) & set(lines_of(heldout))
    ids_cal = {tuple(s.tolist()) for s in calibration.samples}
    ids_held = {tuple(s.tolist()) for s in heldout.samples}
    assert not ids_cal & ids_held  # the rows are all different, so token ids must be too
    again = load_domain("d", [path], tokenizer, options)
    assert lines_of(again[0]) == lines_of(calibration) and lines_of(again[1]) == lines_of(heldout)
    # without max_samples, calibration and held-out cover every sample exactly once
    calibration, heldout = load_domain("d", [path], tokenizer, DataOptions(heldout=0.2, seed=4))
    assert len(heldout) == 6
    assert sorted(lines_of(calibration) + lines_of(heldout)) == list(range(1, 31))


def test_heldout_does_not_change_the_calibration_prefix(tmp_path, tokenizer):
    path = numbered_texts(tmp_path, 30)
    without = load_domain("d", [path], tokenizer, DataOptions(max_samples=10))[0]
    with_heldout = load_domain("d", [path], tokenizer, DataOptions(max_samples=10, heldout=5))[0]
    assert lines_of(without) == lines_of(with_heldout)


# --- truncation ---------------------------------------------------------------------------------------


def test_truncation_keeps_the_first_tokens(tmp_path, tokenizer):
    text = "one two three four five six"
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": text}, {"messages": chat(0)}, {"text": "the cat"}])
    calibration, _ = load_domain("d", [path], tokenizer, DataOptions(max_length=4))
    by_line = dict(zip(lines_of(calibration), calibration.samples, strict=True))
    assert by_line[1].tolist() == tokenizer(text)["input_ids"][:4]
    assert by_line[2].tolist() == list(tokenizer.apply_chat_template(chat(0), tokenize=True, return_dict=False))[:4]
    assert by_line[3].tolist() == tokenizer("the cat")["input_ids"]


def test_default_max_length_comes_from_the_tokenizer(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "one two three four five six"}])
    short = make_tokenizer(model_max_length=3)
    assert len(load_domain("d", [path], short)[0].samples[0]) == 3
    # no declared maximum (transformers' huge sentinel): 2048, so this sample stays whole
    assert len(load_domain("d", [path], make_tokenizer())[0].samples[0]) == 7


# --- errors --------------------------------------------------------------------------------------------


def error(tmp_path, tokenizer, name: str, content: str, options: DataOptions | None = None) -> str:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_domain("d", [path], tokenizer, options)
    return str(info.value)


@pytest.mark.parametrize(
    ("content", "line", "fragment"),
    [
        ('{"text": "the cat"}\n{"text": "dog\n', 2, "invalid JSON"),
        ('{"text": "the cat"}\n\n{"prompt": "the cat"}\n', 3, "neither 'messages' nor 'text'"),
        ('["the cat"]\n', 1, "expected a JSON object"),
        ('{"text": 3}\n', 1, "'text' must be a string"),
        ('{"text": "a"}\n{"messages": "hello"}\n', 2, "'messages' must be a non-empty list"),
        ('{"messages": []}\n', 1, "'messages' must be a non-empty list"),
        ('{"messages": ["hello"]}\n', 1, "messages[0] must be an object"),
        ('{"messages": [{"content": "hello"}]}\n', 1, "messages[0] needs a string 'role'"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "user"}]}\n',
            1,
            "messages[1] has no 'content'",
        ),
        ('{"messages": [{"role": "user", "content": 5}]}\n', 1, "'content' must be a string"),
        (
            '{"text": "a"}\n{"messages": [{"role": "tool", "content": "a"}]}\n',
            2,
            "tool turns are not supported",
        ),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, tokenizer, content, line, fragment):
    message = error(tmp_path, tokenizer, "bad.jsonl", content)
    assert f"{tmp_path / 'bad.jsonl'}:{line}:" in message
    assert fragment in message


def test_messages_without_chat_template(tmp_path):
    content = '{"text": "the cat"}\n{"text": "a"}\n{"messages": [{"role": "user", "content": "hello"}]}\n'
    message = error(tmp_path, make_tokenizer(chat_template=None), "c.jsonl", content)
    assert f"{tmp_path / 'c.jsonl'}:3:" in message and "no chat template" in message


@pytest.mark.parametrize(
    ("content", "line", "fragment"),
    [
        ('[\n {"text": "a"},\n {"text": \n]', 4, "invalid JSON"),
        ('[\n {"text": "a"}\n {"text": "b"}\n]', 3, "Expecting ',' or ']'"),
        ('[\n {"text": "a"}\n] [', 3, "Extra data"),
        ('\n{"text": "a"}', 2, "one array of rows"),
        ('[\n {"text": "a"},\n\n {"txt": "b"}\n]', 4, "neither 'messages' nor 'text'"),
    ],
)
def test_json_errors_name_file_and_line(tmp_path, tokenizer, content, line, fragment):
    message = error(tmp_path, tokenizer, "bad.json", content)
    assert f"{tmp_path / 'bad.json'}:{line}:" in message
    assert fragment in message


def test_invalid_utf8_names_the_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8"):
        load_domain("d", [path], tokenizer)
    path = tmp_path / "bad.txt"
    path.write_bytes(b"the cat\nsat \xff\n")
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8"):
        load_domain("d", [path], tokenizer)


def test_missing_file_and_unknown_extension(tmp_path, tokenizer):
    with pytest.raises(DataError, match=rf"{tmp_path / 'nope.jsonl'}: no such file"):
        load_domain("d", [tmp_path / "nope.jsonl"], tokenizer)
    with pytest.raises(DataError, match=rf"{tmp_path}: no such file"):
        load_domain("d", [tmp_path], tokenizer)
    message = error(tmp_path, tokenizer, "data.tsv", "text\nthe cat\n")
    assert f"{tmp_path / 'data.tsv'}: unknown file type '.tsv'" in message and ".parquet" in message


def test_empty_domains(tmp_path, tokenizer):
    with pytest.raises(DataError, match="domain 'd': no files given"):
        load_domain("d", [], tokenizer)
    message = error(tmp_path, tokenizer, "empty.jsonl", "\n\n")
    assert "domain 'd': no samples in" in message and "empty.jsonl" in message
    message = error(tmp_path, tokenizer, "blank.jsonl", '{"text": ""}\n{"text": " "}\n')
    assert "domain 'd': every sample in" in message and "blank.jsonl" in message and "empty" in message
    message = error(tmp_path, tokenizer, "blank.txt", "\n  \n", DataOptions(txt_split_paragraphs=True))
    assert "no samples in" in message and "blank.txt" in message
    message = error(tmp_path, tokenizer, "blank2.txt", "\n  \n")
    assert "every sample in" in message and "blank2.txt" in message


def test_heldout_that_leaves_nothing_to_calibrate(tmp_path, tokenizer):
    message = error(tmp_path, tokenizer, "t.jsonl", '{"text": "a"}\n{"text": "b"}\n', DataOptions(heldout=2))
    assert "domain 'd'" in message and "reserves 2 of 2 samples" in message


# --- options -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_samples": 0},
        {"max_samples": 1.0},
        {"max_samples": 0.0},
        {"max_samples": True},
        {"max_samples": -3},
        {"heldout": -1},
        {"heldout": 1.5},
        {"heldout": False},
        {"max_length": 0},
        {"batch_size": 4},
    ],
)
def test_invalid_options(kwargs):
    with pytest.raises(pydantic.ValidationError):
        DataOptions(**kwargs)


def test_options_parse_cli_strings_and_document_every_field():
    assert DataOptions(max_samples="0.5").max_samples == 0.5
    assert DataOptions(max_samples="100").max_samples == 100
    assert isinstance(DataOptions(max_samples="100").max_samples, int)
    for name, field in DataOptions.model_fields.items():
        assert field.description, name


def test_importing_data_does_not_import_torch():
    code = "import sys, moemerge.data; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- batches -------------------------------------------------------------------------------------------


@pytest.fixture()
def domain(tmp_path, tokenizer):
    words = WORDS.split()
    rows = [{"text": " ".join(words[(3 * i) % 10 : (3 * i) % 10 + 1 + (7 * i) % 11])} for i in range(25)]
    rows += [{"messages": chat(i)} for i in range(5)]
    return load_domain("d", [write_jsonl(tmp_path / "mix.jsonl", rows)], tokenizer)[0]


@pytest.mark.parametrize("batch_tokens", [1, 7, 12, 40, 1000])
def test_batches_pad_right_and_cover_every_sample_once(domain, batch_tokens):
    pad_id = 0
    seen = []
    for batch in batches(domain, batch_tokens=batch_tokens, pad_id=pad_id):
        b, t = batch.input_ids.shape
        assert batch.attention_mask.shape == (b, t) and b == len(batch.indices)
        assert batch.input_ids.dtype == torch.long and batch.attention_mask.dtype == torch.long
        longest = max(len(domain.samples[i]) for i in batch.indices)
        assert t == longest
        assert b * t <= batch_tokens or b == 1
        for row, i in enumerate(batch.indices):
            sample = domain.samples[i]
            n = len(sample)
            assert torch.equal(batch.input_ids[row, :n], sample)
            assert (batch.input_ids[row, n:] == pad_id).all()
            assert (batch.attention_mask[row, :n] == 1).all() and (batch.attention_mask[row, n:] == 0).all()
        assert batch.num_tokens == sum(len(domain.samples[i]) for i in batch.indices)
        seen += batch.indices
    assert sorted(seen) == list(range(len(domain)))
    lengths = [len(domain.samples[i]) for i in seen]
    assert lengths == sorted(lengths, reverse=True)  # longest first


def test_batches_are_deterministic_and_use_the_budget(domain):
    first = [(b.indices, b.input_ids.tolist()) for b in batches(domain, 30, pad_id=9)]
    second = [(b.indices, b.input_ids.tolist()) for b in batches(domain, 30, pad_id=9)]
    assert first == second
    assert any(9 in row for _, ids in first for row in ids)  # padding uses pad_id
    # greedy packing: a batch stops only when one more row of its width would exceed the budget
    for b in batches(domain, 30, pad_id=0):
        rows, width = b.input_ids.shape
        last = b.indices[-1] == sorted(range(len(domain)), key=lambda i: (-len(domain.samples[i]), i))[-1]
        assert last or (rows + 1) * width > 30


def test_a_sample_longer_than_the_budget_is_a_batch_of_its_own(domain):
    longest = max(len(s) for s in domain.samples)
    first = next(batches(domain, batch_tokens=longest - 1, pad_id=0))
    assert first.input_ids.shape == (1, longest)


def test_batches_reject_a_non_positive_budget(domain):
    with pytest.raises(ValueError, match="batch_tokens"):
        next(batches(domain, batch_tokens=0, pad_id=0))
