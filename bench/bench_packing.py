"""What keeping packed documents apart costs on CPU: sdpa's causal fast path (documents attend to each other, the old
behaviour) vs sdpa and eager with per-document position_ids (transformers builds a block-diagonal mask).

    .venv/bin/python bench/bench_packing.py [--seqs 1024,4096] [--batch 1] [--rounds 3] [--doc-mean 256]
        [--threads 1] [--parts time,memory] [--out FILE]

A random-init Llama from its config (MODEL, fp32, use_cache off, fsdp_train.causal_lm_loss), one process, no FSDP, no
activation checkpointing; one torch thread by default (on 2 shared cores, 2 threads measured 2-8x slower and noisier).
Random tokens cut into documents of exponential length (mean --doc-mean, at least 16), fsdp_train.segment_positions
and block_labels, the same for every mode. Modes: A sdpa without position_ids (is_causal fast path, documents mix);
B sdpa + packed position_ids (an explicit S x S bool mask); C eager + packed position_ids (a float mask on materialised
scores).
  tok/s      one model and AdamW (foreach) switched between modes; a step is forward + backward + optimizer step. Per
             sequence length a warm-up step per mode, then --rounds rounds of A, B, C; median of batch x seq / step s
  memory     a fresh process per (seq, mode) with MALLOC_MMAP_THRESHOLD_=65536: model + AdamW, a warm-up step at seq
             128, then VmHWM is reset (/proc/self/clear_refs) and one full step runs: VmHWM minus the RSS before it
  isolation  the largest log-prob difference of a 24-token document packed second in a block vs alone
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from benchlib import MALLOC_ENV, MIB, emit, fmt, median, parse, run, session, table, worker_cmd

MODES = {
    "A": ("sdpa", False, "sdpa, no position_ids (causal fast path, documents mix)"),
    "B": ("sdpa", True, "sdpa + packed position_ids (bool mask)"),
    "C": ("eager", True, "eager + packed position_ids (float mask)"),
}
MODEL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
         "intermediate_size": 688, "vocab_size": 4096}  # fmt: skip
QUICK = {"seqs": [128], "rounds": 1}


def configure(p) -> None:
    p.add_argument("--seqs", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096],
                   help="sequence lengths (1024,4096)")  # fmt: skip
    p.add_argument("--batch", type=int, default=1, help="blocks per step (1)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of A, B, C per sequence length (3)")
    p.add_argument("--doc-mean", type=float, default=256, help="mean document length in tokens (256)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1, as each rank of the other benches; 0: "
                   "every core)")  # fmt: skip
    p.add_argument("--parts", type=lambda s: s.split(","), default=["time", "memory"], help="time, memory (both)")


def check(args) -> str | None:
    if args.rounds < 1 or args.batch < 1 or min(args.seqs) < 32 or not set(args.parts) <= {"time", "memory"}:
        return "need --rounds >= 1, --batch >= 1, sequence lengths >= 32, --parts from time,memory"
    return None


def build(max_seq: int, threads: int, seed: int = 0):
    """(model, optimizer): the Llama of MODEL with fsdp_train's loss, fp32, training mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    import fsdp_train as ft

    if threads:
        torch.set_num_threads(threads)
    logging.set_verbosity_error()
    config = LlamaConfig(**MODEL, max_position_embeddings=max(max_seq, 1024), use_cache=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.loss_function = ft.causal_lm_loss
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)  # fsdp_train.py's choice on CPU
    return model.train(), optimizer


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


def step(model, optimizer, data: dict, mode: str) -> float:
    """One training step in `mode`; its loss."""
    model.set_attn_implementation(MODES[mode][0])
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

    model.set_attn_implementation(MODES[mode][0])
    g = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, MODEL["vocab_size"], (24,), generator=g) for _ in range(2))
    kwargs = {"position_ids": torch.cat([torch.arange(24), torch.arange(24)])[None]} if MODES[mode][1] else {}
    with torch.no_grad():
        in_block = model.eval()(input_ids=torch.cat([first, second])[None], **kwargs).logits[0, 24:].log_softmax(-1)
        alone = model(input_ids=second[None], position_ids=torch.arange(24)[None]).logits[0].log_softmax(-1)
    model.train()
    return (in_block - alone).abs().max().item()


def memory_worker(mode: str, batch: int, seq: int, doc_mean: float, threads: int) -> None:
    import gc

    import fsdp_train as ft

    model, optimizer = build(seq, threads)
    step(model, optimizer, make_batch(batch, 128, 32), mode)  # optimizer state exists from here on
    data = make_batch(batch, seq, doc_mean)
    gc.collect()
    before = ft.rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
    t0 = time.perf_counter()
    step(model, optimizer, data, mode)
    seconds, peak = time.perf_counter() - t0, ft.rss_bytes("VmHWM")
    emit({"mode": mode, "seq": seq, "before": before, "peak": peak, "added": peak - before, "step_s": seconds})


def run_timing(args) -> tuple[list[dict], dict]:
    """One process, modes alternating step by step, after a warm-up step per mode (kernels, allocator, mask paths)."""
    model, optimizer = build(max(args.seqs), args.threads)
    gaps = {mode: isolation_gap(model, mode) for mode in MODES}
    print("isolation gap: " + ", ".join(f"{m} {g:.2g}" for m, g in gaps.items()), flush=True)
    runs = []
    for seq in args.seqs:
        data = make_batch(args.batch, seq, args.doc_mean)
        for r in range(-1, args.rounds):  # round -1: the warm-up, not recorded
            for mode in MODES:
                t0 = time.perf_counter()
                loss = step(model, optimizer, data, mode)
                dt = time.perf_counter() - t0
                print(f"  seq {seq} {'warm-up' if r < 0 else f'round {r + 1}'} {mode}: {dt:.2f}s", flush=True)
                if r >= 0:
                    runs.append({"seq": seq, "round": r, "mode": mode, "step_s": dt, "tok_s": args.batch * seq / dt,
                                 "loss": loss, "docs": data["docs"]})  # fmt: skip
    return runs, gaps


def summary_rows(args, runs: list[dict], memory: dict, gaps: dict) -> list[list]:
    """One row per (seq, mode): median tok/s, the median of the per-round ratios to A, memory, isolation gap."""
    rows = []
    for seq in args.seqs:
        tok = {(r["round"], r["mode"]): r["tok_s"] for r in runs if r["seq"] == seq}
        for mode, (_, _, what) in MODES.items():
            ratios = [tok[r, mode] / tok[r, "A"] for r in range(args.rounds) if (r, mode) in tok]
            m = memory.get((seq, mode), {})
            rows.append([seq, f"{mode}: {what}", median(t for (_, md), t in tok.items() if md == mode),
                         fmt(median(ratios), ".2f"), fmt(m.get("added") and m["added"] / MIB, ",.0f"),
                         fmt(m.get("peak") and m["peak"] / MIB, ",.0f"), fmt(gaps.get(mode), ".1e")])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse(__doc__, configure, QUICK, check, argv)
    with session("packing", args) as (work, payload):
        runs, gaps = run_timing(args) if "time" in args.parts else ([], {})
        memory = {}
        for seq in args.seqs if "memory" in args.parts else []:
            for mode in MODES:
                cmd = worker_cmd(
                    "bench_packing.py", "memory_worker", mode, args.batch, seq, args.doc_mean, args.threads
                )
                job = run(cmd, env={**MALLOC_ENV, "OMP_NUM_THREADS": str(args.threads or os.cpu_count())})
                memory[seq, mode] = job.results()[-1] if job.rc == 0 else {"error": job.output[-3000:]}
                print(f"  memory {seq} {mode}: {memory[seq, mode].get('added', 0) / MIB:.0f} MiB added", flush=True)
        rows = summary_rows(args, runs, memory, gaps)
        docs = sorted({r["docs"] for r in runs})
        print(
            f"\n## Packed-document masking cost: Llama h256 x 4 layers, vocab 4096, fp32, batch {args.batch}, "
            f"{docs or '?'} documents per step, {args.rounds} rounds (x A: median of per-round ratios)\n"
        )
        print(table(["seq", "mode", "tok/s (median)", "x A", "step adds MiB", "peak RSS MiB", "isolation gap"], rows))
        payload.update(model=MODEL, runs=runs, isolation_gap=gaps, memory=[{"seq": s, "mode": m, **v}
                       for (s, m), v in memory.items()], summary=rows)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
