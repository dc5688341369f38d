"""Host memory and time of loading pretrained weights into the sharded model, per rank and rank count: every rank
reading its own slices of the safetensors files (--load-weights auto) vs rank 0 loading the whole model and
broadcasting it (--load-weights rank0).

    python bench/bench_load.py [--ranks 1 2 4] [--hidden 1024 --layers 18 --vocab 32000] [--shard-mib 100]

Saves a random Llama of that shape once (from_config, bf16 on disk as hub checkpoints are, in --shard-mib files). For
each rank count and path a torchrun job whose workers import the model code, reset their RSS high-water mark, call
fsdp_train.build_model directly (fp32 master weights) and report: the RSS before the build (the import floor), VmHWM
during it, the peak of anonymous memory above the floor (anon_peak: VmHWM less the file-backed pages, i.e. less the
page cache the mmap'd safetensors slices show as) and the build's seconds. Target: rise <= 1.2 x fp32 size / N.
"""

from __future__ import annotations

import sys
import time

from benchlib import MIB, emit, parse, run, session, table, worker_cmd

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
    floor = ft.rss_bytes()
    base = ft.memory_baseline(d.device)  # resets VmHWM; the anonymous memory now
    ft.dist.barrier()
    t0 = time.perf_counter()
    ft.build_model(cfg, d, load_pretrained=True)
    ft.dist.barrier()
    seconds = time.perf_counter() - t0
    emit({"rank": d.rank, "floor_mib": round(floor / MIB), "hwm_mib": round(ft.rss_bytes("VmHWM") / MIB),
          "anon_rise_mib": round((ft.anon_peak() - base) / MIB), "load_s": round(seconds, 2)})  # fmt: skip
    ft.teardown_distributed()


def write_model(out, hidden: int, layers: int, vocab: int, shard_mib: int) -> int:
    """A random bf16 Llama in several safetensors files; its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 256, max_position_embeddings=1024)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size=f"{shard_mib}MB")
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    args = parse(__doc__, configure, QUICK, None, argv)
    with session("load", args) as (work, payload):
        num_params = write_model(work / "model", args.hidden, args.layers, args.vocab, args.shard_mib)
        files = list((work / "model").glob("*.safetensors"))
        disk_mib, fp32_mib = sum(f.stat().st_size for f in files) / MIB, num_params * 4 / MIB
        print(f"model {num_params / 1e6:.0f} M params: {disk_mib:.0f} MiB bf16 in {len(files)} files, {fp32_mib:.0f} "
              "MiB fp32")  # fmt: skip
        results, rows = [], []
        for ranks in args.ranks:
            for load_weights in ("rank0", "auto"):
                job = run(worker_cmd("bench_load.py", "load_worker", work / "model", load_weights, nproc=ranks)).check()
                per_rank = sorted(job.results(), key=lambda r: r["rank"])
                said = [
                    line.split("] ", 1)[1].strip() for _, line in job.lines if "weights" in line and "[rank0]" in line
                ]
                results.append({"ranks": ranks, "load_weights": load_weights, "per_rank": per_rank, "log": said})
                r0 = per_rank[0]
                rows.append([ranks, load_weights, r0["floor_mib"], r0["hwm_mib"], r0["anon_rise_mib"],
                             max(r["anon_rise_mib"] for r in per_rank), round(1.2 * fp32_mib / ranks),
                             max(r["load_s"] for r in per_rank)])  # fmt: skip
                print(f"  {ranks} rank(s), {load_weights}: rank 0 rise {r0['anon_rise_mib']} MiB", flush=True)
        print(table(["ranks", "--load-weights", "rank0 floor MiB", "rank0 VmHWM MiB", "rank0 anon rise MiB",
                     "max anon rise MiB (any rank)", "1.2 x fp32 / N MiB", "load s"], rows))  # fmt: skip
        payload.update(disk_mib=disk_mib, fp32_mib=fp32_mib, results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
