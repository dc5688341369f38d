"""Helpers shared by the bench/ scripts: timed subprocesses, markdown tables, results files and test inputs.

Imported by bench_prep.py, bench_ckpt.py and bench_startup.py (run as `python bench/NAME.py`, so bench/ is on
sys.path). Nothing heavy is imported here at module level: the scripts time their own imports.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# One OpenMP thread per rank, as the tests run it: 2 ranks on 2 cores, no oversubscription.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

# Llama shapes the benchmarks share (intermediate size as model_download.py --tiny derives it).
SHAPES = {
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2},
    "medium": {"hidden_size": 768, "num_hidden_layers": 6, "num_attention_heads": 12, "num_key_value_heads": 4},
}


# ----------------------------------------------------------------------------------------------------------------------
# Numbers and reports


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; floats shown with 3 significant digits unless already formatted."""

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value <= target
    return f"{'MET' if met else 'MISSED'} ({value:.2f} vs target {'>=' if higher_is_better else '<='} {target:g})"


def machine() -> dict:
    """What the numbers depend on: cores, load (the CPU may be shared), library versions."""
    versions = {}
    for pkg in ("torch", "transformers", "datasets", "tokenizers", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "versions": versions,
    }


def save_results(name: str, payload: dict) -> Path:
    """bench/results/NAME-<timestamp>.json (git-ignored), with the machine's state at the end of the run."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({**payload, "machine_at_end": machine()}, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Subprocesses


@dataclass
class Timed:
    """A finished command: exit code, wall and CPU seconds, and each output line with its arrival time after launch.

    CPU seconds (user + system of the whole process tree) hardly change when other jobs share the cores; wall
    seconds do, so a contended run shows as wall >> CPU / cores.
    """

    cmd: list[str]
    rc: int = -1
    wall: float = 0.0
    cpu: float = 0.0
    lines: list[tuple[float, str]] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def first(self, needle: str) -> tuple[float, str] | None:
        """(arrival seconds, line) of the first output line containing `needle`."""
        return next(((t, line) for t, line in self.lines if needle in line), None)

    def check(self) -> Timed:
        if self.rc != 0:
            sys.exit(f"error: `{' '.join(self.cmd)}` exited {self.rc}:\n{self.output[-3000:]}")
        return self


def run_timed(cmd: list, env: dict | None = None, timeout: float = 900, log: Path | None = None) -> Timed:
    """Run from the repo root, stamping every stdout/stderr line with seconds since launch (lines are unbuffered).

    Wall-clock arrival times give millisecond resolution where the training log's own timestamps have seconds.
    """
    run = Timed([str(c) for c in cmd])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        run.cmd, cwd=ROOT, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # so a timeout can end the whole job (torchrun and its workers)
    )  # fmt: skip
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        for line in proc.stdout:
            run.lines.append((time.perf_counter() - t0, line))
        run.rc = proc.wait()
    finally:
        timer.cancel()
    run.wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # every descendant that was waited for
    run.cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if log is not None:
        log.write_text(run.output)
    return run


def python(script: str, *args) -> list[str]:
    return [sys.executable, str(ROOT / script), *map(str, args)]


# ----------------------------------------------------------------------------------------------------------------------
# Inputs: tokenizer, models, the bundled dataset


def build_tokenizer(out: Path) -> Path:
    """The byte-level BPE tokenizer `model_download.py --tiny` trains on data/ (the tiny model comes along)."""
    if not (out / "tokenizer.json").is_file():
        run_timed(python("model_download.py", "--tiny", out, "--overwrite")).check()
    return out


def write_llama(out: Path, shape: str, vocab: int, tokenizer_dir: Path, seed: int = 0) -> Path:
    """An HF folder with a random-init Llama of SHAPES[shape] (vocab rows; 0: the tokenizer's size) + the tokenizer."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    dims = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab or len(tokenizer),
        intermediate_size=dims["hidden_size"] * 8 // 3 // 16 * 16,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **dims,
    )
    torch.manual_seed(seed)
    tmp = out.with_name(f"{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def prepare_dataset(work: Path) -> Path:
    """organize_data.py -> data_to_hf.py on the bundled data/, as tests/conftest.py's `prep` fixture runs them."""
    splits, dataset = work / "splits", work / "dataset"
    if not dataset.is_dir():
        run_timed(python("organize_data.py", "--src_dir", "data", "--dst_root", splits, "--num_dirs", "3")).check()
        run_timed(python("data_to_hf.py", "--data_folder", splits, "--save_dir", dataset)).check()
    return dataset


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
