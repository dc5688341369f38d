"""Checkpoint throughput: fsdp_train.py's save_checkpoint/load_checkpoint vs the disk's bandwidth, and what saves cost
a training run.

    .venv/bin/python bench/bench_ckpt.py [--repeats 3] [--shape medium] [--vocab 32000] [--steps 12] [--every 4]
        [--step-repeats 2] [--workdir DIR] [--keep]

(1) Under torchrun (2 ranks, gloo) a random-init Llama (--shape, default medium: hidden 768, 6 layers; --vocab rows)
    is built by fsdp_train.build_model (meta device, fully_shard per block), given AdamW state by one optimizer step,
    and saved/loaded with the real save_checkpoint/load_checkpoint (folder, rename, marker, prune included).
    Alternating with them, in the same job, the disk baseline: each rank writes (with fsync) and reads back a file the
    size of its own DCP shard, concurrently as DCP does; and rank 0 alone streams the whole size. GB/s = checkpoint
    bytes (model + optimizer) / seconds between barriers. No root, so no drop_caches: "cold" reads come after
    posix_fadvise(DONTNEED) on every file read (empties this guest's page cache for them; a VM host may still cache),
    "warm" reads come straight after. Phases (get_state_dict, dcp.save, dcp.load, set_state_dict) are timed apart.
    Target: save and load >= 50% of the disk's bandwidth (the better of the two baselines).
(2) Training: fsdp_train.py on the bundled data with --ckpt-freq --every, blocking and --async-checkpoint, vs one
    save at the end only, alternately, --steps steps each. From the output's arrival times, the loop (Start-up line ->
    last save) is compared: is a run with n more saves slower by more than n x one save's duration (from the "Saved
    checkpoint ... in Xs" lines)? And what does the step that coincides with a save take (step line k -> k+1, k a
    save step), blocking vs async, against the other steps?

Prints markdown tables; the full record goes to bench/results/bench_ckpt-<time>.json.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (
    ROOT,
    SHAPES,
    TORCHRUN,
    build_tokenizer,
    dir_bytes,
    machine,
    median,
    prepare_dataset,
    run_timed,
    save_results,
    table,
    verdict,
    write_llama,
)

CHUNK = 64 << 20  # bytes per write/read call of the disk baseline


# ----------------------------------------------------------------------------------------------------------------------
# Worker (one per rank, under torchrun)


def call_by_name(fn, **available):
    """fsdp_train's internal signatures are being reworked: pass each parameter fn declares, by name."""
    params = inspect.signature(fn).parameters
    missing = [n for n, p in params.items() if p.default is p.empty and n not in available]
    if missing:
        raise SystemExit(f"{fn.__name__} now needs {missing}: update bench_ckpt.py")
    return fn(**{n: v for n, v in available.items() if n in params})


def write_file(path: Path, nbytes: int, buf: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left:
            left -= os.write(fd, buf[: min(left, len(buf))])
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


def worker(model_dir: Path, work: Path, repeats: int, out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import fsdp_train as ft

    d = ft.setup_distributed()
    # fully_shard per block, as on GPUs (auto is one unit on CPU; the state dicts are the same)
    cfg = ft.Config(
        dataset_name="unused", model_name=str(model_dir), save_dir=str(work), experiment_name="ckpt", shard_unit="block"
    )
    model = ft.build_model(cfg, d, load_pretrained=False)
    g = torch.Generator().manual_seed(d.rank)
    with torch.no_grad():
        for p in model.parameters():
            ft.local_shard(p).normal_(0, 0.02, generator=g)
    built = call_by_name(ft.build_optimizer, model=model, cfg=cfg, d=d, total_steps=1000)
    optimizer, scheduler = built if isinstance(built, tuple) else (built, None)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # one step with zero gradients: AdamW's exp_avg/exp_avg_sq exist, as in a real checkpoint
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    optims = getattr(ft, "dcp_optimizers", lambda o: o)(optimizer)

    rec: dict[str, list[float]] = {}

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
        state = ft.TrainState(step=step)
        return call_by_name(
            ft.save_checkpoint, cfg=cfg, d=d, model=model, optimizer=optimizer, scheduler=scheduler, state=state,
            accum=1, schedule_steps=1000,
        )  # fmt: skip

    def load(path: Path) -> None:
        call_by_name(ft.load_checkpoint, path=path, d=d, model=model, optimizer=optimizer, scheduler=scheduler)

    def drop_all(path: Path) -> None:  # the page cache is shared: one rank evicts every file
        on_main(drop_cache, [p for p in path.rglob("*") if p.is_file()])

    # Warm-up save (first-call imports and planning), then the sizes the baseline has to match.
    ckpt = save(1)
    mine = sum(p.stat().st_size for p in ckpt.glob(f"__{d.rank}_*.distcp"))
    total = dir_bytes(ckpt)
    buf = memoryview(bytearray(os.urandom(1 << 20) * (CHUNK >> 20)))  # incompressible, allocated once
    mine_file, whole_file, diag = work / f"disk-rank{d.rank}.bin", work / "disk-whole.bin", work / "diag"

    def fresh(path: Path) -> Path:  # DCP writes new files: the baseline must not overwrite (truncate) old ones
        path.unlink(missing_ok=True)
        dist.barrier()
        return path

    for r in range(repeats):
        timed("disk_write_parallel", write_file, fresh(mine_file), mine, buf)
        ckpt = timed("save_checkpoint", save, r + 2)
        timed("disk_write_single", on_main, write_file, fresh(whole_file), total, buf)
        drop_all(work)
        timed("disk_read_parallel_cold", read_file, mine_file, buf)
        drop_all(ckpt)
        timed("load_checkpoint_cold", load, ckpt)
        timed("disk_read_parallel_warm", read_file, mine_file, buf)
        timed("load_checkpoint_warm", load, ckpt)
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
        info = {"bytes": total, "rank0_shard_bytes": mine, "params": n_params, "vocab": model.config.vocab_size}
        out.write_text(json.dumps({**info, "seconds": rec}))
    ft.teardown_distributed()


# ----------------------------------------------------------------------------------------------------------------------
# (2) training runs with and without periodic saves


SAVED = re.compile(r"Saved checkpoint \S+ in ([\d.]+)s")
PAUSED = re.compile(r"training paused ([\d.]+)s")
STEP_LINE = re.compile(r"\] step (\d+)/")


def step_gaps(lines: list[tuple[float, str]], freq: int, steps: int) -> tuple[list[float], list[float]]:
    """Seconds from step line k to k+1: (k a save step, so the gap holds that save or its staging; the others).
    Step 1 -> 2 is left out (warm-up)."""
    at = {int(m[1]): t for t, line in lines if (m := STEP_LINE.search(line))}
    gaps = {k: at[k + 1] - at[k] for k in range(2, steps) if k in at and k + 1 in at}
    return [g for k, g in gaps.items() if k % freq == 0], [g for k, g in gaps.items() if k % freq]


def training_run(
    dataset: Path, model_dir: Path, save_dir: Path, exp: str, steps: int, freq: int, async_save: bool = False
) -> dict:
    args = ["-e", exp, "-d", dataset, "-m", model_dir, "--save-dir", save_dir, "-s", "128", "-b", "1"]
    args += ["--log-freq", "1", "--warmup-steps", "1", "--max-steps", steps, "--ckpt-freq", freq]
    args += ["--async-checkpoint", "on" if async_save else "off"]
    run = run_timed([*TORCHRUN, str(ROOT / "fsdp_train.py"), *map(str, args)]).check()
    ready = run.first("Start-up took")
    saves = [(t, float(m[1])) for t, line in run.lines if (m := SAVED.search(line))]
    paused = [float(m[1]) for _, line in run.lines if (m := PAUSED.search(line))]
    metrics = [json.loads(x) for x in (save_dir / exp / "metrics.jsonl").read_text().splitlines()]
    steps_ms = [m["time/total"] for m in metrics if m["global_step"] > 1]  # step 1 warms up
    save_gaps, other_gaps = step_gaps(run.lines, freq, steps)
    return {
        "exp": exp,
        "ckpt_freq": freq,
        "async": async_save,
        "save_step_s": save_gaps,
        "other_step_s": other_gaps,
        "paused_s": paused,
        "wall_s": run.wall,
        "cpu_s": run.cpu,
        "loop_s": saves[-1][0] - ready[0],  # Start-up line -> the final save's line (both runs end with a save)
        "saves": len(saves),
        "save_s": [s for _, s in saves],
        "median_step_ms": median(steps_ms),
        "step_ms": steps_ms,
    }


# ----------------------------------------------------------------------------------------------------------------------
# main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="save/load rounds, each alternating with the disk (3)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="medium", help="Llama shape (default medium)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary rows; 0: the tiny tokenizer's (32000)")
    p.add_argument("--steps", type=int, default=12, help="steps of each training run (default 12)")
    p.add_argument("--every", type=int, default=4, help="--ckpt-freq of the run that saves periodically (default 4)")
    p.add_argument("--step-repeats", type=int, default=2, help="training run pairs, 0 to skip part 2 (default 2)")
    p.add_argument("--workdir", type=Path, help="keep model, data and checkpoints here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="do not delete the temp dir")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # torchrun entry: the JSON file to write
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.model_dir, args.workdir, args.repeats, args.worker)
        return 0
    if args.repeats < 1 or args.step_repeats < 0 or not 1 <= args.every < args.steps:
        p.error("need --repeats >= 1, --step-repeats >= 0 and 1 <= --every < --steps")

    t_start = time.perf_counter()
    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    start = machine()
    print(f"workdir {work}, load average {start['loadavg']}", flush=True)
    tokenizer = build_tokenizer(work / "tiny")
    model_dir = write_llama(work / f"{args.shape}-v{args.vocab}", args.shape, args.vocab, tokenizer)

    io_dir, io_json = work / "io", work / "io.json"
    shutil.rmtree(io_dir, ignore_errors=True)
    io_dir.mkdir()
    cmd = [*TORCHRUN, str(ROOT / "bench" / "bench_ckpt.py"), "--worker", str(io_json), "--model-dir", str(model_dir)]
    cmd += ["--workdir", str(io_dir), "--repeats", str(args.repeats)]
    job = run_timed(cmd, log=work / "io.log").check()
    io = json.loads(io_json.read_text())
    shutil.rmtree(io_dir)
    gb = io["bytes"] / 1e9
    sec = {k: median(v) for k, v in io["seconds"].items()}

    def rate(key: str) -> float:
        return gb / sec[key]

    disk_w = max(rate("disk_write_parallel"), rate("disk_write_single"))
    disk_r = max(rate("disk_read_parallel_cold"), rate("disk_read_single_cold"))
    rows = [
        ["save_checkpoint (fsdp_train)", sec["save_checkpoint"], rate("save_checkpoint"), f"{rate('save_checkpoint') / disk_w:.0%} of write"],
        ["  get_state_dict", sec["get_state_dict"], "", ""],
        ["  dcp.save alone", sec["dcp_save"], rate("dcp_save"), f"{rate('dcp_save') / disk_w:.0%} of write"],
        ["  rmtree of one checkpoint (prune)", sec.get("rmtree_checkpoint", float("nan")), "", ""],
        ["disk write, 2 ranks x shard, fsync", sec["disk_write_parallel"], rate("disk_write_parallel"), ""],
        ["disk write, rank 0 x whole, fsync", sec["disk_write_single"], rate("disk_write_single"), ""],
        ["load_checkpoint cold (fsdp_train)", sec["load_checkpoint_cold"], rate("load_checkpoint_cold"), f"{rate('load_checkpoint_cold') / disk_r:.0%} of cold read"],
        ["  dcp.load alone, cold", sec["dcp_load_cold"], rate("dcp_load_cold"), f"{rate('dcp_load_cold') / disk_r:.0%} of cold read"],
        ["  set_state_dict", sec["set_state_dict"], "", ""],
        ["disk read cold, 2 ranks x shard", sec["disk_read_parallel_cold"], rate("disk_read_parallel_cold"), ""],
        ["disk read cold, rank 0 x whole", sec["disk_read_single_cold"], rate("disk_read_single_cold"), ""],
        ["load_checkpoint warm (page cache)", sec["load_checkpoint_warm"], rate("load_checkpoint_warm"), f"{rate('load_checkpoint_warm') / rate('disk_read_parallel_warm'):.0%} of warm read"],
        ["disk read warm, 2 ranks x shard", sec["disk_read_parallel_warm"], rate("disk_read_parallel_warm"), ""],
    ]  # fmt: skip
    dims = SHAPES[args.shape]
    print(
        f"\n## (1) checkpoint I/O: {args.shape} Llama (hidden {dims['hidden_size']}, {dims['num_hidden_layers']} "
        f"layers, vocab {io['vocab']}), {io['params'] / 1e6:.1f} M params, checkpoint {gb:.2f} GB (model + AdamW), "
        f"2 ranks gloo (median of {args.repeats})\n"
    )
    print(table(["what", "s", "GB/s", "vs disk"], rows))
    save_share, load_share = rate("save_checkpoint") / disk_w, rate("load_checkpoint_cold") / disk_r
    print(f"\nsave vs disk write {disk_w:.2f} GB/s: {verdict(save_share, 0.5)}")
    print(f"load (cold) vs disk read {disk_r:.2f} GB/s: {verdict(load_share, 0.5)}")
    print("(cold = after posix_fadvise DONTNEED in this VM; the host may still cache, so 'disk' read may be RAM speed)")

    runs = []
    if args.step_repeats:
        dataset = prepare_dataset(work)
        save_dir = work / "train"
        shutil.rmtree(save_dir, ignore_errors=True)
        # alternating; 10**6: only the save at the end (blocking: --async-checkpoint waits for it anyway)
        modes = {"blocking": (args.every, False), "async": (args.every, True), "end only": (10**6, False)}
        for r in range(args.step_repeats):
            for mode, (freq, async_save) in modes.items():
                exp = f"{mode.replace(' ', '-')}-{r}"
                runs.append(training_run(dataset, model_dir, save_dir, exp, args.steps, freq, async_save))
                runs[-1]["mode"] = mode
                print(f"  {mode}: loop {runs[-1]['loop_s']:.1f}s, {runs[-1]['saves']} saves", flush=True)
                shutil.rmtree(save_dir / exp)
        by = {m: [x for x in runs if x["mode"] == m] for m in modes}
        loop = {m: median([x["loop_s"] for x in by[m]]) for m in modes}
        extra = by["blocking"][0]["saves"] - by["end only"][0]["saves"]

        def pooled(mode: str, key: str) -> float:
            return median([v for x in by[mode] for v in x[key]]) if any(x[key] for x in by[mode]) else float("nan")

        rows2 = [
            [
                f"--ckpt-freq {args.every}" if m != "end only" else "end only",
                by[m][0]["saves"],
                m,
                loop[m],
                (loop[m] - loop["end only"]) / extra if m != "end only" else "",
                pooled(m, "save_step_s") * 1e3 if m != "end only" else "",
                pooled(m, "other_step_s") * 1e3,
                pooled(m, "save_s"),
                pooled(m, "paused_s") if m == "async" else "",
                median([x["cpu_s"] for x in by[m]]),
            ]
            for m in modes
        ]
        print(
            f"\n## (2) training {args.steps} steps, {args.shape}, -s 128 -b 1, 2 ranks "
            f"(median of {args.step_repeats} runs each)\n"
        )
        heads = ["run", "saves", "mode", "loop s", "s per extra save", "save step ms", "other steps ms",
                 "median save s (start to sealed)", "training paused s", "job CPU s"]  # fmt: skip
        print(table(heads, rows2))
        save_s = pooled("blocking", "save_s")
        per_save = (loop["blocking"] - loop["end only"]) / extra
        inflated = per_save > 1.1 * save_s
        print(
            f"\nblocking: cost per extra save {per_save:.2f}s vs one save {save_s:.2f}s: "
            f"{'INFLATED beyond the save itself' if inflated else 'not inflated beyond the save itself'}; "
            f"async: {(loop['async'] - loop['end only']) / extra:.2f}s per extra save"
        )

    payload = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine_at_start": start,
        "io": io,
        "io_median_s": sec,
        "io_job_wall_s": job.wall,
        "save_vs_disk_write": save_share,
        "load_cold_vs_disk_read": load_share,
        "training_runs": runs,
        "total_s": time.perf_counter() - t_start,
    }
    print(f"\nresults: {save_results('bench_ckpt', payload)} ({payload['total_s']:.0f}s in all)")
    if not args.workdir and not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
