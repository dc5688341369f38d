"""Turn a folder of text/JSON/YAML files into a Hugging Face dataset with one `text` column.

    python data_to_hf.py --data_folder outputs/demo-data/splits --save_dir outputs/demo-data/dataset
    python data_to_hf.py --data_folder outputs/demo-data/splits --save_dir outputs/demo-data/dataset \\
        --num_proc 2 --overwrite

Example output (datasets' progress bars on stderr when it is a terminal, then the summary on stdout):

    read 41 files into 66 documents, 130,013 bytes of text in 0.6 s
      skipped 2 files: 1 binary, 1 malformed JSON
      saved to outputs/demo-data/dataset (reload with datasets.load_from_disk)

What becomes a document:
- .txt / .md (and any other extension): the whole file. Files with no extension at all (LICENSE, README,
  copyright) are read only with --extensionless, as plain text, when their first 8 KiB are UTF-8 without NUL
  bytes; other extension-less files are skipped and counted ("binary (no extension)", "not UTF-8 (no extension)").
  Pass it to organize_data.py too, or its splits will not contain them.
- .json: a top-level list is a list of records, anything else is one record. .jsonl: one record per line.
  .yaml / .yml: every document of the stream is treated like a JSON top-level value (loaded with
  a safe loader, so tags such as !!python/object are refused, never executed).
- A record becomes one document: its string values (not dict keys, numbers, booleans or nulls), depth-first,
  blank ones dropped, joined with "\\n". Empty documents are dropped.
- A bad file is skipped whole and counted by reason: not UTF-8, binary (NUL bytes), empty, malformed JSON/YAML,
  no text (parsed but held no strings), unreadable. The walk is organize_data.find_files (same symlink rules).

Files are spread over --num_proc workers balanced by bytes (organize_data.assign_splits); each worker streams
documents into datasets.Dataset.from_generator and writes its own small skip report, merged for the summary.
Peak memory per worker is about one input file. Output goes to SAVE_DIR.tmp-<pid> (with a private datasets
cache inside, so results are never stale) and is renamed to SAVE_DIR only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from organize_data import (
    DEFAULT_EXTS,
    EXTENSIONLESS_HELP,
    OneLineParser,
    assign_splits,
    check_output_dir,
    check_source_dir,
    find_files,
    run_cli,
    skip_note,
    skipped_line,
    staged_dir,
    wanted_label,
)

# libyaml's safe loader parses ~25x faster than the pure-Python one (measured by bench/bench_prep.py: 43 vs 1.7 MB/s);
# both refuse Python tags. PyYAML wheels normally include it.
SAFE_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

__all__ = ["DEFAULT_EXTS", "BadFileError", "convert", "extract_strings", "find_files", "iter_file_documents"]


# ----------------------------------------------------------------------------- parsing one file


class BadFileError(ValueError):
    """A file that cannot be turned into documents; `reason` is a short, countable label."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def extract_strings(obj: object) -> list[str]:
    """All string values in obj (through dicts and lists, keys excluded), depth-first, in order."""
    out: list[str] = []
    stack = [obj]  # explicit stack: deeply nested JSON must not hit Python's recursion limit
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))
    return out


def _record_document(record: object) -> str:
    return "\n".join(s for s in extract_strings(record) if s.strip())


def _value_documents(value: object) -> Iterator[str]:
    """A top-level JSON/YAML value: a list holds one record per element, anything else is one record."""
    for record in value if isinstance(value, list) else [value]:
        doc = _record_document(record)
        if doc:
            yield doc


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\0" in data:
        raise BadFileError("binary")
    try:
        text = data.decode("utf-8-sig")  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError:
        raise BadFileError("not UTF-8") from None
    if not text.strip():
        raise BadFileError("empty")
    return text


def _jsonl_documents(path: Path) -> Iterator[str]:
    blank = True
    with path.open("rb") as f:  # binary lines: no length limit, and we decode (and check for NULs) ourselves
        for raw in f:
            if b"\0" in raw:
                raise BadFileError("binary")
            try:
                line = raw.decode("utf-8-sig" if blank else "utf-8")
            except UnicodeDecodeError:
                raise BadFileError("not UTF-8") from None
            if not line.strip():
                continue
            blank = False
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                raise BadFileError("malformed JSON") from None
            doc = _record_document(record)
            if doc:
                yield doc
    if blank:
        raise BadFileError("empty")


def iter_file_documents(path: Path) -> Iterator[str]:
    """The documents of one file; a bad file raises BadFileError(reason) before yielding anything.

    .jsonl, .json and .yaml/.yml are parsed; anything else, including a file without an extension, is one text.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext == ".jsonl":
        yield from list(_jsonl_documents(path))  # a bad line anywhere must reject the file before any document
        return
    text = _read_text(path)
    if ext == ".json":
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            raise BadFileError("malformed JSON") from None
        yield from _value_documents(value)
    elif ext in (".yaml", ".yml"):
        try:  # safe_load_all only builds plain types; a !!python/object tag raises ConstructorError
            values = list(yaml.load_all(text, Loader=SAFE_YAML_LOADER))
        except (yaml.YAMLError, RecursionError):
            raise BadFileError("malformed YAML") from None
        for value in values:
            yield from _value_documents(value)
    else:
        yield text


# ----------------------------------------------------------------------------- convert


@dataclass
class Summary:
    save_dir: Path
    files_read: int
    documents: int
    text_bytes: int
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def __str__(self) -> str:
        return (
            f"read {self.files_read:,} files into {self.documents:,} documents, {self.text_bytes:,} bytes of text"
            f" in {self.seconds:.1f} s\n{skipped_line(self.skipped)}\n"
            f"  saved to {self.save_dir} (reload with datasets.load_from_disk)"
        )


def _generate(shards: list[list[str]], report_dir: str) -> Iterator[dict[str, str]]:
    """from_generator worker: yields {"text": doc}, then writes {path: [skip reason or None, bytes, docs]}."""
    report: dict[str, list] = {}
    for shard in shards:
        for name in shard:
            try:
                docs = list(iter_file_documents(Path(name)))
            except BadFileError as e:
                report[name] = [e.reason, 0, 0]
                continue
            except OSError:
                report[name] = ["unreadable file", 0, 0]
                continue
            report[name] = [None, sum(len(d.encode()) for d in docs), len(docs)] if docs else ["no text", 0, 0]
            for doc in docs:
                yield {"text": doc}
    # Keyed by path, so merging is exact even if datasets ever re-ran a shard.
    Path(report_dir, f"{os.getpid()}-{uuid.uuid4().hex}.json").write_text(json.dumps(report))


def convert(
    data_folder: str | Path,
    save_dir: str | Path,
    num_proc: int | None = None,
    overwrite: bool = False,
    extensionless: bool = False,
) -> Summary:
    """Read every document under data_folder and save them as a one-column (`text`) dataset at save_dir.

    extensionless: also read files without an extension whose content is UTF-8 text (organize_data.find_files).
    """
    t0 = time.perf_counter()
    src, dst = Path(data_folder), Path(save_dir)
    if num_proc is not None and num_proc < 1:
        raise ValueError(f"num_proc must be >= 1, got {num_proc}")
    check_source_dir(src)
    check_output_dir(src, dst, overwrite)
    files, skipped = find_files(src, DEFAULT_EXTS, extensionless)
    if not files:
        raise ValueError(f"no {wanted_label(DEFAULT_EXTS, extensionless)} files found under {src}{skip_note(skipped)}")
    num_proc = min(num_proc or os.cpu_count() or 1, len(files))
    shards = assign_splits({str(p): p.stat().st_size for p in files}, num_proc)

    import datasets

    quiet = not sys.stderr.isatty() and not datasets.are_progress_bars_disabled()
    if quiet:  # like tqdm(disable=None): progress bars on a terminal only, not in log files
        datasets.disable_progress_bars()
    try:
        summary = _write_dataset(src, dst, shards, num_proc, skipped, overwrite)
    finally:
        if quiet:
            datasets.enable_progress_bars()
    summary.seconds = time.perf_counter() - t0
    return summary


def _write_dataset(
    src: Path, dst: Path, shards: list[list[str]], num_proc: int, skipped: Counter, overwrite: bool
) -> Summary:
    """Stream the shards into a dataset in a staging folder, merge the workers' skip reports, rename into place."""
    import datasets

    with staged_dir(dst, overwrite) as tmp:
        cache, reports = tmp / ".cache", tmp / ".reports"
        reports.mkdir()
        failure = None
        try:
            ds = datasets.Dataset.from_generator(
                _generate,
                features=datasets.Features({"text": datasets.Value("string")}),
                cache_dir=str(cache),
                gen_kwargs={"shards": shards, "report_dir": str(reports)},  # one list entry per worker
                num_proc=num_proc if num_proc > 1 else None,
                fingerprint=uuid.uuid4().hex,  # skip hashing the file list; the cache is private anyway
            )
        except ValueError as e:  # datasets refuses a split without examples ("... corresponds to no data!")
            failure = e
        report: dict[str, list] = {}
        for part in reports.glob("*.json"):
            report.update(json.loads(part.read_text()))
        skipped.update(reason for reason, _, _ in report.values() if reason)
        documents = sum(ndocs for _, _, ndocs in report.values())
        if documents == 0:
            raise ValueError(f"no documents found under {src} ({skipped_line(skipped).strip()})")
        if failure is not None:
            raise failure
        assert len(ds) == documents, (len(ds), documents)
        ds.save_to_disk(str(tmp))
        del ds
        shutil.rmtree(cache)
        shutil.rmtree(reports)
    files_read = sum(1 for reason, _, _ in report.values() if reason is None)
    text_bytes = sum(nbytes for _, nbytes, _ in report.values())
    return Summary(dst, files_read, documents, text_bytes, skipped)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__)
    parser.add_argument("--data_folder", "--data-folder", required=True, help="folder to read recursively")
    parser.add_argument("--save_dir", "--save-dir", required=True, help="where to save the dataset")
    parser.add_argument("--num_proc", "--num-proc", type=int, help="worker processes (default: CPU count)")
    parser.add_argument("--extensionless", action="store_true", help=EXTENSIONLESS_HELP)
    parser.add_argument("--overwrite", action="store_true", help="replace save_dir if it exists (default: refuse)")
    args = parser.parse_args(argv)
    if args.num_proc is not None and args.num_proc < 1:
        parser.error(f"--num_proc must be >= 1, got {args.num_proc}")
    return run_cli(lambda: convert(args.data_folder, args.save_dir, args.num_proc, args.overwrite, args.extensionless))


if __name__ == "__main__":
    sys.exit(main())
