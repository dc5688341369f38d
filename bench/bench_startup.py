"""Re-run start-up: how long a resumed fsdp_train.py job takes to reach its first step, vs a bare torchrun job that
only imports torch + transformers and joins a gloo process group.

    .venv/bin/python bench/bench_startup.py [--repeats 3] [--shapes small,medium] [--vocab 32000] [--steps 2]
        [--workdir DIR] [--keep]

For each shape (small: hidden 256, 4 layers; medium: hidden 768, 6 layers; random-init Llamas with the tokenizer
`model_download.py --tiny` trains) one fresh run trains --steps steps on the bundled data and checkpoints; then each
repeat runs, alternately, the bare job and the same command with --stop-at-step one higher, which resumes from the
newest checkpoint (the tokenized data cache in SAVE_DIR/.cache is reused). Every output line is stamped with its
arrival time after launch (the log's own timestamps have 1 s resolution), which gives the breakdown:
launch -> "Config" (torchrun, imports, process group, model config, tokenizer) -> "Using tokenized ... cache" ->
"Device mesh" (meta build) -> "Resuming from step" (shard allocation, optimizer, DCP load) -> "... params" ->
"Start-up took" (the loop starts) -> first "step" line (first step done).
Target: resumed launch -> "Start-up took" <= 2x bare launch -> process group ready.

Prints markdown tables; the full record goes to bench/results/bench_startup-<time>.json.
"""

from __future__ import annotations

import argparse
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
    Timed,
    build_tokenizer,
    machine,
    median,
    prepare_dataset,
    run_timed,
    save_results,
    table,
    verdict,
    write_llama,
)

# (label, pattern of the line that marks the moment in rank 0's output), in the order train() logs them.
MILESTONES = [
    ("config", r"Config \{"),
    ("data", r"tokenized train data cache|Tokenized .* train"),
    ("mesh", r"Device mesh"),
    ("resumed", r"Resuming from step"),
    ("params", r" params, "),
    ("startup", r"Start-up took"),
]
STEP_LINE = re.compile(r"step \d+/\d+ \|")


def bare_worker() -> None:
    """What every torchrun job pays before any work: the imports and the gloo rendezvous."""
    t0 = time.perf_counter()
    import torch
    import torch.distributed as dist
    import transformers  # noqa: F401

    t_import = time.perf_counter() - t0
    dist.init_process_group("gloo")
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"BARE ready: imports {t_import:.2f}s, init {time.perf_counter() - t0 - t_import:.2f}s", flush=True)
        # Not part of the bare time: what fsdp_train.py imports on top (transformers' import above is lazy).
        t1 = time.perf_counter()
        import datasets  # noqa: F401
        from transformers import AutoTokenizer  # noqa: F401
        from transformers.models.llama import modeling_llama  # noqa: F401

        print(
            f"BARE extra imports (datasets, AutoTokenizer, modeling_llama) {time.perf_counter() - t1:.2f}s", flush=True
        )
    dist.barrier()
    dist.destroy_process_group()
    del torch


def milestones(run: Timed) -> dict[str, float | None]:
    """Arrival seconds of each milestone line, the first step line, and the Start-up value train() logs."""
    found = {
        label: next((t for t, line in run.lines if re.search(pattern, line)), None) for label, pattern in MILESTONES
    }
    step = next((t for t, line in run.lines if STEP_LINE.search(line)), None)
    took = re.search(r"Start-up took ([\d.]+)s", run.output)
    rss = re.search(r"peak_rss_gib ([\d.]+)", run.output)
    # train() measures from its entry: what came before it is torchrun, interpreter, imports, process group.
    entry = found["startup"] - float(took[1]) if took and found["startup"] is not None else None
    return {
        "entry": entry,
        **found,
        "first_step": step,
        "startup_logged_s": float(took[1]) if took else None,
        "peak_rss_gib_rank0": float(rss[1]) if rss else None,
        "retokenized": "Tokenized " in run.output,
    }


def train_cmd(dataset: Path, model_dir: Path, save_dir: Path, exp: str, steps: int) -> list[str]:
    args = ["-e", exp, "-d", dataset, "-m", model_dir, "--save-dir", save_dir, "-s", "128", "-b", "2"]
    args += ["--log-freq", "1", "--warmup-steps", "1", "--stop-at-step", steps]
    return [*TORCHRUN, str(ROOT / "fsdp_train.py"), *map(str, args)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="resumed runs per shape, each after a bare job (3)")
    p.add_argument("--shapes", default="small,medium", help=f"comma-separated, of {sorted(SHAPES)} (small,medium)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary rows; 0: the tiny tokenizer's (32000)")
    p.add_argument("--steps", type=int, default=2, help="--stop-at-step of the first run (default 2)")
    p.add_argument("--workdir", type=Path, help="keep models, data and runs here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="do not delete the temp dir")
    p.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bare_worker:
        bare_worker()
        return 0
    shapes = args.shapes.split(",")
    if args.repeats < 1 or args.steps < 1 or not set(shapes) <= set(SHAPES):
        p.error(f"need --repeats >= 1, --steps >= 1 and --shapes from {sorted(SHAPES)}")

    t_start = time.perf_counter()
    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="bench-startup-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    start = machine()
    print(f"workdir {work}, load average {start['loadavg']}", flush=True)
    tokenizer = build_tokenizer(work / "tiny")
    dataset = prepare_dataset(work)
    models = {s: write_llama(work / f"{s}-v{args.vocab}", s, args.vocab, tokenizer) for s in shapes}
    save_dir, logs = work / "train", work / "logs"
    shutil.rmtree(save_dir, ignore_errors=True)
    logs.mkdir(exist_ok=True)

    fresh = {}
    for s in shapes:  # the first shape also tokenizes; the cache is keyed by data + tokenizer, so the next reuses it
        run = run_timed(train_cmd(dataset, models[s], save_dir, s, args.steps), log=logs / f"{s}-fresh.log").check()
        fresh[s] = {"wall_s": run.wall, **milestones(run)}
        print(f"  fresh {s}: start-up line at {fresh[s]['startup']:.2f}s", flush=True)

    bare_cmd = [*TORCHRUN, str(ROOT / "bench" / "bench_startup.py"), "--bare-worker"]
    bare, resumed = [], {s: [] for s in shapes}
    for r in range(args.repeats):
        for s in shapes:  # bare, resume A, bare, resume B, ...
            run = run_timed(bare_cmd, log=logs / f"bare-{r}-{s}.log").check()
            hit = run.first("BARE ready")
            extra = re.search(r"BARE extra imports .* ([\d.]+)s", run.output)
            bare.append({"ready": hit[0], "wall_s": run.wall, "extra_imports_s": float(extra[1]) if extra else None})
            steps = args.steps + 1 + r  # one step further each time: every run resumes from the previous one
            run = run_timed(train_cmd(dataset, models[s], save_dir, s, steps), log=logs / f"{s}-resume-{r}.log").check()
            resumed[s].append({"wall_s": run.wall, "max_steps": steps, **milestones(run)})
            print(
                f"  bare ready {bare[-1]['ready']:.2f}s | resumed {s}: start-up line {resumed[s][-1]['startup']:.2f}s",
                flush=True,
            )

    bare_ready = median([b["ready"] for b in bare])
    labels = ["entry"] + [label for label, _ in MILESTONES] + ["first_step"]
    rows, ratios = [], {}
    for s in shapes:
        med = {k: median([x[k] for x in resumed[s] if x[k] is not None]) for k in labels + ["startup_logged_s"]}
        ratios[s] = med["startup"] / bare_ready
        deltas, prev = [], 0.0
        for k in labels:
            deltas.append(med[k] - prev if med[k] == med[k] else float("nan"))
            prev = med[k] if med[k] == med[k] else prev
        rows.append([f"{s} resumed", *deltas, med["startup"], med["startup_logged_s"], f"{ratios[s]:.2f}x"])
        f = fresh[s]
        fresh_deltas, prev = [], 0.0
        for k in labels:
            fresh_deltas.append(f[k] - prev if f[k] is not None else float("nan"))
            prev = f[k] if f[k] is not None else prev
        tok = " (tokenizes)" if f["retokenized"] else ""
        rows.append([f"{s} fresh{tok}", *fresh_deltas, f["startup"], f["startup_logged_s"], f"{f['startup'] / bare_ready:.2f}x"])  # fmt: skip
    rows.append(["bare import+init", *[""] * len(labels), bare_ready, "", "1.00x"])
    heads = ["run", "launch->train()", "->config", "->data cache", "->mesh", "->resumed", "->params", "->start-up line"]
    heads += ["->first step done", "launch->start-up line", "'Start-up took'", "vs bare"]
    print(f"\n## re-run start-up, 2 ranks gloo, seconds (median of {args.repeats}; fresh: one run)\n")
    print(table(heads, rows))
    extra = median([b["extra_imports_s"] for b in bare if b["extra_imports_s"] is not None])
    print(
        f"\nbare torchrun + import torch, transformers + init_process_group: {bare_ready:.2f}s to ready (median); "
        f"importing datasets, AutoTokenizer and modeling_llama on top: {extra:.2f}s more"
    )
    with_imports = bare_ready + extra  # transformers' own import is lazy: the bare job skips what training loads
    for s in shapes:
        print(
            f"{s}: resumed / (bare + those imports {with_imports:.2f}s) = {ratios[s] * bare_ready / with_imports:.2f}x"
        )
    for s in shapes:
        retok = any(x["retokenized"] for x in resumed[s])
        rss_f, rss_r = fresh[s]["peak_rss_gib_rank0"], median([x["peak_rss_gib_rank0"] or 0 for x in resumed[s]])
        print(
            f"{s}: resumed/bare {verdict(ratios[s], 2.0, higher_is_better=False)}; re-tokenized on resume: "
            f"{'YES' if retok else 'no'}; rank-0 peak RSS at first step: fresh {rss_f} GiB, resumed {rss_r} GiB"
        )

    payload = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine_at_start": start,
        "bare": bare,
        "bare_ready_median_s": bare_ready,
        "fresh": fresh,
        "resumed": resumed,
        "resumed_vs_bare": ratios,
        "bare_extra_imports_median_s": extra,
        "total_s": time.perf_counter() - t_start,
    }
    print(f"\nresults: {save_results('bench_startup', payload)} ({payload['total_s']:.0f}s in all)")
    if not args.workdir and not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
