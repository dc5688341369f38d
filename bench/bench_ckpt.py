"""Checkpoint throughput: fsdp_train.py's save_checkpoint/load_checkpoint vs the disk's bandwidth, and what saves cost
a training run.

    python bench/bench_ckpt.py [--repeats 3] [--shape medium] [--vocab 32000] [--steps 12] [--every 4] [--step-repeats 2]

(1) Under torchrun (2 ranks, gloo) a random Llama with AdamW state is saved and loaded by the real save_checkpoint and
    load_checkpoint, alternating with the disk: each rank writes (fsync) and reads a file the size of its DCP shard,
    and rank 0 alone the whole size. GB/s = checkpoint bytes / seconds between barriers; "cold" reads follow
    posix_fadvise(DONTNEED). dcp.save alone shows what the rest of the save costs. Target: >= 50% of the disk.
(2) fsdp_train.py with --ckpt-freq --every, blocking and --async-checkpoint, vs one save at the end, alternating: the
    cost per extra save, and the step that coincides with a save vs the others.
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
RUNS = ("blocking", "async", "end only")


def configure(p) -> None:
    p.add_argument("--repeats", type=int, default=3, help="save/load rounds, each alternating with the disk (3)")
    p.add_argument("--shape", choices=sorted(bl.SHAPES), default="medium", help="Llama shape (medium)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary rows; 0: the tiny tokenizer's (32000)")
    p.add_argument("--steps", type=int, default=12, help="steps of each training run (12)")
    p.add_argument("--every", type=int, default=4, help="--ckpt-freq of the run that saves periodically (4)")
    p.add_argument("--step-repeats", type=int, default=2, help="training run triples, 0 to skip part 2 (2)")


def check(args) -> str | None:
    if args.repeats < 1 or args.step_repeats < 0 or not 1 <= args.every < args.steps:
        return "need --repeats >= 1, --step-repeats >= 0 and 1 <= --every < --steps"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# (1) Worker (one per rank, under torchrun)


def write_file(path: Path, nbytes: int, buf: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    while nbytes:
        nbytes -= os.write(fd, buf[: min(nbytes, len(buf))])
    os.fsync(fd)  # as DCP's FileSystemWriter (sync_files=True) does
    os.close(fd)


def read_file(path: Path, buf: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def drop_cache(root: Path) -> None:
    """Evict the (clean, fsynced) pages of every file under root from the page cache; no root user needed."""
    for p in [p for p in root.rglob("*") if p.is_file()]:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def io_worker(model_dir: str, work: str, repeats: int) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import fsdp_train as ft

    d, work, seconds = ft.setup_distributed(), Path(work), {}
    # fully_shard per block, as on GPUs (auto is one unit on CPU; the state dicts are the same)
    cfg = ft.Config(dataset_name="-", model_name=model_dir, save_dir=str(work), experiment_name="c", shard_unit="block")
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

    def timed(key: str, fn, *args, main_only: bool = False, **kwargs):
        """fn's result; its seconds, barrier to barrier (so the slowest rank's), go to seconds[key]."""
        ft.dist.barrier()
        t0 = time.perf_counter()
        result = fn(*args, **kwargs) if d.is_main or not main_only else None
        ft.dist.barrier()
        seconds.setdefault(key, []).append(time.perf_counter() - t0)
        return result

    def save(step: int) -> Path:
        return ft.save_checkpoint(cfg, d, model, optimizer, ft.TrainState(step=step), accum=1, schedule_steps=1000)

    def evict(path: Path) -> None:  # the page cache is shared: one rank evicts every file
        if d.is_main:
            drop_cache(path)

    def fresh(path: Path) -> Path:  # DCP writes new files: the baseline must not overwrite (truncate) old ones
        path.unlink(missing_ok=True)
        ft.dist.barrier()
        return path

    ckpt = save(1)  # warm-up (first-call imports and planning), then the sizes the baseline has to match
    mine = sum(p.stat().st_size for p in ckpt.glob(f"__{d.rank}_*.distcp"))
    total = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    buf = memoryview(bytearray(os.urandom(1 << 20) * (CHUNK >> 20)))  # incompressible, allocated once
    mine_file, whole_file, diag = work / f"disk-rank{d.rank}.bin", work / "disk-whole.bin", work / "diag"
    for r in range(repeats):
        timed("disk_write_parallel", write_file, fresh(mine_file), mine, buf)
        ckpt = timed("save_checkpoint", save, r + 2)
        timed("disk_write_single", write_file, fresh(whole_file), total, buf, main_only=True)
        evict(work)
        timed("disk_read_parallel_cold", read_file, mine_file, buf)
        evict(ckpt)
        timed("load_checkpoint_cold", ft.load_checkpoint, ckpt, d, model, optimizer)
        evict(work)
        timed("disk_read_single_cold", read_file, whole_file, buf, main_only=True)
        model_sd, optim_sd = get_state_dict(model, ft.dcp_optimizers(optimizer))
        if d.is_main:
            shutil.rmtree(diag, ignore_errors=True)
        state = {"model": model_sd, "optim": optim_sd, "buffers": ft.nonpersistent_buffers(model)}
        timed("dcp_save", dcp.save, state, checkpoint_id=diag)  # what save_checkpoint spends beyond DCP's own I/O
        del state, model_sd, optim_sd
    if d.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        bl.emit({"bytes": total, "params": n_params, "vocab": model.config.vocab_size, "seconds": seconds})
    ft.teardown_distributed()


IO_ROWS = {  # timing key: (what, the disk baseline it is compared with)
    "save_checkpoint": ("save_checkpoint (temp folder, DCP, RNG, fsync, marker, rename, prune)", "write"),
    "dcp_save": ("dcp.save alone", "write"),
    "disk_write_parallel": ("disk write, 2 ranks x shard, fsync", None),
    "disk_write_single": ("disk write, rank 0 x whole, fsync", None),
    "load_checkpoint_cold": ("load_checkpoint, cold", "cold read"),
    "disk_read_parallel_cold": ("disk read cold, 2 ranks x shard", None),
    "disk_read_single_cold": ("disk read cold, rank 0 x whole", None),
}


def report_io(args, io: dict) -> dict:
    gb = io["bytes"] / 1e9
    sec = {k: bl.median(v) for k, v in io["seconds"].items()}
    rate = {k: gb / s for k, s in sec.items()}
    disk = {"write": max(rate["disk_write_parallel"], rate["disk_write_single"])}
    disk["cold read"] = max(rate["disk_read_parallel_cold"], rate["disk_read_single_cold"])
    vs = {k: f"{rate[k] / disk[b]:.0%} of {b}" if b else "" for k, (_, b) in IO_ROWS.items()}
    rows = [[what, sec[k], rate[k], vs[k]] for k, (what, _) in IO_ROWS.items()]
    size = f"{args.shape}, vocab {io['vocab']}, {io['params'] / 1e6:.1f} M params, {gb:.2f} GB (model + AdamW)"
    print(f"\n## (1) checkpoint I/O: {size}, 2 ranks gloo (median of {args.repeats})\n")
    print(bl.table(["what", "s", "GB/s", "vs disk"], rows))
    shares = {"save_vs_disk_write": rate["save_checkpoint"] / disk["write"]}
    shares["load_cold_vs_disk_read"] = rate["load_checkpoint_cold"] / disk["cold read"]
    print(f"\nsave vs disk write {disk['write']:.2f} GB/s: {bl.verdict(shares['save_vs_disk_write'], 0.5)}")
    print(f"load (cold) vs disk read {disk['cold read']:.2f} GB/s: {bl.verdict(shares['load_cold_vs_disk_read'], 0.5)}")
    return {"median_s": sec, **shares}


# ----------------------------------------------------------------------------------------------------------------------
# (2) training runs with and without periodic saves


def found(job: bl.Job, pattern: str) -> list[tuple[float, float]]:
    """(arrival second, the number the pattern captured) of every output line that matches."""
    return [(t, float(m[1])) for t, line in job.lines if (m := re.search(pattern, line))]


def training_run(args, work: Path, dataset: Path, model_dir: Path, mode: str, r: int) -> dict:
    """One run: the loop (Start-up line -> the final save's line; every run ends with a save), the saves' seconds,
    and the gaps from step line k to k+1 split by whether k saved (step 1 -> 2 is warm-up, left out)."""
    freq, exp = 10**6 if mode == "end only" else args.every, f"{mode.replace(' ', '-')}-{r}"
    data = ["-e", exp, "-d", dataset, "-m", model_dir, "--save-dir", work / "train", "-s", 128, "-b", 1]
    loop = ["--log-freq", 1, "--warmup-steps", 1, "--max-steps", args.steps, "--ckpt-freq", freq]
    background = ["--async-checkpoint", "on" if mode == "async" else "off"]
    job = bl.run([*bl.torchrun(2), bl.ROOT / "fsdp_train.py", *data, *loop, *background]).check()
    shutil.rmtree(work / "train" / exp)
    saves = found(job, r"Saved checkpoint \S+ in ([\d.]+)s")
    at = {int(k): t for t, k in found(job, r"\] step (\d+)/")}
    gaps = {k: at[k + 1] - at[k] for k in range(2, args.steps) if k in at and k + 1 in at}
    saved = {"save_s": [s for _, s in saves], "paused_s": [s for _, s in found(job, r"training paused ([\d.]+)s")]}
    loop_s = saves[-1][0] - job.first("Start-up took")[0]
    on_save = [g for k, g in gaps.items() if k % freq == 0]
    steps = {"save_step_s": on_save, "other_step_s": [g for k, g in gaps.items() if k % freq]}
    return {"mode": mode, "saves": len(saves), "loop_s": loop_s, **saved, **steps}


def report_training(args, runs: list[dict]) -> None:
    by = {m: [x for x in runs if x["mode"] == m] for m in RUNS}
    loop = {m: bl.median(x["loop_s"] for x in by[m]) for m in RUNS}
    extra = by["blocking"][0]["saves"] - by["end only"][0]["saves"]
    per_save = {m: (loop[m] - loop["end only"]) / extra for m in RUNS[:2]}
    rows = []
    for m in RUNS:
        ms = [bl.median(v * 1e3 for x in by[m] for v in x[key]) for key in ("save_step_s", "other_step_s")]
        seconds = [bl.median(v for x in by[m] for v in x[key]) for key in ("save_s", "paused_s")]
        name = "end only" if m == "end only" else f"{m}, `--ckpt-freq {args.every}`"
        rows.append([name, by[m][0]["saves"], loop[m], per_save.get(m), *ms, *seconds])
    print(f"\n## (2) training {args.steps} steps, {args.shape}, -s 128 -b 1, 2 ranks (median of {args.step_repeats})\n")
    heads = ["run", "saves", "loop s", "s per extra save", "step with a save, ms", "other steps, ms"]
    print(bl.table([*heads, "save s (start to sealed)", "training paused, s"], rows))
    save_s = bl.median(by["blocking"][0]["save_s"])
    print(f"\nblocking: {per_save['blocking']:.2f}s per extra save vs one save {save_s:.2f}s")


def main(argv: list[str] | None = None) -> int:
    args = bl.parse(__doc__, configure, QUICK, check, argv)
    with bl.session("ckpt", args) as (work, payload):
        tiny = bl.tiny_model(work / "tiny")
        model_dir = bl.write_llama(work / f"{args.shape}-v{args.vocab}", bl.SHAPES[args.shape], args.vocab, tiny)
        shutil.rmtree(work / "io", ignore_errors=True)
        (work / "io").mkdir()
        cmd = bl.worker_cmd("bench_ckpt.py", "io_worker", model_dir, work / "io", args.repeats, nproc=2)
        job = bl.run(cmd, log=work / "io.log").check()
        shutil.rmtree(work / "io")
        payload.update(io=job.results()[0], io_job_wall_s=job.wall)
        payload["io_summary"] = report_io(args, payload["io"])
        runs = payload["training_runs"] = []
        dataset = bl.prepare_dataset(work) if args.step_repeats else None
        shutil.rmtree(work / "train", ignore_errors=True)
        for r in range(args.step_repeats):
            for mode in RUNS:  # alternating
                runs.append(training_run(args, work, dataset, model_dir, mode, r))
                print(f"  {mode}: loop {runs[-1]['loop_s']:.1f}s, {runs[-1]['saves']} saves", flush=True)
        if runs:
            report_training(args, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
