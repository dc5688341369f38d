"""Spread a raw text corpus over N folders of equal size in bytes, ready for data_to_hf.py.

    python organize_data.py --src_dir data --dst_root outputs/demo-data/splits --num_dirs 4
    python organize_data.py --src_dir data --dst_root outputs/demo-data/splits --num_dirs 4 --link --overwrite

Example output (a progress bar on stderr when it is a terminal, then the summary on stdout):

    organized 41 files, 139,364 bytes into 4 splits at outputs/demo-data/splits in 0.0 s
      split_00       10 files          35,086 bytes
      split_01       10 files          35,131 bytes
      split_02       10 files          34,048 bytes
      split_03       11 files          35,099 bytes
      per split: bytes min 34,048 / max 35,131 (x1.03), files min 10 / max 11
      skipped 2 files: 1 broken symlink, 1 symlink outside source

How it works:
- Text-like files (--exts, default .txt .md .json .jsonl .yaml .yml, case-insensitive) are found recursively.
  With --extensionless, files whose name has no dot at all (LICENSE, README, copyright) are taken too, when their
  content looks like text: the first 8 KiB hold no NUL byte and are valid UTF-8. Others are skipped and counted
  ("binary (no extension)", "not UTF-8 (no extension)"). --exts '' --extensionless takes only those files.
  Real folders are walked; symlinked folders are never entered (their target is either outside the source, or
  inside it and walked anyway), which also makes symlink loops harmless. A symlinked file is used when it
  resolves to a regular file inside the source that is not already included; otherwise it is skipped with a reason.
- Files are assigned largest first, each to the split with the fewest bytes so far (then fewest files, then
  lowest index), which keeps splits within one file's size of each other. Paths relative to the source are kept
  inside each split (raw/a/x.txt -> splits/split_03/a/x.txt), so equal names in different folders never collide.
- All num_dirs splits are created, even when there are fewer files than splits (the extras are empty folders),
  so the layout does not depend on the corpus; data_to_hf.py reads empty splits fine.
- Files are copied (shutil.copy2) or, with --link, hard-linked, falling back to absolute symlinks where hard links
  fail (another filesystem). With --link, editing a file in the splits edits the raw file too. The source is
  never modified.
- The splits are written to DST.tmp-<pid> and renamed to DST only when complete. An existing non-empty DST is
  refused unless --overwrite, which swaps the old one out only after the new one is complete.
"""

from __future__ import annotations

import argparse
import codecs
import heapq
import os
import shutil
import stat
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_EXTS = (".txt", ".md", ".json", ".jsonl", ".yaml", ".yml")
SNIFF_BYTES = 8192  # how much of an extension-less file is read to decide whether it is text


# ----------------------------------------------------------------------------- finding files


def normalize_exts(exts: Iterable[str], allow_empty: bool = False) -> frozenset[str]:
    """'.TXT', 'md' -> {'.txt', '.md'}. Empty is an error unless allow_empty (--extensionless gives the files)."""
    out = frozenset("." + e.strip().lower().lstrip(".") for e in exts if e.strip().lstrip("."))
    if not out and not allow_empty:
        raise ValueError("no file extensions given; pass e.g. --exts .txt,.md (or --extensionless)")
    return out


def has_no_extension(path: Path) -> bool:
    """LICENSE, README, copyright: no dot anywhere in the name (so not .gitignore, LICENSE.old or v1.2)."""
    return "." not in path.name


def text_problem(path: str | Path, size: int = SNIFF_BYTES) -> str | None:
    """None if the first `size` bytes look like UTF-8 text, else the reason: "binary" (a NUL byte) or "not UTF-8".

    A multi-byte character cut off at `size` is fine; one cut off by the end of the file is not.
    Raises OSError if the file cannot be read.
    """
    with open(path, "rb") as f:
        head = f.read(size)
        whole = not f.read(1)
    if b"\0" in head:
        return "binary"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=whole)
    except UnicodeDecodeError:
        return "not UTF-8"
    return None


def wanted_label(exts: Iterable[str], extensionless: bool = False) -> str:
    """How error messages name the files looked for: '.txt .md', '.txt .md or extension-less text'."""
    parts = [" ".join(exts)] if exts else []
    if extensionless:
        parts.append("extension-less text")
    return " or ".join(parts)


def skip_note(skipped: Counter) -> str:
    """' (skipped 1 files: 1 binary (no extension))' after a 'no ... files found' error, if an extension-less file
    was skipped; nothing otherwise, so errors without --extensionless read as they always did."""
    if not any(reason.endswith("(no extension)") for reason in skipped):
        return ""
    return f" ({skipped_line(skipped).strip()})"


def find_files(
    root: str | Path, exts: Iterable[str] = DEFAULT_EXTS, extensionless: bool = False
) -> tuple[list[Path], Counter]:
    """Sorted files under root whose extension is in exts, plus a Counter of skip reasons.

    Files with other extensions are ignored, not counted. With extensionless, files without any extension are
    taken as well when text_problem() finds none in them; otherwise they are skipped and counted with the reason.
    Returned paths are root / relative path.
    """
    root, wanted = Path(root), normalize_exts(exts, allow_empty=extensionless)
    root_real = Path(os.path.realpath(root))
    skipped: Counter = Counter()
    files: list[Path] = []
    links: list[Path] = []

    def inside(real: str) -> bool:
        return Path(real).is_relative_to(root_real)

    def on_error(err: OSError) -> None:
        skipped["unreadable folder"] += 1

    # followlinks=False: symlinked folders show up in `dirs` but are not entered, so loops cannot happen.
    for dirpath, dirs, names in os.walk(root, onerror=on_error, followlinks=False):
        for d in dirs:
            path = Path(dirpath, d)
            if path.is_symlink() and not inside(os.path.realpath(path)):
                skipped["symlink outside source"] += 1
        for name in names:
            path = Path(dirpath, name)
            if path.suffix.lower() not in wanted and not (extensionless and has_no_extension(path)):
                continue
            try:
                mode = path.lstat().st_mode
            except OSError:
                skipped["unreadable file"] += 1
                continue
            if stat.S_ISLNK(mode):
                links.append(path)
            elif stat.S_ISREG(mode):
                files.append(path)
            else:  # a FIFO named x.txt would block the reader forever
                skipped["not a regular file"] += 1

    def is_text(path: Path) -> bool:
        """Files with a wanted extension are taken by name; extension-less ones (regular files only) by content."""
        if not has_no_extension(path):
            return True
        try:
            problem = text_problem(path)
        except OSError:
            problem = "unreadable file"
        else:
            problem = problem and f"{problem} (no extension)"
        if problem:
            skipped[problem] += 1
        return not problem

    files = [p for p in files if is_text(p)]
    # Symlinked files last, so a real file always wins over a link to it.
    seen = {os.path.realpath(p) for p in files}
    for path in sorted(links):
        real = os.path.realpath(path)
        if not os.path.isfile(real):
            skipped["broken symlink"] += 1
        elif not inside(real):
            skipped["symlink outside source"] += 1
        elif real in seen:
            skipped["duplicate (symlink)"] += 1
        elif is_text(path):
            seen.add(real)
            files.append(path)
    return sorted(files), skipped


# ----------------------------------------------------------------------------- balancing


def assign_splits(sizes: dict[str, int] | list[tuple[str, int]], num_dirs: int) -> list[list[str]]:
    """Largest-first greedy: each path goes to the split with the fewest bytes (then files, then lowest index).

    Deterministic (ties in size broken by path); each split's paths are returned sorted.
    Guarantees max(split bytes) - min(split bytes) <= the largest size.
    """
    if num_dirs < 1:
        raise ValueError(f"num_dirs must be >= 1, got {num_dirs}")
    items = list(sizes.items()) if isinstance(sizes, dict) else list(sizes)
    if len({path for path, _ in items}) != len(items):
        raise ValueError("duplicate paths in sizes")
    splits: list[list[str]] = [[] for _ in range(num_dirs)]
    heap = [(0, 0, i) for i in range(num_dirs)]  # (bytes, files, index): heap order is the tie-break order
    for path, size in sorted(items, key=lambda item: (-item[1], item[0])):
        load, count, i = heapq.heappop(heap)
        splits[i].append(path)
        heapq.heappush(heap, (load + size, count + 1, i))
    return [sorted(s) for s in splits]


def split_name(index: int, num_dirs: int) -> str:
    return f"split_{index:0{max(2, len(str(num_dirs - 1)))}d}"


# ----------------------------------------------------------------------------- safe output folders


def check_source_dir(src: Path) -> None:
    if not src.exists():
        raise ValueError(f"source folder {src} does not exist")
    if not src.is_dir():
        raise ValueError(f"source {src} is a file, not a folder")
    if not os.access(src, os.R_OK | os.X_OK):
        raise ValueError(f"source folder {src} is not readable")


def check_output_dir(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse outputs that would recurse into, delete or silently replace something."""
    src_real, dst_real = src.resolve(), dst.resolve()
    if dst_real.is_relative_to(src_real):
        raise ValueError(f"output {dst} is inside the source {src}; pick a folder outside it")
    if src_real.is_relative_to(dst_real):
        raise ValueError(f"source {src} is inside the output {dst}; replacing the output would delete it")
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise ValueError(f"output {dst} exists and is not a folder; remove it or pick another path")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ValueError(f"output {dst} already exists and is not empty; pass --overwrite to replace it")


@contextmanager
def staged_dir(dst: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty sibling folder DST.tmp-<pid>; rename it to DST on success, delete it on any error.

    With overwrite, an existing DST is renamed aside and deleted only after the new one is in place.
    """
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a crashed run that had the same pid
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if dst.is_dir() and not any(dst.iterdir()):
            dst.rmdir()
        if not dst.exists():
            tmp.rename(dst)
            return
        if not overwrite:  # appeared while we were working
            raise ValueError(f"output {dst} already exists and is not empty; pass --overwrite to replace it")
        old = dst.with_name(f"{dst.name}.old-{os.getpid()}")
        dst.rename(old)
        try:
            tmp.rename(dst)
        except OSError:
            old.rename(dst)  # put the previous output back rather than leave no output at all
            raise
        shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after the rename


# ----------------------------------------------------------------------------- organize


@dataclass
class Summary:
    dst_root: Path
    files: int
    total_bytes: int
    split_files: list[int]
    split_bytes: list[int]
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def __str__(self) -> str:
        n = len(self.split_bytes)
        lines = [
            f"organized {self.files:,} files, {self.total_bytes:,} bytes into {n} splits at {self.dst_root}"
            f" in {self.seconds:.1f} s"
        ]
        for i, (nf, nb) in enumerate(zip(self.split_files, self.split_bytes, strict=True)):
            lines.append(f"  {split_name(i, n)}  {nf:7,} files  {nb:14,} bytes")
        lo, hi = min(self.split_bytes), max(self.split_bytes)
        ratio = f"x{hi / lo:.2f}" if lo else "some splits empty"
        lines.append(
            f"  per split: bytes min {lo:,} / max {hi:,} ({ratio}), "
            f"files min {min(self.split_files):,} / max {max(self.split_files):,}"
        )
        lines.append(skipped_line(self.skipped))
        return "\n".join(lines)


def skipped_line(skipped: Counter) -> str:
    if not skipped:
        return "  skipped 0 files"
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
    return f"  skipped {sum(skipped.values())} files: {reasons}"


def _place(src: Path, dst: Path, link: bool) -> None:
    if not link:
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:  # EXDEV (another filesystem) or a filesystem without hard links
        os.symlink(os.path.realpath(src), dst)


def organize(
    src_dir: str | Path,
    dst_root: str | Path,
    num_dirs: int,
    exts: Iterable[str] = DEFAULT_EXTS,
    link: bool = False,
    overwrite: bool = False,
    extensionless: bool = False,
) -> Summary:
    """Copy (or link) the text files under src_dir into dst_root/split_XX/<relative path>, balanced by bytes.

    extensionless: also take files without an extension whose content is UTF-8 text (see find_files).
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    src, dst = Path(src_dir), Path(dst_root)
    if num_dirs < 1:
        raise ValueError(f"num_dirs must be >= 1, got {num_dirs}")
    check_source_dir(src)
    check_output_dir(src, dst, overwrite)
    wanted = normalize_exts(exts, allow_empty=extensionless)
    files, skipped = find_files(src, wanted, extensionless)
    if not files:
        raise ValueError(
            f"no {wanted_label(sorted(wanted), extensionless)} files found under {src}{skip_note(skipped)}"
        )

    sizes = {p.relative_to(src).as_posix(): p.stat().st_size for p in files}
    splits = assign_splits(sizes, num_dirs)
    split_files, split_bytes = [0] * num_dirs, [0] * num_dirs
    with staged_dir(dst, overwrite) as tmp, tqdm(total=len(files), unit="file", disable=None) as bar:
        for i, rels in enumerate(splits):
            (tmp / split_name(i, num_dirs)).mkdir()
            for rel in rels:
                target = tmp / split_name(i, num_dirs) / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    _place(src / rel, target, link)
                except OSError:
                    target.unlink(missing_ok=True)  # no half-copied file in the output
                    skipped["unreadable file"] += 1
                else:
                    split_files[i] += 1
                    split_bytes[i] += sizes[rel]
                bar.update()
    return Summary(dst, sum(split_files), sum(split_bytes), split_files, split_bytes, skipped, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- CLI (shared with data_to_hf.py)


def run_cli(job: Callable[[], object]) -> int:
    """Run job and print its summary; bad input becomes one `error: ...` line (exit 2, or 1 for OS errors)."""
    try:
        summary = job()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary)
    return 0


EXTENSIONLESS_HELP = (
    "also take files with no extension (LICENSE, README, copyright) whose first 8 KiB are UTF-8 text without NUL"
    " bytes; other extension-less files are skipped and counted"
)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad flags as a single `error: ...` line, like every other input error here."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__)
    parser.add_argument("--src_dir", "--src-dir", required=True, help="raw corpus folder (read only)")
    parser.add_argument("--dst_root", "--dst-root", required=True, help="output folder for split_XX/ folders")
    parser.add_argument("--num_dirs", "--num-dirs", type=int, required=True, help="number of splits (>= 1)")
    parser.add_argument(
        "--exts", default=",".join(DEFAULT_EXTS), help="comma-separated extensions (default: %(default)s)"
    )
    parser.add_argument("--extensionless", action="store_true", help=EXTENSIONLESS_HELP)
    parser.add_argument("--link", action="store_true", help="hard-link (symlink across filesystems), don't copy")
    parser.add_argument("--overwrite", action="store_true", help="replace dst_root if it exists (default: refuse)")
    args = parser.parse_args(argv)
    if args.num_dirs < 1:
        parser.error(f"--num_dirs must be >= 1, got {args.num_dirs}")
    exts = args.exts.split(",")
    return run_cli(
        lambda: organize(
            args.src_dir, args.dst_root, args.num_dirs, exts, args.link, args.overwrite, args.extensionless
        )
    )


if __name__ == "__main__":
    sys.exit(main())
