"""data_to_hf.py: documents from text/JSON/YAML, bad files counted by reason, atomic dataset output."""

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from test_organize_data import ROOT, assert_one_error_line, run_script, snapshot, write

sys.path.insert(0, str(ROOT))

from data_to_hf import BadFileError, convert, extract_strings, iter_file_documents  # noqa: E402


def docs(path: Path) -> list[str]:
    return list(iter_file_documents(path))


# ----------------------------------------------------------------------------- parsing


def test_extract_strings_depth_first_values_only():
    obj = {"title": "t", "meta": {"tags": ["a", {"deep": "b", "n": 3}], "ok": True, "none": None}, "end": "z"}
    assert extract_strings(obj) == ["t", "a", "b", "z"]
    assert extract_strings([1, 2.5, False, None, {}]) == []
    nested = "x"
    for _ in range(5000):  # deeper than Python's recursion limit
        nested = [nested]
    assert extract_strings(nested) == ["x"]


def test_json_list_is_records_object_is_one_document(tmp_path: Path):
    listed = write(tmp_path / "l.json", '[{"q": "hi", "a": {"x": "there", "n": 1}}, "plain", 5, {"k": "  "}]')
    assert docs(listed) == ["hi\nthere", "plain"]  # 5 and the blank record hold no text
    single = write(tmp_path / "o.json", '{"q": "hi", "rows": [{"a": "one"}, {"a": "two"}]}')
    assert docs(single) == ["hi\none\ntwo"]


def test_jsonl_one_document_per_line(tmp_path: Path):
    path = write(tmp_path / "r.jsonl", '{"t": "first", "k": ["a", "b"]}\n\n["second", 2]\n{"n": 1}\n"third"')
    assert docs(path) == ["first\na\nb", "second", "third"]


def test_yaml_multi_document_stream(tmp_path: Path):
    path = write(tmp_path / "s.YAML", "title: one\nbody: [x, 1]\n---\n- a: two\n- three\n---\nnum: 5\n")
    assert docs(path) == ["one\nx", "two", "three"]


def test_text_file_is_one_document_and_huge_lines_work(tmp_path: Path):
    assert docs(write(tmp_path / "n.md", "# T\n\nbody\n")) == ["# T\n\nbody\n"]
    line = "w" * 3_000_000
    assert docs(write(tmp_path / "big.txt", line)) == [line]
    assert docs(write(tmp_path / "big.jsonl", f'{{"t": "{line}"}}\n')) == [line]


def test_yaml_python_tag_is_refused_not_executed(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = write(tmp_path / "evil.yml", f'!!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(BadFileError) as err:
        docs(path)
    assert err.value.reason == "malformed YAML"
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("zero.txt", b"", "empty"),
        ("blank.md", b" \n\t\n", "empty"),
        ("blank.jsonl", b"\n\n", "empty"),
        ("nul.txt", b"text\0more", "binary"),
        ("nul.jsonl", b'{"a": "x"}\n{"a": "\0"}\n', "binary"),
        ("latin1.txt", "café".encode("latin-1"), "not UTF-8"),
        ("latin1.json", '{"a": "café"}'.encode("latin-1"), "not UTF-8"),
        ("trunc.json", b'{"a": [1, 2', "malformed JSON"),
        ("badline.jsonl", b'{"a": "ok"}\n{oops}\n', "malformed JSON"),
        ("badlast.jsonl", b'{"a": "ok"}\n{"a": "ok"}\n\xff\n', "not UTF-8"),
        ("bad.yaml", b"a: [1, 2\nb: }", "malformed YAML"),
    ],
)
def test_bad_files_raise_with_reason(tmp_path: Path, name: str, data: bytes, reason: str):
    documents = iter_file_documents(write(tmp_path / name, data))
    with pytest.raises(BadFileError) as err:
        next(documents)  # rejected before the first document, so callers never see part of a bad file
    assert err.value.reason == reason
    assert isinstance(err.value, ValueError)


# ----------------------------------------------------------------------------- convert


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    src = tmp_path / "corpus"
    write(src / "a" / "doc.txt", "alpha text")
    write(src / "b" / "doc.txt", "beta text")  # same name, other folder
    write(src / "c" / "q.json", '[{"q": "question one", "a": "answer one"}, {"q": "question two"}]')
    write(src / "c" / "r.jsonl", '{"t": "jsonl one"}\n{"t": "jsonl two"}\n')
    write(src / "d" / "conf.yaml", "text: yaml one\n---\ntext: yaml two\n")
    write(src / "d" / "empty.md", "")
    write(src / "e" / "blob.txt", b"\0\1\2")
    write(src / "e" / "broken.json", "{")
    write(src / "e" / "numbers.json", "[1, 2, 3]")
    write(src / "e" / "latin.txt", "é".encode("latin-1"))
    write(src / "e" / "photo.png", b"\x89PNG")  # other extension: ignored
    (src / "e" / "loop").symlink_to(src)
    write(tmp_path / "outside" / "secret.txt", "outside secret")
    (src / "e" / "leak.txt").symlink_to(tmp_path / "outside" / "secret.txt")
    return src


EXPECTED_DOCS = {
    "alpha text",
    "beta text",
    "question one\nanswer one",
    "question two",
    "jsonl one",
    "jsonl two",
    "yaml one",
    "yaml two",
}
EXPECTED_SKIPS = Counter(
    {"empty": 1, "binary": 1, "malformed JSON": 1, "no text": 1, "not UTF-8": 1, "symlink outside source": 1}
)


def load_texts(path: Path) -> list[str]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    assert ds.column_names == ["text"]
    assert ds.features["text"].dtype == "string"
    return ds["text"]


def test_convert_counts_skips_across_workers(corpus: Path, tmp_path: Path):
    summary = convert(corpus, tmp_path / "ds", num_proc=2)
    texts = load_texts(tmp_path / "ds")
    assert sorted(texts) == sorted(EXPECTED_DOCS)
    assert summary.skipped == EXPECTED_SKIPS
    assert (summary.files_read, summary.documents) == (5, len(EXPECTED_DOCS))
    assert summary.text_bytes == sum(len(t.encode()) for t in texts)
    assert sorted(os.listdir(tmp_path)) == ["corpus", "ds", "outside"]  # no temp folder or cache left


def test_convert_crash_keeps_previous_dataset(corpus: Path, tmp_path: Path, monkeypatch):
    import datasets

    convert(corpus, tmp_path / "ds", num_proc=1)
    before = snapshot(tmp_path / "ds")

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", crash)
    with pytest.raises(KeyboardInterrupt):
        convert(corpus, tmp_path / "ds", num_proc=1, overwrite=True)
    assert snapshot(tmp_path / "ds") == before
    with pytest.raises(KeyboardInterrupt):
        convert(corpus, tmp_path / "other", num_proc=1)
    assert sorted(os.listdir(tmp_path)) == ["corpus", "ds", "outside"]


def test_pipeline_cli_organize_then_convert(corpus: Path, tmp_path: Path):
    res = run_script("organize_data.py", "--src_dir", "corpus", "--dst_root", "splits", "--num_dirs", "3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    args = ["--data_folder", "splits", "--save_dir", "ds", "--num_proc", "2"]
    res = run_script("data_to_hf.py", *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"into {len(EXPECTED_DOCS)} documents" in res.stdout
    assert "skipped 5 files: 1 binary, 1 empty, 1 malformed JSON, 1 no text, 1 not UTF-8" in res.stdout
    assert sorted(load_texts(tmp_path / "ds")) == sorted(EXPECTED_DOCS)

    before = snapshot(tmp_path / "ds")
    assert "--overwrite" in assert_one_error_line(run_script("data_to_hf.py", *args, cwd=tmp_path))
    assert snapshot(tmp_path / "ds") == before

    # A changed source must show up: the datasets cache is private to each run, never reused.
    write(tmp_path / "splits" / "split_00" / "new.txt", "a new document")
    res = run_script("data_to_hf.py", *args, "--overwrite", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(load_texts(tmp_path / "ds")) == sorted(EXPECTED_DOCS | {"a new document"})
    assert set(os.listdir(tmp_path)) - {"hf_home"} == {"corpus", "ds", "outside", "splits"}  # no temp folders


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data_folder", "missing", "--save_dir", "ds"], "does not exist"),
        (["--data_folder", "corpus/a/doc.txt", "--save_dir", "ds"], "is a file"),
        (["--data_folder", "corpus/e", "--save_dir", "ds"], "no documents found under corpus/e (skipped 6 files"),
        (["--data_folder", "pictures", "--save_dir", "ds"], "no .txt .md .json .jsonl .yaml .yml files found"),
        (["--data_folder", "corpus", "--save_dir", "corpus/ds"], "inside the source"),
        (["--data_folder", "corpus", "--save_dir", "ds", "--num_proc", "0"], "--num_proc must be >= 1"),
        (["--data_folder", "corpus", "--save_dir", "existing"], "pass --overwrite"),
        (["--data_folder", "corpus"], "required: --save_dir"),
    ],
)
def test_cli_bad_input_is_one_error_line(corpus: Path, tmp_path: Path, args: list[str], message: str):
    write(tmp_path / "existing" / "keep.txt", "keep me")
    write(tmp_path / "pictures" / "cat.png", b"\x89PNG")
    before = snapshot(tmp_path)
    assert message in assert_one_error_line(run_script("data_to_hf.py", *args, cwd=tmp_path))
    assert snapshot(tmp_path) == before  # nothing written, nothing removed


def test_extensionless_files_are_plain_text(tmp_path: Path):
    assert docs(write(tmp_path / "LICENSE", "MIT License\n\nPermission is hereby granted")) == [
        "MIT License\n\nPermission is hereby granted"
    ]
    assert docs(write(tmp_path / "README", '{"looks": "like JSON"}')) == ['{"looks": "like JSON"}']  # not parsed


def test_extensionless_organize_cli_then_convert(tmp_path: Path):
    """LICENSE/README are taken only with --extensionless (by both scripts); binaries are skipped and counted."""
    write(tmp_path / "raw" / "a.txt", "a text")
    write(tmp_path / "raw" / "LICENSE", "MIT License")
    write(tmp_path / "raw" / "sub" / "README", "Read me")
    write(tmp_path / "raw" / "tool", b"\x7fELF\0\0")
    organize_args = ["--src_dir", "raw", "--dst_root", "splits", "--num_dirs", "2", "--extensionless"]
    res = run_script("organize_data.py", *organize_args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "organized 3 files" in res.stdout and "skipped 1 files: 1 binary (no extension)" in res.stdout
    write(tmp_path / "splits" / "split_01" / "blob", b"\0\1\2")

    without = convert(tmp_path / "splits", tmp_path / "ds", num_proc=1)  # as before: extension-less files ignored
    assert load_texts(tmp_path / "ds") == ["a text"] and not without.skipped
    summary = convert(tmp_path / "splits", tmp_path / "ds", num_proc=1, overwrite=True, extensionless=True)
    assert sorted(load_texts(tmp_path / "ds")) == ["MIT License", "Read me", "a text"]
    assert (summary.files_read, summary.documents) == (3, 3)
    assert summary.skipped == {"binary (no extension)": 1}


def test_import_and_help_do_not_import_datasets():
    code = "import sys, data_to_hf; assert 'datasets' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
    res = run_script("data_to_hf.py", "--help", cwd=ROOT)
    assert res.returncode == 0 and "--num_proc" in res.stdout
    assert re.search(r"^ +--extensionless +also take files with no extension", res.stdout, re.M), res.stdout
