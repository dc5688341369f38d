"""Bad input to the prep CLIs: one `error:` line, a non-zero exit, and existing outputs left byte-for-byte as they were.

Each case runs the real script as a subprocess in a workspace that already holds a valid previous output of all three
scripts (splits/, dataset/, model/) next to the raw corpus (raw/). Where the case allows it, the command points at the
previous output *with* --overwrite, so a check that came too late would replace it and the digest would show it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ROOT, TINIEST, shared, tree_digest

# The extensions as each script lists them in its "no ... files found" error: sorted, and in DEFAULT_EXTS order.
ORGANIZE_EXTS, TO_HF_EXTS = ".json .jsonl .md .txt .yaml .yml", ".txt .md .json .jsonl .yaml .yml"
RAW = {
    "raw/a.txt": "The lighthouse keeper lit the lamp at dusk and watched the ships come home.\n",
    "raw/notes/b.md": "# Notes\n\nThe keeper wrote down every ship, every storm and every light.\n",
    "raw/c.json": '[{"q": "Who lit the lamp?", "a": "The keeper."}]',
}
# name -> (content, the reason data_to_hf.py gives when it skips it). "{w}" in a content becomes the workspace path.
BAD_FILES = {
    "latin1.txt": ("café".encode("latin-1"), "not UTF-8"),
    "nul.txt": (b"text\0more text", "binary"),
    "zero.txt": (b"", "empty"),
    "broken.json": (b'{"a": [1, 2', "malformed JSON"),
    "broken.jsonl": (b'{"a": "ok"}\n{oops}\n', "malformed JSON"),
    "broken.yaml": (b"a: [1, 2\nb: }", "malformed YAML"),
    "evil.yml": (b'!!python/object/apply:os.system ["touch {w}/pwned"]\n', "malformed YAML"),
    "numbers.json": (b"[1, 2.5, true, null]", "no text"),
}


def run_script(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, from the repo root; stdout and stderr merged in .stdout."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def write_files(root: Path, files: dict[str, str | bytes]) -> None:
    for rel, data in files.items():
        raw = data.encode() if isinstance(data, str) else data
        write(root / rel, raw.replace(b"{w}", str(root).encode()))


# ----------------------------------------------------------------------------- the previous outputs


@shared("module")
def previous(tmp_path_factory) -> Path:
    """raw/ and a valid splits/, dataset/ and model/ built from it by the three scripts, once per module."""
    root = tmp_path_factory.mktemp("previous")
    write_files(root, RAW)
    env = {"HF_HOME": str(root / "hf_home")}
    for args in (
        ["organize_data.py", "--src_dir", root / "raw", "--dst_root", root / "splits", "--num_dirs", "2"],
        ["data_to_hf.py", "--data_folder", root / "splits", "--save_dir", root / "dataset", "--num_proc", "1"],
        ["model_download.py", "--tiny", root / "model", "--corpus", root / "raw", *TINIEST],
    ):
        proc = run_script([str(a) for a in args], env)
        assert proc.returncode == 0, proc.stdout[-4000:]
    shutil.rmtree(root / "hf_home", ignore_errors=True)
    return root


@pytest.fixture
def workspace(previous: Path, tmp_path: Path) -> Path:
    """A private copy of the previous outputs, plus an empty HF_HOME, so no case sees another's leftovers."""
    w = tmp_path / "w"
    shutil.copytree(previous, w, symlinks=True)
    (w / "hf_home").mkdir()
    return w


def assert_no_temp_folders(w: Path) -> None:
    leftovers = sorted(p.name for p in w.iterdir() if ".tmp-" in p.name or ".old-" in p.name)
    assert not leftovers, leftovers


# ----------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One bad command. "{w}" in args, message and files is replaced with the workspace path."""

    args: tuple[str, ...]  # script and its flags
    message: str  # must appear in the single `error:` line
    files: dict[str, str | bytes] = field(default_factory=dict)  # extra inputs written before the run
    dirs: tuple[str, ...] = ()  # extra empty folders
    links: dict[str, str] = field(default_factory=dict)  # symlink -> target, both relative to the workspace
    env: dict[str, str] = field(default_factory=dict)
    never_created: tuple[str, ...] = ()  # e.g. the marker a YAML tag would create if it were ever executed


def case(*args: str, message: str, id: str, **kwargs):
    return pytest.param(Case(args, message, **kwargs), id=id)


def organize(*args: str, **kwargs):
    return case("organize_data.py", *args, **kwargs)


def to_hf(*args: str, **kwargs):
    return case("data_to_hf.py", *args, **kwargs)


def model(*args: str, **kwargs):
    return case("model_download.py", *args, **kwargs)


def only_bad_file(name: str):
    """data_to_hf on a folder whose only file is BAD_FILES[name], replacing the previous dataset if it got that far."""
    data, reason = BAD_FILES[name]
    return to_hf(
        *("--data_folder", "{w}/bad", "--save_dir", "{w}/dataset", "--num_proc", "1", "--overwrite"),
        files={f"bad/{name}": data},
        message=f"no documents found under {{w}}/bad (skipped 1 files: 1 {reason})",
        never_created=("pwned",),
        id=f"to_hf-only-{name}",
    )


SPLITS = ("--dst_root", "{w}/splits", "--overwrite")  # aimed at the previous splits, replacing allowed
CASES = [
    organize(
        *("--src_dir", "{w}/missing", *SPLITS, "--num_dirs", "2"),
        message="source folder {w}/missing does not exist",
        id="organize-missing-src",
    ),
    organize(
        *("--src_dir", "{w}/raw/a.txt", *SPLITS, "--num_dirs", "2"),
        message="source {w}/raw/a.txt is a file, not a folder",
        id="organize-src-is-file",
    ),
    organize(
        *("--src_dir", "{w}/empty", *SPLITS, "--num_dirs", "2"),
        dirs=("empty",),
        message=f"no {ORGANIZE_EXTS} files found under {{w}}/empty",
        id="organize-empty-src",
    ),
    organize(
        *("--src_dir", "{w}/pictures", *SPLITS, "--num_dirs", "2"),
        files={"pictures/cat.png": b"\x89PNG", "pictures/a/notes.TXT.bak": "text", "pictures/run.log": "text"},
        message=f"no {ORGANIZE_EXTS} files found under {{w}}/pictures",
        id="organize-only-other-extensions",
    ),
    organize(
        *("--src_dir", "{w}/raw", *SPLITS, "--num_dirs", "0"),
        message="--num_dirs must be >= 1, got 0",
        id="organize-num-dirs-0",
    ),
    organize(
        *("--src_dir", "{w}/raw", *SPLITS, "--num_dirs", "-3"),
        message="--num_dirs must be >= 1, got -3",
        id="organize-num-dirs-negative",
    ),
    organize(
        *("--src_dir", "{w}/raw", "--dst_root", "{w}/raw/splits", "--num_dirs", "2", "--overwrite"),
        message="output {w}/raw/splits is inside the source {w}/raw",
        id="organize-dst-inside-src",
    ),
    organize(
        *("--src_dir", "{w}/raw", "--dst_root", "{w}/splits", "--num_dirs", "2"),
        message="output {w}/splits already exists and is not empty; pass --overwrite to replace it",
        id="organize-dst-exists-no-overwrite",
    ),
    organize(
        *("--src_dir", "{w}/splits/split_00", *SPLITS, "--num_dirs", "2"),
        message="source {w}/splits/split_00 is inside the output {w}/splits",
        id="organize-src-inside-dst",
    ),
    organize(
        *("--src_dir", "{w}/raw", "--dst_root", "{w}/dataset/state.json", "--num_dirs", "2", "--overwrite"),
        message="output {w}/dataset/state.json exists and is not a folder",
        id="organize-dst-is-a-file",
    ),
    organize(
        *("--src_dir", "{w}/raw", *SPLITS, "--num_dirs", "2", "--exts", ","),
        message="no file extensions given",
        id="organize-no-extensions",
    ),
    organize(
        *("--src_dir", "{w}/raw", *SPLITS, "--num_dirs", "2", "--exts", ""),
        message="no file extensions given; pass e.g. --exts .txt,.md (or --extensionless)",
        id="organize-empty-exts-without-extensionless",
    ),
    organize(
        *("--src_dir", "{w}/bins", *SPLITS, "--num_dirs", "2", "--exts", "", "--extensionless"),
        files={"bins/tool": b"\x7fELF\0\0", "bins/notes.txt": "has an extension, not asked for"},
        message="no extension-less text files found under {w}/bins (skipped 1 files: 1 binary (no extension))",
        id="organize-extensionless-only-binaries",
    ),
    organize(
        *("--src_dir", "{w}/raw", *SPLITS, "--num_dirs", "2", "--bogus"),
        message="unrecognized arguments: --bogus",
        id="organize-unknown-flag",
    ),
    to_hf(
        *("--data_folder", "{w}/missing", "--save_dir", "{w}/dataset", "--overwrite"),
        message="source folder {w}/missing does not exist",
        id="to_hf-missing-folder",
    ),
    to_hf(
        *("--data_folder", "{w}/raw/a.txt", "--save_dir", "{w}/dataset", "--overwrite"),
        message="source {w}/raw/a.txt is a file, not a folder",
        id="to_hf-folder-is-file",
    ),
    *[only_bad_file(name) for name in BAD_FILES],
    to_hf(
        *("--data_folder", "{w}/splits", "--save_dir", "{w}/dataset"),
        message="output {w}/dataset already exists and is not empty; pass --overwrite to replace it",
        id="to_hf-save-dir-exists-no-overwrite",
    ),
    to_hf(
        *("--data_folder", "{w}/splits", "--save_dir", "{w}/dataset", "--overwrite", "--num_proc", "0"),
        message="--num_proc must be >= 1, got 0",
        id="to_hf-num-proc-0",
    ),
    to_hf(
        # The only content: a loop back into the source, a folder link and a file link leading outside it.
        *("--data_folder", "{w}/linked", "--save_dir", "{w}/dataset", "--num_proc", "1", "--overwrite"),
        files={"outside/secret.txt": "outside secret"},
        links={"linked/loop": "linked", "linked/out": "outside", "linked/leak.txt": "outside/secret.txt"},
        message=f"no {TO_HF_EXTS} files found under {{w}}/linked",
        id="to_hf-only-symlink-loop-and-outside-links",
    ),
    to_hf(
        *("--data_folder", "{w}/bins", "--save_dir", "{w}/dataset", "--overwrite", "--extensionless"),
        files={"bins/tool": b"\x7fELF\0\0", "bins/sub/copyright": "café".encode("latin-1"), "bins/a.png": b"\x89PNG"},
        message=f"no {TO_HF_EXTS} or extension-less text files found under {{w}}/bins"
        " (skipped 2 files: 1 binary (no extension), 1 not UTF-8 (no extension))",
        id="to_hf-extensionless-only-binaries",
    ),
    model(
        *("--tiny", "{w}/model", "--corpus", "{w}/raw", *TINIEST),
        message="{w}/model already exists (pass --overwrite to replace it)",
        id="model-tiny-exists-no-overwrite",
    ),
    model(
        *("--tiny", "{w}/model", "--corpus", "{w}/missing", *TINIEST, "--overwrite"),
        message="corpus folder not found: {w}/missing",
        id="model-tiny-missing-corpus",
    ),
    model(
        *("--tiny", "{w}/model", "--corpus", "{w}/bad", *TINIEST, "--overwrite"),
        files={f"bad/{name}": data for name, (data, _) in BAD_FILES.items()},
        message="no text found under {w}/bad to train a tokenizer on",
        never_created=("pwned",),
        id="model-tiny-corpus-without-text",
    ),
    model(
        "--model-name",
        "nobody-here/not-cached-model",
        env={"HF_HUB_OFFLINE": "1"},  # HF_HOME is the workspace's empty hf_home/
        message="'nobody-here/not-cached-model' is not in the cache at {w}/hf_home/hub",
        id="model-name-not-cached-offline",
    ),
    model(
        *("--tiny", "{w}/model", "--corpus", "{w}/raw", *TINIEST, "--overwrite", "--revision", "v1"),
        message="--revision only applies to --model-name",
        id="model-revision-without-model-name",
    ),
    model(
        *("--tiny", "{w}/model", "--corpus", "{w}/raw", *TINIEST, "--overwrite", "--vocab-size", "10"),
        message="--vocab-size must be >= 300",
        id="model-vocab-size-10",
    ),
    model(
        *("--tiny", "{w}/model", "--model-name", "nobody-here/not-cached-model", "--overwrite"),
        message="not allowed with argument",
        id="model-tiny-and-model-name",
    ),
]


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_one_error_line_and_touches_nothing(bad: Case, workspace: Path):
    w = workspace
    write_files(w, bad.files)
    for rel in bad.dirs:
        (w / rel).mkdir(parents=True)
    for link, target in bad.links.items():
        (w / link).parent.mkdir(parents=True, exist_ok=True)
        (w / link).symlink_to(w / target)
    before = tree_digest(w)
    assert {"raw", "splits", "dataset", "model"} <= set(before)  # there is something to destroy

    args = [a.replace("{w}", str(w)) for a in bad.args]
    proc = run_script(args, env={"HF_HOME": str(w / "hf_home"), **bad.env})
    out = proc.stdout

    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    for name in bad.never_created:
        assert not (w / name).exists(), f"{name} was created: the input was executed"
    assert_no_temp_folders(w)
    assert tree_digest(w) == before  # previous outputs, sources and HF_HOME all byte-for-byte unchanged

    errors = [line for line in out.splitlines() if line.startswith("error:")]
    message = bad.message.replace("{w}", str(w))
    if len(errors) != 1 or message not in errors[0]:
        raise AssertionError(f"expected one 'error: ...{message}...' line, got:\n{out}")


# ----------------------------------------------------------------------------- inputs that must work


def load_texts(path: Path) -> list[str]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    assert ds.column_names == ["text"]
    return ds["text"]


def test_huge_single_line_file_is_one_document(workspace: Path):
    w = workspace
    line = "0123456789" * 2_000_000  # 20 MB and not a single newline
    write(w / "huge" / "one-line.txt", line)
    proc = run_script(
        ["data_to_hf.py", "--data_folder", str(w / "huge"), "--save_dir", str(w / "dataset"), "--overwrite"],
        env={"HF_HOME": str(w / "hf_home")},
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "read 1 files into 1 documents, 20,000,000 bytes of text" in proc.stdout
    texts = load_texts(w / "dataset")
    assert len(texts) == 1 and len(texts[0]) == len(line)
    assert texts[0] == line
    assert_no_temp_folders(w)


def test_mixed_folder_keeps_good_documents_and_counts_each_bad_reason(workspace: Path):
    w = workspace
    good = {
        "mixed/a.txt": "good text one",
        "mixed/sub/b.json": '[{"q": "good question", "a": "good answer"}, "good plain"]',
        "mixed/c.jsonl": '{"t": "good line one"}\n\n{"t": "good line two"}\n',
        "mixed/d.yaml": "text: good yaml one\n---\n- good yaml two\n",
    }
    expected = [
        "good text one",
        "good question\ngood answer",
        "good plain",
        "good line one",
        "good line two",
        "good yaml one",
        "good yaml two",
    ]
    write_files(w, good)
    write_files(w, {f"mixed/bad/{name}": data for name, (data, _) in BAD_FILES.items()})
    write(w / "outside" / "secret.txt", "outside secret")
    (w / "mixed" / "leak.txt").symlink_to(w / "outside" / "secret.txt")

    args = ["--data_folder", str(w / "mixed"), "--save_dir", str(w / "dataset"), "--num_proc", "2", "--overwrite"]
    proc = run_script(["data_to_hf.py", *args], env={"HF_HOME": str(w / "hf_home")})
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert sorted(load_texts(w / "dataset")) == sorted(expected)
    assert f"read {len(good)} files into {len(expected)} documents" in proc.stdout
    summary = (
        "  skipped 9 files: 1 binary, 1 empty, 2 malformed JSON, 2 malformed YAML, 1 no text, 1 not UTF-8,"
        " 1 symlink outside source"
    )
    assert summary in proc.stdout.splitlines(), proc.stdout
    assert not (w / "pwned").exists()
    assert_no_temp_folders(w)
