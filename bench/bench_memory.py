"""Memory: what each memory-saving option of fsdp_train.py saves (measured vs `fsdp_train.py plan`), how the sharded
per-rank state shrinks with the ranks, what unsharded gradient accumulation costs, what the loss holds, and host memory
per rank of the end-of-run HF export. Training processes run with MALLOC_MMAP_THRESHOLD_=65536 (freed buffers leave RSS).

    python bench/bench_memory.py [--parts modes,scaling,accum,loss,export] [--repeats 1] [--ranks 1,2,4]

modes    small Llama (h256 x 4, vocab 4096), 2 ranks, per-block units, 3 steps, each mode adding one saver: the max of
         rank 0's `mem/train_peak_gib` (median over --repeats) vs `fsdp_train.py plan --json` "as given"
scaling  medium Llama (h768 x 6, vocab 32000), N ranks, one step: bytes of the distinct local storages of parameters,
         gradients and optimizer state, max over ranks. Target: <= 1.1 x 1/N of one rank
accum    --grad-accum-steps 4: sharded (default) vs --accumulate-unsharded on, alternating, measured and planned
loss     forward + backward of fsdp_train.causal_lm_loss vs transformers' ForCausalLMLoss: peak in logits-sized units
export   each rank's rise above its RSS before export_hf (VmHWM reset); --export-code: another checkout's fsdp_train.py
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import benchlib as bl

# Per-block units, as on GPUs: on CPU --shard-unit auto is one unit, which holds every unsharded gradient (nothing
# for in-backward or sharded accumulation to save) and which the planner would plan differently.
PER_BLOCK = ["--shard-unit", "block"]
_AC, _ADAFACTOR = ["--activation-checkpointing", "on"], ["--optimizer", "adafactor"]
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
PARTS = ("modes", "scaling", "accum", "loss", "export")
QUICK = {
    "shapes": [(1, 64)],
    "ranks": [1, 2],
    "accum_shapes": [(1, 64)],
    "accum_steps": 2,
    "loss_shape": [(2, 128, 4096)],
    "export_model": [(256, 2, 4096)],
}


def configure(p) -> None:
    p.add_argument("--parts", type=bl.csv(), default=list(PARTS), help=f"which parts to run ({','.join(PARTS)})")
    p.add_argument("--repeats", type=int, default=1, help="training runs per mode and shape; median taken (1)")
    p.add_argument("--shapes", type=bl.shapes, default=[(8, 512), (1, 64)], help="modes: BATCHxSEQ list (8x512,1x64)")
    p.add_argument("--ranks", type=bl.csv(int), default=[1, 2, 4], help="world sizes of scaling and export (1,2,4)")
    p.add_argument("--accum-shapes", type=bl.shapes, default=[(1, 64), (4, 256)], help="accum: BxS (1x64,4x256)")
    p.add_argument("--accum-steps", type=int, default=6, help="optimizer steps per accumulation run (6)")
    p.add_argument("--loss-shape", type=bl.shapes, default=[(8, 512, 32000)], help="BxSEQxVOCAB (8x512x32000)")
    p.add_argument("--export-model", type=bl.shapes, default=[(1024, 8, 16384)], help="HxLxVOCAB (1024x8x16384)")
    p.add_argument("--export-code", default=str(bl.ROOT), help="checkout whose fsdp_train.py exports (this one)")


def check(args) -> str | None:
    if args.repeats < 1 or not set(args.parts) <= set(PARTS) or args.accum_steps < 2 or min(args.ranks) < 1:
        return f"need --repeats >= 1, --accum-steps >= 2, --ranks >= 1 and --parts from {','.join(PARTS)}"
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Workers (scaling and export: one per rank, under torchrun)


def storage_bytes(tensors) -> tuple[int, int]:
    """(bytes of the distinct storages under these tensors' local shards, bytes of their elements). FSDP2 pads
    shards to an even split and may hand out gradients as views of one buffer: the first is what the rank holds."""
    from fsdp_train import local_shard

    seen, held, used = set(), 0, 0
    for t in map(local_shard, tensors):
        used += t.numel() * t.element_size()
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            held += t.untyped_storage().nbytes()
    return held, used


def scaling_worker(model_dir: str, batch: int, seq: int) -> None:
    """One training step; rank 0 emits every rank's local storage bytes."""
    import torch

    import fsdp_train as ft

    d = ft.setup_distributed()
    cfg = ft.parse_args(["-d", "-", "-m", model_dir, "-b", str(batch), "-s", str(seq), *PER_BLOCK])
    # Real weights: to_empty leaves garbage whose NaNs and denormals would slow the step and break the rotary buffers.
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
    states = [s for o in (opts if isinstance(opts, list) else [opts]) for s in o.state.values()]
    state = [v for s in states for v in s.values() if isinstance(v, torch.Tensor)]
    mine = {"rank": d.rank, "params": storage_bytes(params), "grads": grads, "optimizer": storage_bytes(state)}
    everyone = [None] * d.world_size
    ft.dist.all_gather_object(everyone, mine)
    if d.is_main:
        bl.emit({"world_size": d.world_size, "ranks": everyone})
    ft.teardown_distributed()


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
    bl.emit({"logits": dtype, "loss": loss, "units": units, "seconds": seconds})


def export_worker(code: str, model: str, out: str) -> None:
    sys.path.insert(0, code)  # before the repo root benchlib put there
    import fsdp_train as ft

    cfg = ft.Config(dataset_name="-", model_name=model, save_dir=out, experiment_name="export")
    d = ft.setup_distributed()
    built = ft.build_model(cfg, d, load_pretrained=True)
    base = ft.memory_baseline(ft.torch.device("cpu"))  # resets VmHWM
    ft.export_hf(built, cfg, d, Path(out) / f"hf-{os.getpid()}")
    bl.emit({"rank": d.rank, "rise_mib": round((ft.anon_peak() - base) / bl.MIB, 1)})
    ft.teardown_distributed()


# ----------------------------------------------------------------------------------------------------------------------
# Parts


def plan(model: Path, nproc: int, batch: int, seq: int, flags: list[str]) -> dict:
    """`fsdp_train.py plan ... --json`'s "as given" estimate (bytes per rank)."""
    cmd = bl.python("fsdp_train.py", "plan", "-m", model, "--nproc", nproc, "-b", batch, "-s", seq, "--device", "cpu")
    job = bl.run([*cmd, *PER_BLOCK, *flags, "--json"]).check()
    return json.loads(job.output.strip().splitlines()[-1])["plans"]["as given"]


def compare(args, model: Path, work: Path, part: str, shape: tuple, variants: dict, steps: int) -> dict:
    """Each variant (fsdp_train.py flags) trained `steps` steps, --repeats times alternating, and planned."""
    (batch, seq), data = shape, bl.prepare_dataset(work)
    runs = {name: [] for name in variants}
    for r in range(args.repeats):
        for name, flags in variants.items():  # alternating, so a change in load hits every variant alike
            exp = f"{part}-{name}-{batch}x{seq}-{r}"
            train = ["-e", exp, "-d", data, "-m", model, "--save-dir", work / "runs", "-b", batch, "-s", seq]
            loop = ["--max-steps", steps, "--log-freq", 1, "--warmup-steps", 1, "--ckpt-freq", 0, *PER_BLOCK, *flags]
            cmd = [*bl.torchrun(2), bl.ROOT / "fsdp_train.py", *train, "--tensorboard", "off", *loop]
            job = bl.run(cmd, env=bl.MALLOC_ENV, log=work / "logs" / f"{exp}.log").check()
            rows = bl.read_metrics(work / "runs" / exp)
            peak = max(x["mem/train_peak_gib"] for x in rows) * bl.GIB
            tok_s = bl.median(x["tok/s"] for x in rows if x["global_step"] >= 2)
            runs[name].append({"peak_bytes": peak, "tok_s": tok_s, "losses": [x["loss"] for x in rows]})
            shutil.rmtree(work / "runs" / exp)  # the checkpoint and export are not needed (the data cache stays)
            print(f"  {exp}: {peak / bl.MIB:.1f} MiB ({job.wall:.0f}s)", flush=True)
    out = {}
    for name, flags in variants.items():
        peak = bl.median(x["peak_bytes"] for x in runs[name])
        out[name] = {"flags": flags, "runs": runs[name], "plan": plan(model, 2, batch, seq, flags), "peak": peak}
    return out


def report(title: str, by_variant: dict) -> None:
    """One row per variant, measured and planned, each against the first variant (its paired run of a repeat)."""
    first, base = next(iter(by_variant.items()))
    rows = []
    for name, v in by_variant.items():
        meas, est = v["peak"], v["plan"]["peak"]
        pairs = list(zip(v["runs"], base["runs"], strict=True))
        gap = max(abs(a - b) for x, y in pairs for a, b in zip(x["losses"], y["losses"], strict=True))
        ratio = bl.median(x["tok_s"] / y["tok_s"] for x, y in pairs)
        mib = [x / bl.MIB for x in (meas, est, v["plan"]["gradients"], meas - base["peak"], est - base["plan"]["peak"])]
        tok_s = bl.median(x["tok_s"] for x in v["runs"])
        rows.append([name, *mib[:2], f"{est / meas:.2f}", *mib[2:], tok_s, f"{ratio:.2f}", f"{gap:.1e}"])
    heads = ["variant", "measured peak MiB", "planned peak MiB", "plan/measured", "planned grads MiB"]
    heads += [f"measured - {first}", f"planned - {first}", "tok/s", f"x {first}", f"max Δloss vs {first}"]
    print(f"\n## {title}\n\n{bl.table(heads, rows)}")


def scaling(args, model: Path, work: Path, batch: int = 1, seq: int = 128) -> dict:
    results, rows = {}, []
    for n in args.ranks:
        cmd = bl.worker_cmd("bench_memory.py", "scaling_worker", model, batch, seq, nproc=n)
        job = bl.run(cmd, env=bl.MALLOC_ENV, log=work / "logs" / f"scaling-{n}.log").check()
        ranks = job.results()[0]["ranks"]
        parts = {k: max(r[k][0] for r in ranks) for k in ("params", "grads", "optimizer")}
        planned = plan(model, n, batch, seq, [])
        most = max(sum(r[k][0] for k in parts) for r in ranks)
        results[n] = {"ranks": ranks, "max_by_part": parts, "max_bytes": most}
        results[n]["planned_bytes"] = sum(planned[k] for k in ("params", "gradients", "optimizer"))
        print(f"  {n} rank(s): {results[n]['max_bytes'] / bl.MIB:.1f} MiB per rank ({job.wall:.0f}s)", flush=True)
    one = results.get(1, {}).get("max_bytes")
    for n, r in results.items():
        ideal = one / n if one else None
        r["ratio"] = r["max_bytes"] / ideal if ideal else None
        sizes = [*r["max_by_part"].values(), r["max_bytes"], ideal or 0, r["planned_bytes"]]
        rows.append([n, *(b / bl.MIB for b in sizes), bl.fmt(r["ratio"], ".3f")])
    print(f"\n## scaling: medium model, -b {batch} -s {seq}, AdamW; local storage per rank, max over ranks, MiB\n")
    print(bl.table(["ranks", "params", "grads", "optimizer", "total", "1/N of 1 rank", "planner p+g+o", "ratio"], rows))
    if one:
        print(f"\nworst ratio to 1/N: {bl.verdict(max(r['ratio'] for r in results.values()), 1.10, False)}")
    return results


def loss(args) -> list[dict]:
    batch, seq, vocab = args.loss_shape[0]
    rows = []
    for dtype in ("float32", "bfloat16"):
        for name in ("transformers", "chunked"):
            cmd = bl.worker_cmd("bench_memory.py", "loss_worker", name, dtype, batch, seq, vocab)
            rows.append(bl.run(cmd, env=bl.MALLOC_ENV).check().results()[-1])
    print(f"\n## loss: batch {batch} x seq {seq} x vocab {vocab}\n")
    cells = [[r["logits"], r["loss"], f"{r['units']:.2f}", f"{r['seconds']:.2f}"] for r in rows]
    print(bl.table(["logits", "loss", "peak memory (logits-sized units)", "forward+backward s"], cells))
    return rows


def export(args, work: Path) -> dict:
    hidden, layers, vocab = args.export_model[0]
    model = bl.tiny_model(work / f"export-h{hidden}", hidden_size=hidden, num_layers=layers, vocab_size=vocab)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / bl.MIB
    out, rows = {}, []
    for n in args.ranks:
        cmd = bl.worker_cmd("bench_memory.py", "export_worker", args.export_code, model, work, nproc=n)
        job = bl.run(cmd, bl.MALLOC_ENV)
        out[n] = sorted(job.check().results(), key=lambda r: r["rank"])
        rows.append([n, out[n][0]["rise_mib"], max((r["rise_mib"] for r in out[n][1:]), default=None)])
    print(f"\n## export: h{hidden} x {layers} layers, vocab {vocab}: {size:.0f} MiB; code {args.export_code}\n")
    print(bl.table(["ranks", "rank 0 MiB", "other ranks MiB (max)"], rows))
    return {"model_mib": size, "ranks": out}


def main(argv: list[str] | None = None) -> int:
    args = bl.parse(__doc__, configure, QUICK, check, argv)
    with bl.session("memory", args) as (work, payload):
        (work / "logs").mkdir(exist_ok=True)
        small = bl.tiny_model(work / "small-v4096", hidden_size=256, num_layers=4, vocab_size=4096)
        payload["env"] = bl.MALLOC_ENV
        for b, s in args.shapes if "modes" in args.parts else []:
            payload[f"modes-{b}x{s}"] = compare(args, small, work, "modes", (b, s), MODES, 3)
            report(f"modes: small model, -b {b} -s {s}, 2 ranks, median of {args.repeats}", payload[f"modes-{b}x{s}"])
        for b, s in args.accum_shapes if "accum" in args.parts else []:
            payload[f"accum-{b}x{s}"] = compare(args, small, work, "accum", (b, s), ACCUM, args.accum_steps)
            report(f"gradient accumulation: small model, -b {b} -s {s} --grad-accum-steps 4", payload[f"accum-{b}x{s}"])
        if "scaling" in args.parts:
            medium = bl.write_llama(work / "medium-v32000", bl.SHAPES["medium"], 32000, small)
            payload["scaling"] = scaling(args, medium, work)
        if "loss" in args.parts:
            payload["loss"] = loss(args)
        if "export" in args.parts:
            payload["export"] = export(args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
