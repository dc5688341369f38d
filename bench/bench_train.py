"""Benchmark fsdp_train.py against the Hugging Face Trainer on the same model, data, batch, steps and schedule.

    make bench                                                   # = python bench/bench_train.py (small, 3 rounds)
    python bench/bench_train.py --model medium --repeats 1       # compute-bound shape, ~1 min per run on 2 cores
    python bench/bench_train.py --device cuda                    # bf16, ~1B Llama shape, one rank per GPU
    python bench/bench_train.py --variants ac-off,ac-off-block-unit,trainer-ac-off --repeats 3 --steps 4 \\
        --skip-steps 1 --outside 10,90                           # throughput as a user sees it, launch to exit

Variants alternate (A B C A B C ...), each a fresh torchrun job. fsdp: fsdp_train.py as users run it; trainer:
bench/hf_trainer_run.py, transformers.Trainer built from the same flags (on CPU accelerate runs DDP, not FSDP; the
backend is printed); the others add VARIANTS' flags. The Trainer gets fsdp_train.py's own packed blocks (checked token
for token against its cache) in its sample order, so the per-step losses agree (Δloss). A 1-step warm-up run of each
side is not measured. tok/s: median over steps > --skip-steps; MFU: fsdp_train's (benchlib.mfu), against
--peak-tflops, PEAK_TFLOPS on CUDA, or on CPU the best fp32 matmul rate of one process per rank, measured every round;
peak memory: the largest sampled VmRSS of any rank (CUDA: max allocated); ratios to the Trainer per round, then
median'd. --outside SHORT,LONG: (LONG - SHORT) steps of tokens / the difference of the two runs' wall times.
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
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path

import benchlib as bl
import numpy as np

# ======================================================================================================================
# Config


# A Llama shape and the batch it is benchmarked with (batch: sequences per rank per step; vocab: the BPE tokenizer
# model_download trains on data/).
Shape = namedtuple("Shape", "hidden layers heads kv_heads seq batch steps lr warmup vocab", defaults=(1e-3, 5, 2048))
SHAPES = {
    "small": Shape(hidden=256, layers=4, heads=4, kv_heads=2, seq=256, batch=4, steps=30),
    # ~0.26 GFLOP/token: compute-bound on CPU, about a minute per run on 2 cores.
    "medium": Shape(hidden=768, layers=6, heads=12, kv_heads=4, seq=512, batch=2, steps=10),
    # Llama-3.2-1B-like trunk; data/ packs into only ~12 blocks of 1024 tokens, so batch 1/GPU.
    "1b": Shape(hidden=2048, layers=16, heads=32, kv_heads=8, seq=1024, batch=1, steps=30, lr=3e-4),
}
_AC_OFF, _BLOCK = ["--activation-checkpointing", "off"], ["--shard-unit", "block"]
_NO_RESHARD = ["--reshard-after-forward", "off", *_BLOCK]  # acts on per-block units only (on CPU auto is one unit)
VARIANTS = {  # name -> (runner, extra fsdp_train.py flags; hf_trainer_run.py reads the same flags)
    "fsdp": ("fsdp", []),
    "trainer": ("trainer", []),
    "ac-off": ("fsdp", _AC_OFF),
    "compile": ("fsdp", ["--compile", "on"]),
    "no-reshard": ("fsdp", _NO_RESHARD),
    "ac-off-no-reshard": ("fsdp", [*_AC_OFF, *_NO_RESHARD]),
    "ac-off-block-unit": ("fsdp", [*_AC_OFF, *_BLOCK]),
    "trainer-ac-off": ("trainer", _AC_OFF),
}
FIRST_STEP = {"fsdp": r"\[rank0\] step 1/\d+", "trainer": r"\[bench\] trainer step 1 done"}
SCRIPT = {"fsdp": "fsdp_train.py", "trainer": "bench/hf_trainer_run.py"}
QUICK = {"repeats": 1, "steps": 6, "skip_steps": 2}


def configure(p) -> None:
    p.add_argument("--model", choices=sorted(SHAPES), help="shape (default: small on cpu, 1b on cuda)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu: fp32, gloo; cuda: bf16 (cpu)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per run (0: the shape's, 30 small/10 medium)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of all variants, alternating (3)")
    p.add_argument("--variants", type=bl.csv(), default=list(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--nproc", type=int, default=0, help="ranks per run (0: 2 on cpu, every GPU on cuda)")
    p.add_argument("--batch-size", type=int, default=0, help="sequences per rank per step (0: the shape's)")
    p.add_argument("--skip-steps", type=int, default=3, help="first steps left out of the steady-state tok/s (3)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense peak TFLOP/s per device (0: table/measured)")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds one run may take before it is killed (1200)")
    p.add_argument("--outside", type=bl.csv(int), default=[], metavar="SHORT,LONG", help="also from outside: 10,90")
    p.set_defaults(workdir=bl.ROOT / "outputs" / "bench")  # data and models are reused; --keep keeps each run's outputs


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


def prepare_inputs(workdir: Path, s: Shape, corpus: Path = bl.ROOT / "data") -> tuple[Path, Path]:
    """(text dataset, model folder), built once per content of data/ (paths, sizes, mtimes) and shape."""
    from data_to_hf import convert
    from model_download import build_tiny

    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    key = "|".join(f"{p.relative_to(corpus)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    dataset = workdir / f"dataset-{digest}"
    if not dataset.is_dir():
        print(f"dataset: {convert(corpus, dataset, num_proc=1).documents} documents from {corpus} -> {dataset}")
    model = workdir / "models" / f"llama-h{s.hidden}-l{s.layers}-a{s.heads}-kv{s.kv_heads}-v{s.vocab}-{digest}"
    if not model.is_dir():
        dims = {"hidden_size": s.hidden, "num_layers": s.layers, "num_heads": s.heads, "num_kv_heads": s.kv_heads}
        build_tiny(model, corpus, vocab_size=s.vocab, max_positions=max(1024, s.seq), **dims)
    return dataset, model


def pack_blocks(dataset: Path, model: Path, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, position_ids), each (blocks, seq), as fsdp_train.py packs them: tokenize_documents over
    1000-document batches, then one TextPacker over all documents in order."""
    from functools import partial

    import datasets

    from fsdp_train import TextPacker, load_tokenizer, tokenize_documents

    ds = datasets.load_from_disk(str(dataset))
    fn = partial(tokenize_documents, tokenizer=load_tokenizer(str(model)))
    docs = ds.map(fn, batched=True, batch_size=1000, remove_columns=ds.column_names, keep_in_memory=True)
    packer = TextPacker(seq)
    blocks = [packer.pack(t) for t in docs.with_format("arrow").iter(batch_size=10_000)]
    return np.concatenate([b["input_ids"] for b in blocks]), np.concatenate([b["position_ids"] for b in blocks])


def write_trainer_data(blocks, steps: int, global_batch: int, seed: int, out: Path) -> Path:
    """The Trainer's data: the blocks fsdp_train.py trains on, in its order (epoch_permutation; rank r takes the r-th
    slice of each global batch), with its labels. Within the first epoch only, whose last step may be short."""
    import datasets
    import torch

    from fsdp_train import block_labels, epoch_permutation

    if steps * global_batch > len(blocks[0]):
        raise SystemExit(f"error: {steps} steps x {global_batch} sequences exceed one epoch; use fewer --steps")
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


def measure_cpu_peak(nproc: int, threads: int, sizes=(1024, 2048, 4096), seconds: float = 1.5) -> float:
    """fp32 matmul TFLOP/s per rank: `nproc` concurrent processes with `threads` threads each; the best size."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(nproc), ctx.Queue()
    procs = [ctx.Process(target=_matmul_worker, args=(threads, sizes, seconds, barrier, queue)) for _ in range(nproc)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=300) for _ in range(nproc * len(sizes))]
    for proc in procs:
        proc.join()
    return max(sum(f for m, f in results if m == n) / nproc / 1e12 for n in sizes)


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
    cmd = [*bl.torchrun(plan.nproc), SCRIPT[runner], *data, *plan.fsdp_argv(exp, steps, extra)]
    env = {"OMP_NUM_THREADS": str(plan.threads), "TOKENIZERS_PARALLELISM": "false"}
    job = bl.run(cmd, env=env, timeout=plan.args.timeout, log=log, ranks=SCRIPT[runner])
    first = job.first(FIRST_STEP[runner])
    rec = {"variant": variant, "tag": tag, "command": " ".join(cmd), "rc": job.rc, "wall_s": job.wall, "log": str(log)}
    rec.update(first_step_s=first[0] if first else None, rank_peak_rss_gib=job.rank_peak_rss_gib)
    if job.rc != 0:
        return {**rec, "error": job.output[-3000:]}
    if runner == "fsdp":
        metrics = bl.read_metrics(out_dir)
        rec["steps"] = {m["global_step"]: {"loss": m["loss"], "step_s": m["time/total"] / 1e3} for m in metrics}
        for m in metrics:
            rec["steps"][m["global_step"]].update(tok_s=m["tok/s"], mfu=m.get("mfu"))
        peaks = [m["mem/peak_allocated_gib"] for m in metrics if "mem/peak_allocated_gib" in m]
        rec["cuda_peak_allocated_gib"] = max(peaks, default=None)
    else:
        result = json.loads((out_dir / "result.json").read_text())
        losses, tokens = result["losses"], result["tokens_per_step"]
        steps = enumerate(result["step_s"], 1)
        rec["steps"] = {i: {"tok_s": tokens / dt, "loss": losses.get(str(i)), "step_s": dt} for i, dt in steps}
        rec["backend"] = {k: result[k] for k in ("backend", "distributed_type", "wrapped_model", "fsdp_enabled")}
        rec["cuda_peak_allocated_gib"] = result.get("cuda_peak_allocated_gib")
    steady = [s for step, s in rec["steps"].items() if step > plan.args.skip_steps] or list(rec["steps"].values())
    rec["steady_tok_s"] = bl.median(s["tok_s"] for s in steady)  # (a 1-step warm-up has only its first step)
    rec["logged_mfu"] = bl.median(s.get("mfu") for s in steady)
    rec["final_loss"] = rec["steps"][max(rec["steps"])]["loss"]
    cuda = plan.args.device == "cuda"
    rec["peak_mem_gib"] = rec["cuda_peak_allocated_gib"] if cuda else max(job.rank_peak_rss_gib, default=None)
    if not plan.args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return rec


def outside_record(variant: str, round_: int, walls: dict[int, dict], steps: list[int], tokens_per_step: int) -> dict:
    """A variant's throughput as a user sees it: the extra wall time of LONG - SHORT steps, launch to exit."""
    (short, long), wall = steps, {n: r["wall_s"] for n, r in walls.items()}
    rec = {"variant": variant, "round": round_, "wall_s": wall}
    if any(r["rc"] != 0 for r in walls.values()):
        return {**rec, "summary": "failed: " + ", ".join(r["log"] for r in walls.values() if r["rc"] != 0)}
    extra_s = wall[long] - wall[short]
    inside = bl.median(st["step_s"] for n, st in walls[long]["steps"].items() if n > short)
    rec.update(step_s=extra_s / (long - short), tok_s=(long - short) * tokens_per_step / extra_s, inside_step_s=inside)
    ms = f"{rec['step_s'] * 1e3:.0f} ms/step from outside, {inside * 1e3:.0f} inside"
    rec["summary"] = f"{rec['tok_s']:,.0f} tok/s ({ms}; walls {wall[short]:.1f} s / {wall[long]:.1f} s)"
    return rec


def summarize(records: list[dict], variants: list[str], peak: float, fpt: float, nproc: int, base) -> dict:
    """Median over rounds per variant; ratios vs the Trainer per round (same tag), then median'd."""
    ok = [r for r in records if r["rc"] == 0]
    trainer = {r["tag"]: r for r in ok if r["variant"] == "trainer"}
    out = {}
    for v in variants:
        runs = [r for r in ok if r["variant"] == v]
        s = out[v] = {"runs": len(runs), "failed": sum(1 for r in records if r["variant"] == v and r["rc"] != 0)}
        if not runs:
            continue
        for key in ("steady_tok_s", "first_step_s", "wall_s", "peak_mem_gib", "final_loss", "logged_mfu"):
            s[key] = bl.median(r[key] for r in runs)
        s["mfu"] = bl.mfu(s["steady_tok_s"], fpt, nproc, peak)
        if base is not None:
            s["peak_mem_above_baseline_gib"] = s["peak_mem_gib"] - base
        pairs = [(r, trainer[r["tag"]]) for r in runs if r["tag"] in trainer and v != "trainer"]
        if pairs:
            s["tok_s_vs_trainer"] = bl.median(r["steady_tok_s"] / t["steady_tok_s"] for r, t in pairs)
            mem = [(r["peak_mem_gib"], t["peak_mem_gib"]) for r, t in pairs if r["peak_mem_gib"] and t["peak_mem_gib"]]
            s["peak_mem_vs_trainer"] = bl.median(a / b for a, b in mem)
            if base is not None:
                s["above_baseline_vs_trainer"] = bl.median((a - base) / (b - base) for a, b in mem if b - base > 1e-3)
            steps = [(r["steps"], t["steps"]) for r, t in pairs]
            losses = [(a[k]["loss"], b[k].get("loss")) for a, b in steps for k in a if k in b]
            s["max_abs_dloss_vs_trainer"] = max((abs(a - b) for a, b in losses if b is not None), default=None)
    return out


def markdown_table(summary: dict, device: str) -> str:
    mem = "peak alloc GiB (rank 0)" if device == "cuda" else "peak RSS/rank GiB"
    heads = ["variant", "tok/s", "x Trainer", "MFU", "first step s", "wall s", mem, "x Trainer", "final loss"]
    specs = {"steady_tok_s": ",.0f", "tok_s_vs_trainer": ".2f", "mfu": ".1%", "first_step_s": ".1f", "wall_s": ".1f"}
    specs.update(peak_mem_gib=".3f", peak_mem_vs_trainer=".2f", final_loss=".4f", max_abs_dloss_vs_trainer=".1e")
    rows = [[v, *(bl.fmt(s.get(k), spec) for k, spec in specs.items())] for v, s in summary.items() if s["runs"]]
    failed = [[v, f"failed ({s['failed']} runs)", *[""] * 8] for v, s in summary.items() if not s["runs"]]
    return bl.table([*heads, "max Δloss"], rows + failed)


def outside_table(records: list[dict], variants: list[str], steps: list[int]) -> str:
    """Medians over rounds, and each variant's ratio to the Trainer (trainer-ac-off) of the same round."""
    ok = [r for r in records if "tok_s" in r]
    peer = {r["round"]: r["tok_s"] for r in ok if r["variant"] == "trainer-ac-off"}
    rows = []
    for variant in variants:
        if mine := [r for r in ok if r["variant"] == variant]:
            ratio = bl.median(r["tok_s"] / peer[r["round"]] for r in mine if r["round"] in peer)
            ms = [bl.median(r[k] for r in mine) * 1e3 for k in ("step_s", "inside_step_s")]
            tok_s = bl.median(r["tok_s"] for r in mine)
            rows.append([variant, bl.fmt(tok_s, ",.0f"), *(bl.fmt(x, ".0f") for x in ms), bl.fmt(ratio, ".2f")])
    heads = [f"tok/s from outside ({steps[1]} - {steps[0]} steps)", "ms/step outside", "ms/step inside", "x Trainer"]
    return bl.table(["variant", *heads], rows)


# ======================================================================================================================
# Main


def import_baseline_gib() -> float:
    """Peak RSS of a process that only imports what every rank imports: the floor under any per-rank number."""
    code = "import resource, torch, torch.distributed, transformers, datasets; "
    job = bl.run([sys.executable, "-c", code + "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"]).check()
    return int(job.output.split()[-1]) * 1024 / bl.GIB


def make_plan(args, work: Path) -> Plan:
    """Inputs, the fsdp_train.py config both sides train with, the Trainer's data; the peak the trainer would use."""
    import torch

    from fsdp_train import device_peak_tflops
    from fsdp_train import parse_args as fsdp_parse_args

    shape = SHAPES[args.model]
    nproc = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 2)
    threads = max(1, len(os.sched_getaffinity(0)) // nproc)
    runs_dir = work / f"runs-{time.strftime('%Y%m%d-%H%M%S')}"
    runs_dir.mkdir(parents=True)
    plan = Plan(args, shape, *prepare_inputs(work, shape), runs_dir, nproc, threads)
    cfg = fsdp_parse_args(plan.fsdp_argv("plan", args.steps, []))
    args.peak_tflops = device_peak_tflops(cfg, torch.device(args.device)) or 0.0  # the trainer's own look-up
    if args.device == "cuda" and not args.peak_tflops:
        raise SystemExit(f"error: no datasheet peak for '{torch.cuda.get_device_name()}'; pass --peak-tflops")
    what = f"{args.steps} steps, batch {plan.batch}/rank x seq {shape.seq}, {args.repeats} round(s) of {args.variants}"
    print(f"bench: {args.model} on {args.device}, {nproc} ranks x {threads} threads, {what}")
    plan.blocks = pack_blocks(plan.dataset, plan.model, shape.seq)
    longest = max([args.steps, *args.outside])
    data = runs_dir / "trainer-data"
    plan.trainer_data = write_trainer_data(plan.blocks, longest, plan.batch * nproc, cfg.seed, data)
    return plan


def warm_up(plan: Plan, payload: dict) -> None:
    """1 step of each runner (fills fsdp_train.py's data cache and the file cache; not measured), then the bench's
    blocks against those fsdp_train.py cached, token for token."""
    from fsdp_train import load_packed

    print("warm-up: 1 step of each runner (not measured)")
    runners = {VARIANTS[v][0] for v in plan.args.variants}
    warm = [run_variant(plan, runner, "warmup", 1) for runner in ("fsdp", "trainer") if runner in runners]
    for rec in warm:
        if rec["rc"] != 0:
            raise SystemExit(f"{rec['error']}\nerror: the {rec['variant']} warm-up run failed (log {rec['log']})")
    ids, positions = plan.blocks
    check = {"blocks": len(ids), "seq": plan.shape.seq, "segments": int((positions == 0).sum())}
    cache = bl.packed_cache(plan.runs_dir, plan.dataset, plan.shape.seq) if "fsdp" in runners else None
    if cache is not None:
        cached = load_packed(cache).with_format("numpy")
        same = np.array_equal(cached["input_ids"], ids) and np.array_equal(cached["position_ids"], positions)
        check["matches_fsdp_train"] = bool(same)
    print(f"token check: {check}")
    if check.get("matches_fsdp_train") is False:
        raise SystemExit("error: the Trainer would not see fsdp_train.py's sequences; packing differs")
    backend = next((r["backend"] for r in warm if r["variant"] == "trainer"), None)
    if backend:
        note = "" if backend["fsdp_enabled"] else " (asked for FSDP2 FULL_SHARD; accelerate fell back)"
        print(f"Trainer backend: {backend['backend']}{note}: {backend['distributed_type']}, {backend['wrapped_model']}")
    payload.update(warmup=warm, token_check=check, trainer_backend=backend)


def run_rounds(plan: Plan) -> tuple[list[float], list[dict]]:
    """--repeats rounds of every variant (and of its --outside pair), alternating; the CPU peak measured before each
    round and after the last when it is not known up front. Returns (peak measurements, outside records)."""
    args, peaks, outside = plan.args, [], []
    tokens = plan.batch * plan.nproc * plan.shape.seq
    for r in range(1, args.repeats + 1):
        if not args.peak_tflops:  # every round: a busy moment can only lower a measurement, so the best is the peak
            peaks.append(measure_cpu_peak(plan.nproc, plan.threads))
            print(f"[round {r}/{args.repeats}] matmul: {peaks[-1] * 1e3:.1f} GFLOP/s per rank")
        for variant in args.variants:
            plan.results.append(rec := run_variant(plan, variant, f"r{r}", args.steps))
            if rec["rc"]:
                print(f"[round {r}/{args.repeats}] {variant}: FAILED rc={rec['rc']} (log {rec['log']})", flush=True)
            else:
                rss = "/".join(f"{g:.2f}" for g in rec["rank_peak_rss_gib"])
                said = f"{rec['steady_tok_s']:,.0f} tok/s, wall {rec['wall_s']:.1f}s, peak RSS {rss} GiB"
                print(f"[round {r}/{args.repeats}] {variant}: {said}, loss {rec['final_loss']:.4f}", flush=True)
        for variant in args.variants if args.outside else []:
            walls = {n: run_variant(plan, variant, f"r{r}-outside{n}", n) for n in args.outside}
            outside.append(outside_record(variant, r, walls, args.outside, tokens))
            print(f"[round {r}/{args.repeats}] {variant} from outside: {outside[-1]['summary']}", flush=True)
    if not args.peak_tflops:
        peaks.append(measure_cpu_peak(plan.nproc, plan.threads))
    return peaks, outside


def report(plan: Plan, summary: dict, payload: dict) -> None:
    args, s, flops = plan.args, plan.shape, payload["flops_per_token"]
    size = f"{s.hidden}h x {s.layers}L, {payload['params'] / 1e6:.1f} M params, {flops / 1e6:.0f} MFLOP/token"
    ranks = f"{plan.nproc} ranks x {plan.threads} threads"
    print(f"\n{args.model} ({size}), {args.device}, {ranks}, {args.steps} steps x {plan.batch * plan.nproc} x {s.seq}")
    print(f"median of {args.repeats}; peak {payload['peak_tflops'] * 1e3:.1f} GFLOP/s per rank")
    print(payload["table"])
    if (base := payload["import_baseline_rss_gib"]) is not None:
        vs = {v: bl.fmt(x.get("above_baseline_vs_trainer"), ".2f") for v, x in summary.items()}
        above = [f"{v} {x['peak_mem_above_baseline_gib']:.3f} ({vs[v]}x)" for v, x in summary.items() if x["runs"]]
        print(f"peak RSS/rank above the {base:.3f} GiB import baseline (x Trainer): {', '.join(above)}")
    for v, x in summary.items():
        if x.get("logged_mfu") is not None:
            print(f"MFU of {v}: {x['logged_mfu']:.6%} as fsdp_train.py logged it, {x['mfu']:.6%} from the bench's")
    if payload["outside"]:
        print(outside_table(payload["outside"], args.variants, args.outside))


def main(argv: list[str] | None = None) -> int:
    args = bl.parse(__doc__, configure, QUICK, settle, argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU")
    if any(VARIANTS[v][0] == "trainer" for v in args.variants) and not importlib.util.find_spec("accelerate"):
        raise SystemExit("error: the Trainer runs need accelerate: pip install -r requirements-bench.txt")
    with bl.session("train", args) as (work, payload):
        if args.device == "cpu" and os.getloadavg()[0] > 0.5:
            print("warning: other work shares these cores, so the numbers (and the measured peak) will be noisy")
        plan = make_plan(args, work)
        fpt, n_params = bl.model_flops(plan.model, plan.shape.seq)
        warm_up(plan, payload)
        base_gib = None if args.device == "cuda" else import_baseline_gib()
        peaks, outside = run_rounds(plan)
        peak = max(peaks) if peaks else args.peak_tflops  # measured: the best run; else fsdp_train.device_peak_tflops
        summary = summarize(plan.results, args.variants, peak, fpt, plan.nproc, base_gib)
        settings = {**plan.shape._asdict(), "nproc": plan.nproc, "threads": plan.threads, "batch_per_rank": plan.batch}
        payload.update(settings=settings, flops_per_token=fpt, params=n_params, peak_tflops=peak, peaks_measured=peaks)
        payload.update(import_baseline_rss_gib=base_gib, summary=summary, outside=outside, runs=plan.results)
        payload["table"] = markdown_table(summary, args.device)
        report(plan, summary, payload)
        failed = [r for r in plan.results if r["rc"] != 0]
        for rec in failed:
            print(f"failed: {rec['tag']} {rec['variant']}: see {rec['log']}", file=sys.stderr)
        if not args.keep and not failed:  # a failed run's log stays for reading
            shutil.rmtree(plan.runs_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
