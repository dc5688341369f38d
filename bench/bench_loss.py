"""Peak host memory of the loss (forward + backward) in units of the logits' size: fsdp_train.py's chunked
cross-entropy against transformers' ForCausalLMLoss, fp32 and bf16 logits.

    python bench/bench_loss.py            # batch 8 x 512 tokens x vocab 32000

Each case runs in a fresh process with MALLOC_MMAP_THRESHOLD_=65536 (freed blocks go back to the OS, so the peak RSS
counts live memory) and reports (peak of anonymous memory after the logits exist - that memory then) / logits bytes.
"""

from __future__ import annotations

import sys
import time

from benchlib import MALLOC_ENV, emit, parse, run, session, worker_cmd

QUICK = {"batch": 2, "seq": 128, "vocab": 4096}


def configure(p) -> None:
    p.add_argument("--batch", type=int, default=8, help="sequences (8)")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (512)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary (32000)")


def loss_worker(loss: str, dtype: str, batch: int, seq: int, vocab: int) -> None:
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
    emit({"dtype": dtype, "loss": loss, "units": units, "seconds": seconds})


def main(argv: list[str] | None = None) -> int:
    args = parse(__doc__, configure, QUICK, None, argv)
    with session("loss", args) as (_, payload):
        rows = []
        for dtype in ("float32", "bfloat16"):
            for loss in ("transformers", "chunked"):
                cmd = worker_cmd("bench_loss.py", "loss_worker", loss, dtype, args.batch, args.seq, args.vocab)
                rows.append(run(cmd, env=MALLOC_ENV).check().results()[-1])
        print(f"batch {args.batch} x seq {args.seq} x vocab {args.vocab}\n")
        print("| logits | loss | peak memory (logits-sized units) | forward+backward s |\n|---|---|---:|---:|")
        print("\n".join(f"| {r['dtype']} | {r['loss']} | {r['units']:.2f} | {r['seconds']:.2f} |" for r in rows))
        payload["rows"] = rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
