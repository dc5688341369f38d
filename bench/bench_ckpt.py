"""Checkpoint throughput: fsdp_train.py's save_checkpoint/load_checkpoint vs the disk's bandwidth, and what saves cost
a training run.

    .venv/bin/python bench/bench_ckpt.py [--repeats 3] [--shape medium] [--vocab 32000] [--steps 12] [--every 4]
        [--step-repeats 2] [--workdir DIR] [--keep]

(1) Under torchrun (2 ranks, gloo) a random-init Llama (--shape: benchlib.SHAPES, --vocab rows) is built by
    fsdp_train.build_model (per-block units), given AdamW state by one optimizer step, and saved/loaded with the real
    save_checkpoint/load_checkpoint (folder, rename, marker, prune included). Alternating with them, in the same job,
    the disk baseline: each rank writes (with fsync) and reads back a file the size of its own DCP shard, concurrently
    as DCP does; and rank 0 alone streams the whole size. GB/s = checkpoint bytes / seconds between barriers. "Cold"
    reads come after posix_fadvise(DONTNEED) on every file read (no root, so no drop_caches; a VM host may still
    cache). The phases (get_state_dict, dcp.save, dcp.load, set_state_dict) are timed apart.
    Target: save and load >= 50% of the disk's bandwidth (the better of the two baselines).
(2) fsdp_train.py on the bundled data with --ckpt-freq --every, blocking and --async-checkpoint, vs one save at the
    end only, alternately. Is a run with n more saves slower by more than n x one save ("Saved checkpoint ... in Xs")?
    And how long is the step that coincides with a save (step line k -> k+1), blocking vs async, vs the others?
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import benchlib as bl

CHUNK = 64 << 20  # bytes per write/read call of the disk baseline
QUICK = {"repeats": 1, "shape": "small", "vocab": 0, "steps": 4, "every": 2, "step_repeats": 1}


def configure(p) -> None:
    p.add_argument("--repeats", type=int, default=3, help="save/load rounds, each alternating with the disk (3)")
    p.add_argument("--shape", choices=sorted(bl.SHAPES), default="medium", help="Llama shape (default medium)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary rows; 0: the tiny tokenizer's (32000)")
    p.add_argument("--steps", type=int, default=12, help="steps of each training run (default 12)")
    p.add_argument("--every", type=int, default=4, help="--ckpt-freq of the run that saves periodically (default 4)")
    p.add_argument("--step-repeats", type=int, default=2, help="training run triples, 0 to skip part 2 (default 2)")


def check(args) -> str | None:
    if args.repeats < 1 or args.step_repeats < 0 or not 1 <= args.every < args.steps:
        return "need --repeats >= 1, --step-repeats >= 0 and 1 <= --every < --steps"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# (1) Worker (one per rank, under torchrun)


def write_file(path: Path, nbytes: int, buf: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while nbytes:
            nbytes -= os.write(fd, buf[: min(nbytes, len(buf))])
        os.fsync(fd)  # as DCP's FileSystemWriter (sync_files=True) does
    finally:
        os.close(fd)


def read_file(path: Path, buf: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def drop_cache(paths: list[Path]) -> None:
    """Evict these files' (clean, fsynced) pages from the page cache; no root needed, unlike drop_caches."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def io_worker(model_dir: str, work: str, repeats: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import fsdp_train as ft

    d, work = ft.setup_distributed(), Path(work)
    # fully_shard per block, as on GPUs (auto is one unit on CPU; the state dicts are the same)
    cfg = ft.Config(
        dataset_name="-", model_name=model_dir, save_dir=str(work), experiment_name="ckpt", shard_unit="block"
    )
    model = ft.build_model(cfg, d, load_pretrained=False)
    g = torch.Generator().manual_seed(d.rank)
    with torch.no_grad():
        for p in model.parameters():
            ft.local_shard(p).normal_(0, 0.02, generator=g)
    optimizer = ft.build_optimizer(model, cfg, d)
    for p in model.parameters():  # one step with zero gradients: AdamW's moments exist, as in a real checkpoint
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    optims, rec = ft.dcp_optimizers(optimizer), {}

    def timed(key: str, fn, *args, **kwargs):
        """fn's result; its seconds, barrier to barrier (so the slowest rank's), go to rec[key]."""
        dist.barrier()
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        dist.barrier()
        rec.setdefault(key, []).append(time.perf_counter() - t0)
        return result

    def on_main(fn, *args) -> None:
        if d.is_main:
            fn(*args)

    def save(step: int) -> Path:
        return ft.save_checkpoint(cfg, d, model, optimizer, ft.TrainState(step=step), accum=1, schedule_steps=1000)

    def drop_all(path: Path) -> None:  # the page cache is shared: one rank evicts every file
        on_main(drop_cache, [p for p in path.rglob("*") if p.is_file()])

    def fresh(path: Path) -> Path:  # DCP writes new files: the baseline must not overwrite (truncate) old ones
        path.unlink(missing_ok=True)
        dist.barrier()
        return path

    ckpt = save(1)  # warm-up (first-call imports and planning), then the sizes the baseline has to match
    mine, total = sum(p.stat().st_size for p in ckpt.glob(f"__{d.rank}_*.distcp")), bl.dir_bytes(ckpt)
    buf = memoryview(bytearray(os.urandom(1 << 20) * (CHUNK >> 20)))  # incompressible, allocated once
    mine_file, whole_file, diag = work / f"disk-rank{d.rank}.bin", work / "disk-whole.bin", work / "diag"
    for r in range(repeats):
        timed("disk_write_parallel", write_file, fresh(mine_file), mine, buf)
        ckpt = timed("save_checkpoint", save, r + 2)
        timed("disk_write_single", on_main, write_file, fresh(whole_file), total, buf)
        drop_all(work)
        timed("disk_read_parallel_cold", read_file, mine_file, buf)
        drop_all(ckpt)
        timed("load_checkpoint_cold", ft.load_checkpoint, ckpt, d, model, optimizer)
        timed("disk_read_parallel_warm", read_file, mine_file, buf)
        timed("load_checkpoint_warm", ft.load_checkpoint, ckpt, d, model, optimizer)
        drop_all(work)
        timed("disk_read_single_cold", on_main, read_file, whole_file, buf)
        # The phases of the same work, called directly: what the two functions spend beyond DCP's own I/O.
        model_sd, optim_sd = timed("get_state_dict", get_state_dict, model, optims)
        state = {"model": model_sd, "optim": optim_sd, "buffers": ft.nonpersistent_buffers(model)}
        if diag.exists():  # what pruning one old checkpoint costs inside save_checkpoint
            timed("rmtree_checkpoint", on_main, shutil.rmtree, diag)
        timed("dcp_save", dcp.save, state, checkpoint_id=diag)
        drop_all(diag)
        timed("dcp_load_cold", dcp.load, state, checkpoint_id=diag)
        timed("set_state_dict", set_state_dict, model, optims, model_state_dict=model_sd, optim_state_dict=optim_sd)
        del state, model_sd, optim_sd
    if d.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        bl.emit({"bytes": total, "rank0_shard_bytes": mine, "params": n_params, "vocab": model.config.vocab_size,
                 "seconds": rec})  # fmt: skip
    ft.teardown_distributed()


IO_ROWS = [  # (timing key, what); the indented ones are parts of the line above them
    ("save_checkpoint", "save_checkpoint (fsdp_train)"),
    ("get_state_dict", "  get_state_dict"),
    ("dcp_save", "  dcp.save alone"),
    ("rmtree_checkpoint", "  rmtree of one checkpoint (prune)"),
    ("disk_write_parallel", "disk write, 2 ranks x shard, fsync"),
    ("disk_write_single", "disk write, rank 0 x whole, fsync"),
    ("load_checkpoint_cold", "load_checkpoint cold (fsdp_train)"),
    ("dcp_load_cold", "  dcp.load alone, cold"),
    ("set_state_dict", "  set_state_dict"),
    ("disk_read_parallel_cold", "disk read cold, 2 ranks x shard"),
    ("disk_read_single_cold", "disk read cold, rank 0 x whole"),
    ("load_checkpoint_warm", "load_checkpoint warm (page cache)"),
    ("disk_read_parallel_warm", "disk read warm, 2 ranks x shard"),
]
NO_BYTES = {"get_state_dict", "set_state_dict", "rmtree_checkpoint"}  # moves no checkpoint bytes: no GB/s


def report_io(args, io: dict) -> dict:
    gb, sec = io["bytes"] / 1e9, {k: bl.median(v) for k, v in io["seconds"].items()}
    rate = {k: gb / s for k, s in sec.items() if k not in NO_BYTES}
    disk_w = max(rate["disk_write_parallel"], rate["disk_write_single"])
    disk_r = max(rate["disk_read_parallel_cold"], rate["disk_read_single_cold"])
    warm = rate["disk_read_parallel_warm"]
    vs = {"save_checkpoint": (disk_w, "write"), "dcp_save": (disk_w, "write"), "load_checkpoint_cold": (disk_r,
          "cold read"), "dcp_load_cold": (disk_r, "cold read"),
          "load_checkpoint_warm": (warm, "warm read")}  # fmt: skip
    rows = [[what, sec.get(k), rate.get(k), f"{rate[k] / vs[k][0]:.0%} of {vs[k][1]}" if k in vs else ""]
            for k, what in IO_ROWS]  # fmt: skip
    dims = bl.SHAPES[args.shape]
    print(f"\n## (1) checkpoint I/O: {args.shape} Llama (hidden {dims['hidden_size']}, {dims['num_hidden_layers']} "
          f"layers, vocab {io['vocab']}), {io['params'] / 1e6:.1f} M params, checkpoint {gb:.2f} GB (model + AdamW), "
          f"2 ranks gloo (median of {args.repeats})\n")  # fmt: skip
    print(bl.table(["what", "s", "GB/s", "vs disk"], rows))
    shares = {
        "save_vs_disk_write": rate["save_checkpoint"] / disk_w,
        "load_cold_vs_disk_read": rate["load_checkpoint_cold"] / disk_r,
    }
    print(f"\nsave vs disk write {disk_w:.2f} GB/s: {bl.verdict(shares['save_vs_disk_write'], 0.5)}")
    print(f"load (cold) vs disk read {disk_r:.2f} GB/s: {bl.verdict(shares['load_cold_vs_disk_read'], 0.5)}")
    print("(cold = after posix_fadvise DONTNEED in this VM; the host may still cache, so 'disk' read may be RAM speed)")
    return {"median_s": sec, **shares}


# ----------------------------------------------------------------------------------------------------------------------
# (2) training runs with and without periodic saves


def training_run(args, work: Path, dataset: Path, model_dir: Path, mode: str, r: int) -> dict:
    """One run: the loop (Start-up line -> the final save's line; every run ends with a save), the saves' own
    seconds, and the gaps from step line k to k+1 split by whether k saved (step 1 -> 2 is warm-up, left out)."""
    freq = 10**6 if mode == "end only" else args.every  # 10**6: only the save at the end
    exp = f"{mode.replace(' ', '-')}-{r}"
    flags = ["-e", exp, "-d", dataset, "-m", model_dir, "--save-dir", work / "train", "-s", 128, "-b", 1, "--log-freq",
             1, "--warmup-steps", 1, "--max-steps", args.steps, "--ckpt-freq", freq, "--async-checkpoint",
             "on" if mode == "async" else "off"]  # fmt: skip
    job = bl.run([*bl.torchrun(2), bl.ROOT / "fsdp_train.py", *flags]).check()
    saves = [(t, float(m[1])) for t, line in job.lines if (m := re.search(r"Saved checkpoint \S+ in ([\d.]+)s", line))]
    at = {int(m[1]): t for t, line in job.lines if (m := re.search(r"\] step (\d+)/", line))}
    gaps = {k: at[k + 1] - at[k] for k in range(2, args.steps) if k in at and k + 1 in at}
    metrics = bl.read_metrics(work / "train" / exp)
    shutil.rmtree(work / "train" / exp)
    return {"mode": mode, "exp": exp, "saves": len(saves), "save_s": [s for _, s in saves], "wall_s": job.wall,
            "cpu_s": job.cpu, "loop_s": saves[-1][0] - job.first("Start-up took")[0],
            "save_step_s": [g for k, g in gaps.items() if k % freq == 0],
            "other_step_s": [g for k, g in gaps.items() if k % freq],
            "paused_s": [float(m[1]) for _, line in job.lines if (m := re.search(r"training paused ([\d.]+)s", line))],
            "step_ms": [m["time/total"] for m in metrics if m["global_step"] > 1]}  # fmt: skip


def report_training(args, runs: list[dict]) -> None:
    modes = ("blocking", "async", "end only")
    by = {m: [x for x in runs if x["mode"] == m] for m in modes}
    loop = {m: bl.median(x["loop_s"] for x in by[m]) for m in modes}
    extra = by["blocking"][0]["saves"] - by["end only"][0]["saves"]

    def pooled(mode: str, key: str):
        return bl.median(v for x in by[mode] for v in x[key])

    rows = [[f"--ckpt-freq {args.every}" if m != "end only" else "end only", by[m][0]["saves"], m, loop[m],
             (loop[m] - loop["end only"]) / extra if m != "end only" else "", fmt_ms(pooled(m, "save_step_s")),
             fmt_ms(pooled(m, "other_step_s")), pooled(m, "save_s"), pooled(m, "paused_s") if m == "async" else "",
             bl.median(x["cpu_s"] for x in by[m])] for m in modes]  # fmt: skip
    print(f"\n## (2) training {args.steps} steps, {args.shape}, -s 128 -b 1, 2 ranks (median of {args.step_repeats} "
          "runs each)\n")  # fmt: skip
    print(bl.table(["run", "saves", "mode", "loop s", "s per extra save", "save step ms", "other steps ms",
                    "median save s (start to sealed)", "training paused s", "job CPU s"], rows))  # fmt: skip
    per_save, save_s = (loop["blocking"] - loop["end only"]) / extra, pooled("blocking", "save_s")
    print(f"\nblocking: cost per extra save {per_save:.2f}s vs one save {save_s:.2f}s: "
          f"{'INFLATED beyond' if per_save > 1.1 * save_s else 'not inflated beyond'} the save itself; async: "
          f"{(loop['async'] - loop['end only']) / extra:.2f}s per extra save")  # fmt: skip


def fmt_ms(seconds: float | None):
    return None if seconds is None else seconds * 1e3


def main(argv: list[str] | None = None) -> int:
    args = bl.parse(__doc__, configure, QUICK, check, argv)
    with bl.session("ckpt", args) as (work, payload):
        model_dir = bl.write_llama(
            work / f"{args.shape}-v{args.vocab}", args.shape, args.vocab, bl.tiny_model(work / "tiny")
        )
        shutil.rmtree(work / "io", ignore_errors=True)
        (work / "io").mkdir()
        cmd = bl.worker_cmd("bench_ckpt.py", "io_worker", model_dir, work / "io", args.repeats, nproc=2)
        job = bl.run(cmd, log=work / "io.log").check()
        shutil.rmtree(work / "io")
        payload.update(io=job.results()[0], io_job_wall_s=job.wall)
        payload["io_summary"] = report_io(args, payload["io"])
        runs = []
        if args.step_repeats:
            dataset = bl.prepare_dataset(work)
            shutil.rmtree(work / "train", ignore_errors=True)
            for r in range(args.step_repeats):
                for mode in ("blocking", "async", "end only"):  # alternating
                    runs.append(training_run(args, work, dataset, model_dir, mode, r))
                    print(f"  {mode}: loop {runs[-1]['loop_s']:.1f}s, {runs[-1]['saves']} saves", flush=True)
            report_training(args, runs)
        payload["training_runs"] = runs
    return 0


if __name__ == "__main__":
    sys.exit(main())
