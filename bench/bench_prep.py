"""Data prep throughput: data_to_hf.py with 2 workers vs 1, and fsdp_train.py's tokenize+pack vs raw `tokenizers`.

    python bench/bench_prep.py [--size-mb 200] [--tok-mb 32] [--repeats 3]

(a) A deterministic corpus of --size-mb MB (.txt prose, .json and .yaml record lists, 60/30/10 by count, 1 KB .. 1 MB
    log-uniform, words of the bundled data/); `data_to_hf.py --num_proc 2` and `--num_proc 1` alternately. MB/s =
    corpus bytes / wall seconds of the command. Target: 2 workers >= 1.7x 1 worker. Also each kind's single-process
    parse rate (data_to_hf.iter_file_documents).
(b) On --tok-mb MB of its documents, with model_download.build_tiny's tokenizer, each in a fresh process: raw
    `tokenizers` encode_batch vs fsdp_train.prepare_data run for real (map, write_packed, load_packed); tokens/s over
    the same token count. Target: prepare_data >= 80% of encode_batch.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import sys
import time
from pathlib import Path

from benchlib import ROOT, emit, median, parse, python, run, session, table, tiny_model, verdict, worker_cmd

KINDS = {"txt": 0.6, "json": 0.3, "yaml": 0.1}  # share of files (not bytes)
MODES = ("encode_batch", "prepare_data")
QUICK = {"size_mb": 2.0, "tok_mb": 1.0, "repeats": 1}


def configure(p) -> None:
    p.add_argument("--size-mb", type=float, default=200, help="generated corpus size in MB (200)")
    p.add_argument("--tok-mb", type=float, default=32, help="MB of its documents for the tokenize part (32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (3)")
    p.add_argument("--seq-length", type=int, default=1024, help="packed block length (fsdp_train's default 1024)")


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
            title, body = self.sentence(), self.prose(r.randint(200, 3000)).strip()
            rec = {"id": len(out), "title": title, "body": body, "tags": r.choices(self.words, k=3)}
            rec["score"] = round(r.random(), 3)
            out.append({**rec, "meta": {"author": r.choice(self.words), "draft": r.random() < 0.2}})
            size += len(body) + 150
        return out

    def file(self, kind: str, nbytes: int) -> str:
        if kind == "txt":
            return self.prose(nbytes)
        if kind == "json":
            return json.dumps(self.records(nbytes), indent=self.rng.choice([None, 2]))
        # YAML by hand (PyYAML's dumper would take minutes): JSON-quoted strings are valid YAML scalars.
        docs, lines, q = [], [], json.dumps
        for rec in self.records(nbytes):
            top = [f"{k}: {q(v)}" for k, v in rec.items() if k != "meta"]  # json.dumps(True) == "true", as YAML
            lines += ["- " + top[0], *(f"  {x}" for x in top[1:]), "  meta:"]
            lines += [f"    {k}: {q(v)}" for k, v in rec["meta"].items()]
            if self.rng.random() < 0.05:  # now and then a multi-document stream
                docs.append("\n".join(lines))
                lines = []
        docs.append("\n".join(lines))
        return "\n---\n".join(d for d in docs if d) + "\n"


def generate_corpus(out: Path, size_mb: float, seed: int = 0) -> dict:
    """Files of varied kinds and sizes until size_mb MB are written; their bytes and count. Reused when present."""
    marker = out.with_name(f"{out.name}.json")  # beside the corpus, or data_to_hf.py would read it as a document
    if marker.is_file() and json.loads(marker.read_text())["request"] == [size_mb, seed]:
        return json.loads(marker.read_text())
    shutil.rmtree(out, ignore_errors=True)
    writer, rng = Writer(seed), random.Random(seed + 1)
    total, i = 0, 0
    while total < size_mb * 1e6:
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        data = writer.file(kind, int(math.exp(rng.uniform(math.log(1e3), math.log(1e6))))).encode()
        path = out / f"d{i % 16:02d}" / f"s{i % 7}" / f"doc-{i:05d}.{kind}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        total, i = total + len(data), i + 1
    info = {"request": [size_mb, seed], "bytes": total, "files": i}
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


def bench_convert(corpus: dict, work: Path, repeats: int) -> dict:
    wall = {2: [], 1: []}
    for _ in range(repeats):
        for nproc in wall:  # alternating, so drift in the machine's load hits both alike
            args = ["--data_folder", work / "corpus", "--save_dir", work / "dataset", "--num_proc", nproc]
            wall[nproc].append(run(python("data_to_hf.py", *args)).check().wall)
            print(f"  data_to_hf --num_proc {nproc}: {wall[nproc][-1]:.1f}s", flush=True)
            shutil.rmtree(work / "dataset")
    mb, med = corpus["bytes"] / 1e6, {n: median(w) for n, w in wall.items()}
    print(f"\n## (a) data_to_hf.py on {mb:.0f} MB, {corpus['files']:,} files (median of {repeats})\n")
    print(table(["`data_to_hf.py`", "wall s", "MB/s"], [[f"`--num_proc {n}`", s, mb / s] for n, s in med.items()]))
    print(f"\nspeed-up 2 vs 1 worker: {verdict(med[1] / med[2], 1.7)}")
    return {"wall_s": wall, "speedup": med[1] / med[2]}


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


def tok_worker(mode: str, dataset: str, tokenizer_dir: str, seq_length: int, save_dir: str) -> None:
    """One timed mode, in this fresh process; emits its seconds (and encode_batch its token count)."""
    import datasets

    import fsdp_train as ft

    tokenizer = ft.load_tokenizer(tokenizer_dir)
    if mode == "prepare_data":
        ft.quiet_library_progress_bars()  # train() calls it before prepare_data
        d = ft.setup_distributed()  # a 1-process gloo group: prepare_data agrees on errors with the other ranks
        cfg = ft.Config(dataset_name=dataset, model_name=tokenizer_dir, save_dir=save_dir, seq_length=seq_length)
        ds = ft.load_dataset_any(dataset)
        t0 = time.perf_counter()
        result = {"blocks": len(ft.prepare_data(cfg, d, tokenizer, ds, "train"))}
        ft.teardown_distributed()
    else:
        texts = datasets.load_from_disk(dataset)["text"]
        encode = tokenizer.backend_tokenizer.encode_batch
        t0 = time.perf_counter()
        result = {"tokens": sum(len(e.ids) for i in range(0, len(texts), 1000) for e in encode(texts[i : i + 1000]))}
    emit({"mode": mode, "seconds": time.perf_counter() - t0, **result})


def bench_tokenize(args, work: Path) -> dict:
    tok_data = write_token_dataset(work / "corpus", work / "tok-dataset", args.tok_mb)
    tokenizer_dir, runs = tiny_model(work / "tiny"), []
    for _ in range(args.repeats):
        for mode in MODES:
            save_dir = work / f"prep-{mode}"
            fn_args = (mode, work / "tok-dataset", tokenizer_dir, args.seq_length, save_dir)
            cmd = worker_cmd("bench_prep.py", "tok_worker", *fn_args)
            runs.append(run(cmd).check().results()[-1])
            print(f"  {mode}: {runs[-1]['seconds']:.2f}s", flush=True)
            shutil.rmtree(save_dir, ignore_errors=True)
    tokens = median(r["tokens"] for r in runs if r["mode"] == "encode_batch")
    rate = {m: tokens / median(r["seconds"] for r in runs if r["mode"] == m) / 1e6 for m in MODES}
    size = f"{tok_data['documents']:,} docs, {tok_data['bytes'] / 1e6:.1f} MB, {tokens / 1e6:.2f} M tokens"
    print(f"\n## (b) tokenize + pack: {size}, seq {args.seq_length} (median of {args.repeats})\n")
    share = rate["prepare_data"] / rate["encode_batch"]
    rates = f"prepare_data {rate['prepare_data']:.2f} M tok/s vs raw encode_batch {rate['encode_batch']:.2f} M tok/s"
    print(f"{rates}: {share:.0%} -> {verdict(share, 0.8)}")
    return {"set": tok_data, "runs": runs, "m_tok_s": rate, "prepare_vs_encode_batch": share}


def main(argv: list[str] | None = None) -> int:
    args = parse(__doc__, configure, QUICK, check, argv)
    with session("prep", args) as (work, payload):
        corpus = generate_corpus(work / "corpus", args.size_mb)
        rates = {kind: round(mb_s, 1) for kind, mb_s in parse_rates(work / "corpus").items()}
        print(f"corpus: {corpus['files']:,} files, {corpus['bytes'] / 1e6:.1f} MB; single-process parse MB/s: {rates}")
        payload.update(corpus=corpus, parse_mb_per_s=rates, convert=bench_convert(corpus, work, args.repeats))
        payload["tokenize"] = bench_tokenize(args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
