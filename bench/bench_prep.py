"""Data prep throughput: data_to_hf.py with 2 workers vs 1, and fsdp_train.py's tokenize+pack vs raw `tokenizers`.

    .venv/bin/python bench/bench_prep.py [--size-mb 200] [--tok-mb 32] [--repeats 3] [--workdir DIR] [--keep]

(a) Generates a deterministic corpus of --size-mb MB under a temp dir: .txt prose, .json record lists and .yaml
    record lists (count mix 60/30/10, sizes log-uniform 1 KB .. 1 MB, words drawn from the bundled data/), then runs
    `data_to_hf.py --num_proc 2` and `--num_proc 1` alternately. MB/s = corpus bytes / wall seconds of the command
    (interpreter start included; the script's own "in X s" is reported too). Target: 2 workers >= 1.7x 1 worker.
(b) On --tok-mb MB of the same documents, with the tokenizer `model_download.py --tiny` trains: tokens/s of raw
    `tokenizers` (backend encode_batch, 2 threads) vs fsdp_train.prepare_data run for real (datasets.map over
    tokenize_documents, num_proc as it picks, then write_packed streaming the documents through a TextPacker into
    SAVE_DIR/.cache/tokenized/<key>/blocks.arrow, then load_packed). Also in-process: tokenize_documents + TextPacker
    without datasets, and TextPacker alone on documents tokenized beforehand. Every mode runs in a fresh process
    (prepare_data sets TOKENIZERS_PARALLELISM=false for its process), modes alternate, and every rate uses the same
    numerator: the text's token count. Target: prepare_data >= 80% of encode_batch.

Prints markdown tables; the full record goes to bench/results/bench_prep-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, build_tokenizer, machine, median, python, run_timed, save_results, table, verdict

KINDS = {"txt": 0.6, "json": 0.3, "yaml": 0.1}  # share of files (not bytes)
MODES = ("encode_batch", "prepare_data", "tokenize_documents", "call", "encode_batch_fast", "text_packer")
BATCH = 1000  # documents per batch, as prepare_data's map uses


# ----------------------------------------------------------------------------------------------------------------------
# (a) corpus


def data_words() -> list[str]:
    """Every word of the bundled corpus, repeated as often as it occurs (so draws follow its frequencies)."""
    words = []
    for path in sorted((ROOT / "data").rglob("*")):
        if path.is_file():
            words += re.findall(r"[A-Za-z][A-Za-z'-]*", path.read_text(errors="ignore"))
    return words


class Writer:
    """Deterministic prose and records from a word list."""

    def __init__(self, words: list[str], seed: int):
        self.words, self.rng = words, random.Random(seed)

    def sentence(self) -> str:
        ws = self.rng.choices(self.words, k=self.rng.randint(6, 20))
        return ws[0].capitalize() + " " + " ".join(ws[1:]) + self.rng.choice(".....?!")

    def prose(self, nbytes: int) -> str:
        paragraphs, size = [], 0
        while size < nbytes:
            p = " ".join(self.sentence() for _ in range(self.rng.randint(3, 8)))
            paragraphs.append(p)
            size += len(p) + 2
        return "\n\n".join(paragraphs) + "\n"

    def record(self, i: int) -> dict:
        return {
            "id": i,
            "title": self.sentence(),
            "body": self.prose(self.rng.randint(200, 3000)).strip(),
            "tags": self.rng.choices(self.words, k=3),
            "score": round(self.rng.random(), 3),
            "meta": {"author": self.rng.choice(self.words), "draft": self.rng.random() < 0.2},
        }

    def records(self, nbytes: int) -> list[dict]:
        out, size = [], 0
        while size < nbytes:
            out.append(self.record(len(out)))
            size += len(out[-1]["body"]) + 150
        return out

    def file(self, kind: str, nbytes: int) -> str:
        if kind == "txt":
            return self.prose(nbytes)
        if kind == "json":
            return json.dumps(self.records(nbytes), indent=self.rng.choice([None, 2]))
        # YAML by hand (PyYAML's dumper would take minutes): JSON-quoted strings are valid YAML scalars.
        docs, lines = [], []
        for rec in self.records(nbytes):
            lines += [
                f"- id: {rec['id']}",
                f"  title: {json.dumps(rec['title'])}",
                f"  body: {json.dumps(rec['body'])}",
            ]
            lines += [f"  tags: {json.dumps(rec['tags'])}", f"  score: {rec['score']}", "  meta:"]
            lines += [
                f"    author: {json.dumps(rec['meta']['author'])}",
                f"    draft: {str(rec['meta']['draft']).lower()}",
            ]
            if self.rng.random() < 0.05:  # now and then a multi-document stream
                docs.append("\n".join(lines))
                lines = []
        docs.append("\n".join(lines))
        return "\n---\n".join(d for d in docs if d) + "\n"


def generate_corpus(out: Path, size_mb: float, seed: int) -> dict:
    """Files of varied kinds and sizes until size_mb MB are written; returns bytes and files per kind."""
    marker = out.with_name(f"{out.name}.json")  # beside the corpus, or data_to_hf.py would read it as a document
    if marker.is_file() and json.loads(marker.read_text())["request"] == [size_mb, seed]:
        return json.loads(marker.read_text())  # a reused --workdir keeps its corpus
    shutil.rmtree(out, ignore_errors=True)
    writer, rng = Writer(data_words(), seed), random.Random(seed + 1)
    stats = {k: {"files": 0, "bytes": 0} for k in KINDS}
    total, target, i = 0, int(size_mb * 1e6), 0
    while total < target:
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        nbytes = int(math.exp(rng.uniform(math.log(1e3), math.log(1e6))))
        path = out / f"d{i % 16:02d}" / f"s{i % 7}" / f"doc-{i:05d}.{kind}"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = writer.file(kind, nbytes).encode()
        path.write_bytes(data)
        stats[kind]["files"] += 1
        stats[kind]["bytes"] += len(data)
        total, i = total + len(data), i + 1
    info = {"request": [size_mb, seed], "bytes": total, "files": i, "kinds": stats}
    marker.write_text(json.dumps(info))
    return info


def parse_rates(corpus: Path, mb_per_kind: float = 16) -> dict[str, float]:
    """Single-process MB/s of data_to_hf.iter_file_documents per file kind (where (a)'s time goes)."""
    sys.path.insert(0, str(ROOT))
    from data_to_hf import iter_file_documents

    rates = {}
    for kind in KINDS:
        files, size = [], 0
        for p in sorted(corpus.rglob(f"*.{kind}")):
            files.append(p)
            size += p.stat().st_size
            if size >= mb_per_kind * 1e6:
                break
        t0 = time.perf_counter()
        for p in files:
            for _ in iter_file_documents(p):
                pass
        rates[kind] = size / 1e6 / (time.perf_counter() - t0)
    return rates


SUMMARY = re.compile(r"read ([\d,]+) files into ([\d,]+) documents, ([\d,]+) bytes of text in ([\d.]+) s")


def bench_convert(corpus: Path, corpus_bytes: int, work: Path, repeats: int) -> dict:
    runs = []
    for r in range(repeats):
        for nproc in (2, 1):  # alternating, so drift in the machine's load hits both alike
            out = work / "dataset"
            run = run_timed(python("data_to_hf.py", "--data_folder", corpus, "--save_dir", out, "--num_proc", nproc))
            run.check()
            m = SUMMARY.search(run.output)
            skipped = re.search(r"skipped ([\d,]+) files?[^\n]*", run.output)
            runs.append(
                {
                    "repeat": r,
                    "num_proc": nproc,
                    "wall_s": run.wall,
                    "cpu_s": run.cpu,
                    "script_s": float(m[4]),
                    "documents": int(m[2].replace(",", "")),
                    "skipped": skipped[0] if skipped else None,
                }
            )
            print(
                f"  data_to_hf --num_proc {nproc}: {run.wall:.1f}s wall ({m[4]} s by its summary), {run.cpu:.1f}s CPU"
            )
            shutil.rmtree(out)
    return {"runs": runs, "mb": corpus_bytes / 1e6}


# ----------------------------------------------------------------------------------------------------------------------
# (b) tokenize + pack


def write_token_dataset(corpus: Path, out: Path, mb: float) -> dict:
    """The first `mb` MB of documents data_to_hf.py extracts from the corpus (files in sorted order), saved to disk."""
    if not out.is_dir():
        sys.path.insert(0, str(ROOT))
        import datasets

        from data_to_hf import iter_file_documents

        datasets.disable_progress_bars()
        docs, size = [], 0
        for p in sorted(corpus.rglob("doc-*")):
            for doc in iter_file_documents(p):
                docs.append(doc)
                size += len(doc.encode())
            if size >= mb * 1e6:
                break
        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(out))
    import datasets

    ds = datasets.load_from_disk(str(out))
    return {"documents": len(ds), "bytes": sum(len(t.encode()) for t in ds["text"])}


def cpu_seconds() -> float:
    """User + system seconds of this process (all threads) and of its waited-for children."""
    return sum(
        ru.ru_utime + ru.ru_stime for ru in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )


def flat_lengths(token_lists: list[list[int]]):
    """Documents as (concatenated int32 tokens, lengths): what write_packed hands TextPacker from an Arrow column."""
    import numpy as np

    lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
    flat = np.fromiter((t for tokens in token_lists for t in tokens), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def tok_worker(mode: str, dataset: Path, tokenizer_dir: Path, seq_length: int, save_dir: Path) -> dict:
    """One timed mode, in this fresh process; prints a RESULT line for the driver."""
    sys.path.insert(0, str(ROOT))
    import datasets

    import fsdp_train as ft

    tokenizer = ft.load_tokenizer(str(tokenizer_dir))
    ds = datasets.load_from_disk(str(dataset))
    texts = ds["text"]
    batches = [texts[i : i + BATCH] for i in range(0, len(texts), BATCH)]
    result = {"mode": mode}
    if mode == "prepare_data":
        getattr(ft, "quiet_library_progress_bars", lambda: None)()  # train() calls it before prepare_data
        d = ft.setup_distributed()  # a 1-process gloo group: prepare_data agrees on errors with the other ranks
        cfg = ft.Config(
            dataset_name=str(dataset), model_name=str(tokenizer_dir), save_dir=str(save_dir), seq_length=seq_length
        )
        ds = ft.load_dataset_any(str(dataset))
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        data = ft.prepare_data(cfg, d, tokenizer, ds, "train")
        result["seconds"] = time.perf_counter() - t0
        result["blocks"] = len(data)
        ft.teardown_distributed()
    elif mode == "text_packer":  # the packing alone, on documents tokenized beforehand (as write_packed feeds it)
        docs = [flat_lengths(ft.tokenize_documents({"text": b}, tokenizer)["input_ids"]) for b in batches]
        packer = ft.TextPacker(seq_length)
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        result["blocks"] = sum(len(packer.add(flat, lengths)["input_ids"]) for flat, lengths in docs)
        result["seconds"] = time.perf_counter() - t0
    elif mode == "tokenize_documents":  # prepare_data's work in this process: no datasets.map, no Arrow file
        packer = ft.TextPacker(seq_length)

        def tokenize_and_pack(b: list[str]) -> list[int]:
            ids = ft.tokenize_documents({"text": b}, tokenizer)["input_ids"]
            result["blocks"] = result.get("blocks", 0) + len(packer.add(*flat_lengths(ids))["input_ids"])
            return [len(x) for x in ids]

        cpu0, t0 = cpu_seconds(), time.perf_counter()
        result["tokens"] = sum(sum(tokenize_and_pack(b)) for b in batches)
        result["seconds"] = time.perf_counter() - t0
    else:
        backend = tokenizer.backend_tokenizer
        encode = {
            "encode_batch": lambda b: [len(e.ids) for e in backend.encode_batch(b)],
            "encode_batch_fast": lambda b: [len(e.ids) for e in backend.encode_batch_fast(b)],
            "call": lambda b: [len(x) for x in tokenizer(b)["input_ids"]],
        }[mode]
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        result["tokens"] = sum(sum(encode(b)) for b in batches)
        result["seconds"] = time.perf_counter() - t0
    result["cpu_s"] = cpu_seconds() - cpu0  # includes prepare_data's map workers, which map() waits for
    print("RESULT " + json.dumps(result), flush=True)
    return result


def bench_tokenize(dataset: Path, tokenizer_dir: Path, seq_length: int, work: Path, repeats: int) -> list[dict]:
    runs = []
    for r in range(repeats):
        for mode in MODES:
            save_dir = work / f"prep-{mode}-{r}"
            cmd = python("bench/bench_prep.py", "--tok-worker", mode, "--tok-dataset", dataset)
            cmd += ["--tokenizer", str(tokenizer_dir), "--seq-length", str(seq_length), "--workdir", str(save_dir)]
            run = run_timed(cmd).check()
            res = json.loads(next(line for _, line in reversed(run.lines) if line.startswith("RESULT "))[7:])
            runs.append({"repeat": r, **res})
            print(f"  {mode}: {res['seconds']:.2f}s, {res['cpu_s']:.2f}s CPU", flush=True)
            shutil.rmtree(save_dir, ignore_errors=True)
    return runs


# ----------------------------------------------------------------------------------------------------------------------
# main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=200, help="generated corpus size in MB (default 200)")
    p.add_argument("--tok-mb", type=float, default=32, help="MB of its documents for the tokenize part (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (default 3)")
    p.add_argument("--seq-length", type=int, default=1024, help="packed block length (fsdp_train's default 1024)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--workdir", type=Path, help="keep corpus, tokenizer and outputs here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="do not delete the temp dir")
    p.add_argument("--tok-worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--tok-dataset", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tok_worker:
        tok_worker(args.tok_worker, args.tok_dataset, args.tokenizer, args.seq_length, args.workdir)
        return 0
    if args.repeats < 1 or args.size_mb <= 0 or not 0 < args.tok_mb <= args.size_mb:
        p.error("need --repeats >= 1, --size-mb > 0 and 0 < --tok-mb <= --size-mb")

    t_start = time.perf_counter()
    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="bench-prep-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    start = machine()
    print(f"workdir {work}, load average {start['loadavg']}", flush=True)

    t0 = time.perf_counter()
    corpus = generate_corpus(work / "corpus", args.size_mb, args.seed)
    gen_s = time.perf_counter() - t0
    print(f"corpus: {corpus['files']:,} files, {corpus['bytes'] / 1e6:.1f} MB ({gen_s:.0f}s to generate)", flush=True)
    rates = parse_rates(work / "corpus")
    convert = bench_convert(work / "corpus", corpus["bytes"], work, args.repeats)

    tokenizer_dir = build_tokenizer(work / "tiny")
    tok_data = write_token_dataset(work / "corpus", work / "tok-dataset", args.tok_mb)
    print(f"tokenize set: {tok_data['documents']:,} documents, {tok_data['bytes'] / 1e6:.1f} MB", flush=True)
    tok_runs = bench_tokenize(work / "tok-dataset", tokenizer_dir, args.seq_length, work, args.repeats)

    # --- tables
    mb = convert["mb"]
    a = {n: [r for r in convert["runs"] if r["num_proc"] == n] for n in (1, 2)}
    wall = {n: median([r["wall_s"] for r in a[n]]) for n in a}
    script = {n: median([r["script_s"] for r in a[n]]) for n in a}
    cpu = {n: median([r["cpu_s"] for r in a[n]]) for n in a}
    rows_a = [[f"--num_proc {n}", wall[n], mb / wall[n], script[n], mb / script[n], cpu[n]] for n in (2, 1)]
    ratio_wall, ratio_script = wall[1] / wall[2], script[1] / script[2]
    print(f"\n## (a) data_to_hf.py on {mb:.0f} MB, {corpus['files']:,} files (median of {args.repeats})\n")
    print(table(["variant", "wall s", "MB/s (wall)", "script s", "MB/s (script)", "CPU s (all processes)"], rows_a))
    print(f"\nspeed-up 2 vs 1 worker: wall {ratio_wall:.2f}x, script {ratio_script:.2f}x -> {verdict(ratio_wall, 1.7)}")
    kinds = ", ".join(
        f"{k} {v['files']} files {v['bytes'] / 1e6:.0f} MB parsed at {rates[k]:.0f} MB/s"
        for k, v in corpus["kinds"].items()
    )
    print(f"corpus by kind (single-process iter_file_documents): {kinds}")

    tokens = median([r["tokens"] for r in tok_runs if r["mode"] == "encode_batch"])
    secs = {m: median([r["seconds"] for r in tok_runs if r["mode"] == m]) for m in MODES}
    base = tokens / secs["encode_batch"]
    what = {
        "encode_batch": "tokenizers backend encode_batch (Rust threads)",
        "encode_batch_fast": "tokenizers encode_batch_fast (no offsets)",
        "call": "transformers fast tokenizer __call__",
        "tokenize_documents": "fsdp_train.tokenize_documents + TextPacker in-process (tokenize + EOS + pack)",
        "text_packer": "fsdp_train.TextPacker alone (numpy), on documents tokenized beforehand",
        "prepare_data": "fsdp_train.prepare_data for real (map + write_packed to blocks.arrow + load_packed)",
    }
    tok_cpu = {m: median([r["cpu_s"] for r in tok_runs if r["mode"] == m]) for m in MODES}
    rows_b = [
        [
            m,
            what[m],
            secs[m],
            tokens / secs[m] / 1e6,
            f"{100 * tokens / secs[m] / base:.0f}%",
            tok_cpu[m],
            tokens / tok_cpu[m] / 1e6,
        ]
        for m in MODES
    ]
    print(
        f"\n## (b) tokenize + pack: {tok_data['documents']:,} docs, {tok_data['bytes'] / 1e6:.1f} MB, "
        f"{tokens / 1e6:.2f} M tokens, seq {args.seq_length} (median of {args.repeats})\n"
    )
    print(table(["mode", "what", "s", "M tok/s", "vs encode_batch", "CPU s", "M tok/CPU-s"], rows_b))
    share = secs["encode_batch"] / secs["prepare_data"]
    print(f"\nprepare_data vs raw encode_batch: {100 * share:.0f}% -> {verdict(share, 0.8)}")

    payload = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine_at_start": start,
        "corpus": corpus,
        "corpus_generate_s": gen_s,
        "parse_mb_per_s": rates,
        "convert": {**convert, "median_wall_s": wall, "median_script_s": script, "median_cpu_s": cpu},
        "convert_speedup_wall": ratio_wall,
        "convert_speedup_script": ratio_script,
        "tokenize_set": tok_data,
        "tokenize_runs": tok_runs,
        "tokenize_tokens": tokens,
        "tokenize_median_s": secs,
        "tokenize_median_cpu_s": tok_cpu,
        "prepare_vs_encode_batch": share,
        "total_s": time.perf_counter() - t_start,
    }
    print(f"\nresults: {save_results('bench_prep', payload)} ({payload['total_s']:.0f}s in all)")
    if not args.workdir and not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
