"""What keeping packed documents apart costs on CPU: sdpa's causal fast path (documents attend to each other, the old
behaviour) vs sdpa and eager with per-document position_ids (transformers builds a block-diagonal mask).

    python bench/bench_packing.py [--seqs 1024,4096] [--rounds 3]

A random Llama (MODEL, fp32, fsdp_train.causal_lm_loss), one process, one thread, no FSDP or checkpointing; one block
of random tokens cut into documents of exponential length (mean 256) with fsdp_train's positions and labels.
  tok/s      one model and AdamW switched between modes, a warm-up step per mode, then --rounds rounds of A, B, C
  memory     a fresh process per (seq, mode), MALLOC_MMAP_THRESHOLD_=65536: after a warm-up step VmHWM is reset and
             one step runs; its VmHWM minus the RSS before it
  isolation  the largest log-prob difference of a 24-token document packed second in a block vs alone
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from benchlib import MALLOC_ENV, MIB, csv, emit, fmt, median, parse, run, session, table, worker_cmd

MODES = {
    "A": ("sdpa", False, "sdpa, no position_ids (causal fast path, documents mix)"),
    "B": ("sdpa", True, "sdpa + packed position_ids (bool mask)"),
    "C": ("eager", True, "eager + packed position_ids (float mask)"),
}
MODEL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
         "intermediate_size": 688, "vocab_size": 4096}  # fmt: skip
QUICK = {"seqs": [128], "rounds": 1}


def configure(p) -> None:
    p.add_argument("--seqs", type=csv(int), default=[1024, 4096], help="sequence lengths (1024,4096)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of A, B, C per sequence length (3)")


def check(args) -> str | None:
    return "need --rounds >= 1 and sequence lengths >= 32" if args.rounds < 1 or min(args.seqs) < 32 else None


def build(max_seq: int):
    """(model, optimizer): the Llama of MODEL with fsdp_train's loss, fp32, training mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    import fsdp_train as ft

    torch.set_num_threads(1)  # as each rank of the other benches; 2 threads on 2 shared cores were 2-8x noisier
    logging.set_verbosity_error()
    config = LlamaConfig(**MODEL, max_position_embeddings=max(max_seq, 1024), use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.loss_function = ft.causal_lm_loss
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)  # fsdp_train.py's choice on CPU
    return model.train(), optimizer


def make_batch(seq: int, doc_mean: float = 256) -> dict:
    """One block of random tokens in documents of exponential lengths (>= 16); fsdp_train's positions and labels."""
    import numpy as np
    import torch

    import fsdp_train as ft

    rng, starts, i = np.random.default_rng(0), np.zeros((1, seq), dtype=bool), 0
    while i < seq:
        starts[0, i] = True
        i += max(16, int(rng.exponential(doc_mean)))
    ids = torch.from_numpy(rng.integers(0, MODEL["vocab_size"], (1, seq)))
    positions = torch.from_numpy(ft.segment_positions(starts).astype(np.int64))
    return {"input_ids": ids, "position_ids": positions, "labels": ft.block_labels(ids, positions)}


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


def memory_worker(mode: str, seq: int) -> None:
    import gc

    import fsdp_train as ft

    model, optimizer = build(seq)
    step(model, optimizer, make_batch(128, 32), mode)  # optimizer state exists from here on
    data = make_batch(seq)
    gc.collect()
    before = ft.rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now
    step(model, optimizer, data, mode)
    emit({"mode": mode, "seq": seq, "before": before, "peak": ft.rss_bytes("VmHWM")})


def run_timing(args) -> tuple[list[dict], dict]:
    """One process, modes alternating step by step, after a warm-up step per mode (kernels, allocator, mask paths)."""
    model, optimizer = build(max(args.seqs))
    gaps = {mode: isolation_gap(model, mode) for mode in MODES}
    runs = []
    for seq in args.seqs:
        data = make_batch(seq)
        for r in range(-1, args.rounds):  # round -1: the warm-up, not recorded
            for mode in MODES:
                t0 = time.perf_counter()
                step(model, optimizer, data, mode)
                dt = time.perf_counter() - t0
                print(f"  seq {seq} {'warm-up' if r < 0 else f'round {r + 1}'} {mode}: {dt:.2f}s", flush=True)
                if r >= 0:
                    runs.append({"seq": seq, "round": r, "mode": mode, "tok_s": seq / dt})
    return runs, gaps


def main(argv: list[str] | None = None) -> int:
    args = parse(__doc__, configure, QUICK, check, argv)
    with session("packing", args) as (_, payload):
        runs, gaps = run_timing(args)
        rows, memory = [], []
        for seq in args.seqs:
            tok = {(r["round"], r["mode"]): r["tok_s"] for r in runs if r["seq"] == seq}
            for mode, (_, _, what) in MODES.items():
                job = run(worker_cmd("bench_packing.py", "memory_worker", mode, seq), env=MALLOC_ENV).check()
                memory.append(m := job.results()[-1])
                ratio = median(tok[r, mode] / tok[r, "A"] for r in range(args.rounds))
                tok_s = median(tok[r, mode] for r in range(args.rounds))
                added, peak = (m["peak"] - m["before"]) / MIB, m["peak"] / MIB
                rows.append([seq, f"{mode}: {what}", tok_s, f"{ratio:.2f}", added, peak, fmt(gaps[mode], ".1e")])
        print(f"\n## Packed-document masking cost: Llama h256 x 4 layers, vocab 4096, fp32, {args.rounds} rounds\n")
        print(table(["seq", "mode", "tok/s", "x A", "step adds MiB", "peak RSS MiB", "isolation gap"], rows))
        payload.update(model=MODEL, runs=runs, isolation_gap=gaps, memory=memory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
