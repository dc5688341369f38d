"""Memory: what each memory-saving option of fsdp_train.py saves (measured vs `fsdp_train.py plan`), how the sharded
per-rank state shrinks with the number of ranks, and what unsharded gradient accumulation costs.

    .venv/bin/python bench/bench_memory.py [--parts modes,scaling,accum] [--repeats 1] [--workdir DIR]
        [--modes baseline,ac,adafactor,in-backward,pure-bf16] [--shapes 8x512,1x64] [--ranks 1,2,4]
        [--accum-shapes 1x64,4x256] [--accum-steps 6]

modes    The `small` Llama (hidden 256, 4 layers, vocab 4096, tokenizer trained on data/) trains 3 steps on the bundled
         data, 2 ranks on CPU, per-block FSDP units, once per mode and --repeats times, modes alternating; each mode
         adds one saver to those above it (MODES). Measured: the max over steps of rank 0's `mem/train_peak_gib` (peak
         RSS above the RSS before the model was built; MALLOC_MMAP_THRESHOLD_=65536, so that freed buffers leave the
         RSS), median over repeats. Planned: `fsdp_train.py plan --nproc 2 --device cpu --json` with the same flags,
         "as given". Shapes (BATCHxSEQ): an activation-heavy 8x512 and a weight-heavy 1x64.
scaling  Under torchrun with N ranks a worker builds the `medium` Llama (hidden 768, 6 layers, vocab 32000) with
         fsdp_train.build_model + build_optimizer, runs one step on random tokens and sums the bytes of the distinct
         local storages (FSDP padding included) of the parameters, the gradients (after backward) and the optimizer
         state (after the step); the max over ranks. Target: per-rank bytes <= 1.10 x (1-rank bytes / N).
accum    The small model, --grad-accum-steps 4, AdamW, activation checkpointing, --accum-steps steps: sharded (the
         default: a reduce-scatter per micro-batch) vs --accumulate-unsharded on, alternating. Peak and plan as in
         modes; tok/s: median over steps >= 2 of metrics.jsonl, ratio to sharded per repeat, then median'd.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

import benchlib as bl

STEPS = 3
# Per-block units, as the modes work on GPUs: on CPU --shard-unit auto is one unit, which holds every unsharded
# gradient (no saving for in-backward or sharded accumulation to show) and which the planner would plan differently.
PER_BLOCK = ["--shard-unit", "block"]
_AC = ["--activation-checkpointing", "on"]
_ADAFACTOR = ["--optimizer", "adafactor"]
_IN_BACKWARD = ["--optimizer-in-backward", "on", "--max-norm", "0"]
MODES = {  # each keeps the savers of the ones before it
    "baseline": ["--activation-checkpointing", "off", "--optimizer", "adamw"],
    "ac": [*_AC, "--optimizer", "adamw"],
    "adafactor": [*_AC, *_ADAFACTOR],
    "in-backward": [*_AC, *_ADAFACTOR, *_IN_BACKWARD],
    "pure-bf16": [*_AC, *_ADAFACTOR, *_IN_BACKWARD, "--pure-bf16", "on"],
}
ACCUM = {
    "sharded": ["--grad-accum-steps", "4"],
    "unsharded": ["--grad-accum-steps", "4", "--accumulate-unsharded", "on"],
}
PARTS = ("modes", "scaling", "accum")
QUICK = {"shapes": [(1, 64)], "ranks": [1, 2], "accum_shapes": [(1, 64)], "accum_steps": 2, "repeats": 1}


def shape_list(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in item.split("x")) for item in text.split(",")]


def configure(p) -> None:
    csv = lambda s: s.split(",")  # noqa: E731
    p.add_argument("--parts", type=csv, default=list(PARTS), help="which parts to run (modes,scaling,accum)")
    p.add_argument("--repeats", type=int, default=1, help="training runs per mode and shape; median taken (1)")
    p.add_argument("--modes", type=csv, default=list(MODES), help="comma-separated subset of the modes (all)")
    p.add_argument("--shapes", type=shape_list, default=[(8, 512), (1, 64)], help="BATCHxSEQ list (8x512,1x64)")
    p.add_argument("--ranks", type=lambda s: [int(n) for n in s.split(",")], default=[1, 2, 4],
                   help="world sizes of the scaling part (1,2,4)")  # fmt: skip
    p.add_argument("--scaling-batch", type=int, default=1, help="sequences per rank of the scaling step (1)")
    p.add_argument("--scaling-seq", type=int, default=128, help="tokens per sequence of the scaling step (128)")
    p.add_argument("--scaling-flags", default="", help="extra fsdp_train.py flags for the scaling part, quoted")
    p.add_argument("--accum-shapes", type=shape_list, default=[(1, 64), (4, 256)],
                   help="micro-batch BATCHxSEQ list of the accumulation part (1x64,4x256)")  # fmt: skip
    p.add_argument("--accum-steps", type=int, default=6, help="optimizer steps per accumulation run (6)")


def check(args) -> str | None:
    if args.repeats < 1 or not set(args.modes) <= set(MODES) or not set(args.parts) <= set(PARTS):
        return f"need --repeats >= 1, --modes from {list(MODES)} and --parts from {','.join(PARTS)}"
    if min(args.ranks) < 1 or any(b < 1 or s < 1 for b, s in args.shapes + args.accum_shapes):
        return "--ranks, batch sizes and sequence lengths must be >= 1"
    return "--accum-steps must be >= 2 (tok/s leaves out step 1)" if args.accum_steps < 2 else None


# ----------------------------------------------------------------------------------------------------------------------
# Scaling worker (one per rank, under torchrun)


def storage_bytes(tensors) -> tuple[int, int]:
    """(bytes of the distinct storages under these tensors' local shards, bytes of the elements themselves).

    FSDP2 pads each shard to an even split and may hand out several gradients as views of one reduce-scatter buffer,
    so storages are counted once each, whole: the first number is what the rank really holds, the gap is padding."""
    from fsdp_train import local_shard

    seen, held, used = set(), 0, 0
    for t in tensors:
        x = local_shard(t)
        used += x.numel() * x.element_size()
        if x.untyped_storage().data_ptr() not in seen:
            seen.add(x.untyped_storage().data_ptr())
            held += x.untyped_storage().nbytes()
    return held, used


def scaling_worker(model_dir: str, batch: int, seq: int, flags: list[str]) -> None:
    """Build, run one training step, and emit every rank's local storage bytes from rank 0."""
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
        opts = ft.dcp_optimizers(optimizer)  # AdamW moments and steps, Adafactor factors, or per-parameter ones
        state = [v for o in (opts if isinstance(opts, list) else [opts]) for s in o.state.values()
                 for v in s.values() if isinstance(v, torch.Tensor)]  # fmt: skip
        mine = {"rank": d.rank, "params": storage_bytes(params), "grads": grads, "optimizer": storage_bytes(state)}
        everyone = [None] * d.world_size
        dist.all_gather_object(everyone, mine)
        if d.is_main:
            bl.emit({"world_size": d.world_size, "ranks": everyone})
    finally:
        ft.teardown_distributed()


# ----------------------------------------------------------------------------------------------------------------------
# Training runs against the planner (modes, accum)


def plan(model: Path, nproc: int, batch: int, seq: int, flags: list[str]) -> dict:
    """`fsdp_train.py plan ... --json`'s "as given" estimate (bytes per rank)."""
    cmd = bl.python("fsdp_train.py", "plan", "-m", model, "--nproc", nproc, "-b", batch, "-s", seq, "--device", "cpu")
    job = bl.run([*cmd, *PER_BLOCK, *flags, "--json"]).check()
    return json.loads(job.output.strip().splitlines()[-1])["plans"]["as given"]


def compare(args, model: Path, dataset: Path, work: Path, part: str, shape: tuple, variants: dict, steps: int) -> dict:
    """Each variant (fsdp_train.py flags) trained `steps` steps, --repeats times alternating, and planned."""
    batch, seq = shape
    runs = {name: [] for name in variants}
    for r in range(args.repeats):
        for name, flags in variants.items():  # alternating, so a change in load hits every variant alike
            exp = f"{part}-{name}-{batch}x{seq}-{r}"
            cmd = [*bl.torchrun(2), bl.ROOT / "fsdp_train.py", "-e", exp, "-d", dataset, "-m", model, "--save-dir",
                   work / "runs", "-b", batch, "-s", seq, "--max-steps", steps, "--log-freq", 1, "--warmup-steps", 1,
                   *PER_BLOCK, "--tensorboard", "off", "--ckpt-freq", 0, *flags]  # fmt: skip
            job = bl.run(cmd, env=bl.MALLOC_ENV, log=work / "logs" / f"{exp}.log").check()
            rows = bl.read_metrics(work / "runs" / exp)
            runs[name].append({"peak_bytes": max(x["mem/train_peak_gib"] for x in rows) * 2**30, "wall_s": job.wall,
                               "tok_s": bl.median(x["tok/s"] for x in rows if x["global_step"] >= 2),
                               "losses": [x["loss"] for x in rows]})  # fmt: skip
            shutil.rmtree(work / "runs" / exp)  # the checkpoint and export are not needed (the data cache stays)
            print(f"  {exp}: {runs[name][-1]['peak_bytes'] / bl.MIB:.1f} MiB ({job.wall:.0f}s)", flush=True)
    return {name: {"flags": flags, "runs": runs[name], "plan": plan(model, 2, batch, seq, flags),
                   "peak_median_bytes": bl.median(x["peak_bytes"] for x in runs[name])}
            for name, flags in variants.items()}  # fmt: skip


def report(title: str, by_variant: dict, losses: bool) -> None:
    """One row per variant, measured and planned, and each against the first variant (the paired run of a repeat)."""
    base = next(iter(by_variant.values()))
    rows = []
    for name, v in by_variant.items():
        meas, est = v["peak_median_bytes"], v["plan"]["peak"]
        d_meas, d_est = meas - base["peak_median_bytes"], est - base["plan"]["peak"]
        pairs = list(zip(v["runs"], base["runs"], strict=True))
        gap = max(abs(a - b) for x, y in pairs for a, b in zip(x["losses"], y["losses"], strict=True))
        rows.append([name, meas / bl.MIB, est / bl.MIB, f"{est / meas:.2f}", v["plan"]["peak at"],
                     v["plan"]["gradients"] / bl.MIB, bl.median(x["tok_s"] for x in v["runs"]),
                     f"{bl.median(x['tok_s'] / y['tok_s'] for x, y in pairs):.2f}",
                     f"{d_meas / bl.MIB:+.1f} ({d_meas / base['peak_median_bytes']:+.0%})",
                     f"{d_est / bl.MIB:+.1f} ({d_est / base['plan']['peak']:+.0%})",
                     *([f"{gap:.1e}"] if losses else [])])  # fmt: skip
    first = next(iter(by_variant))
    heads = ["variant", "measured peak MiB", "planned peak MiB", "plan/measured", "planned peak at",
             "planned grads MiB", "tok/s", f"x {first} (paired)", f"measured - {first} MiB",
             f"planned - {first} MiB"]  # fmt: skip
    print(f"\n## {title}\n\n{bl.table(heads + ([f'max Δloss vs {first}'] if losses else []), rows)}")


# ----------------------------------------------------------------------------------------------------------------------
# Scaling with ranks


def scaling(args, model: Path, work: Path) -> dict:
    flags = shlex.split(args.scaling_flags)
    results, rows = {}, []
    for n in args.ranks:
        cmd = bl.worker_cmd("bench_memory.py", "scaling_worker", model, args.scaling_batch, args.scaling_seq, flags,
                            nproc=n)  # fmt: skip
        job = bl.run(cmd, env=bl.MALLOC_ENV, log=work / "logs" / f"scaling-{n}.log").check()
        ranks = job.results()[0]["ranks"]
        parts = {k: max(r[k][0] for r in ranks) for k in ("params", "grads", "optimizer")}
        planned = plan(model, n, args.scaling_batch, args.scaling_seq, flags)
        results[n] = {"ranks": ranks, "max_by_part": parts, "wall_s": job.wall,
                      "max_bytes": max(sum(r[k][0] for k in parts) for r in ranks),
                      "padding_max_bytes": max(sum(r[k][0] - r[k][1] for k in parts) for r in ranks),
                      "planned_bytes": sum(planned[k] for k in ("params", "gradients", "optimizer"))}  # fmt: skip
        print(f"  {n} rank(s): {results[n]['max_bytes'] / bl.MIB:.1f} MiB per rank ({job.wall:.0f}s)", flush=True)
    one = results.get(1, {}).get("max_bytes")
    for n, r in results.items():
        ideal = one / n if one else None
        r["ratio"] = r["max_bytes"] / ideal if ideal else None
        sizes = [*r["max_by_part"].values(), r["max_bytes"], ideal or 0, r["planned_bytes"]]
        rows.append([n, *(b / bl.MIB for b in sizes), bl.fmt(r["ratio"], ".3f"), r["padding_max_bytes"] / 1024])
    print(f"\n## scaling: medium model (hidden 768, 6 layers, vocab 32000), -b {args.scaling_batch} -s "
          f"{args.scaling_seq}, {args.scaling_flags or 'adamw, activation checkpointing on'}; local storage per rank, "
          "max over ranks, MiB\n")  # fmt: skip
    print(bl.table(["ranks", "params", "grads", "optimizer", "total", "ideal 1/N of 1-rank", "planner p+g+o", "ratio",
                    "padding KiB"], rows))  # fmt: skip
    if one:
        print(f"\nworst ratio to 1/N: {bl.verdict(max(r['ratio'] for r in results.values()), 1.10, False)}")
    return results


def main(argv: list[str] | None = None) -> int:
    args = bl.parse(__doc__, configure, QUICK, check, argv)
    with bl.session("memory", args) as (work, payload):
        (work / "logs").mkdir(exist_ok=True)
        small = bl.tiny_model(work / "small-v4096", hidden_size=256, num_layers=4, vocab_size=4096)
        payload["env"] = bl.MALLOC_ENV
        if "modes" in args.parts:
            modes = {k: MODES[k] for k in args.modes}
            for b, s in args.shapes:
                payload[f"modes-{b}x{s}"] = compare(args, small, bl.prepare_dataset(work), work, "modes", (b, s), modes,
                                                    STEPS)  # fmt: skip
                report(f"modes: small model, -b {b} -s {s}, 2 ranks CPU, per rank (median of {args.repeats})",
                       payload[f"modes-{b}x{s}"], losses=False)  # fmt: skip
        if "accum" in args.parts:
            for b, s in args.accum_shapes:
                payload[f"accum-{b}x{s}"] = compare(args, small, bl.prepare_dataset(work), work, "accum", (b, s), ACCUM,
                                                    args.accum_steps)  # fmt: skip
                report(f"gradient accumulation: small model, -b {b} -s {s} --grad-accum-steps 4, 2 ranks CPU, per "
                       f"rank (median of {args.repeats})", payload[f"accum-{b}x{s}"], losses=True)  # fmt: skip
        if "scaling" in args.parts:
            medium = bl.write_llama(work / "medium-v32000", "medium", 32000, small)
            payload["scaling"] = scaling(args, medium, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
