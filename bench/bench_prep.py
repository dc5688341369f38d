"""Data prep throughput: data_to_hf.py with 2 workers vs 1, and fsdp_train.py's tokenize+pack vs raw `tokenizers`.

    .venv/bin/python bench/bench_prep.py [--size-mb 200] [--tok-mb 32] [--repeats 3] [--workdir DIR] [--keep]

(a) Generates a deterministic corpus of --size-mb MB: .txt prose, .json and .yaml record lists (count mix 60/30/10,
    sizes log-uniform 1 KB .. 1 MB, words drawn from the bundled data/), then runs `data_to_hf.py --num_proc 2` and
    `--num_proc 1` alternately. MB/s = corpus bytes / wall seconds of the command (interpreter start included; the
    script's own "in X s" is reported too). Target: 2 workers >= 1.7x 1 worker.
(b) On --tok-mb MB of the same documents, with the tokenizer model_download.build_tiny trains: tokens/s of raw
    `tokenizers` (backend encode_batch) vs fsdp_train.prepare_data run for real (datasets.map over tokenize_documents,
    write_packed into SAVE_DIR/.cache/tokenized/<key>/blocks.arrow, load_packed), and the in-process variants of MODES.
    Every mode runs in a fresh process, modes alternate, and every rate has the same numerator: the text's token
    count. Target: prepare_data >= 80% of encode_batch.
"""

from __future__ import annotations

import json
import math
import random
import re
import resource
import shutil
import sys
import time
from pathlib import Path

from benchlib import ROOT, emit, median, parse, python, run, session, table, tiny_model, verdict, worker_cmd

KINDS = {"txt": 0.6, "json": 0.3, "yaml": 0.1}  # share of files (not bytes)
BATCH = 1000  # documents per batch, as prepare_data's map uses
MODES = {
    "encode_batch": "tokenizers backend encode_batch (Rust threads)",
    "prepare_data": "fsdp_train.prepare_data for real (map + write_packed to blocks.arrow + load_packed)",
    "tokenize_documents": "fsdp_train.tokenize_documents + TextPacker in-process (tokenize + EOS + pack)",
    "call": "transformers fast tokenizer __call__",
    "encode_batch_fast": "tokenizers encode_batch_fast (no offsets)",
    "text_packer": "fsdp_train.TextPacker alone (numpy), on documents tokenized beforehand",
}
QUICK = {"size_mb": 2.0, "tok_mb": 1.0, "repeats": 1}


def configure(p) -> None:
    p.add_argument("--size-mb", type=float, default=200, help="generated corpus size in MB (default 200)")
    p.add_argument("--tok-mb", type=float, default=32, help="MB of its documents for the tokenize part (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (default 3)")
    p.add_argument("--seq-length", type=int, default=1024, help="packed block length (fsdp_train's default 1024)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")


def check(args) -> str | None:
    if args.repeats < 1 or args.size_mb <= 0 or not 0 < args.tok_mb <= args.size_mb:
        return "need --repeats >= 1, --size-mb > 0 and 0 < --tok-mb <= --size-mb"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# (a) corpus and data_to_hf.py


class Writer:
    """Deterministic prose and records from the words of the bundled corpus (drawn as often as they occur)."""

    def __init__(self, seed: int):
        files = sorted(p for p in (ROOT / "data").rglob("*") if p.is_file())
        self.words = [w for p in files for w in re.findall(r"[A-Za-z][A-Za-z'-]*", p.read_text(errors="ignore"))]
        self.rng = random.Random(seed)

    def sentence(self) -> str:
        ws = self.rng.choices(self.words, k=self.rng.randint(6, 20))
        return ws[0].capitalize() + " " + " ".join(ws[1:]) + self.rng.choice(".....?!")

    def prose(self, nbytes: int) -> str:
        paragraphs, size = [], 0
        while size < nbytes:
            paragraphs.append(" ".join(self.sentence() for _ in range(self.rng.randint(3, 8))))
            size += len(paragraphs[-1]) + 2
        return "\n\n".join(paragraphs) + "\n"

    def records(self, nbytes: int) -> list[dict]:
        out, size, r = [], 0, self.rng
        while size < nbytes:
            out.append({"id": len(out), "title": self.sentence(), "body": self.prose(r.randint(200, 3000)).strip(),
                        "tags": r.choices(self.words, k=3), "score": round(r.random(), 3),
                        "meta": {"author": r.choice(self.words), "draft": r.random() < 0.2}})  # fmt: skip
            size += len(out[-1]["body"]) + 150
        return out

    def file(self, kind: str, nbytes: int) -> str:
        if kind == "txt":
            return self.prose(nbytes)
        if kind == "json":
            return json.dumps(self.records(nbytes), indent=self.rng.choice([None, 2]))
        # YAML by hand (PyYAML's dumper would take minutes): JSON-quoted strings are valid YAML scalars.
        docs, lines, q = [], [], json.dumps
        for rec in self.records(nbytes):
            lines += [f"- id: {rec['id']}", f"  title: {q(rec['title'])}", f"  body: {q(rec['body'])}",
                      f"  tags: {q(rec['tags'])}", f"  score: {rec['score']}", "  meta:",
                      f"    author: {q(rec['meta']['author'])}",
                      f"    draft: {str(rec['meta']['draft']).lower()}"]  # fmt: skip
            if self.rng.random() < 0.05:  # now and then a multi-document stream
                docs.append("\n".join(lines))
                lines = []
        docs.append("\n".join(lines))
        return "\n---\n".join(d for d in docs if d) + "\n"


def generate_corpus(out: Path, size_mb: float, seed: int) -> dict:
    """Files of varied kinds and sizes until size_mb MB are written; bytes and files per kind. Reused when present."""
    marker = out.with_name(f"{out.name}.json")  # beside the corpus, or data_to_hf.py would read it as a document
    if marker.is_file() and json.loads(marker.read_text())["request"] == [size_mb, seed]:
        return json.loads(marker.read_text())
    shutil.rmtree(out, ignore_errors=True)
    writer, rng = Writer(seed), random.Random(seed + 1)
    stats = {k: {"files": 0, "bytes": 0} for k in KINDS}
    total, i = 0, 0
    while total < size_mb * 1e6:
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        data = writer.file(kind, int(math.exp(rng.uniform(math.log(1e3), math.log(1e6))))).encode()
        path = out / f"d{i % 16:02d}" / f"s{i % 7}" / f"doc-{i:05d}.{kind}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        stats[kind]["files"] += 1
        stats[kind]["bytes"] += len(data)
        total, i = total + len(data), i + 1
    info = {"request": [size_mb, seed], "bytes": total, "files": i, "kinds": stats}
    marker.write_text(json.dumps(info))
    return info


def parse_rates(corpus: Path, mb_per_kind: float = 16) -> dict[str, float]:
    """Single-process MB/s of data_to_hf.iter_file_documents per file kind (where (a)'s time goes)."""
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


def bench_convert(corpus: Path, work: Path, repeats: int) -> list[dict]:
    runs = []
    for r in range(repeats):
        for nproc in (2, 1):  # alternating, so drift in the machine's load hits both alike
            job = run(python("data_to_hf.py", "--data_folder", corpus, "--save_dir", work / "dataset", "--num_proc",
                             nproc)).check()  # fmt: skip
            m = SUMMARY.search(job.output)
            runs.append({"repeat": r, "num_proc": nproc, "wall_s": job.wall, "cpu_s": job.cpu, "script_s": float(m[4]),
                         "documents": int(m[2].replace(",", ""))})  # fmt: skip
            print(
                f"  data_to_hf --num_proc {nproc}: {job.wall:.1f}s wall ({m[4]} s by its summary), {job.cpu:.1f}s CPU"
            )
            shutil.rmtree(work / "dataset")
    return runs


# ----------------------------------------------------------------------------------------------------------------------
# (b) tokenize + pack


def write_token_dataset(corpus: Path, out: Path, mb: float) -> dict:
    """The first `mb` MB of documents data_to_hf.py extracts from the corpus (files in sorted order), saved to disk."""
    import datasets

    from data_to_hf import iter_file_documents

    if not out.is_dir():
        docs, size = [], 0
        for p in sorted(corpus.rglob("doc-*")):
            new = list(iter_file_documents(p))
            docs, size = docs + new, size + sum(len(d.encode()) for d in new)
            if size >= mb * 1e6:
                break
        datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(out))
    ds = datasets.load_from_disk(str(out))
    return {"documents": len(ds), "bytes": sum(len(t.encode()) for t in ds["text"])}


def cpu_seconds() -> float:
    """User + system seconds of this process (all threads) and of its waited-for children."""
    return sum(ru.ru_utime + ru.ru_stime for ru in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                           resource.RUSAGE_CHILDREN)))  # fmt: skip


def flat_lengths(token_lists: list[list[int]]):
    """Documents as (concatenated int32 tokens, lengths): what write_packed hands TextPacker from an Arrow column."""
    import numpy as np

    lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
    return np.fromiter((t for x in token_lists for t in x), dtype=np.int32, count=int(lengths.sum())), lengths


def tok_worker(mode: str, dataset: str, tokenizer_dir: str, seq_length: int, save_dir: str) -> None:
    """One timed mode, in this fresh process; emits its seconds, CPU seconds and tokens or blocks."""
    import datasets

    import fsdp_train as ft

    tokenizer = ft.load_tokenizer(tokenizer_dir)
    texts = datasets.load_from_disk(dataset)["text"]
    batches = [texts[i : i + BATCH] for i in range(0, len(texts), BATCH)]
    result, packer = {"mode": mode}, ft.TextPacker(seq_length)

    def tokenize_and_pack(b: list[str]) -> int:  # prepare_data's work in this process: no datasets.map, no Arrow
        ids = ft.tokenize_documents({"text": b}, tokenizer)["input_ids"]
        result["blocks"] = result.get("blocks", 0) + len(packer.add(*flat_lengths(ids))["input_ids"])
        return sum(len(x) for x in ids)

    if mode == "prepare_data":
        ft.quiet_library_progress_bars()  # train() calls it before prepare_data
        d = ft.setup_distributed()  # a 1-process gloo group: prepare_data agrees on errors with the other ranks
        cfg = ft.Config(dataset_name=dataset, model_name=tokenizer_dir, save_dir=save_dir, seq_length=seq_length)
        ds = ft.load_dataset_any(dataset)

        def work() -> dict:
            return {"blocks": len(ft.prepare_data(cfg, d, tokenizer, ds, "train"))}

    elif mode == "text_packer":  # the packing alone, on documents tokenized beforehand (as write_packed feeds it)
        docs = [flat_lengths(ft.tokenize_documents({"text": b}, tokenizer)["input_ids"]) for b in batches]

        def work() -> dict:
            return {"blocks": sum(len(packer.add(*doc)["input_ids"]) for doc in docs)}

    elif mode == "tokenize_documents":

        def work() -> dict:
            return {"tokens": sum(tokenize_and_pack(b) for b in batches)}

    else:
        backend = tokenizer.backend_tokenizer
        encode = {"encode_batch": lambda b: [len(e.ids) for e in backend.encode_batch(b)],
                  "encode_batch_fast": lambda b: [len(e.ids) for e in backend.encode_batch_fast(b)],
                  "call": lambda b: [len(x) for x in tokenizer(b)["input_ids"]]}[mode]  # fmt: skip

        def work() -> dict:
            return {"tokens": sum(sum(encode(b)) for b in batches)}

    cpu0, t0 = cpu_seconds(), time.perf_counter()
    result.update(work())
    result["seconds"] = time.perf_counter() - t0
    result["cpu_s"] = cpu_seconds() - cpu0  # includes prepare_data's map workers, which map() waits for
    if mode == "prepare_data":
        ft.teardown_distributed()
    emit(result)


def bench_tokenize(dataset: Path, tokenizer_dir: Path, seq_length: int, work: Path, repeats: int) -> list[dict]:
    runs = []
    for r in range(repeats):
        for mode in MODES:
            save_dir = work / f"prep-{mode}-{r}"
            job = run(worker_cmd("bench_prep.py", "tok_worker", mode, dataset, tokenizer_dir, seq_length, save_dir))
            runs.append({"repeat": r, **job.check().results()[-1]})
            print(f"  {mode}: {runs[-1]['seconds']:.2f}s, {runs[-1]['cpu_s']:.2f}s CPU", flush=True)
            shutil.rmtree(save_dir, ignore_errors=True)
    return runs


# ----------------------------------------------------------------------------------------------------------------------
# main


def report_convert(corpus: dict, runs: list[dict], rates: dict, repeats: int) -> dict:
    mb = corpus["bytes"] / 1e6
    med = {n: {k: median(r[k] for r in runs if r["num_proc"] == n) for k in ("wall_s", "script_s", "cpu_s")}
           for n in (1, 2)}  # fmt: skip
    rows = [[f"--num_proc {n}", m["wall_s"], mb / m["wall_s"], m["script_s"], mb / m["script_s"], m["cpu_s"]]
            for n, m in sorted(med.items(), reverse=True)]  # fmt: skip
    ratio = med[1]["wall_s"] / med[2]["wall_s"]
    print(f"\n## (a) data_to_hf.py on {mb:.0f} MB, {corpus['files']:,} files (median of {repeats})\n")
    print(table(["variant", "wall s", "MB/s (wall)", "script s", "MB/s (script)", "CPU s (all processes)"], rows))
    print(f"\nspeed-up 2 vs 1 worker: wall {ratio:.2f}x, script {med[1]['script_s'] / med[2]['script_s']:.2f}x -> "
          f"{verdict(ratio, 1.7)}")  # fmt: skip
    kinds = ", ".join(f"{k} {v['files']} files {v['bytes'] / 1e6:.0f} MB parsed at {rates[k]:.0f} MB/s"
                      for k, v in corpus["kinds"].items())  # fmt: skip
    print(f"corpus by kind (single-process iter_file_documents): {kinds}")
    return {"medians_by_num_proc": med, "speedup_wall": ratio}


def report_tokenize(tok_data: dict, runs: list[dict], args) -> dict:
    tokens = median(r["tokens"] for r in runs if r["mode"] == "encode_batch")
    secs = {m: median(r["seconds"] for r in runs if r["mode"] == m) for m in MODES}
    cpu = {m: median(r["cpu_s"] for r in runs if r["mode"] == m) for m in MODES}
    rows = [[m, what, secs[m], tokens / secs[m] / 1e6, f"{secs['encode_batch'] / secs[m]:.0%}", cpu[m],
             tokens / cpu[m] / 1e6] for m, what in MODES.items()]  # fmt: skip
    print(f"\n## (b) tokenize + pack: {tok_data['documents']:,} docs, {tok_data['bytes'] / 1e6:.1f} MB, "
          f"{tokens / 1e6:.2f} M tokens, seq {args.seq_length} (median of {args.repeats})\n")  # fmt: skip
    print(table(["mode", "what", "s", "M tok/s", "vs encode_batch", "CPU s", "M tok/CPU-s"], rows))
    share = secs["encode_batch"] / secs["prepare_data"]
    print(f"\nprepare_data vs raw encode_batch: {share:.0%} -> {verdict(share, 0.8)}")
    return {"tokens": tokens, "median_s": secs, "median_cpu_s": cpu, "prepare_vs_encode_batch": share}


def main(argv: list[str] | None = None) -> int:
    args = parse(__doc__, configure, QUICK, check, argv)
    with session("prep", args) as (work, payload):
        t0 = time.perf_counter()
        corpus = generate_corpus(work / "corpus", args.size_mb, args.seed)
        print(f"corpus: {corpus['files']:,} files, {corpus['bytes'] / 1e6:.1f} MB ({time.perf_counter() - t0:.0f}s)")
        rates = parse_rates(work / "corpus")
        convert = bench_convert(work / "corpus", work, args.repeats)
        tokenizer_dir = tiny_model(work / "tiny")
        tok_data = write_token_dataset(work / "corpus", work / "tok-dataset", args.tok_mb)
        print(f"tokenize set: {tok_data['documents']:,} documents, {tok_data['bytes'] / 1e6:.1f} MB", flush=True)
        tok_runs = bench_tokenize(work / "tok-dataset", tokenizer_dir, args.seq_length, work, args.repeats)
        payload.update(corpus=corpus, parse_mb_per_s=rates, convert_runs=convert, tokenize_set=tok_data,
                       tokenize_runs=tok_runs, convert=report_convert(corpus, convert, rates, args.repeats),
                       tokenize=report_tokenize(tok_data, tok_runs, args))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
