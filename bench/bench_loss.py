"""Peak host memory of the loss (forward + backward) in units of the logits' size: fsdp_train.py's chunked
cross-entropy against transformers' ForCausalLMLoss, fp32 and bf16 logits, one process each (so every peak is clean).

    python bench/bench_loss.py            # batch 8 x 512 tokens x vocab 32000

Each case runs in a fresh process with MALLOC_MMAP_THRESHOLD_=65536 (freed blocks go back to the OS, so the peak
RSS counts live memory) and reports (peak RSS after the logits exist - RSS then) / bytes of the logits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(loss: str, dtype: str, batch: int, seq: int, vocab: int) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    import fsdp_train as ft

    logits = torch.randn(batch, seq, vocab, dtype=getattr(torch, dtype)).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq))
    base = ft.memory_baseline(torch.device("cpu"))
    fn = ft.causal_lm_loss if loss == "chunked" else ForCausalLMLoss
    t0 = time.perf_counter()
    fn(logits, labels, vocab_size=vocab, num_items_in_batch=float(batch * seq)).backward()
    seconds = time.perf_counter() - t0
    units = (ft.anon_peak() - base) / (logits.numel() * logits.element_size())
    print(json.dumps({"loss": loss, "dtype": dtype, "units": units, "seconds": seconds}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--worker", nargs=2, metavar=("LOSS", "DTYPE"))
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker, args.batch, args.seq, args.vocab)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    rows = []
    for dtype in ("float32", "bfloat16"):
        for loss in ("transformers", "chunked"):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                loss,
                dtype,
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
            ]
            cmd += ["--vocab", str(args.vocab)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"batch {args.batch} x seq {args.seq} x vocab {args.vocab}\n")
    print("| logits | loss | peak memory (logits-sized units) | forward+backward s |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['loss']} | {r['units']:.2f} | {r['seconds']:.2f} |")
    out = ROOT / "bench" / "results" / f"loss-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
