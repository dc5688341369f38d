"""Memory: what each memory-saving option of fsdp_train.py saves (measured vs `fsdp_train.py plan`), and how the
sharded per-rank state shrinks with the number of ranks.

    .venv/bin/python bench/bench_memory.py [--repeats 1] [--modes baseline,ac,adafactor,in-backward,pure-bf16]
        [--shapes 8x512,1x64] [--ranks 1,2,4] [--accum-shapes 1x64,4x256] [--accum-steps 6]
        [--parts modes,scaling,accum] [--workdir DIR] [--keep]

(1) Modes. The `small` Llama (hidden 256, 4 layers, vocab 4096, tokenizer trained on data/ by model_download.py
    --tiny) trains 3 steps on the bundled data, 2 ranks on CPU (gloo), once per mode and --repeats times, modes
    alternating. Each mode adds one saver to the one above it:
      baseline     --activation-checkpointing off, adamw
      ac           + activation checkpointing
      adafactor    + --optimizer adafactor
      in-backward  + --optimizer-in-backward on --max-norm 0
      pure-bf16    + --pure-bf16 on
    Measured: the max over steps of `mem/train_peak_gib` in metrics.jsonl (rank 0's peak RSS minus its RSS just
    before the model was built), median over repeats. The runs get MALLOC_MMAP_THRESHOLD_=65536 so that glibc hands
    freed buffers back at once; with its default threshold the peak RSS keeps freed heap and overstates live memory.
    Planned: `fsdp_train.py plan --nproc 2 --device cpu --json` with the same flags ("as given" peak). Two shapes: an
    activation-heavy one (-b 8 -s 512) and a weight-heavy one (-b 1 -s 64), where the optimizer state counts.
(2) Scaling. Under torchrun with N ranks (gloo, CPU) this script's --worker builds the `medium` Llama shape (hidden
    768, 6 layers, intermediate 2048, vocab 32000) with fsdp_train.build_model + build_optimizer, runs one forward,
    backward and optimizer step on random tokens and sums, per rank, the bytes of the distinct local storages
    (DTensor.to_local(), FSDP padding included) of the parameters, of the gradients (right after backward, before the
    step clears them) and of the optimizer state (after the step). Reported: the max over ranks for N = --ranks.
    Target: per-rank bytes <= 1.10 x (1-rank bytes / N).
(3) Gradient accumulation. The `small` Llama (as in (1)), 2 ranks, `--grad-accum-steps 4`, adamw, activation
    checkpointing on, --accum-steps optimizer steps (--log-freq 1), once per variant and --repeats times, alternating:
      sharded      the default: FSDP reduce-scatters every micro-batch, the accumulated gradient stays sharded
      unsharded    --accumulate-unsharded on: no gradient sync on the first 3 micro-batches, so every rank holds
                   every parameter's full fp32 gradient until the 4th reduce-scatters it
    Measured as in (1): max over steps of rank 0's `mem/train_peak_gib` (same MALLOC_MMAP_THRESHOLD_), and the
    median over steps >= 2 of metrics.jsonl's per-step `tok/s` (step 1 pays warm-up); medians over repeats, and the
    ratio to sharded per repeat (the two ran one after the other), then median'd. Planned:
    `fsdp_train.py plan --nproc 2 --device cpu --json` with the same flags ("as given" peak and gradient bytes).
    Shapes: --accum-shapes, per-micro-batch BATCHxSEQ (the weight-heavy 1x64, where the gradients count, and 4x256).

Prints markdown tables; the full record goes to bench/results/memory-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (
    ROOT,
    TORCHRUN,
    machine,
    median,
    prepare_dataset,
    python,
    run_timed,
    save_results,
    table,
    verdict,
    write_llama,
)

MIB = 2**20
# glibc serves allocations above this from mmap and returns them on free, so RSS tracks live memory (see docstring).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
STEPS = 3
# Per-block units, as the modes work on GPUs: on CPU --shard-unit auto is one unit, which holds every unsharded
# gradient (no saving for in-backward or sharded accumulation to show) and which the planner would plan differently.
PER_BLOCK = ["--shard-unit", "block"]

# (key, label, flags): each mode keeps the savers of the ones before it.
MODES = [
    ("baseline", "baseline (AC off, adamw)", ["--activation-checkpointing", "off", "--optimizer", "adamw"]),
    ("ac", "+ activation checkpointing", ["--activation-checkpointing", "on", "--optimizer", "adamw"]),
    ("adafactor", "+ adafactor", ["--activation-checkpointing", "on", "--optimizer", "adafactor"]),
    (
        "in-backward",
        "+ optimizer-in-backward",
        ["--activation-checkpointing", "on", "--optimizer", "adafactor", "--optimizer-in-backward", "on"]
        + ["--max-norm", "0"],
    ),
    (
        "pure-bf16",
        "+ pure bf16",
        ["--activation-checkpointing", "on", "--optimizer", "adafactor", "--optimizer-in-backward", "on"]
        + ["--max-norm", "0", "--pure-bf16", "on"],
    ),
]
SHAPE_NAMES = {(8, 512): "activation-heavy", (1, 64): "weight-heavy"}


# ----------------------------------------------------------------------------------------------------------------------
# Scaling worker (one per rank, under torchrun)


def storage_bytes(tensors) -> tuple[int, int]:
    """(bytes of the distinct storages under these tensors' local shards, bytes of the elements themselves).

    FSDP2 pads each shard to an even split and may hand out several gradients as views of one reduce-scatter buffer,
    so storages are counted once each, whole: the first number is what the rank really holds, the gap is padding.
    """
    from fsdp_train import local_shard as local

    seen, held, used = set(), 0, 0
    for t in tensors:
        x = local(t)
        used += x.numel() * x.element_size()
        storage = x.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            held += storage.nbytes()
    return held, used


def optimizer_tensors(optimizer):
    """Every tensor of the optimizer state (AdamW moments and step counts, Adafactor factors), of one optimizer or
    of the per-parameter ones --optimizer-in-backward makes."""
    import torch

    from fsdp_train import dcp_optimizers

    opts = dcp_optimizers(optimizer)
    for opt in opts if isinstance(opts, list) else [opts]:
        for state in opt.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def scaling_worker(model_dir: str, batch: int, seq: int, flags: list[str]) -> None:
    """Build, run one training step, and report this job's per-rank local storage bytes from rank 0 as one line."""
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.distributed as dist

    import fsdp_train as ft

    d = ft.setup_distributed()
    try:
        cfg = ft.parse_args(["-d", "-", "-m", model_dir, "-b", str(batch), "-s", str(seq), *PER_BLOCK, *flags])
        # Real weights (rank 0 reads and broadcasts them): to_empty leaves garbage, whose NaNs and denormals would
        # make the step slow and the non-persistent rotary buffers wrong.
        model = ft.build_model(cfg, d, load_pretrained=True)
        optimizer = ft.build_optimizer(model, cfg, d)
        params = [p for p in model.parameters() if p.requires_grad]
        torch.manual_seed(d.rank)
        ids = torch.randint(model.config.vocab_size, (batch, seq), device=d.device)
        ft.set_lr(optimizer, cfg.lr)
        model(input_ids=ids, labels=ids).loss.backward()
        grads = storage_bytes(p.grad for p in params if p.grad is not None)  # before optimizer_step frees them
        ft.optimizer_step(optimizer, params, cfg)
        mine = {
            "rank": d.rank,
            "params": storage_bytes(params),
            "grads": grads,
            "optimizer": storage_bytes(optimizer_tensors(optimizer)),
        }
        everyone = [None] * d.world_size
        dist.all_gather_object(everyone, mine)
        if d.is_main:
            print("SCALING " + json.dumps({"world_size": d.world_size, "ranks": everyone}), flush=True)
    finally:
        ft.teardown_distributed()


# ----------------------------------------------------------------------------------------------------------------------
# Planner


def plan(model: Path, nproc: int, batch: int, seq: int, flags: list[str]) -> dict:
    """`fsdp_train.py plan ... --json`'s "as given" estimate (bytes per rank)."""
    cmd = python("fsdp_train.py", "plan", "-m", model, "--nproc", nproc, "-b", batch, "-s", seq, "--device", "cpu")
    cmd += PER_BLOCK
    run = run_timed([*cmd, *flags, "--json"]).check()
    return json.loads(run.output.strip().splitlines()[-1])["plans"]["as given"]


# ----------------------------------------------------------------------------------------------------------------------
# Part 1: memory-saving modes


def measured_peak(metrics: Path) -> float:
    """Max over the logged steps of mem/train_peak_gib, in bytes."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return max(r["mem/train_peak_gib"] for r in rows) * 2**30


def run_modes(args, model: Path, dataset: Path, work: Path) -> dict:
    modes = [m for m in MODES if m[0] in args.modes]
    save_dir, logs = work / "runs", work / "logs"
    logs.mkdir(exist_ok=True)
    results = {}
    for batch, seq in args.shapes:
        key = f"{batch}x{seq}"
        runs: dict[str, list[float]] = {m[0]: [] for m in modes}
        for r in range(args.repeats):
            for name, _, flags in modes:  # alternating, so a change in load hits every mode alike
                exp = f"{name}-{key}-{r}"
                cmd = [*TORCHRUN, ROOT / "fsdp_train.py", "-e", exp, "-d", dataset, "-m", model, "--save-dir", save_dir]
                cmd += ["-b", batch, "-s", seq, "--max-steps", STEPS, "--log-freq", 1, "--warmup-steps", 1]
                cmd += PER_BLOCK
                cmd += ["--tensorboard", "off", "--ckpt-freq", 0, *flags]
                run = run_timed(cmd, env=MALLOC_ENV, log=logs / f"{exp}.log").check()
                runs[name].append(measured_peak(save_dir / exp / "metrics.jsonl"))
                shutil.rmtree(save_dir / exp)  # the checkpoint and export are not needed (the data cache stays)
                print(f"  {key} {name} #{r}: {runs[name][-1] / MIB:.1f} MiB ({run.wall:.0f}s)", flush=True)
        plans = {name: plan(model, 2, batch, seq, flags) for name, _, flags in modes}
        results[key] = {
            name: {"flags": flags, "measured_bytes": runs[name], "measured_median_bytes": median(runs[name]),
                   "plan": plans[name]}
            for name, _, flags in modes
        }  # fmt: skip
    return results


def report_modes(args, results: dict) -> None:
    labels = {name: label for name, label, _ in MODES}
    for key, by_mode in results.items():
        batch, seq = map(int, key.split("x"))
        print(f"\n## {SHAPE_NAMES.get((batch, seq), key)}: small model, -b {batch} -s {seq}, 2 ranks CPU, per rank, "
              f"MiB (measured: median of {args.repeats})\n")  # fmt: skip
        base = by_mode.get("baseline")
        rows = []
        for name, m in by_mode.items():
            meas, est = m["measured_median_bytes"], m["plan"]["peak"]
            row = [labels[name], meas / MIB, f"{est / MIB:.1f}", f"{est / meas:.2f}", m["plan"]["peak at"]]
            if base:
                row += [f"{1 - meas / base['measured_median_bytes']:+.0%}", f"{1 - est / base['plan']['peak']:+.0%}"]
            rows.append(row)
        heads = ["mode", "measured peak", "planned peak", "plan/measured", "planned peak at"]
        heads += ["saved vs baseline (measured)", "saved (planned)"] if base else []
        print(table(heads, rows))


# ----------------------------------------------------------------------------------------------------------------------
# Part 3: gradient accumulation, sharded vs unsharded

ACCUM = 4
ACCUM_VARIANTS = [
    ("sharded", "sharded (default: reduce-scatter per micro-batch)", ["--grad-accum-steps", ACCUM]),
    ("unsharded", "--accumulate-unsharded on", ["--grad-accum-steps", ACCUM, "--accumulate-unsharded", "on"]),
]


def run_accum(args, model: Path, dataset: Path, work: Path) -> dict:
    save_dir, logs = work / "runs", work / "logs"
    results = {}
    for batch, seq in args.accum_shapes:
        key = f"{batch}x{seq}"
        runs: dict[str, list[dict]] = {v[0]: [] for v in ACCUM_VARIANTS}
        for r in range(args.repeats):
            for name, _, flags in ACCUM_VARIANTS:  # alternating, so a change in load hits both alike
                exp = f"accum-{name}-{key}-{r}"
                cmd = [*TORCHRUN, ROOT / "fsdp_train.py", "-e", exp, "-d", dataset, "-m", model, "--save-dir", save_dir]
                cmd += ["-b", batch, "-s", seq, "--max-steps", args.accum_steps, "--log-freq", 1, "--warmup-steps", 1]
                cmd += PER_BLOCK
                cmd += ["--tensorboard", "off", "--ckpt-freq", 0, *flags]
                run = run_timed(cmd, env=MALLOC_ENV, log=logs / f"{exp}.log").check()
                rows = [json.loads(x) for x in (save_dir / exp / "metrics.jsonl").read_text().splitlines() if x.strip()]
                rec = {
                    "peak_bytes": max(x["mem/train_peak_gib"] for x in rows) * 2**30,
                    "tok_s": median([x["tok/s"] for x in rows if x["global_step"] >= 2]),
                    "losses": [x["loss"] for x in rows],
                    "wall_s": run.wall,
                }
                runs[name].append(rec)
                shutil.rmtree(save_dir / exp)
                print(f"  accum {key} {name} #{r}: {rec['peak_bytes'] / MIB:.1f} MiB, {rec['tok_s']:,.0f} tok/s "
                      f"({run.wall:.0f}s)", flush=True)  # fmt: skip
        results[key] = {
            name: {
                "flags": [str(f) for f in flags],
                "runs": runs[name],
                "peak_median_bytes": median([x["peak_bytes"] for x in runs[name]]),
                "tok_s_median": median([x["tok_s"] for x in runs[name]]),
                "plan": plan(model, 2, batch, seq, [str(f) for f in flags]),
            }
            for name, _, flags in ACCUM_VARIANTS
        }
    return results


def loss_gap(runs: list[dict], base: list[dict]) -> float:
    """Max |loss - the sharded run's loss| over the steps of runs of the same repeat (the maths is the same)."""
    pairs = zip(runs, base, strict=True)
    return max(abs(a - b) for x, y in pairs for a, b in zip(x["losses"], y["losses"], strict=True))


def tok_s_ratio(runs: list[dict], base: list[dict]) -> float:
    """Median over repeats of tok/s / the sharded run's tok/s in the same repeat (runs side by side in time)."""
    return median([x["tok_s"] / y["tok_s"] for x, y in zip(runs, base, strict=True)])


def report_accum(args, results: dict) -> None:
    labels = {name: label for name, label, _ in ACCUM_VARIANTS}
    for key, by_variant in results.items():
        batch, seq = map(int, key.split("x"))
        print(f"\n## gradient accumulation: small model, -b {batch} -s {seq} --grad-accum-steps {ACCUM}, 2 ranks CPU, "
              f"per rank (measured: median of {args.repeats})\n")  # fmt: skip
        base = by_variant["sharded"]
        rows = []
        for name, v in by_variant.items():
            meas, est = v["peak_median_bytes"], v["plan"]["peak"]
            rows.append([
                labels[name], meas / MIB, f"{est / MIB:.1f}", f"{est / meas:.2f}", v["plan"]["peak at"],
                f"{v['plan']['gradients'] / MIB:.1f}", f"{v['tok_s_median']:,.0f}",
                f"{tok_s_ratio(v['runs'], base['runs']):.2f}", f"{(meas - base['peak_median_bytes']) / MIB:+.1f}",
                f"{(est - base['plan']['peak']) / MIB:+.1f}",
                f"{loss_gap(v['runs'], base['runs']):.1e}",
            ])  # fmt: skip
        heads = ["variant", "measured peak MiB", "planned peak MiB", "plan/measured", "planned peak at",
                 "planned grads MiB", "tok/s", "x sharded (paired)", "measured - sharded MiB", "planned - sharded MiB",
                 "max Δloss vs sharded"]  # fmt: skip
        print(table(heads, rows))


# ----------------------------------------------------------------------------------------------------------------------
# Part 2: scaling with ranks


def run_scaling(args, model: Path, work: Path) -> dict:
    flags = shlex.split(args.scaling_flags)
    results = {}
    for n in args.ranks:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
        cmd = [*torchrun, ROOT / "bench" / "bench_memory.py", "--worker", model]
        cmd += ["--worker-batch", args.scaling_batch, "--worker-seq", args.scaling_seq]
        cmd += ["--worker-flags", args.scaling_flags]
        run = run_timed(cmd, env=MALLOC_ENV, log=work / "logs" / f"scaling-{n}.log").check()
        line = run.first("SCALING ")
        if line is None:
            sys.exit(f"error: the {n}-rank worker printed no SCALING line:\n{run.output[-3000:]}")
        ranks = json.loads(line[1].split("SCALING ", 1)[1])["ranks"]
        per_rank = [sum(r[k][0] for k in ("params", "grads", "optimizer")) for r in ranks]
        estimate = plan(model, n, args.scaling_batch, args.scaling_seq, flags)
        results[n] = {
            "ranks": ranks,
            "per_rank_bytes": per_rank,
            "max_bytes": max(per_rank),
            "max_by_part": {k: max(r[k][0] for r in ranks) for k in ("params", "grads", "optimizer")},
            "padding_max_bytes": max(sum(r[k][0] - r[k][1] for k in ("params", "grads", "optimizer")) for r in ranks),
            "planned_bytes": sum(estimate[k] for k in ("params", "gradients", "optimizer")),
            "wall_s": run.wall,
        }
        print(f"  {n} rank(s): {max(per_rank) / MIB:.1f} MiB per rank ({run.wall:.0f}s)", flush=True)
    return results


def report_scaling(args, results: dict) -> float:
    """Prints the table; returns the worst ratio to the ideal 1/N (nan without a 1-rank run)."""
    one = results.get(1, {}).get("max_bytes")
    rows, worst = [], float("nan")
    for n, r in results.items():
        ideal = one / n if one else float("nan")
        ratio = r["max_bytes"] / ideal
        worst = ratio if worst != worst else max(worst, ratio)
        part = r["max_by_part"]
        sizes = [part["params"], part["grads"], part["optimizer"], r["max_bytes"], ideal]
        padding = f"{r['padding_max_bytes'] / 2**10:.1f}"
        rows.append([n, *(b / MIB for b in sizes), f"{ratio:.3f}", padding, r["planned_bytes"] / MIB])
    flags = args.scaling_flags or "(defaults: adamw, activation checkpointing on)"
    print(f"\n## scaling: medium model (hidden 768, 6 layers, vocab 32000), -b {args.scaling_batch} -s "
          f"{args.scaling_seq}, {flags}; local storage bytes per rank, max over ranks, MiB\n")  # fmt: skip
    heads = ["ranks", "params", "grads", "optimizer", "total", "ideal 1/N of 1-rank", "ratio", "padding KiB"]
    print(table([*heads, "planner p+g+o"], rows))
    if worst == worst:
        print(f"\nworst ratio to 1/N: {verdict(worst, 1.10, higher_is_better=False)}")
    return worst


# ----------------------------------------------------------------------------------------------------------------------
# Main


def shape_list(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(x) for x in item.split("x")) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BxS[,BxS...], e.g. 8x512,1x64; got {text!r}") from None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=1, help="training runs per mode and shape; median taken (1)")
    p.add_argument("--modes", default=",".join(m[0] for m in MODES), help="comma-separated subset of the modes (all)")
    p.add_argument("--shapes", type=shape_list, default=[(8, 512), (1, 64)], help="BATCHxSEQ list (8x512,1x64)")
    p.add_argument("--ranks", default="1,2,4", help="world sizes of the scaling part (1,2,4)")
    p.add_argument("--scaling-batch", type=int, default=1, help="sequences per rank of the scaling step (1)")
    p.add_argument("--scaling-seq", type=int, default=128, help="tokens per sequence of the scaling step (128)")
    p.add_argument("--scaling-flags", default="", help="extra fsdp_train.py flags for the scaling part, quoted")
    p.add_argument(
        "--accum-shapes",
        type=shape_list,
        default=[(1, 64), (4, 256)],
        help="micro-batch BATCHxSEQ list of the accumulation part (1x64,4x256)",
    )
    p.add_argument("--accum-steps", type=int, default=6, help="optimizer steps per accumulation run (6)")
    p.add_argument("--parts", default="modes,scaling,accum", help="which parts to run (modes,scaling,accum)")
    p.add_argument("--workdir", type=Path, help="keep models, data and runs here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="do not delete the temp dir")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--worker-seq", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--worker-flags", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        scaling_worker(args.worker, args.worker_batch, args.worker_seq, shlex.split(args.worker_flags))
        return 0
    args.modes = args.modes.split(",")
    args.parts = args.parts.split(",")
    args.ranks = [int(n) for n in args.ranks.split(",")]
    known = [m[0] for m in MODES]
    if args.repeats < 1 or not set(args.modes) <= set(known) or not set(args.parts) <= {"modes", "scaling", "accum"}:
        p.error(f"need --repeats >= 1, --modes from {known} and --parts from modes,scaling,accum")
    if min(args.ranks) < 1 or any(b < 1 or s < 1 for b, s in args.shapes + args.accum_shapes):
        p.error("--ranks, batch sizes and sequence lengths must be >= 1")
    if args.accum_steps < 2:
        p.error("--accum-steps must be >= 2 (tok/s leaves out step 1)")

    t_start = time.perf_counter()
    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="bench-memory-", dir="/tmp"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    start = machine()
    print(f"workdir {work}, load average {start['loadavg']}", flush=True)
    small = work / "small-v4096"
    if not (small / "config.json").is_file():
        tiny = ["--tiny", small, "--corpus", "data", "--hidden-size", 256, "--num-layers", 4, "--vocab-size", 4096]
        run_timed(python("model_download.py", *tiny, "--overwrite")).check()
    payload = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine_at_start": start,
        "env": MALLOC_ENV,
    }
    if "modes" in args.parts:
        payload["modes"] = run_modes(args, small, prepare_dataset(work), work)
        report_modes(args, payload["modes"])
    if "accum" in args.parts:
        payload["accum"] = run_accum(args, small, prepare_dataset(work), work)
        report_accum(args, payload["accum"])
    if "scaling" in args.parts:
        medium = write_llama(work / "medium-v32000", "medium", 32000, small)
        payload["scaling"] = run_scaling(args, medium, work)
        payload["scaling_worst_ratio"] = report_scaling(args, payload["scaling"])
    payload["total_s"] = time.perf_counter() - t_start
    print(f"\nresults: {save_results('memory', payload)} ({payload['total_s']:.0f}s in all)")
    if not args.workdir and not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
