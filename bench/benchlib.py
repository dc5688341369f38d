"""What every bench/ script shares: its command line and results file, the one job runner, the worker protocol, the
test inputs, markdown tables, and the trainer's own FLOPs per token and MFU.

Run the scripts as `python bench/NAME.py`; this module puts the repo root on sys.path, so that they import what they
measure from fsdp_train.py. Heavy libraries are imported inside the functions that need them: `--help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
# One OpenMP thread per rank, as the tests run it: 2 ranks on 2 cores, no oversubscription.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
# glibc serves allocations above 64 KiB from mmap and returns them at free, so that RSS tracks live memory.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
MIB, GIB = 2**20, 2**30
RESULT = "RESULT "  # a worker's output line: RESULT {json}

# Llama shapes the benchmarks share (intermediate size as model_download.build_tiny derives it).
SHAPES = {
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2},
    "medium": {"hidden_size": 768, "num_hidden_layers": 6, "num_attention_heads": 12, "num_key_value_heads": 4},
}


def torchrun(nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def python(script: str, *args) -> list[str]:
    return [sys.executable, str(ROOT / script), *map(str, args)]


def csv(cast=str):
    """An argparse type: a comma list of `cast`."""
    return lambda text: [cast(x) for x in text.split(",") if x]


def shapes(text: str) -> list[tuple[int, ...]]:
    """An argparse type: BxS[xV],... -> [(B, S[, V]), ...]."""
    return [tuple(int(x) for x in item.split("x")) for item in text.split(",")]


# ----------------------------------------------------------------------------------------------------------------------
# Command line, workers and the results file


def parse(doc: str, configure, quick: dict | None = None, check=None, argv: list[str] | None = None):
    """The script's arguments, plus the shared ones: --quick (`quick`'s values, a smoke run), --workdir, --keep, --out.
    A hidden --worker '["fn", args...]' runs fn(*args) of the script's __main__ instead (see worker_cmd) and exits.
    `check(args)` returns what is wrong with the flags, for parser.error."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(p)
    shown = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in (quick or {}).items())
    p.add_argument("--quick", action="store_true", help=f"a smoke run at the smallest settings: {shown or 'none'}")
    p.add_argument("--workdir", type=Path, help="keep inputs and runs here (default: a temp dir, deleted at the end)")
    p.add_argument("--keep", action="store_true", help="do not delete the temp dir")
    p.add_argument("--out", type=Path, help="results JSON (default: bench/results/NAME-<time>.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        fn, *fn_args = json.loads(args.worker)
        getattr(sys.modules["__main__"], fn)(*fn_args)
        raise SystemExit(0)
    if args.quick:
        vars(args).update(quick or {})
    if check and (problem := check(args)):
        p.error(problem)
    return args


def worker_cmd(script: str, fn: str, *args, nproc: int = 0) -> list[str]:
    """The command that runs fn(*args) (JSON-able) of bench/SCRIPT in a fresh process, or under torchrun."""
    head = torchrun(nproc) if nproc else [sys.executable]
    return [*head, str(ROOT / "bench" / script), "--worker", json.dumps([fn, *map(jsonable, args)])]


def emit(obj: dict) -> None:
    """A worker's result, one line in one write() so that ranks never interleave mid-line."""
    os.write(sys.stdout.fileno(), (RESULT + json.dumps(obj) + "\n").encode())


def jsonable(v):
    return str(v) if isinstance(v, Path) else v


def machine() -> dict:
    """What the numbers depend on: cores, load (the CPU may be shared), library versions."""
    versions = {}
    for pkg in ("torch", "transformers", "accelerate", "datasets", "tokenizers", "safetensors"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    load = [round(x, 2) for x in os.getloadavg()]
    cpu = platform.processor() or platform.machine()
    return {"cpus": len(os.sched_getaffinity(0)), "loadavg": load, "cpu": cpu, "versions": versions}


@contextlib.contextmanager
def session(name: str, args):
    """(work dir, payload): the payload gets the arguments and the machine's state, and at the end goes to
    bench/results/NAME-<time>.json (or --out). A temp work dir is deleted unless --keep, the run raised, or the
    payload says passed=False (its logs are then kept to read)."""
    t0, stamp = time.perf_counter(), time.strftime("%Y%m%d-%H%M%S")
    temp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir="/tmp")) if temp else args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    payload = {"args": {k: jsonable(v) for k, v in vars(args).items()}, "machine_at_start": machine()}
    print(f"{name}: workdir {work}, load average {payload['machine_at_start']['loadavg']}", flush=True)
    try:
        yield work, payload
    except BaseException:
        print(f"workdir kept: {work}", file=sys.stderr)
        raise
    payload.update(total_s=time.perf_counter() - t0, machine_at_end=machine())
    out = args.out or RESULTS / f"{name}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1, default=jsonable) + "\n")
    print(f"\nresults: {out} ({payload['total_s']:.0f}s in all)")
    if temp and not args.keep and payload.get("passed", True):
        shutil.rmtree(work, ignore_errors=True)
    elif temp:
        print(f"workdir kept: {work}")


# ----------------------------------------------------------------------------------------------------------------------
# Numbers and tables


def median(values) -> float | None:
    """The median of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec: str = "") -> str:
    """A table cell: '-' for None/nan, `spec` if given, floats to 3 significant digits (thousands whole)."""
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if spec:
        return format(v, spec)
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value <= target
    return f"{'MET' if met else 'MISSED'} ({value:.2f} vs target {'>=' if higher_is_better else '<='} {target:g})"


# ----------------------------------------------------------------------------------------------------------------------
# The one job runner


@dataclass
class Job:
    """A finished command: exit status, wall and CPU seconds of the whole process tree, every output line with its
    arrival time after launch (ms resolution, where the log's own timestamps have seconds), and for torchrun jobs
    each rank's peak RSS sampled from outside every 50 ms."""

    cmd: list[str]
    pid: int = 0  # also the id of the job's session (process group)
    rc: int = -1
    wall: float = 0.0
    cpu: float = 0.0
    lines: list[tuple[float, str]] = field(default_factory=list)
    rank_peak_rss_gib: list[float] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def first(self, pattern: str) -> tuple[float, str] | None:
        """(arrival seconds, line) of the first output line matching `pattern` (a regex)."""
        return next(((t, line) for t, line in self.lines if re.search(pattern, line)), None)

    def results(self) -> list[dict]:
        """What the job's workers emit()ted."""
        return [json.loads(line[len(RESULT) :]) for _, line in self.lines if line.startswith(RESULT)]

    def check(self) -> Job:
        if self.rc != 0:
            sys.exit(f"error: `{' '.join(self.cmd)}` exited {self.rc}:\n{self.output[-3000:]}")
        return self


def _read(path) -> str:
    with contextlib.suppress(OSError):  # the process may have ended
        return Path(path).read_text()
    return ""


def run(cmd: list, env: dict | None = None, timeout=1800.0, log: Path | None = None, ranks="", watch=None) -> Job:
    """Run from the repo root in a new session (a timeout ends the whole job: torchrun and its workers), output to
    `log` as it comes. `ranks`: sample the peak RSS of the children whose command line holds it (torchrun's
    workers). `watch(job, proc)` is called at every poll (chaos.py kills from there)."""
    job, t0 = Job([str(c) for c in cmd]), time.perf_counter()
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, "start_new_session": True}
    proc = subprocess.Popen(job.cmd, cwd=ROOT, env={**ENV, **(env or {})}, **pipes)

    def read() -> None:
        with open(log or os.devnull, "w") as f:
            for line in proc.stdout:
                job.lines.append((time.perf_counter() - t0, line))
                f.write(line)
                f.flush()

    job.pid = proc.pid
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak, is_rank = {}, {}
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaped here: Popen.wait would drop the rusage
        if pid:
            break
        tasks = Path(f"/proc/{proc.pid}/task").glob("*") if ranks else []  # torchrun's threads, and their children
        for child in [int(x) for task in tasks for x in _read(task / "children").split()]:
            if child not in is_rank:
                is_rank[child] = ranks in _read(f"/proc/{child}/cmdline")
            if is_rank[child] and (m := re.search(r"VmRSS:\s+(\d+)", _read(f"/proc/{child}/status"))):
                peak[child] = max(peak.get(child, 0), int(m[1]))  # KiB
        if watch:
            watch(job, proc)
        if time.perf_counter() - t0 > timeout:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.05)
    job.wall = time.perf_counter() - t0
    job.rc = proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=30)  # survivors of a killed agent may hold the pipe a little longer
    job.cpu = usage.ru_utime + usage.ru_stime  # the child and every descendant it waited for
    job.rank_peak_rss_gib = sorted((k * 1024 / GIB for k in peak.values()), reverse=True)
    return job


# ----------------------------------------------------------------------------------------------------------------------
# Inputs and what runs wrote


def tiny_model(out: Path, **shape) -> Path:
    """A random-init Llama with the BPE tokenizer trained on data/ (model_download.build_tiny with `shape`), built
    once."""
    if not (out / "config.json").is_file():
        from model_download import build_tiny

        build_tiny(out, ROOT / "data", overwrite=True, **shape)
    return out


def write_llama(out: Path, dims: dict, vocab: int, tokenizer_dir: Path | None = None, **save) -> Path:
    """An HF folder with a random-init Llama of `dims` (LlamaConfig fields, e.g. SHAPES[name]), `vocab` rows (0: the
    tokenizer's size) and the tokenizer of `tokenizer_dir`, built once; `save`: save_pretrained's, and dtype."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else None
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")} if tokenizer else {}
    shape = {"intermediate_size": dims["hidden_size"] * 8 // 3 // 16 * 16, "max_position_embeddings": 1024, **dims}
    config = LlamaConfig(vocab_size=vocab or len(tokenizer), **ids, **shape)
    torch.manual_seed(0)
    tmp = out.with_name(f"{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(config).to(save.pop("dtype", torch.float32)).save_pretrained(tmp, **save)
    if tokenizer:
        tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def prepare_dataset(work: Path) -> Path:
    """organize_data.py -> data_to_hf.py on the bundled data/, as tests/conftest.py's `prep` fixture runs them."""
    splits, dataset = work / "splits", work / "dataset"
    if not dataset.is_dir():
        organize = ["--src_dir", "data", "--dst_root", splits, "--num_dirs", 3, "--overwrite"]
        run(python("organize_data.py", *organize)).check()
        run(python("data_to_hf.py", "--data_folder", splits, "--save_dir", dataset)).check()
    return dataset


def read_metrics(exp: Path) -> list[dict]:
    """SAVE_DIR/EXP/metrics.jsonl: one dict per log step."""
    return [json.loads(line) for line in (Path(exp) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def packed_cache(save_dir: Path, dataset: str, seq: int) -> Path | None:
    """The folder of the packed training blocks fsdp_train.py cached for this dataset and sequence length (not
    --packing padded) under SAVE_DIR/.cache/tokenized, found by its info.json."""
    for info in sorted((Path(save_dir) / ".cache" / "tokenized").glob("*/info.json")):
        meta = json.loads(info.read_text())
        found = (meta.get("role"), meta.get("dataset"), meta.get("seq_length"), meta.get("padded", False))
        if found == ("train", str(dataset), seq, False):
            return info.parent
    return None


def checkpoint_weights(ckpt: Path) -> dict:
    """The model tensors of a DCP checkpoint, read in this one process (no process group)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(ckpt, Path(tmp) / "weights.pt")
        return torch.load(Path(tmp) / "weights.pt", weights_only=True)["model"]


# ----------------------------------------------------------------------------------------------------------------------
# FLOPs per token and MFU: the trainer's own definitions, never re-derived here


def model_flops(model_dir: Path, seq: int) -> tuple[float, int]:
    """(FLOPs per trained token, parameters) as fsdp_train.py counts them for the MFU it logs (flops_per_token over
    count_params of the model, built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fsdp_train import count_params, flops_per_token

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        n = count_params(AutoModelForCausalLM.from_config(config))
    return flops_per_token(config, n, seq), n


def mfu(tok_s: float, flops_per_token: float, world_size: int, peak_tflops: float) -> float:
    """The MFU fsdp_train.py logs (Throughput.mfu on these figures): tok_s of all ranks, `peak_tflops` per rank."""
    from fsdp_train import Throughput

    return Throughput.mfu(SimpleNamespace(flops=flops_per_token, world_size=world_size, peak=peak_tflops), tok_s)
