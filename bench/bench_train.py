"""Benchmark fsdp_train.py against the Hugging Face Trainer on the same model, data, batch, steps and schedule.

    make bench                                                   # = python bench/bench_train.py (small, 3 rounds)
    python bench/bench_train.py --model medium --repeats 1       # compute-bound shape, ~1 min per run on 2 cores
    python bench/bench_train.py --variants fsdp,trainer --steps 12 --repeats 1          # a quick look
    python bench/bench_train.py --device cuda                    # bf16, ~1B Llama shape, one rank per GPU

What runs, alternating (fsdp, trainer, ac-off, compile, no-reshard, fsdp, trainer, ... for --repeats rounds), each a
fresh `torchrun --standalone --nproc_per_node N` job with OMP_NUM_THREADS = cores / N:
  fsdp        fsdp_train.py as users run it: FULL_SHARD, activation checkpointing on, final checkpoint + HF export
  trainer     bench/hf_trainer_run.py: transformers.Trainer asked for FSDP2 FULL_SHARD + per-block wrap, activation
              checkpointing, the same AdamW (betas 0.9/0.95, eps 1e-8), clipping, and fsdp_train.py's own LR schedule;
              on CPU accelerate silently uses DDP instead; the backend it really used is printed
  ac-off      fsdp + --activation-checkpointing off;   compile: + --compile on;   no-reshard: + --reshard-after-forward off
              (with --shard-unit block: the flag acts on per-block units only)
              --shard-unit is left to auto: on CPU one FSDP unit for the whole model (one all-gather, one reduce-scatter
              a step), per block on CUDA; ac-off-block-unit: ac-off + --shard-unit block (per-block units on CPU too)

Model and data (cached under --workdir, default outputs/bench, keyed by the content of data/): the documents of data/
(data_to_hf.convert), a random-init Llama of the chosen shape with a BPE tokenizer trained on data/
(model_download.build_tiny). fsdp_train.py gets the text dataset and packs it itself; the bench packs it with
fsdp_train.tokenize_documents + TextPacker (the same functions, the same 1000-document batches), checks the blocks and
their per-document position_ids equal those in fsdp_train.py's cache (SAVE_DIR/.cache/tokenized/<key>/blocks.arrow,
read with fsdp_train.load_packed) token for token, and gives the Trainer those blocks with the same position_ids and
labels (fsdp_train.block_labels: a document's first token is not trained on) in fsdp_train.py's sample order (epoch
permutations, rank r = r-th slice of each global batch). Both then train the same thing: the same sequences per step
and rank, documents kept apart by the same block-diagonal mask (sdpa: transformers builds it from the restarting
position_ids), the same trained tokens, and their per-step losses agree (the Δloss column). A 1-step run of each side
first warms the tokenized-data cache and the file cache; it is not measured.

Metrics, per run, then the median over rounds (ratios vs the Trainer are taken per round, then median'd):
  tok/s       steady-state tokens/s: median over steps > --skip-steps of (global tokens of the step / its wall time);
              fsdp: per-step `tok/s` of metrics.jsonl (--log-freq 1); trainer: a TrainerCallback's step-end clock;
              both windows include that step's loss logging (one small collective)
  MFU         tok/s x FLOPs/token / peak FLOP/s, with FLOPs/token = 6*N + 12*L*h*s, where N = weights of every matmul
              (all nn.Linear, lm_head included; embedding table and norms excluded), L layers, h hidden size, s
              sequence length (the attention score and value matmuls, counted in full, forward + backward, as in
              PaLM's MFU). Activation-checkpointing recompute is not counted (model FLOPs, not hardware FLOPs).
              Peak on CPU: measured in this invocation, fp32 square matmuls (1024, 2048, 4096) run concurrently by
              N processes with the training's threads each, FLOP/s summed, best size; measured before every round
              and after the last, the best is used (other load only lowers it; MFU > 100% means the runs had the
              cores when the matmuls did not). On CUDA: the datasheet dense bf16 peak (--peak-tflops overrides).
  first step  process launch -> the first optimizer step's log line on stdout (fsdp: `step 1/`, trainer: callback);
              compile's includes compilation, cold only while torch's inductor cache (in /tmp) is empty
  wall        process launch -> exit of torchrun (fsdp includes its final checkpoint + HF export; the Trainer saves
              its model with save_model)
  peak mem    CPU: peak RSS of each rank process, max over ranks: the largest VmRSS of torchrun's worker processes
              sampled from outside every 50 ms, the same way for every runner. (Not VmHWM or wait4's ru_maxrss:
              fsdp_train.py resets the kernel's high-water mark after start-up, the Trainer does not; both are in
              the JSON.) CUDA: torch.cuda max allocated of rank 0 (fsdp: metrics.jsonl, trainer: callback).
              Below the table: each peak minus the peak RSS of a process that only imports torch, transformers
              and datasets (what every rank carries before it holds a single weight).
  final loss  logged loss of the last step (global token mean), and max |loss - Trainer's loss| over all steps.

Prints a markdown table and writes everything (per-run numbers, per-step data, peaks, backend) to
bench/results/<time>.json (--out to change). Run it on an otherwise idle machine: the CPU numbers are only
meaningful when the ranks have the cores to themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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

# name -> (runner, extra fsdp_train.py flags)
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
    ),
    "ac-off-block-unit": ("fsdp", ["--activation-checkpointing", "off", "--shard-unit", "block"]),
    "trainer-ac-off": ("trainer", ["--activation-checkpointing", "off"]),
}

FIRST_STEP = {"fsdp": re.compile(r"\[rank0\] step 1/\d+"), "trainer": re.compile(r"\[bench\] trainer step 1 done")}
SCRIPT = {"fsdp": "fsdp_train.py", "trainer": "bench/hf_trainer_run.py"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(SHAPES), help="shape (default: small on cpu, 1b on cuda)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu: fp32, gloo; cuda: bf16 (cpu)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per run (0: the shape's, 30 small/10 medium)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of all variants, alternating (3)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)} (all)")
    p.add_argument("--nproc", type=int, default=0, help="ranks per run (0: 2 on cpu, every GPU on cuda)")
    p.add_argument("--batch-size", type=int, default=0, help="sequences per rank per step (0: the shape's)")
    p.add_argument("--skip-steps", type=int, default=3, help="first steps left out of the steady-state tok/s (3)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak FLOP/s for MFU, in TFLOP/s (0: measure/table)")
    p.add_argument("--out", type=Path, help="results JSON (default: bench/results/<time>.json)")
    p.add_argument(
        "--workdir", type=Path, default=ROOT / "outputs" / "bench", help="data, models, runs (outputs/bench)"
    )
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds one run may take before it is killed (1200)")
    p.add_argument("--keep", action="store_true", help="keep each run's outputs (checkpoints, logs) in the workdir")
    p.add_argument(
        "--outside",
        default="",
        metavar="SHORT,LONG",
        help="also time each variant from outside: a SHORT- and a LONG-step run (e.g. 10,50) per round, tok/s = "
        "(LONG - SHORT) x global tokens per step / (wall of LONG - wall of SHORT), so start-up and the end cancel",
    )
    args = p.parse_args(argv)
    args.model = args.model or ("1b" if args.device == "cuda" else "small")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.repeats < 1 or args.steps < 0 or args.nproc < 0 or args.skip_steps < 0:
        p.error("--repeats must be >= 1 and --steps, --nproc, --skip-steps >= 0")
    args.outside = [int(x) for x in args.outside.split(",") if x.strip()]
    if args.outside and (len(args.outside) != 2 or not 0 < args.outside[0] < args.outside[1]):
        p.error("--outside takes two step counts SHORT,LONG with 0 < SHORT < LONG")
    shape = SHAPES[args.model]
    args.steps = args.steps or shape.steps
    if args.steps <= args.skip_steps:
        p.error(f"--steps {args.steps} leaves no step after --skip-steps {args.skip_steps}")
    return args


# ======================================================================================================================
# Model and data


def corpus_digest(corpus: Path) -> str:
    """Names the prepared data and models by what data/ holds (paths, sizes, mtimes), so edits rebuild them."""
    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    key = "|".join(f"{p.relative_to(corpus)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def prepare_inputs(workdir: Path, shape: Shape, corpus: Path = ROOT / "data") -> tuple[Path, Path]:
    """(text dataset, model folder), built once per data/ content and shape; both are written atomically."""
    from data_to_hf import convert
    from model_download import build_tiny

    digest = corpus_digest(corpus)
    dataset = workdir / f"dataset-{digest}"
    if not dataset.is_dir():
        summary = convert(corpus, dataset, num_proc=1)
        print(f"dataset: {summary.documents} documents from {corpus} -> {dataset}")
    name = f"llama-h{shape.hidden}-l{shape.layers}-a{shape.heads}-kv{shape.kv_heads}-v{shape.vocab}-{digest}"
    model = workdir / "models" / name
    if not model.is_dir():
        model.parent.mkdir(parents=True, exist_ok=True)
        build_tiny(
            model,
            corpus,
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            num_layers=shape.layers,
            num_heads=shape.heads,
            num_kv_heads=shape.kv_heads,
            max_positions=max(1024, shape.seq),
        )
        print(f"model: {model}")
    return dataset, model


def pack_blocks(dataset: Path, model: Path, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, position_ids), each (blocks, seq): the text documents tokenized and packed as fsdp_train.py does
    (tokenize_documents over 1000-document batches, then one TextPacker over all documents in order)."""
    from functools import partial

    import datasets

    from fsdp_train import TextPacker, list_columns, load_tokenizer, tokenize_documents

    ds = datasets.load_from_disk(str(dataset))
    fn = partial(tokenize_documents, tokenizer=load_tokenizer(str(model)))
    docs = ds.map(fn, batched=True, batch_size=1000, remove_columns=ds.column_names, keep_in_memory=True)
    packer, ids, positions = TextPacker(seq), [], []
    for table in docs.with_format("arrow").iter(batch_size=10_000):
        blocks = packer.add(*list_columns(table, "input_ids"))
        ids.append(blocks["input_ids"])
        positions.append(blocks["position_ids"])
    return np.concatenate(ids), np.concatenate(positions)


def fsdp_train_blocks(save_root: Path, dataset: Path, seq: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(input_ids, position_ids) of the training blocks fsdp_train.py cached under SAVE_DIR/.cache (None if no
    cache for this dataset and sequence length is found)."""
    from fsdp_train import load_packed

    for info_path in sorted((save_root / ".cache" / "tokenized").glob("*/info.json")):
        info = json.loads(info_path.read_text())
        if info.get("role") == "train" and info.get("seq_length") == seq and info.get("dataset") == str(dataset):
            data = load_packed(info_path.parent).with_format("numpy")
            return data["input_ids"], data["position_ids"]
    return None


def sample_order(num_samples: int, steps: int, global_batch: int, seed: int) -> list[int]:
    """Sample indices fsdp_train.py trains on, step after step, within the first epoch: there an epoch's last step
    may be short (fsdp_train.py trains the blocks left, with masked filler rows), which the Trainer's fixed batches
    cannot copy, so a longer benchmark is refused."""
    from fsdp_train import epoch_permutation

    if steps * global_batch > num_samples:
        raise SystemExit(
            f"error: {steps} steps of {global_batch} sequences exceed the {num_samples} packed sequences of one epoch; "
            "use fewer --steps"
        )
    return epoch_permutation(num_samples, seed, 0)[: steps * global_batch].tolist()


def write_trainer_data(blocks: tuple[np.ndarray, np.ndarray], order: list[int], out: Path) -> Path:
    """The Trainer's data in training order: input_ids, position_ids (the Trainer hands every column the model's
    forward accepts to it) and fsdp_train.py's labels for text blocks."""
    import datasets
    import torch

    from fsdp_train import block_labels

    ids, positions = (torch.from_numpy(a[order]).long() for a in blocks)
    labels = block_labels(ids, positions)
    shutil.rmtree(out, ignore_errors=True)
    columns = {"input_ids": ids.tolist(), "position_ids": positions.tolist(), "labels": labels.tolist()}
    datasets.Dataset.from_dict(columns).save_to_disk(str(out))
    return out


def flops_per_token(model_dir: Path, seq: int) -> tuple[float, int]:
    """(FLOPs per trained token, the parameters counted): fsdp_train.flops_per_token, the definition behind the MFU
    that fsdp_train.py logs, so the bench's MFU and the run's are one figure."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fsdp_train import count_params
    from fsdp_train import flops_per_token as trainer_flops_per_token

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        n = count_params(AutoModelForCausalLM.from_config(config))
    return trainer_flops_per_token(config, n, seq), n


# ======================================================================================================================
# Peak FLOP/s


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
    """fp32 matmul FLOP/s of `nproc` concurrent processes with `threads` threads each, summed; best size wins."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(nproc), ctx.Queue()
    procs = [ctx.Process(target=_matmul_worker, args=(threads, sizes, seconds, barrier, queue)) for _ in range(nproc)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=300) for _ in range(nproc * len(sizes))]
    for proc in procs:
        proc.join()
    by_size = {n: sum(f for m, f in results if m == n) for n in sizes}
    best = max(by_size, key=by_size.get)
    return {"flops": by_size[best], "best_size": best, "by_size_gflops": {n: f / 1e9 for n, f in by_size.items()}}


def cuda_peak(tflops_override: float) -> dict:
    """All GPUs' dense bf16 peak: --peak-tflops, or fsdp_train.py's table (the logged MFU's)."""
    import torch

    from fsdp_train import peak_tflops

    name = torch.cuda.get_device_name(0)
    if tflops_override:
        return {"flops": tflops_override * 1e12 * torch.cuda.device_count(), "device": name, "source": "--peak-tflops"}
    tflops = peak_tflops(name, torch.bfloat16)
    if tflops is None:
        raise SystemExit(f"error: no datasheet peak for '{name}'; pass --peak-tflops (dense bf16 TFLOP/s per GPU)")
    total = tflops * 1e12 * torch.cuda.device_count()
    return {"flops": total, "device": name, "source": f"fsdp_train.PEAK_TFLOPS: dense bf16 {tflops:g} TFLOP/s per GPU"}


# ======================================================================================================================
# Running one job


def child_pids(pid: int) -> list[int]:
    pids = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                pids += [int(x) for x in (task / "children").read_text().split()]
    return pids


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB: its resident set now, and the kernel's high-water mark of it."""
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                fields[line[:5]] = int(line.split()[1])
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


@dataclass
class Job:
    rc: int
    wall_s: float
    first_step_s: float | None
    rank_peak_rss_gib: list[float]  # the largest VmRSS sample of each rank process, every 50 ms
    rank_vmhwm_gib: list[float]  # the last VmHWM seen; fsdp_train.py resets it after start-up (clear_refs)
    tree_maxrss_gib: float  # wait4's ru_maxrss: the largest VmHWM in the process tree at exit (same caveat)
    log: Path


def run_job(cmd: list[str], env: dict, script: str, first_step: re.Pattern, log: Path, timeout: float) -> Job:
    """Launch, time the first-step line, poll the ranks' peak RSS, reap with wait4 for the tree's max RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    seen: dict[str, float] = {}

    def read():
        with open(log, "w") as f:
            for line in proc.stdout:
                f.write(line)
                if "first" not in seen and first_step.search(line):
                    seen["first"] = time.perf_counter() - t0

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak: dict[int, int] = {}
    hwm: dict[int, int] = {}
    is_rank: dict[int, bool] = {}
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # we reap it ourselves: Popen would drop the rusage
        if pid:
            break
        for child in child_pids(proc.pid):
            if child not in is_rank:
                with contextlib.suppress(OSError):
                    is_rank[child] = script in Path(f"/proc/{child}/cmdline").read_text()
            if is_rank.get(child):
                rss, high = rss_kib(child)
                peak[child], hwm[child] = max(peak.get(child, 0), rss), high or hwm.get(child, 0)
        if time.perf_counter() - t0 > timeout:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=30)
    gib = 2**20  # KiB per GiB
    return Job(
        rc=proc.returncode,
        wall_s=wall,
        first_step_s=seen.get("first"),
        rank_peak_rss_gib=sorted((kib / gib for kib in peak.values()), reverse=True),
        rank_vmhwm_gib=sorted((kib / gib for kib in hwm.values()), reverse=True),
        tree_maxrss_gib=usage.ru_maxrss / gib,
        log=log,
    )


def import_baseline_rss_gib(env: dict) -> float:
    """Peak RSS of a process that only imports what every rank imports: the floor under any per-rank number."""
    code = "import resource, torch, torch.distributed, transformers, datasets; "
    code += "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1]) / 2**20


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


# ======================================================================================================================
# Runs and their numbers


@dataclass
class Plan:
    """Everything that is the same for every run of one invocation."""

    args: argparse.Namespace
    shape: Shape
    dataset: Path
    model: Path
    runs_dir: Path
    nproc: int
    threads: int
    batch: int
    env: dict
    trainer_data: Path | None = None
    schedule_steps: int = 0
    results: list[dict] = field(default_factory=list)

    def fsdp_argv(self, exp: str, steps: int, extra: list[str]) -> list[str]:
        a, s = self.args, self.shape
        return [
            *("-e", exp, "-d", str(self.dataset), "-m", str(self.model), "--save-dir", str(self.runs_dir)),
            *("-s", str(s.seq), "-b", str(self.batch), "--lr", str(s.lr), "--warmup-steps", str(s.warmup)),
            *("--num-epochs", "1", "--max-steps", str(steps), "--log-freq", "1", "--ckpt-freq", "0", "--seed", "0"),
            *("--dtype", "bf16" if a.device == "cuda" else "fp32", *extra),
        ]

    def trainer_argv(self, out_dir: Path, steps: int, extra: list[str]) -> list[str]:
        s = self.shape
        return [
            *("--model", str(self.model), "--data", str(self.trainer_data), "--output-dir", str(out_dir)),
            *("--result", str(out_dir / "result.json"), "--steps", str(steps), "-b", str(self.batch)),
            *("--lr", str(s.lr), "--warmup-steps", str(s.warmup), "--schedule-steps", str(self.schedule_steps)),
            *("--seed", "0", "--activation-checkpointing", "on", *(["--bf16"] if self.args.device == "cuda" else [])),
            *extra,  # argparse keeps the last value: a variant's flags override the defaults above
        ]


def run_variant(plan: Plan, variant: str, tag: str, steps: int) -> dict:
    """One job of `variant`; returns its per-run record (rc != 0: the error and the log's tail)."""
    runner, extra = VARIANTS[variant]
    exp = f"{tag}-{variant}"
    out_dir = plan.runs_dir / exp
    if runner == "fsdp":
        cmd = [*torchrun(plan.nproc), SCRIPT[runner], *plan.fsdp_argv(exp, steps, extra)]
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [*torchrun(plan.nproc), SCRIPT[runner], *plan.trainer_argv(out_dir, steps, extra)]
    log = plan.runs_dir / f"{exp}.log"
    job = run_job(cmd, plan.env, SCRIPT[runner], FIRST_STEP[runner], log, plan.args.timeout)
    rec = {"variant": variant, "tag": tag, "command": " ".join(cmd), **asdict(job), "log": str(job.log)}
    if job.rc != 0:
        rec["error"] = log.read_text()[-3000:]
        return rec
    if runner == "fsdp":
        metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        rec["steps"] = {
            m["global_step"]: {"tok_s": m["tok/s"], "loss": m["loss"], "step_s": m["time/total"] / 1e3} for m in metrics
        }
        for key, name in (
            ("mem/peak_rss_gib", "metrics_peak_rss_gib_rank0"),
            ("mem/peak_allocated_gib", "cuda_peak_allocated_gib"),
        ):
            rec[name] = max((m[key] for m in metrics if key in m), default=None)  # CUDA: reset at every log step
    else:
        result = json.loads((out_dir / "result.json").read_text())
        tokens = result["tokens_per_step"]
        rec["steps"] = {
            i + 1: {"tok_s": tokens / dt, "loss": result["losses"].get(str(i + 1)), "step_s": dt}
            for i, dt in enumerate(result["step_s"])
        }
        rec["backend"] = {k: result[k] for k in ("backend", "distributed_type", "wrapped_model", "fsdp_enabled")}
        rec["cuda_peak_allocated_gib"] = result.get("cuda_peak_allocated_gib")
    steady = [s["tok_s"] for step, s in rec["steps"].items() if step > plan.args.skip_steps]
    rec["steady_tok_s"] = statistics.median(steady or [s["tok_s"] for s in rec["steps"].values()])  # warm-up: 1 step
    rec["final_loss"] = rec["steps"][max(rec["steps"])]["loss"]
    rec["peak_mem_gib"] = (
        rec["cuda_peak_allocated_gib"] if plan.args.device == "cuda" else max(job.rank_peak_rss_gib, default=None)
    )
    if not plan.args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return rec


def outside_record(variant: str, round_: int, walls: dict[int, dict], steps: list[int], tokens_per_step: int) -> dict:
    """A variant's throughput as a user sees it: the extra wall time of LONG - SHORT steps, launch to exit."""
    short, long = steps
    rec = {"variant": variant, "round": round_, "wall_s": {n: r["wall_s"] for n, r in walls.items()}}
    if any(r["rc"] != 0 for r in walls.values()):
        rec["summary"] = "failed: " + ", ".join(r["log"] for r in walls.values() if r["rc"] != 0)
        return rec
    extra_s = walls[long]["wall_s"] - walls[short]["wall_s"]
    rec["step_s"] = extra_s / (long - short)
    rec["tok_s"] = (long - short) * tokens_per_step / extra_s
    # What the job says of the same steps from inside: its steady per-step time, and the rest per step.
    inside = median_or_none([st["step_s"] for n, st in walls[long]["steps"].items() if n > short])
    rec["inside_step_s"] = inside
    rec["summary"] = (
        f"{rec['tok_s']:,.0f} tok/s ({rec['step_s'] * 1e3:.0f} ms/step from outside, "
        f"{inside * 1e3:.0f} ms/step inside; walls {walls[short]['wall_s']:.1f} s / {walls[long]['wall_s']:.1f} s)"
    )
    return rec


def outside_table(records: list[dict], variants: list[str], steps: list[int]) -> str:
    """Medians over rounds, and each variant's ratio to the Trainer of the same round (when it ran)."""
    rows = [f"| variant | tok/s from outside ({steps[1]} - {steps[0]} steps) | ms/step outside | ms/step inside | "
            "x Trainer |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    ok = [r for r in records if "tok_s" in r]
    for variant in variants:
        mine = [r for r in ok if r["variant"] == variant]
        if not mine:
            continue
        peer = {r["round"]: r["tok_s"] for r in ok if r["variant"] == "trainer-ac-off"}
        ratio = median_or_none([r["tok_s"] / peer[r["round"]] for r in mine if r["round"] in peer])
        rows.append(
            f"| {variant} | {statistics.median(r['tok_s'] for r in mine):,.0f} | "
            f"{statistics.median(r['step_s'] for r in mine) * 1e3:.0f} | "
            f"{median_or_none([r['inside_step_s'] for r in mine]) * 1e3:.0f} | {fmt(ratio, '.2f')} |"
        )
    return "\n".join(rows)


def median_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(
    records: list[dict], variants: list[str], peak_flops: float, fpt: float, baseline_gib: float | None
) -> dict:
    """Median over rounds per variant; ratios vs the Trainer per round (same tag), then median'd."""
    ok = [r for r in records if r["rc"] == 0]
    trainer = {r["tag"]: r for r in ok if r["variant"] == "trainer"}
    out = {}
    for v in variants:
        runs = [r for r in ok if r["variant"] == v]
        failed = sum(1 for r in records if r["variant"] == v and r["rc"] != 0)
        if not runs:
            out[v] = {"failed": failed}
            continue
        s = {
            "runs": len(runs),
            "failed": failed,
            "tok_s": median_or_none([r["steady_tok_s"] for r in runs]),
            "first_step_s": median_or_none([r["first_step_s"] for r in runs]),
            "wall_s": median_or_none([r["wall_s"] for r in runs]),
            "peak_mem_gib": median_or_none([r["peak_mem_gib"] for r in runs]),
            "final_loss": median_or_none([r["final_loss"] for r in runs]),
        }
        s["mfu"] = s["tok_s"] * fpt / peak_flops if peak_flops else None
        if baseline_gib is not None and s["peak_mem_gib"] is not None:
            s["peak_mem_above_baseline_gib"] = s["peak_mem_gib"] - baseline_gib
        pairs = [(r, trainer[r["tag"]]) for r in runs if r["tag"] in trainer]
        if pairs and v != "trainer":
            s["tok_s_vs_trainer"] = median_or_none([r["steady_tok_s"] / t["steady_tok_s"] for r, t in pairs])
            s["peak_mem_vs_trainer"] = median_or_none(
                [r["peak_mem_gib"] / t["peak_mem_gib"] for r, t in pairs if r["peak_mem_gib"] and t["peak_mem_gib"]]
            )
            if baseline_gib is not None:
                s["above_baseline_vs_trainer"] = median_or_none(
                    [
                        (r["peak_mem_gib"] - baseline_gib) / (t["peak_mem_gib"] - baseline_gib)
                        for r, t in pairs
                        if t["peak_mem_gib"] - baseline_gib > 1e-3
                    ]
                )
            s["max_abs_dloss_vs_trainer"] = max(
                abs(r["steps"][k]["loss"] - t["steps"][k]["loss"])
                for r, t in pairs
                for k in r["steps"]
                if k in t["steps"] and t["steps"][k]["loss"] is not None
            )
        out[v] = s
    return out


def fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def markdown_table(summary: dict, device: str) -> str:
    mem = "peak alloc GiB (rank 0)" if device == "cuda" else "peak RSS/rank GiB"
    lines = [
        f"| variant | tok/s | x Trainer | MFU | first step s | wall s | {mem} | x Trainer | final loss | max Δloss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v, s in summary.items():
        if "tok_s" not in s:
            lines.append(f"| {v} | failed ({s['failed']} runs) | | | | | | | | |")
            continue
        lines.append(
            f"| {v} | {s['tok_s']:,.0f} | {fmt(s.get('tok_s_vs_trainer'), '.2f')} | {fmt(s['mfu'], '.1%')} | "
            f"{fmt(s['first_step_s'], '.1f')} | {s['wall_s']:.1f} | {fmt(s['peak_mem_gib'], '.3f')} | "
            f"{fmt(s.get('peak_mem_vs_trainer'), '.2f')} | {fmt(s['final_loss'], '.4f')} | "
            f"{fmt(s.get('max_abs_dloss_vs_trainer'), '.1e')} |"
        )
    return "\n".join(lines)


def describe(rec: dict) -> str:
    if rec["rc"] != 0:
        return f"FAILED rc={rec['rc']} (log {rec['log']})"
    ranks = "/".join(f"{g:.2f}" for g in rec["rank_peak_rss_gib"])
    first = fmt(rec["first_step_s"], ".1f", "?")
    return (
        f"{rec['steady_tok_s']:,.0f} tok/s, first step {first}s, wall {rec['wall_s']:.1f}s, "
        f"peak RSS {ranks} GiB, loss {rec['final_loss']:.4f}"
    )


# ======================================================================================================================
# Main


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "datasets"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import torch

    from fsdp_train import count_steps
    from fsdp_train import parse_args as fsdp_parse_args

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU")
    try:
        import accelerate  # noqa: F401 - the Trainer needs it; fail here, not inside a torchrun job
    except ImportError:
        raise SystemExit("error: the Trainer runs need accelerate: pip install -r requirements-bench.txt") from None
    shape = SHAPES[args.model]
    cores = len(os.sched_getaffinity(0))
    nproc = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 2)
    threads = max(1, cores // nproc)
    batch = args.batch_size or shape.batch
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = args.workdir.resolve()
    runs_dir = workdir / f"runs-{stamp}"
    runs_dir.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}

    print(
        f"bench: {args.model} on {args.device}, {nproc} ranks x {threads} threads, {args.steps} steps, "
        f"batch {batch}/rank x seq {shape.seq}, {args.repeats} round(s) of {', '.join(args.variants)}"
    )
    load_before = os.getloadavg()[0]
    if args.device == "cpu" and load_before > 0.5:
        print(
            f"warning: load average {load_before:.1f} before starting: other work shares these cores, so the numbers "
            "(and the measured peak) will be noisy"
        )
    dataset, model = prepare_inputs(workdir, shape)
    plan = Plan(args, shape, dataset, model, runs_dir, nproc, threads, batch, env)
    fpt, n_params = flops_per_token(model, shape.seq)

    # The schedule both sides use: fsdp_train.py's own flag parsing and step planning, then its packed blocks.
    blocks = pack_blocks(dataset, model, shape.seq)
    cfg = fsdp_parse_args(plan.fsdp_argv("plan", args.steps, []))
    _, plan.schedule_steps = count_steps(cfg, len(blocks[0]), nproc)
    global_batch = batch * nproc
    longest = max([args.steps, *args.outside])
    order = sample_order(len(blocks[0]), longest, global_batch, cfg.seed)
    plan.trainer_data = write_trainer_data(blocks, order, runs_dir / "trainer-data")

    print("warm-up: 1 step of each runner (fills fsdp_train.py's tokenized-data cache; not measured)")
    runners = {VARIANTS[v][0] for v in args.variants}
    warm = [run_variant(plan, runner, "warmup", 1) for runner in ("fsdp", "trainer") if runner in runners]
    for rec in warm:
        if rec["rc"] != 0:
            print(rec["error"], file=sys.stderr)
            raise SystemExit(f"error: the {rec['variant']} warm-up run failed (log {rec['log']})")
    cached = fsdp_train_blocks(runs_dir, dataset, shape.seq) if "fsdp" in runners else None
    n_blocks = len(blocks[0])
    docs = int((blocks[1] == 0).sum())
    token_check = {"blocks": n_blocks, "tokens": n_blocks * shape.seq, "seq": shape.seq, "segments": docs}
    if cached is None:
        token_check["matches_fsdp_train"] = None
        print("token check: fsdp_train.py's data cache not found, blocks not compared")
    else:
        same = all(np.array_equal(a, b) for a, b in zip(cached, blocks, strict=True))
        token_check["matches_fsdp_train"] = same
        print(
            f"token check: bench {n_blocks} blocks / fsdp_train.py {len(cached[0])} blocks of {shape.seq} tokens "
            f"({docs} document segments), input_ids and position_ids identical: {same}"
        )
        if not same:
            raise SystemExit("error: the Trainer would not see fsdp_train.py's sequences; packing differs")
    trainer_warm = next((r for r in warm if r["variant"] == "trainer"), None)
    backend = trainer_warm["backend"] if trainer_warm else None
    if backend:
        asked = "FSDP2 FULL_SHARD"
        note = "" if backend["fsdp_enabled"] else f" (asked for {asked}; accelerate fell back)"
        print(
            f"Trainer backend: {backend['backend']}{note}: accelerate {backend['distributed_type']}, "
            f"wrapped model {backend['wrapped_model']}"
        )

    baseline = None if args.device == "cuda" else import_baseline_rss_gib(env)
    measure_peak = args.device == "cpu" and not args.peak_tflops
    if not measure_peak:
        peak = cuda_peak(args.peak_tflops) if args.device == "cuda" else {"flops": args.peak_tflops * 1e12}
    peaks, outside = [], []
    for r in range(args.repeats):
        if measure_peak:  # every round: a busy moment can only lower a measurement, so the best one is the peak
            peaks.append(measure_cpu_peak(nproc, threads))
            by_size = ", ".join(f"{n}: {g:.1f}" for n, g in peaks[-1]["by_size_gflops"].items())
            print(
                f"[round {r + 1}/{args.repeats}] matmul: {peaks[-1]['flops'] / 1e9:.1f} GFLOP/s ({nproc} procs x "
                f"{threads} threads, fp32, GFLOP/s by size {by_size})"
            )
        for variant in args.variants:
            rec = run_variant(plan, variant, f"r{r + 1}", args.steps)
            plan.results.append(rec)
            print(f"[round {r + 1}/{args.repeats}] {variant}: {describe(rec)}", flush=True)
        for variant in args.variants if args.outside else []:  # A B A B: each round alternates the variants
            walls = {n: run_variant(plan, variant, f"r{r + 1}-outside{n}", n) for n in args.outside}
            rec = outside_record(variant, r + 1, walls, args.outside, global_batch * shape.seq)
            outside.append(rec)
            print(f"[round {r + 1}/{args.repeats}] {variant} from outside: {rec['summary']}", flush=True)
    if measure_peak:
        peaks.append(measure_cpu_peak(nproc, threads))
        peak = {**max(peaks, key=lambda p: p["flops"]), "measured": peaks, "source": "measured fp32 matmul, best run"}
        print(
            f"matmul after the rounds: {peaks[-1]['flops'] / 1e9:.1f} GFLOP/s; MFU uses the best, "
            f"{peak['flops'] / 1e9:.1f}"
        )
    summary = summarize(plan.results, args.variants, peak["flops"], fpt, baseline)

    table = markdown_table(summary, args.device)
    print()
    print(
        f"{args.model} ({shape.hidden}h x {shape.layers}L, {n_params / 1e6:.1f} M params, "
        f"{fpt / 1e6:.0f} MFLOP/token), {args.device}, {nproc} ranks x {threads} threads, {args.steps} steps x "
        f"{global_batch} x {shape.seq} tokens, median of {args.repeats}; peak {peak['flops'] / 1e9:.1f} GFLOP/s"
    )
    print(table)
    if backend:
        print(f"Trainer backend: {backend['backend']} ({backend['distributed_type']}, {backend['wrapped_model']})")
    if baseline is not None:
        above = ", ".join(
            f"{v} {s['peak_mem_above_baseline_gib']:.3f}"
            + (f" ({s['above_baseline_vs_trainer']:.2f}x)" if s.get("above_baseline_vs_trainer") else "")
            for v, s in summary.items()
            if "peak_mem_above_baseline_gib" in s
        )
        print(f"peak RSS/rank above the {baseline:.3f} GiB import baseline (torch+transformers+datasets): {above}")
    if outside:
        print(outside_table(outside, args.variants, args.outside))
    failed = [r for r in plan.results if r["rc"] != 0]
    for rec in failed:
        print(f"failed: {rec['tag']} {rec['variant']}: see {rec['log']}", file=sys.stderr)

    out = args.out or ROOT / "bench" / "results" / f"{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "outside": outside,
        "time": stamp,
        "argv": sys.argv,
        "host": {
            "load_avg_1min_before": load_before,
            "load_avg_1min_after": os.getloadavg()[0],
            "cores": cores,
            "cpu": platform.processor() or platform.machine(),
            "platform": platform.platform(),
        },
        "versions": versions(),
        "settings": {
            "model": args.model,
            "shape": asdict(shape),
            "device": args.device,
            "nproc": nproc,
            "omp_threads": threads,
            "steps": args.steps,
            "batch_per_rank": batch,
            "global_batch": global_batch,
            "schedule_steps": plan.schedule_steps,
            "skip_steps": args.skip_steps,
            "repeats": args.repeats,
            "variants": args.variants,
        },
        "flops_per_token": fpt,
        "flops_formula": "6*N + 12*L*h*s; N = all nn.Linear weights (lm_head in, embeddings/norms out); no AC recompute",
        "params": n_params,
        "peak": peak,
        "import_baseline_rss_gib": baseline,
        "token_check": token_check,
        "trainer_backend": backend,
        "summary": summary,
        "table": table,
        "runs": plan.results,
        "warmup": warm,
        "seconds": time.perf_counter() - t_start,
    }
    out.write_text(json.dumps(report, indent=1))
    if not args.keep and not failed:  # a failed run's log stays for reading
        shutil.rmtree(runs_dir, ignore_errors=True)
    print(f"results: {out} ({time.perf_counter() - t_start:.0f}s in all)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
