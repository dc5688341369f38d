"""Host memory and time of loading pretrained weights into the sharded model, per rank and rank count: every rank
reading its own slices of the safetensors files (--load-weights auto) vs rank 0 loading the whole model and
broadcasting it (--load-weights rank0).

    python bench/bench_load.py [--ranks 1 2 4] [--hidden 1024 --layers 18 --vocab 32000] [--shard-mib 100]

Saves a random Llama of that shape once (from_config, bf16 on disk as hub checkpoints are, save_pretrained in
--shard-mib files) in a temp folder under /tmp, deleted at the end. For each rank count and path, a torchrun job
whose workers import the model code, reset their resident-memory high-water mark, call build_model directly (fp32
master weights), and print as JSON: the RSS before the build (the import floor), the peak RSS during it (VmHWM), the
peak of anonymous memory above the floor (anon_peak: VmHWM less the file-backed pages, i.e. less the page cache the
mmap'd safetensors slices show as) and the build's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, machine, run_timed, save_results, table

MIB = 2**20


def worker(model: str, load_weights: str) -> None:
    sys.path.insert(0, str(ROOT))
    import fsdp_train as ft

    cfg = ft.Config(dataset_name="-", model_name=model, load_weights=load_weights)
    d = ft.setup_distributed()
    ft.import_model_code(cfg, d.device)
    floor = ft.rss_bytes()
    base = ft.memory_baseline(d.device)  # resets VmHWM; the anonymous memory now
    ft.dist.barrier()
    t0 = time.perf_counter()
    ft.build_model(cfg, d, load_pretrained=True)
    ft.dist.barrier()
    seconds = time.perf_counter() - t0
    row = {
        "rank": d.rank,
        "floor_mib": round(floor / MIB),
        "hwm_mib": round(ft.rss_bytes("VmHWM") / MIB),
        "anon_rise_mib": round((ft.anon_peak() - base) / MIB),
        "load_s": round(seconds, 2),
    }
    ft.say(json.dumps(row))  # one write: no interleaving
    ft.teardown_distributed()


def write_model(out: Path, hidden: int, layers: int, vocab: int, shard_mib: int) -> int:
    """A random bf16 Llama in several safetensors files; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, max_position_embeddings=1024,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size=f"{shard_mib}MB")
    return sum(p.numel() for p in model.parameters())


def measure(model: Path, ranks: int, load_weights: str) -> tuple[list[dict], list[str]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", __file__,
           "--worker", str(model), load_weights]  # fmt: skip
    run = run_timed(cmd).check()
    rows = [json.loads(line) for line in run.output.splitlines() if line.startswith('{"rank"')]
    assert len(rows) == ranks, run.output[-3000:]
    said = [
        line.split("] ", 1)[1].strip() for line in run.output.splitlines() if "weights" in line and "[rank0]" in line
    ]
    return sorted(rows, key=lambda r: r["rank"]), said


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-mib", type=int, default=100, help="size of each safetensors file")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker)
    work = Path(tempfile.mkdtemp(prefix="bench-load-", dir="/tmp"))
    try:
        num_params = write_model(work / "model", args.hidden, args.layers, args.vocab, args.shard_mib)
        files = list((work / "model").glob("*.safetensors"))
        disk_mib = sum(f.stat().st_size for f in files) / MIB
        fp32_mib = num_params * 4 / MIB
        print(
            f"model {num_params / 1e6:.0f} M params: {disk_mib:.0f} MiB bf16 in {len(files)} files, {fp32_mib:.0f} MiB fp32"
        )
        results, rows = [], []
        for ranks in args.ranks:
            for load_weights in ("rank0", "auto"):
                per_rank, said = measure(work / "model", ranks, load_weights)
                results.append({"ranks": ranks, "load_weights": load_weights, "per_rank": per_rank, "log": said})
                r0, worst = per_rank[0], max(r["anon_rise_mib"] for r in per_rank)
                target = 1.2 * fp32_mib / ranks
                rows.append([ranks, load_weights, r0["floor_mib"], r0["hwm_mib"], r0["anon_rise_mib"], worst,
                             round(target), max(r["load_s"] for r in per_rank)])  # fmt: skip
                print(json.dumps(results[-1]), flush=True)
        headers = ["ranks", "--load-weights", "rank0 floor MiB", "rank0 VmHWM MiB", "rank0 anon rise MiB",
                   "max anon rise MiB (any rank)", "1.2 x fp32 / N MiB", "load s"]  # fmt: skip
        print(table(headers, rows))
        path = save_results("load", {"args": vars(args), "disk_mib": disk_mib, "fp32_mib": fp32_mib,
                                     "results": results, "machine": machine()})  # fmt: skip
        print(f"results: {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
