"""organize_data.py: byte-balanced splits, symlink safety, atomic output, one-line CLI errors."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import organize_data  # noqa: E402
from organize_data import (  # noqa: E402
    SNIFF_BYTES,
    assign_splits,
    find_files,
    normalize_exts,
    organize,
    split_name,
    text_problem,
)


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(cwd / "hf_home")}  # never touch the user's Hugging Face cache
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def assert_one_error_line(res: subprocess.CompletedProcess, code: int = 2) -> str:
    lines = res.stderr.splitlines()
    assert res.returncode == code, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """A small corpus: equal names in different folders, mixed-case extensions, files to ignore."""
    src = tmp_path / "raw"
    write(src / "a" / "x.txt", "a" * 900)
    write(src / "b" / "x.txt", "b" * 700)
    write(src / "b" / "deep" / "notes.MD", "m" * 500)
    write(src / "c.json", '{"k": "' + "j" * 300 + '"}')
    write(src / "d.yaml", "k: " + "y" * 200)
    write(src / "e.jsonl", '{"k": "l"}\n')
    write(src / "image.bin", b"\0\1\2")  # wrong extension: ignored, not counted
    return src


# ----------------------------------------------------------------------------- assign_splits


def test_assign_splits_largest_first_with_lowest_index_ties():
    sizes = {"a": 7, "b": 6, "c": 5, "d": 4, "e": 3, "f": 2, "g": 1}
    # a,b,c open the three splits; d,e,f go to the lightest; g finds all at 9 bytes and 2 files -> split 0.
    assert assign_splits(sizes, 3) == [["a", "f", "g"], ["b", "e"], ["c", "d"]]


@pytest.mark.parametrize("num_dirs", [1, 2, 5, 17])
def test_assign_splits_balance_property(num_dirs: int):
    rng = random.Random(num_dirs)
    sizes = {f"dir{i % 7}/f{i}.txt": rng.randint(0, 10_000) for i in range(300)}
    splits = assign_splits(sizes, num_dirs)
    assert len(splits) == num_dirs
    assert sorted(p for s in splits for p in s) == sorted(sizes)  # every file exactly once
    loads = [sum(sizes[p] for p in s) for s in splits]
    assert max(loads) - min(loads) <= max(sizes.values())  # largest-first greedy bound


def test_assign_splits_is_deterministic_and_ignores_input_order():
    items = [(f"f{i:03d}", 100 if i % 3 else 50) for i in range(60)]  # many equal sizes: ties decided by path
    expected = assign_splits(items, 4)
    for seed in range(3):
        random.Random(seed).shuffle(items)
        assert assign_splits(items, 4) == expected
        assert assign_splits(dict(items), 4) == expected


def test_assign_splits_spreads_zero_byte_files_and_rejects_bad_input():
    assert assign_splits({"a": 0, "b": 0, "c": 0}, 3) == [["a"], ["b"], ["c"]]
    assert assign_splits({"a": 5}, 3) == [["a"], [], []]
    with pytest.raises(ValueError, match="duplicate"):
        assign_splits([("a", 1), ("a", 2)], 2)
    with pytest.raises(ValueError, match="num_dirs"):
        assign_splits({"a": 1}, 0)


def test_split_names_are_zero_padded():
    assert [split_name(i, 3) for i in range(3)] == ["split_00", "split_01", "split_02"]
    assert split_name(5, 100) == "split_05"
    assert split_name(5, 101) == "split_005" and split_name(100, 101) == "split_100"


# ----------------------------------------------------------------------------- find_files


def test_find_files_filters_extensions_case_insensitively(raw: Path):
    files, skipped = find_files(raw)
    rels = [p.relative_to(raw).as_posix() for p in files]
    assert rels == ["a/x.txt", "b/deep/notes.MD", "b/x.txt", "c.json", "d.yaml", "e.jsonl"]
    assert not skipped  # image.bin is ignored, not a skip
    only_md, _ = find_files(raw, ["MD"])
    assert [p.name for p in only_md] == ["notes.MD"]


def test_find_files_does_not_follow_symlink_loops_or_links_outside(tmp_path: Path):
    src, outside = tmp_path / "src", tmp_path / "outside"
    write(src / "a" / "real.txt", "real")
    write(src / "a" / "data.bin", "linked under a text name")
    write(outside / "secret.txt", "must not be read")
    (src / "a" / "loop").symlink_to(src)  # folder loop
    (src / "a" / "self").symlink_to(".")  # folder loop onto itself
    (src / "out_dir").symlink_to(outside)  # folder outside
    (src / "out.txt").symlink_to(outside / "secret.txt")  # file outside
    (src / "dangling.txt").symlink_to(src / "missing.txt")
    (src / "dup.txt").symlink_to(src / "a" / "real.txt")  # same content as a real file
    (src / "alias.txt").symlink_to(src / "a" / "data.bin")  # inside, not otherwise included

    files, skipped = find_files(src)

    assert [p.relative_to(src).as_posix() for p in files] == ["a/real.txt", "alias.txt"]
    assert skipped == {"symlink outside source": 2, "broken symlink": 1, "duplicate (symlink)": 1}


# ----------------------------------------------------------------------------- files without an extension


def test_text_problem_reads_only_the_head_and_tolerates_a_cut_character(tmp_path: Path):
    assert text_problem(write(tmp_path / "LICENSE", "MIT License\n")) is None
    assert text_problem(write(tmp_path / "empty", b"")) is None
    assert text_problem(write(tmp_path / "bom", "\ufeffcafé")) is None
    cut = "a" * (SNIFF_BYTES - 1) + "é"  # the 2-byte é straddles the end of the head
    assert text_problem(write(tmp_path / "cut", cut)) is None
    assert text_problem(write(tmp_path / "late_nul", b"a" * SNIFF_BYTES + b"\0")) is None  # beyond the head
    assert text_problem(write(tmp_path / "elf", b"\x7fELF\x02\x01\x01\0\0")) == "binary"
    assert text_problem(write(tmp_path / "latin", "café\n".encode("latin-1"))) == "not UTF-8"
    assert text_problem(write(tmp_path / "latin_end", "café".encode("latin-1"))) == "not UTF-8"  # é cut by EOF
    exact = b"a" * (SNIFF_BYTES - 1)  # files of exactly SNIFF_BYTES: nothing is cut, so a lone lead byte is bad
    assert text_problem(write(tmp_path / "exact_ok", exact[1:] + "é".encode())) is None
    assert text_problem(write(tmp_path / "exact_bad", exact + b"\xc3")) == "not UTF-8"
    with pytest.raises(OSError):
        text_problem(tmp_path / "missing")


@pytest.fixture
def mixed(raw: Path) -> Path:
    """raw plus files without an extension: two text, two binary, and names that only look extension-less."""
    write(raw / "LICENSE", "MIT License\n")
    write(raw / "docs" / "README", "Read me, café.\n")
    write(raw / "copyright", "Copyright café\n".encode("latin-1"))
    write(raw / "tool", b"\x7fELF\x02\x01\x01\0\0")
    write(raw / ".gitignore", "*.pyc\n")  # a dot file: has no extension-less name, ignored
    write(raw / "LICENSE.old", "old\n")  # another extension: ignored
    (raw / "LICENCE").symlink_to("LICENSE")  # a second name for a taken file
    (raw / "tool_link").symlink_to("tool")  # a link to a binary is sniffed too
    return raw


def test_find_files_extensionless_takes_text_by_content_and_counts_binaries(mixed: Path):
    files, skipped = find_files(mixed)  # without the option: exactly as before
    assert [p.relative_to(mixed).as_posix() for p in files] == [
        "a/x.txt", "b/deep/notes.MD", "b/x.txt", "c.json", "d.yaml", "e.jsonl"
    ]  # fmt: skip
    assert not skipped

    files, skipped = find_files(mixed, extensionless=True)
    assert [p.relative_to(mixed).as_posix() for p in files] == [
        "LICENSE", "a/x.txt", "b/deep/notes.MD", "b/x.txt", "c.json", "d.yaml", "docs/README", "e.jsonl"
    ]  # fmt: skip
    assert skipped == {"binary (no extension)": 2, "not UTF-8 (no extension)": 1, "duplicate (symlink)": 1}

    only, _ = find_files(mixed, [], extensionless=True)
    assert [p.relative_to(mixed).as_posix() for p in only] == ["LICENSE", "docs/README"]
    with pytest.raises(ValueError, match="no file extensions given"):
        normalize_exts([""])


def test_organize_extensionless_copies_text_and_reports_skips(mixed: Path, tmp_path: Path):
    summary = organize(mixed, tmp_path / "splits", 2, extensionless=True)
    out = {rel.partition("/")[2]: data for rel, data in snapshot(tmp_path / "splits").items()}
    assert out["LICENSE"] == b"MIT License\n" and out["docs/README"] == "Read me, café.\n".encode()
    assert not {"tool", "tool_link", "copyright", ".gitignore", "LICENCE"} & set(out)
    assert summary.files == 8
    assert str(summary).endswith(
        "skipped 4 files: 2 binary (no extension), 1 duplicate (symlink), 1 not UTF-8 (no extension)"
    )


# ----------------------------------------------------------------------------- organize


def test_organize_keeps_relative_paths_and_never_touches_the_source(raw: Path, tmp_path: Path):
    before = snapshot(raw)
    summary = organize(raw, tmp_path / "splits", 3)
    assert snapshot(raw) == before

    out = snapshot(tmp_path / "splits")
    found = {}
    for rel, data in out.items():
        split, _, inner = rel.partition("/")
        assert split in {"split_00", "split_01", "split_02"}
        assert inner not in found, f"{inner} in two splits"
        found[inner] = data
    expected = {k: v for k, v in before.items() if k != "image.bin"}
    assert found == expected  # a/x.txt and b/x.txt both kept, with their own bytes
    assert summary.files == 6 and summary.total_bytes == sum(map(len, expected.values()))
    # 900 | 700 | 500, then 309 -> split_02, 203 -> split_01, 11 -> split_02
    assert summary.split_bytes == [900, 903, 820] and summary.split_files == [1, 2, 3]


def test_organize_creates_all_splits_even_with_few_files(raw: Path, tmp_path: Path):
    summary = organize(raw, tmp_path / "splits", 8)
    dirs = sorted(p.name for p in (tmp_path / "splits").iterdir())
    assert dirs == [f"split_{i:02d}" for i in range(8)]
    assert summary.split_files.count(0) == 2


def test_organize_link_makes_hard_links(raw: Path, tmp_path: Path):
    organize(raw, tmp_path / "splits", 2, link=True)
    linked = next((tmp_path / "splits").glob("split_*/a/x.txt"))
    assert linked.stat().st_ino == (raw / "a" / "x.txt").stat().st_ino


def test_organize_link_falls_back_to_absolute_symlinks(raw: Path, tmp_path: Path, monkeypatch):
    def cross_device(src, dst, *args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(organize_data.os, "link", cross_device)
    organize(raw, tmp_path / "splits", 2, link=True)
    linked = next((tmp_path / "splits").glob("split_*/a/x.txt"))
    assert linked.is_symlink() and Path(os.readlink(linked)) == (raw / "a" / "x.txt").resolve()
    assert linked.read_text() == "a" * 900


def test_crash_leaves_no_output_and_keeps_the_previous_one(raw: Path, tmp_path: Path, monkeypatch):
    dst = tmp_path / "splits"
    calls = []

    def failing_place(src: Path, target: Path, link: bool) -> None:
        calls.append(src)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a crash, not a per-file error
        target.write_bytes(src.read_bytes())

    monkeypatch.setattr(organize_data, "_place", failing_place)
    with pytest.raises(KeyboardInterrupt):
        organize(raw, dst, 2)
    assert sorted(os.listdir(tmp_path)) == ["raw"]  # no half-written splits, no temp folder

    monkeypatch.undo()
    organize(raw, dst, 2)
    before = snapshot(dst)
    monkeypatch.setattr(organize_data, "_place", failing_place)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        organize(raw, dst, 5, overwrite=True)
    assert snapshot(dst) == before
    assert sorted(os.listdir(tmp_path)) == ["raw", "splits"]


def test_failed_swap_puts_the_previous_output_back(raw: Path, tmp_path: Path, monkeypatch):
    dst = tmp_path / "splits"
    organize(raw, dst, 2)
    before = snapshot(dst)
    real_rename = Path.rename

    def rename(self: Path, target):
        if ".tmp-" in self.name:
            raise OSError("simulated failure while moving the new output into place")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        organize(raw, dst, 3, overwrite=True)
    assert snapshot(dst) == before
    assert sorted(os.listdir(tmp_path)) == ["raw", "splits"]


# ----------------------------------------------------------------------------- CLI


def test_cli_refuses_existing_output_then_overwrites(raw: Path, tmp_path: Path):
    res = run_script("organize_data.py", "--src_dir", "raw", "--dst_root", "splits", "--num_dirs", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "organized 6 files" in res.stdout and "split_01" in res.stdout
    before = snapshot(tmp_path / "splits")

    again = ["--src_dir", "raw", "--dst_root", "splits", "--num_dirs", "3"]
    assert "--overwrite" in assert_one_error_line(run_script("organize_data.py", *again, cwd=tmp_path))
    assert snapshot(tmp_path / "splits") == before

    res = run_script("organize_data.py", *again, "--overwrite", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "splits").iterdir()) == ["split_00", "split_01", "split_02"]
    assert sorted(os.listdir(tmp_path)) == ["raw", "splits"]  # no temp or old folder left behind


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--src_dir", "missing", "--dst_root", "out", "--num_dirs", "2"], "does not exist"),
        (["--src_dir", "raw/c.json", "--dst_root", "out", "--num_dirs", "2"], "is a file"),
        (["--src_dir", "raw", "--dst_root", "out", "--num_dirs", "2", "--exts", ".csv"], "no .csv files found"),
        (["--src_dir", "raw", "--dst_root", "out", "--num_dirs", "0"], "--num_dirs must be >= 1"),
        (["--src_dir", "raw", "--dst_root", "out", "--num_dirs", "-3"], "--num_dirs must be >= 1"),
        (["--src_dir", "raw", "--dst_root", "raw/splits", "--num_dirs", "2"], "inside the source"),
        (["--src_dir", "raw/b", "--dst_root", "raw", "--num_dirs", "2", "--overwrite"], "would delete it"),
        (["--src_dir", "raw", "--dst_root", "raw/c.json", "--num_dirs", "2", "--overwrite"], "inside the source"),
        (["--src_dir", "raw", "--dst_root", "a_file", "--num_dirs", "2", "--overwrite"], "is not a folder"),
        (["--src_dir", "raw", "--num_dirs", "2"], "required: --dst_root"),
    ],
)
def test_cli_bad_input_is_one_error_line(raw: Path, tmp_path: Path, args: list[str], message: str):
    write(tmp_path / "a_file", "not a folder")
    before = snapshot(tmp_path)
    assert message in assert_one_error_line(run_script("organize_data.py", *args, cwd=tmp_path))
    assert snapshot(tmp_path) == before  # nothing written, nothing removed
