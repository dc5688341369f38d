"""Host memory and time of loading pretrained weights into the sharded model, per rank count: every rank reading its
own slices of the safetensors files (--load-weights auto) vs rank 0 loading the whole model and broadcasting it
(--load-weights rank0).

    python bench/bench_load.py [--ranks 1 2 4] [--hidden 1024 --layers 18 --vocab 32000] [--shard-mib 100]

A random Llama of that shape is saved once (bf16 on disk, as hub checkpoints are). Per rank count and path a torchrun
job's workers import the model code, reset their RSS high-water mark and call fsdp_train.build_model (fp32 master
weights): VmHWM, the rise of anonymous memory (anon_peak: less the page cache of the mmap'd files) and the seconds.
Target: rise <= 1.2 x fp32 size / N.
"""

from __future__ import annotations

import sys
import time

from benchlib import MIB, emit, parse, run, session, table, worker_cmd, write_llama

QUICK = {"ranks": [2], "hidden": 256, "layers": 2, "vocab": 4096, "shard_mib": 5}


def configure(p) -> None:
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="rank counts (1 2 4)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (1024)")
    p.add_argument("--layers", type=int, default=18, help="decoder layers (18)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary rows (32000)")
    p.add_argument("--shard-mib", type=int, default=100, help="size of each safetensors file (100)")


def load_worker(model: str, load_weights: str) -> None:
    import fsdp_train as ft

    cfg = ft.Config(dataset_name="-", model_name=model, load_weights=load_weights)
    d = ft.setup_distributed()
    ft.import_model_code(cfg, d.device)
    base = ft.memory_baseline(d.device)  # resets VmHWM; the anonymous memory now
    ft.dist.barrier()
    t0 = time.perf_counter()
    ft.build_model(cfg, d, load_pretrained=True)
    ft.dist.barrier()
    seconds, rise = time.perf_counter() - t0, (ft.anon_peak() - base) / MIB
    emit({"rank": d.rank, "hwm_mib": round(ft.rss_bytes("VmHWM") / MIB), "rise_mib": round(rise), "load_s": seconds})
    ft.teardown_distributed()


def main(argv: list[str] | None = None) -> int:
    args = parse(__doc__, configure, QUICK, None, argv)
    with session("load", args) as (work, payload):
        import torch

        h = args.hidden
        dims = {"hidden_size": h, "num_hidden_layers": args.layers, "num_attention_heads": h // 64}
        dims["num_key_value_heads"] = h // 256
        files = {"dtype": torch.bfloat16, "max_shard_size": f"{args.shard_mib}MB"}
        model = write_llama(work / "model", dims, args.vocab, **files)
        disk_mib = sum(f.stat().st_size for f in model.glob("*.safetensors")) / MIB
        fp32_mib = disk_mib * 2  # bf16 on disk
        print(f"model: {disk_mib:.0f} MiB bf16, {fp32_mib:.0f} MiB fp32")
        results, rows = [], []
        for ranks in args.ranks:
            for load_weights in ("rank0", "auto"):
                job = run(worker_cmd("bench_load.py", "load_worker", model, load_weights, nproc=ranks)).check()
                per_rank = sorted(job.results(), key=lambda r: r["rank"])
                results.append({"ranks": ranks, "load_weights": load_weights, "per_rank": per_rank})
                r0, rise = per_rank[0], max(r["rise_mib"] for r in per_rank)
                target, seconds = round(1.2 * fp32_mib / ranks), max(r["load_s"] for r in per_rank)
                rows.append([ranks, load_weights, r0["hwm_mib"], r0["rise_mib"], rise, target, seconds])
                print(f"  {ranks} rank(s), {load_weights}: rank 0 rise {r0['rise_mib']} MiB", flush=True)
        heads = ["ranks", "`--load-weights`", "rank 0 peak RSS MiB", "rank 0 rise MiB", "max rise, any rank"]
        print(table([*heads, "target MiB", "load s"], rows))
        payload.update(disk_mib=disk_mib, fp32_mib=fp32_mib, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
