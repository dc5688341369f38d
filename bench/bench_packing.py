"""What keeping packed documents apart costs on CPU: sdpa's causal fast path (documents attend to each other, the old
behaviour) vs sdpa and eager with per-document position_ids (transformers builds a block-diagonal mask).

    .venv/bin/python bench/bench_packing.py [--seqs 1024,4096] [--batch 1] [--rounds 3] [--doc-mean 256]
        [--threads 1] [--parts time,memory] [--out FILE]

One torch thread by default (--threads): on 2 cores shared with other jobs, 2 threads per process measured 2-8x
slower and far noisier than 1 (OpenMP threads waiting for each other).

Model: a random-init Llama built from its config (hidden 256, 4 layers, 4 heads, intermediate 688, vocab 4096, fp32,
use_cache off, fsdp_train.causal_lm_loss as its loss), single process, no FSDP, no activation checkpointing.
Data: random tokens; each block is cut into documents with exponential lengths (mean --doc-mean tokens, at least 16),
position_ids restart at 0 at each document (fsdp_train.segment_positions) and labels are fsdp_train.block_labels,
the same for every mode (so the loss does the same work).

Modes:
  A  sdpa, no position_ids: the causal fast path (is_causal), documents see each other (before packing isolation)
  B  sdpa + packed position_ids: an explicit B x 1 x S x S boolean mask, no is_causal fast path
  C  eager + packed position_ids: a float mask added to materialised S x S scores

Measured:
  tok/s     one process, one model and AdamW (foreach) switched between modes with set_attn_implementation; a step is
            forward + backward + optimizer step + zero_grad. Per sequence length: one warm-up step per mode, then
            --rounds rounds of A, B, C (alternating, so drift in the machine's load hits every mode alike); median of
            the rounds' batch x seq / step seconds.
  memory    a fresh process per (seq, mode) with MALLOC_MMAP_THRESHOLD_=65536 (freed buffers go back to the OS, so
            RSS tracks live memory): model + AdamW, one warm-up step at seq 128 (creates the optimizer state), then
            the kernel's RSS high-water mark is reset (/proc/self/clear_refs) and one full step runs. Reported: VmHWM
            minus the RSS just before that step (what the step itself adds: activations, mask, scores, gradients)
            and VmHWM itself.
  isolation the largest log-prob difference of a 24-token document packed second in a block (after 24 others) vs the
            same document alone, as fsdp_train.document_isolation_gap checks it: ~0 = isolated, ~1 = mixing.

Prints markdown tables; the full record goes to bench/results/bench_packing-<time>.json (--out to change).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchlib import ROOT, machine, median, save_results, table

MODES = {
    "A": ("sdpa", False, "sdpa, no position_ids (causal fast path, documents mix)"),
    "B": ("sdpa", True, "sdpa + packed position_ids (bool mask)"),
    "C": ("eager", True, "eager + packed position_ids (float mask)"),
}
MODEL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
         "intermediate_size": 688, "vocab_size": 4096}  # fmt: skip
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
MIB = 2**20


# ----------------------------------------------------------------------------------------------------------------------
# Model, data, one step (used by the driver and by the memory workers)


def build(max_seq: int, seed: int = 0):
    """(model, optimizer): the Llama of MODEL with fsdp_train's loss, fp32, training mode."""
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    import fsdp_train as ft

    logging.set_verbosity_error()
    config = LlamaConfig(**MODEL, max_position_embeddings=max(max_seq, 1024), use_cache=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.loss_function = ft.causal_lm_loss
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)  # fsdp_train.py's choice on CPU
    return model, optimizer


def make_batch(batch: int, seq: int, doc_mean: float, seed: int = 0) -> dict:
    """Random tokens in blocks of documents with exponential lengths; fsdp_train's positions and labels."""
    import numpy as np
    import torch

    import fsdp_train as ft

    rng = np.random.default_rng(seed)
    starts = np.zeros((batch, seq), dtype=bool)
    for b in range(batch):
        i = 0
        while i < seq:
            starts[b, i] = True
            i += max(16, int(rng.exponential(doc_mean)))
    ids = torch.from_numpy(rng.integers(0, MODEL["vocab_size"], (batch, seq)))
    positions = torch.from_numpy(ft.segment_positions(starts).astype(np.int64))
    return {"input_ids": ids, "position_ids": positions, "labels": ft.block_labels(ids, positions),
            "docs": int(starts.sum())}  # fmt: skip


def set_mode(model, mode: str) -> None:
    model.set_attn_implementation(MODES[mode][0])


def step(model, optimizer, data: dict, mode: str) -> float:
    """One training step in `mode`; returns its loss."""
    kwargs = {"position_ids": data["position_ids"]} if MODES[mode][1] else {}
    loss = model(input_ids=data["input_ids"], labels=data["labels"], **kwargs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def isolation_gap(model, mode: str) -> float:
    """Max |log-prob| difference of a document packed second vs alone (as fsdp_train.document_isolation_gap, but
    mode A feeds the block without position_ids, as training did before)."""
    import torch

    g = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, MODEL["vocab_size"], (24,), generator=g) for _ in range(2))
    packed = torch.cat([first, second])[None]
    kwargs = {"position_ids": torch.cat([torch.arange(24), torch.arange(24)])[None]} if MODES[mode][1] else {}
    model.eval()
    try:
        with torch.no_grad():
            in_block = model(input_ids=packed, **kwargs).logits[0, 24:].log_softmax(-1)
            alone = model(input_ids=second[None], position_ids=torch.arange(24)[None]).logits[0].log_softmax(-1)
    finally:
        model.train()
    return (in_block - alone).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------------
# Memory worker: a fresh process per (seq, mode)


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_worker(mode: str, batch: int, seq: int, doc_mean: float, threads: int) -> None:
    import gc

    import torch

    if threads:
        torch.set_num_threads(threads)
    model, optimizer = build(seq)
    set_mode(model, mode)
    step(model, optimizer, make_batch(batch, 128, 32), mode)  # optimizer state exists from here on
    data = make_batch(batch, seq, doc_mean)
    gc.collect()
    before = rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
    t0 = time.perf_counter()
    step(model, optimizer, data, mode)
    seconds = time.perf_counter() - t0
    peak = rss("VmHWM")
    print("RESULT " + json.dumps({"mode": mode, "seq": seq, "before": before, "peak": peak, "added": peak - before,
                                  "step_s": seconds}), flush=True)  # fmt: skip


def run_memory(args) -> list[dict]:
    out = []
    env = {**os.environ, **MALLOC_ENV, "PYTHONUNBUFFERED": "1"}
    for seq in args.seqs:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--memory-worker", mode, "--batch", str(args.batch), "--seqs", str(seq)]
            cmd += ["--doc-mean", str(args.doc_mean), "--threads", str(args.threads)]
            run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
            if run.returncode != 0 or line is None:
                err = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
                print(f"  memory {seq} {mode}: FAILED rc={run.returncode}: {err[0]}", flush=True)
                out.append({"mode": mode, "seq": seq, "error": (run.stderr or run.stdout)[-3000:]})
                continue
            res = json.loads(line[7:])
            out.append(res)
            print(f"  memory {seq} {mode}: +{res['added'] / MIB:.0f} MiB over {res['before'] / MIB:.0f} MiB "
                  f"({res['step_s']:.1f}s step)", flush=True)  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Timing: one process, modes alternating step by step


def run_timing(args) -> tuple[list[dict], dict]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, optimizer = build(max(args.seqs))
    gaps = {}
    for mode in MODES:
        set_mode(model, mode)
        gaps[mode] = isolation_gap(model, mode)
    print("isolation gap: " + ", ".join(f"{m} {g:.2g}" for m, g in gaps.items()), flush=True)
    runs = []
    for seq in args.seqs:
        data = make_batch(args.batch, seq, args.doc_mean)
        for mode in MODES:  # warm-up: kernels, allocator, mask code paths
            set_mode(model, mode)
            t0 = time.perf_counter()
            step(model, optimizer, data, mode)
            print(f"  seq {seq} warm-up {mode}: {time.perf_counter() - t0:.2f}s", flush=True)
        for r in range(args.rounds):
            for mode in MODES:
                set_mode(model, mode)
                t0 = time.perf_counter()
                loss = step(model, optimizer, data, mode)
                dt = time.perf_counter() - t0
                runs.append({"seq": seq, "round": r, "mode": mode, "step_s": dt, "tok_s": args.batch * seq / dt,
                             "loss": loss, "docs": data["docs"]})  # fmt: skip
                print(f"  seq {seq} round {r + 1} {mode}: {dt:.2f}s, {args.batch * seq / dt:,.0f} tok/s", flush=True)
    return runs, gaps


# ----------------------------------------------------------------------------------------------------------------------
# Main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="1024,4096", help="sequence lengths (1024,4096)")
    p.add_argument("--batch", type=int, default=1, help="blocks per step (1)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of A, B, C per sequence length (3)")
    p.add_argument("--doc-mean", type=float, default=256, help="mean document length in tokens (256)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1, as each rank of the other benches; 0: torch's default, every core)",
    )
    p.add_argument("--parts", default="time,memory", help="time, memory or both (time,memory)")
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/bench_packing-<time>.json)")
    p.add_argument("--memory-worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.seqs = [int(s) for s in args.seqs.split(",")]
    args.parts = args.parts.split(",")
    if args.memory_worker:
        memory_worker(args.memory_worker, args.batch, args.seqs[0], args.doc_mean, args.threads)
        return 0
    if args.rounds < 1 or args.batch < 1 or min(args.seqs) < 32 or not set(args.parts) <= {"time", "memory"}:
        p.error("need --rounds >= 1, --batch >= 1, sequence lengths >= 32, --parts from time,memory")

    t_start = time.perf_counter()
    start = machine()
    print(f"load average {start['loadavg']} on {start['cpus']} cores", flush=True)
    payload = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "machine_at_start": start, "model": MODEL, "modes": {k: v[2] for k, v in MODES.items()}}  # fmt: skip
    runs, gaps, memory = [], {}, []
    if "time" in args.parts:
        runs, gaps = run_timing(args)
    if "memory" in args.parts:
        memory = run_memory(args)
    payload.update(runs=runs, isolation_gap=gaps, memory=memory)

    mem = {(m["seq"], m["mode"]): m for m in memory}
    summary = []
    for seq in args.seqs:
        tok = {m: median([r["tok_s"] for r in runs if r["seq"] == seq and r["mode"] == m]) for m in MODES}
        for mode in MODES:
            ratio = tok[mode] / tok["A"] if runs else float("nan")
            paired = [b["tok_s"] / a["tok_s"] for a in runs for b in runs
                      if a["seq"] == b["seq"] == seq and a["round"] == b["round"] and a["mode"] == "A"
                      and b["mode"] == mode]  # fmt: skip
            m = mem.get((seq, mode), {})
            summary.append({"seq": seq, "mode": mode, "tok_s": tok[mode], "vs_A": ratio,
                            "vs_A_paired_median": median(paired), "added_bytes": m.get("added"),
                            "peak_bytes": m.get("peak"), "gap": gaps.get(mode)})  # fmt: skip
    payload["summary"] = summary
    heads = ["seq", "mode", "tok/s (median)", "x A", "step added MiB", "peak RSS MiB", "isolation gap"]
    rows = [
        [s["seq"], f"{s['mode']}: {MODES[s['mode']][2]}", f"{s['tok_s']:,.0f}" if runs else "-",
         f"{s['vs_A_paired_median']:.2f}" if runs else "-",
         f"{s['added_bytes'] / MIB:,.0f}" if s["added_bytes"] is not None else "-",
         f"{s['peak_bytes'] / MIB:,.0f}" if s["peak_bytes"] is not None else "-",
         f"{s['gap']:.1e}" if s["gap"] is not None else "-"]
        for s in summary
    ]  # fmt: skip
    docs = sorted({r["docs"] for r in runs})
    print(f"\n## Packed-document masking cost: Llama h256 x 4 layers, vocab 4096, fp32, batch {args.batch}, "
          f"{docs or '?'} documents per step, {args.rounds} rounds (x A: median of per-round ratios)\n")  # fmt: skip
    print(table(heads, rows))
    payload["total_s"] = time.perf_counter() - t_start
    end = machine()
    print(f"\nload average {start['loadavg']} at start, {end['loadavg']} at end")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**payload, "machine_at_end": end}, indent=2) + "\n")
        path = args.out
    else:
        path = save_results("bench_packing", payload)
    print(f"results: {path} ({payload['total_s']:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
