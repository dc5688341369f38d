"""Benchmark fsdp_train.py against the Hugging Face Trainer on the same model, data, batch, steps and schedule.

    make bench                                                   # = python bench/bench_train.py (small, 3 rounds)
    python bench/bench_train.py --model medium --repeats 1       # compute-bound shape, ~1 min per run on 2 cores
    python bench/bench_train.py --variants fsdp,trainer --steps 12 --repeats 1          # a quick look
    python bench/bench_train.py --device cuda                    # bf16, ~1B Llama shape, one rank per GPU
    python bench/bench_train.py --variants ac-off,ac-off-block-unit,trainer-ac-off --repeats 3 --steps 4 \
        --skip-steps 1 --outside 10,90                           # throughput as a user sees it, launch to exit

Variants run alternating (A B C A B C ... for --repeats rounds), each a fresh `torchrun --standalone` job with
OMP_NUM_THREADS = cores / ranks. fsdp: fsdp_train.py as users run it (FULL_SHARD, activation checkpointing, final
checkpoint + HF export). trainer: bench/hf_trainer_run.py, transformers.Trainer given the same fsdp_train.py flags
(on CPU accelerate silently runs DDP instead of FSDP; the backend it used is printed). The others add VARIANTS' flags
(--shard-unit is left to auto: one FSDP unit on CPU, per block on CUDA). Both sides train the same blocks: the bench
packs data/ with fsdp_train's functions, checks them token for token against fsdp_train.py's cache, and hands the
Trainer those blocks, position_ids and labels in fsdp_train.py's sample order; their per-step losses agree (Δloss).
A 1-step run of each side first warms the data and file caches; it is not measured.

Per run, then the median over rounds (ratios vs the Trainer are taken per round, then median'd):
  tok/s       median over steps > --skip-steps of (global tokens of the step / its wall time); fsdp: metrics.jsonl at
              --log-freq 1, trainer: a TrainerCallback's step-end clock
  MFU         fsdp_train.py's own (benchlib.mfu: Throughput.mfu with flops_per_token and count_params) against the
              peak per device fsdp_train.device_peak_tflops resolves (--peak-tflops, else PEAK_TFLOPS on CUDA). On CPU
              without --peak-tflops: fp32 square matmuls run concurrently by one process per rank, measured before
              every round and after the last, the best per rank (other load only lowers it). fsdp runs that know the
              peak up front log the same MFU in metrics.jsonl; both are printed
  first step  launch -> the first optimizer step's line on stdout;   wall: launch -> exit of torchrun
  peak mem    CPU: the largest VmRSS of any rank process, sampled every 50 ms; CUDA: max allocated of rank 0. Below the
              table, each minus the peak RSS of a process that only imports torch, transformers and datasets
  final loss  the last step's loss (global token mean), and max |loss - the Trainer's loss| over all steps
--outside SHORT,LONG also times each variant from outside: (LONG - SHORT) x global tokens per step / (wall of LONG
- wall of SHORT), so start-up, final save, export and exit cancel. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from benchlib import GIB, ROOT, fmt, median, mfu, model_flops, packed_cache, parse, read_metrics, run, session, torchrun

# ======================================================================================================================
# Config


@dataclass(frozen=True)
class Shape:
    """A Llama shape and the batch it is benchmarked with."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    seq: int
    batch: int  # sequences per rank per step
    steps: int
    lr: float = 1e-3
    warmup: int = 5
    vocab: int = 2048  # the BPE tokenizer trained on data/


SHAPES = {
    "small": Shape(hidden=256, layers=4, heads=4, kv_heads=2, seq=256, batch=4, steps=30),
    # ~40 M matmul weights, ~0.26 GFLOP/token: compute-bound on CPU, about a minute per run on 2 cores.
    "medium": Shape(hidden=768, layers=6, heads=12, kv_heads=4, seq=512, batch=2, steps=10),
    # Llama-3.2-1B-like trunk (its MLP is 8/3 h here); data/ packs into only ~12 blocks of 1024 tokens, so batch 1/GPU.
    "1b": Shape(hidden=2048, layers=16, heads=32, kv_heads=8, seq=1024, batch=1, steps=30, lr=3e-4),
}
# name -> (runner, extra fsdp_train.py flags; hf_trainer_run.py reads the same flags)
VARIANTS = {
    "fsdp": ("fsdp", []),
    "trainer": ("trainer", []),
    "ac-off": ("fsdp", ["--activation-checkpointing", "off"]),
    "compile": ("fsdp", ["--compile", "on"]),
    # --reshard-after-forward acts on per-block units only, so these pin them (on CPU auto is one unit)
    "no-reshard": ("fsdp", ["--reshard-after-forward", "off", "--shard-unit", "block"]),
    "ac-off-no-reshard": (
        "fsdp",
        ["--activation-checkpointing", "off", "--reshard-after-forward", "off", "--shard-unit", "block"],
    ),  # fmt: skip
    "ac-off-block-unit": ("fsdp", ["--activation-checkpointing", "off", "--shard-unit", "block"]),
    "trainer-ac-off": ("trainer", ["--activation-checkpointing", "off"]),
}
FIRST_STEP = {"fsdp": r"\[rank0\] step 1/\d+", "trainer": r"\[bench\] trainer step 1 done"}
SCRIPT = {"fsdp": "fsdp_train.py", "trainer": "bench/hf_trainer_run.py"}
QUICK = {"repeats": 1, "steps": 6, "skip_steps": 2}


def configure(p) -> None:
    p.add_argument("--model", choices=sorted(SHAPES), help="shape (default: small on cpu, 1b on cuda)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu: fp32, gloo; cuda: bf16 (cpu)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per run (0: the shape's, 30 small/10 medium)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of all variants, alternating (3)")
    p.add_argument("--variants", type=lambda s: [v for v in s.split(",") if v], default=list(VARIANTS),
                   help=f"comma list of {', '.join(VARIANTS)} (all)")  # fmt: skip
    p.add_argument("--nproc", type=int, default=0, help="ranks per run (0: 2 on cpu, every GPU on cuda)")
    p.add_argument("--batch-size", type=int, default=0, help="sequences per rank per step (0: the shape's)")
    p.add_argument("--skip-steps", type=int, default=3, help="first steps left out of the steady-state tok/s (3)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense peak TFLOP/s of one device (rank), passed to "
                   "fsdp_train.py too (0: its PEAK_TFLOPS on cuda, measured on cpu)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds one run may take before it is killed (1200)")
    p.add_argument(
        "--outside",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[],
        metavar="SHORT,LONG",
        help="also time each variant from outside: a SHORT- and a LONG-step run per round (e.g. 10,50)",
    )
    p.set_defaults(workdir=ROOT / "outputs" / "bench")  # data and models are reused; --keep keeps each run's outputs


def settle(args) -> str | None:
    args.model = args.model or ("1b" if args.device == "cuda" else "small")
    args.steps = args.steps or SHAPES[args.model].steps
    if not args.variants or not set(args.variants) <= set(VARIANTS):
        return f"--variants: choose from {', '.join(VARIANTS)}"
    if args.repeats < 1 or args.steps < 0 or args.nproc < 0 or args.skip_steps < 0:
        return "--repeats must be >= 1 and --steps, --nproc, --skip-steps >= 0"
    if args.outside and (len(args.outside) != 2 or not 0 < args.outside[0] < args.outside[1]):
        return "--outside takes two step counts SHORT,LONG with 0 < SHORT < LONG"
    if args.steps <= args.skip_steps:
        return f"--steps {args.steps} leaves no step after --skip-steps {args.skip_steps}"
    return None


# ======================================================================================================================
# Model and data


def prepare_inputs(workdir: Path, shape: Shape, corpus: Path = ROOT / "data") -> tuple[Path, Path]:
    """(text dataset, model folder), built once per content of data/ (paths, sizes, mtimes) and shape."""
    from data_to_hf import convert
    from model_download import build_tiny

    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    key = "|".join(f"{p.relative_to(corpus)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    dataset = workdir / f"dataset-{digest}"
    if not dataset.is_dir():
        print(f"dataset: {convert(corpus, dataset, num_proc=1).documents} documents from {corpus} -> {dataset}")
    s = shape
    model = workdir / "models" / f"llama-h{s.hidden}-l{s.layers}-a{s.heads}-kv{s.kv_heads}-v{s.vocab}-{digest}"
    if not model.is_dir():
        model.parent.mkdir(parents=True, exist_ok=True)
        build_tiny(model, corpus, vocab_size=s.vocab, hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads,
                   num_kv_heads=s.kv_heads, max_positions=max(1024, s.seq))  # fmt: skip
    return dataset, model


def pack_blocks(dataset: Path, model: Path, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, position_ids), each (blocks, seq), as fsdp_train.py packs them: tokenize_documents over
    1000-document batches, then one TextPacker over all documents in order."""
    from functools import partial

    import datasets

    from fsdp_train import TextPacker, list_columns, load_tokenizer, tokenize_documents

    ds = datasets.load_from_disk(str(dataset))
    fn = partial(tokenize_documents, tokenizer=load_tokenizer(str(model)))
    docs = ds.map(fn, batched=True, batch_size=1000, remove_columns=ds.column_names, keep_in_memory=True)
    packer = TextPacker(seq)
    blocks = [packer.add(*list_columns(t, "input_ids")) for t in docs.with_format("arrow").iter(batch_size=10_000)]
    return np.concatenate([b["input_ids"] for b in blocks]), np.concatenate([b["position_ids"] for b in blocks])


def write_trainer_data(blocks, steps: int, global_batch: int, seed: int, out: Path) -> Path:
    """The Trainer's data: the blocks fsdp_train.py trains on, step after step, in its order (epoch_permutation, rank
    r = r-th slice of each global batch), with its labels (block_labels). Within the first epoch only: there the last
    step may be short (fsdp_train.py fills it with masked rows), which the Trainer's fixed batches cannot copy."""
    import datasets
    import torch

    from fsdp_train import block_labels, epoch_permutation

    if steps * global_batch > len(blocks[0]):
        raise SystemExit(f"error: {steps} steps of {global_batch} sequences exceed the {len(blocks[0])} packed "
                         "sequences of one epoch; use fewer --steps")  # fmt: skip
    order = epoch_permutation(len(blocks[0]), seed, 0)[: steps * global_batch].tolist()
    ids, positions = (torch.from_numpy(a[order]).long() for a in blocks)
    columns = {"input_ids": ids, "position_ids": positions, "labels": block_labels(ids, positions)}
    shutil.rmtree(out, ignore_errors=True)
    datasets.Dataset.from_dict({k: v.tolist() for k, v in columns.items()}).save_to_disk(str(out))
    return out


# ======================================================================================================================
# Peak FLOP/s on CPU (on CUDA: fsdp_train.device_peak_tflops)


def _matmul_worker(threads: int, sizes: tuple[int, ...], seconds: float, barrier, queue) -> None:
    import torch

    torch.set_num_threads(threads)
    for n in sizes:
        a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
        for _ in range(2):
            torch.mm(a, b, out=c)
        barrier.wait()  # every process multiplies at the same time, as the ranks train at the same time
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, b, out=c)
            k += 1
        queue.put((n, 2.0 * n**3 * k / (time.perf_counter() - t0)))


def measure_cpu_peak(nproc: int, threads: int, sizes=(1024, 2048, 4096), seconds: float = 1.5) -> dict:
    """fp32 matmul TFLOP/s per rank: `nproc` concurrent processes with `threads` threads each; the best size."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(nproc), ctx.Queue()
    procs = [ctx.Process(target=_matmul_worker, args=(threads, sizes, seconds, barrier, queue)) for _ in range(nproc)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=300) for _ in range(nproc * len(sizes))]
    for proc in procs:
        proc.join()
    by_size = {n: sum(f for m, f in results if m == n) / nproc / 1e12 for n in sizes}
    best = max(by_size, key=by_size.get)
    return {"tflops": by_size[best], "best_size": best, "tflops_by_size": by_size}


# ======================================================================================================================
# Runs and their numbers


@dataclass
class Plan:
    """Everything that is the same for every run of one invocation."""

    args: object
    shape: Shape
    dataset: Path
    model: Path
    runs_dir: Path
    nproc: int
    threads: int
    env: dict
    blocks: tuple[np.ndarray, np.ndarray] | None = None  # (input_ids, position_ids) as fsdp_train.py packs them
    trainer_data: Path | None = None
    results: list[dict] = field(default_factory=list)

    @property
    def batch(self) -> int:
        return self.args.batch_size or self.shape.batch

    def fsdp_argv(self, exp: str, steps: int, extra: list[str]) -> list[str]:
        a, s = self.args, self.shape
        return [
            *("-e", exp, "-d", str(self.dataset), "-m", str(self.model), "--save-dir", str(self.runs_dir)),
            *("-s", str(s.seq), "-b", str(self.batch), "--lr", str(s.lr), "--warmup-steps", str(s.warmup)),
            *("--num-epochs", "1", "--max-steps", str(steps), "--log-freq", "1", "--ckpt-freq", "0", "--seed", "0"),
            *("--dtype", "bf16" if a.device == "cuda" else "fp32", "--peak-tflops", str(a.peak_tflops), *extra),
        ]


def run_variant(plan: Plan, variant: str, tag: str, steps: int) -> dict:
    """One job of `variant`; its record (rc != 0: the error and the log's tail)."""
    runner, extra = VARIANTS[variant]
    exp = f"{tag}-{variant}"
    out_dir, log = plan.runs_dir / exp, plan.runs_dir / f"{exp}.log"
    data = ["--data", str(plan.trainer_data)] if runner == "trainer" else []
    cmd = [*torchrun(plan.nproc), SCRIPT[runner], *data, *plan.fsdp_argv(exp, steps, extra)]
    job = run(cmd, env=plan.env, timeout=plan.args.timeout, log=log, ranks=SCRIPT[runner])
    first = job.first(FIRST_STEP[runner])
    rec = {"variant": variant, "tag": tag, "command": " ".join(cmd), "rc": job.rc, "wall_s": job.wall,
           "first_step_s": first[0] if first else None, "rank_peak_rss_gib": job.rank_peak_rss_gib,
           "rank_vmhwm_gib": job.rank_vmhwm_gib, "tree_maxrss_gib": job.tree_maxrss_gib, "log": str(log)}  # fmt: skip
    if job.rc != 0:
        return {**rec, "error": job.output[-3000:]}
    if runner == "fsdp":
        metrics = read_metrics(out_dir)
        rec["steps"] = {m["global_step"]: {"tok_s": m["tok/s"], "loss": m["loss"], "step_s": m["time/total"] / 1e3,
                                           "mfu": m.get("mfu")} for m in metrics}  # fmt: skip
        rec["cuda_peak_allocated_gib"] = max((m["mem/peak_allocated_gib"] for m in metrics
                                              if "mem/peak_allocated_gib" in m), default=None)  # fmt: skip
    else:
        result = json.loads((out_dir / "result.json").read_text())
        rec["steps"] = {i + 1: {"tok_s": result["tokens_per_step"] / dt, "loss": result["losses"].get(str(i + 1)),
                                "step_s": dt} for i, dt in enumerate(result["step_s"])}  # fmt: skip
        rec["backend"] = {k: result[k] for k in ("backend", "distributed_type", "wrapped_model", "fsdp_enabled")}
        rec["cuda_peak_allocated_gib"] = result.get("cuda_peak_allocated_gib")
    steady = [s for step, s in rec["steps"].items() if step > plan.args.skip_steps] or list(rec["steps"].values())
    rec["steady_tok_s"] = median(s["tok_s"] for s in steady)  # (a 1-step warm-up has only its first step)
    rec["logged_mfu"] = median(s.get("mfu") for s in steady) if steady[0].get("mfu") is not None else None
    rec["final_loss"] = rec["steps"][max(rec["steps"])]["loss"]
    cuda = plan.args.device == "cuda"
    rec["peak_mem_gib"] = rec["cuda_peak_allocated_gib"] if cuda else max(job.rank_peak_rss_gib, default=None)
    if not plan.args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return rec


def outside_record(variant: str, round_: int, walls: dict[int, dict], steps: list[int], tokens_per_step: int) -> dict:
    """A variant's throughput as a user sees it: the extra wall time of LONG - SHORT steps, launch to exit."""
    short, long = steps
    rec = {"variant": variant, "round": round_, "wall_s": {n: r["wall_s"] for n, r in walls.items()}}
    if any(r["rc"] != 0 for r in walls.values()):
        return {**rec, "summary": "failed: " + ", ".join(r["log"] for r in walls.values() if r["rc"] != 0)}
    extra_s = walls[long]["wall_s"] - walls[short]["wall_s"]
    inside = median(st["step_s"] for n, st in walls[long]["steps"].items() if n > short)
    rec.update(step_s=extra_s / (long - short), tok_s=(long - short) * tokens_per_step / extra_s, inside_step_s=inside)
    rec["summary"] = (f"{rec['tok_s']:,.0f} tok/s ({rec['step_s'] * 1e3:.0f} ms/step from outside, {inside * 1e3:.0f} "
                      f"inside; walls {walls[short]['wall_s']:.1f} s / {walls[long]['wall_s']:.1f} s)")  # fmt: skip
    return rec


def summarize(records: list[dict], variants: list[str], peak: float | None, fpt: float, nproc: int,
              baseline: float | None) -> dict:  # fmt: skip
    """Median over rounds per variant; ratios vs the Trainer per round (same tag), then median'd."""
    ok = [r for r in records if r["rc"] == 0]
    trainer = {r["tag"]: r for r in ok if r["variant"] == "trainer"}
    out = {}
    for v in variants:
        runs = [r for r in ok if r["variant"] == v]
        s = {"runs": len(runs), "failed": sum(1 for r in records if r["variant"] == v and r["rc"] != 0)}
        out[v] = s
        if not runs:
            continue
        for key in ("steady_tok_s", "first_step_s", "wall_s", "peak_mem_gib", "final_loss", "logged_mfu"):
            s[key] = median(r[key] for r in runs)
        s["mfu"] = mfu(s["steady_tok_s"], fpt, nproc, peak) if peak else None
        if baseline is not None and s["peak_mem_gib"] is not None:
            s["peak_mem_above_baseline_gib"] = s["peak_mem_gib"] - baseline
        pairs = [(r, trainer[r["tag"]]) for r in runs if r["tag"] in trainer and v != "trainer"]
        if pairs:
            s["tok_s_vs_trainer"] = median(r["steady_tok_s"] / t["steady_tok_s"] for r, t in pairs)
            s["peak_mem_vs_trainer"] = median(r["peak_mem_gib"] / t["peak_mem_gib"] for r, t in pairs
                                              if r["peak_mem_gib"] and t["peak_mem_gib"])  # fmt: skip
            if baseline is not None:
                above = [(r["peak_mem_gib"] - baseline, t["peak_mem_gib"] - baseline) for r, t in pairs]
                s["above_baseline_vs_trainer"] = median(a / b for a, b in above if b > 1e-3)
            s["max_abs_dloss_vs_trainer"] = max((abs(r["steps"][k]["loss"] - t["steps"][k]["loss"]) for r, t in pairs
                                                 for k in r["steps"] if t["steps"].get(k, {}).get("loss") is not None),
                                                default=None)  # fmt: skip
    return out


def markdown_table(summary: dict, device: str) -> str:
    mem = "peak alloc GiB (rank 0)" if device == "cuda" else "peak RSS/rank GiB"
    lines = [
        f"| variant | tok/s | x Trainer | MFU | first step s | wall s | {mem} | x Trainer | final loss | max Δloss |"
    ]
    lines.append("|---|" + "---:|" * 9)
    for v, s in summary.items():
        if not s["runs"]:
            lines.append(f"| {v} | failed ({s['failed']} runs) | | | | | | | | |")
            continue
        cells = [fmt(s["steady_tok_s"], ",.0f"), fmt(s.get("tok_s_vs_trainer"), ".2f"), fmt(s["mfu"], ".1%"),
                 fmt(s["first_step_s"], ".1f"), fmt(s["wall_s"], ".1f"), fmt(s["peak_mem_gib"], ".3f"),
                 fmt(s.get("peak_mem_vs_trainer"), ".2f"), fmt(s["final_loss"], ".4f"),
                 fmt(s.get("max_abs_dloss_vs_trainer"), ".1e")]  # fmt: skip
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def outside_table(records: list[dict], variants: list[str], steps: list[int]) -> str:
    """Medians over rounds, and each variant's ratio to the Trainer (trainer-ac-off) of the same round."""
    rows = [f"| variant | tok/s from outside ({steps[1]} - {steps[0]} steps) | ms/step outside | ms/step inside | "
            "x Trainer |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    ok = [r for r in records if "tok_s" in r]
    peer = {r["round"]: r["tok_s"] for r in ok if r["variant"] == "trainer-ac-off"}
    for variant in variants:
        if mine := [r for r in ok if r["variant"] == variant]:
            ratio = median(r["tok_s"] / peer[r["round"]] for r in mine if r["round"] in peer)
            rows.append(f"| {variant} | {median(r['tok_s'] for r in mine):,.0f} | "
                        f"{median(r['step_s'] for r in mine) * 1e3:.0f} | "
                        f"{median(r['inside_step_s'] for r in mine) * 1e3:.0f} | {fmt(ratio, '.2f')} |")  # fmt: skip
    return "\n".join(rows)


def describe(rec: dict) -> str:
    if rec["rc"] != 0:
        return f"FAILED rc={rec['rc']} (log {rec['log']})"
    ranks = "/".join(f"{g:.2f}" for g in rec["rank_peak_rss_gib"])
    return (f"{rec['steady_tok_s']:,.0f} tok/s, first step {fmt(rec['first_step_s'], '.1f')}s, wall "
            f"{rec['wall_s']:.1f}s, peak RSS {ranks} GiB, loss {rec['final_loss']:.4f}")  # fmt: skip


# ======================================================================================================================
# Main


def import_baseline_gib() -> float:
    """Peak RSS of a process that only imports what every rank imports: the floor under any per-rank number."""
    code = "import resource, torch, torch.distributed, transformers, datasets; "
    job = run([sys.executable, "-c", code + "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"]).check()
    return int(job.output.split()[-1]) * 1024 / GIB


def make_plan(args, work: Path) -> Plan:
    """Inputs, the fsdp_train.py config both sides train with, the Trainer's data; the peak the trainer would use."""
    import torch

    from fsdp_train import device_peak_tflops
    from fsdp_train import parse_args as fsdp_parse_args

    shape = SHAPES[args.model]
    nproc = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 2)
    threads = max(1, len(os.sched_getaffinity(0)) // nproc)
    env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    runs_dir = work / f"runs-{time.strftime('%Y%m%d-%H%M%S')}"
    runs_dir.mkdir(parents=True)
    plan = Plan(args, shape, *prepare_inputs(work, shape), runs_dir, nproc, threads, env)
    cfg = fsdp_parse_args(plan.fsdp_argv("plan", args.steps, []))
    args.peak_tflops = device_peak_tflops(cfg, torch.device(args.device)) or 0.0  # the trainer's own look-up
    if args.device == "cuda" and not args.peak_tflops:
        raise SystemExit(f"error: no datasheet peak for '{torch.cuda.get_device_name()}'; pass --peak-tflops")
    print(f"bench: {args.model} on {args.device}, {nproc} ranks x {threads} threads, {args.steps} steps, batch "
          f"{plan.batch}/rank x seq {shape.seq}, {args.repeats} round(s) of {', '.join(args.variants)}")  # fmt: skip
    plan.blocks = pack_blocks(plan.dataset, plan.model, shape.seq)
    longest = max([args.steps, *args.outside])
    plan.trainer_data = write_trainer_data(
        plan.blocks, longest, plan.batch * nproc, cfg.seed, runs_dir / "trainer-data"
    )
    return plan


def warm_up(plan: Plan, payload: dict) -> None:
    """1 step of each runner (fills fsdp_train.py's tokenized-data cache and the file cache; not measured), then the
    bench's blocks against those fsdp_train.py cached, token for token."""
    from fsdp_train import load_packed

    print("warm-up: 1 step of each runner (not measured)")
    runners = {VARIANTS[v][0] for v in plan.args.variants}
    warm = [run_variant(plan, runner, "warmup", 1) for runner in ("fsdp", "trainer") if runner in runners]
    for rec in warm:
        if rec["rc"] != 0:
            raise SystemExit(f"{rec['error']}\nerror: the {rec['variant']} warm-up run failed (log {rec['log']})")
    ids, positions = plan.blocks
    check = {"blocks": len(ids), "seq": plan.shape.seq, "segments": int((positions == 0).sum())}
    cache = packed_cache(plan.runs_dir, plan.dataset, plan.shape.seq) if "fsdp" in runners else None
    if cache is not None:
        cached = load_packed(cache).with_format("numpy")
        check["matches_fsdp_train"] = bool(np.array_equal(cached["input_ids"], ids)
                                           and np.array_equal(cached["position_ids"], positions))  # fmt: skip
    print(f"token check: {check}")
    if check.get("matches_fsdp_train") is False:
        raise SystemExit("error: the Trainer would not see fsdp_train.py's sequences; packing differs")
    backend = next((r["backend"] for r in warm if r["variant"] == "trainer"), None)
    if backend:
        note = "" if backend["fsdp_enabled"] else " (asked for FSDP2 FULL_SHARD; accelerate fell back)"
        print(f"Trainer backend: {backend['backend']}{note}: {backend['distributed_type']}, {backend['wrapped_model']}")
    payload.update(warmup=warm, token_check=check, trainer_backend=backend)


def run_rounds(plan: Plan) -> tuple[list[dict], list[dict]]:
    """--repeats rounds of every variant (and of its --outside pair), alternating; the CPU peak measured before each
    round when it is not known up front. Returns (peak measurements, outside records)."""
    args, peaks, outside = plan.args, [], []
    for r in range(1, args.repeats + 1):
        if not args.peak_tflops:  # every round: a busy moment can only lower a measurement, so the best is the peak
            peaks.append(measure_cpu_peak(plan.nproc, plan.threads))
            print(f"[round {r}/{args.repeats}] matmul: {peaks[-1]['tflops'] * 1e3:.1f} GFLOP/s per rank")
        for variant in args.variants:
            plan.results.append(run_variant(plan, variant, f"r{r}", args.steps))
            print(f"[round {r}/{args.repeats}] {variant}: {describe(plan.results[-1])}", flush=True)
        for variant in args.variants if args.outside else []:
            walls = {n: run_variant(plan, variant, f"r{r}-outside{n}", n) for n in args.outside}
            tokens = plan.batch * plan.nproc * plan.shape.seq
            outside.append(outside_record(variant, r, walls, args.outside, tokens))
            print(f"[round {r}/{args.repeats}] {variant} from outside: {outside[-1]['summary']}", flush=True)
    if not args.peak_tflops:
        peaks.append(measure_cpu_peak(plan.nproc, plan.threads))
    return peaks, outside


def report(plan: Plan, summary: dict, payload: dict) -> None:
    args, s = plan.args, plan.shape
    print(
        f"\n{args.model} ({s.hidden}h x {s.layers}L, {payload['params'] / 1e6:.1f} M params, "
        f"{payload['flops_per_token'] / 1e6:.0f} MFLOP/token), {args.device}, {plan.nproc} ranks x {plan.threads} "
        f"threads, {args.steps} steps x {plan.batch * plan.nproc} x {s.seq} tokens, median of {args.repeats}; "
        f"peak {payload['peak']['tflops_per_device'] * 1e3:.1f} GFLOP/s per rank ({payload['peak']['source']})"
    )
    print(payload["table"])
    if b := payload["trainer_backend"]:
        print(f"Trainer backend: {b['backend']} ({b['distributed_type']}, {b['wrapped_model']})")
    if (base := payload["import_baseline_rss_gib"]) is not None:
        above = ", ".join(f"{v} {x['peak_mem_above_baseline_gib']:.3f}" + (f" ({x['above_baseline_vs_trainer']:.2f}x)"
                          if x.get("above_baseline_vs_trainer") else "") for v, x in summary.items()
                          if "peak_mem_above_baseline_gib" in x)  # fmt: skip
        print(f"peak RSS/rank above the {base:.3f} GiB import baseline (torch+transformers+datasets): {above}")
    for v, x in summary.items():
        if x.get("logged_mfu") is not None:
            print(f"MFU of {v}: {x['logged_mfu']:.6%} as fsdp_train.py logged it (metrics.jsonl, median of steady "
                  f"steps), {x['mfu']:.6%} from the bench's tok/s")  # fmt: skip
    if payload["outside"]:
        print(outside_table(payload["outside"], args.variants, args.outside))


def main(argv: list[str] | None = None) -> int:
    args = parse(__doc__, configure, QUICK, settle, argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU")
    if any(VARIANTS[v][0] == "trainer" for v in args.variants) and not importlib.util.find_spec("accelerate"):
        raise SystemExit("error: the Trainer runs need accelerate: pip install -r requirements-bench.txt")
    with session("train", args) as (work, payload):
        if args.device == "cpu" and os.getloadavg()[0] > 0.5:
            print("warning: other work shares these cores, so the numbers (and the measured peak) will be noisy")
        plan = make_plan(args, work)
        fpt, n_params = model_flops(plan.model, plan.shape.seq)
        warm_up(plan, payload)
        base_gib = None if args.device == "cuda" else import_baseline_gib()
        peaks, outside = run_rounds(plan)
        if peaks:
            peak = {"tflops_per_device": max(p["tflops"] for p in peaks), "measured": peaks,
                    "source": "fp32 matmul measured in this invocation, best run"}  # fmt: skip
        else:
            peak = {"tflops_per_device": args.peak_tflops, "source": "fsdp_train.device_peak_tflops"}
        summary = summarize(plan.results, args.variants, peak["tflops_per_device"], fpt, plan.nproc, base_gib)
        payload.update(settings={**asdict(plan.shape), "nproc": plan.nproc, "omp_threads": plan.threads,
                                 "batch_per_rank": plan.batch}, flops_per_token=fpt, params=n_params, peak=peak,
                       import_baseline_rss_gib=base_gib, summary=summary, outside=outside,
                       table=markdown_table(summary, args.device), runs=plan.results)  # fmt: skip
        report(plan, summary, payload)
        failed = [r for r in plan.results if r["rc"] != 0]
        for rec in failed:
            print(f"failed: {rec['tag']} {rec['variant']}: see {rec['log']}", file=sys.stderr)
        if not args.keep and not failed:  # a failed run's log stays for reading
            shutil.rmtree(plan.runs_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
