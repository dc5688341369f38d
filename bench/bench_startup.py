"""Re-run start-up: how long a resumed fsdp_train.py job takes to reach its first step, vs a bare torchrun job that
only imports torch + transformers and joins a gloo process group.

    .venv/bin/python bench/bench_startup.py [--repeats 3] [--shapes small,medium] [--vocab 32000] [--steps 2]
        [--workdir DIR] [--keep]

For each shape (random-init Llamas of benchlib.SHAPES with the tokenizer model_download.build_tiny trains) one fresh
run trains --steps steps on the bundled data and checkpoints; then each repeat runs, alternately, the bare job and the
same command one step further, which resumes from the newest checkpoint (the tokenized data cache is reused). The
arrival time of every output line gives the breakdown: launch -> "Config" (torchrun, imports, process group, model
config, tokenizer) -> data cache -> "Device mesh" (meta build) -> "Resuming from step" (shard allocation, optimizer,
DCP load) -> "... params" -> "Start-up took" (the loop starts) -> the first step line.
Target: resumed launch -> "Start-up took" <= 2x bare launch -> process group ready.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import benchlib as bl

# (label, pattern of the line that marks the moment in rank 0's output), in the order train() logs them.
MILESTONES = [("config", r"Config \{"), ("data", r"tokenized train data cache|Packed in "),
              ("mesh", r"Device mesh"), ("resumed", r"Resuming from step"), ("params", r" params, "),
              ("startup", r"Start-up took"), ("first_step", r"step \d+/\d+ \|")]  # fmt: skip
QUICK = {"repeats": 1, "shapes": ["small"], "vocab": 0}


def configure(p) -> None:
    p.add_argument("--repeats", type=int, default=3, help="resumed runs per shape, each after a bare job (3)")
    p.add_argument("--shapes", type=lambda s: s.split(","), default=["small", "medium"],
                   help=f"comma-separated, of {sorted(bl.SHAPES)} (small,medium)")  # fmt: skip
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary rows; 0: the tiny tokenizer's (32000)")
    p.add_argument("--steps", type=int, default=2, help="--stop-at-step of the first run (default 2)")


def check(args) -> str | None:
    if args.repeats < 1 or args.steps < 1 or not set(args.shapes) <= set(bl.SHAPES):
        return f"need --repeats >= 1, --steps >= 1 and --shapes from {sorted(bl.SHAPES)}"
    return None


def bare_worker() -> None:
    """What every torchrun job pays before any work: the imports and the gloo rendezvous."""
    t0 = time.perf_counter()
    import torch.distributed as dist
    import transformers  # noqa: F401

    t_import = time.perf_counter() - t0
    dist.init_process_group("gloo")
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"BARE ready: imports {t_import:.2f}s, init {time.perf_counter() - t0 - t_import:.2f}s", flush=True)
        t1 = time.perf_counter()  # not part of the bare time: what fsdp_train.py imports on top (transformers is lazy)
        import datasets  # noqa: F401
        from transformers import AutoTokenizer  # noqa: F401
        from transformers.models.llama import modeling_llama  # noqa: F401

        print(
            f"BARE extra imports (datasets, AutoTokenizer, modeling_llama) {time.perf_counter() - t1:.2f}s", flush=True
        )
    dist.barrier()
    dist.destroy_process_group()


def train(work: Path, dataset: Path, model: Path, shape: str, steps: int, log: str) -> dict:
    """One fsdp_train.py run to --stop-at-step `steps`: the arrival second of each milestone, and 'entry' (train()
    measures its 'Start-up took' from its entry: what came before is torchrun, interpreter, imports, process group)."""
    args = ["-e", shape, "-d", dataset, "-m", model, "--save-dir", work / "train", "-s", 128, "-b", 2, "--log-freq", 1,
            "--warmup-steps", 1, "--stop-at-step", steps]  # fmt: skip
    job = bl.run([*bl.torchrun(2), bl.ROOT / "fsdp_train.py", *args], log=work / "logs" / f"{log}.log").check()
    rec = {label: (hit[0] if (hit := job.first(pattern)) else None) for label, pattern in MILESTONES}
    took, rss = re.search(r"Start-up took ([\d.]+)s", job.output), re.search(r"peak_rss_gib ([\d.]+)", job.output)
    rec["entry"] = rec["startup"] - float(took[1]) if took and rec["startup"] is not None else None
    return {**rec, "wall_s": job.wall, "startup_logged_s": float(took[1]) if took else None,
            "peak_rss_gib_rank0": float(rss[1]) if rss else None,
            "retokenized": "Tokenizing " in job.output}  # fmt: skip


def row(name: str, runs: list[dict], bare_ready: float) -> list:
    """Seconds from one milestone to the next (medians over runs), launch -> start-up line, and the ratio to bare."""
    med = {k: bl.median(r[k] for r in runs) for k in ["entry", *(m for m, _ in MILESTONES), "startup_logged_s"]}
    deltas, prev = [], 0.0
    for k in ["entry", *(m for m, _ in MILESTONES)]:
        deltas.append(None if med[k] is None else med[k] - prev)
        prev = prev if med[k] is None else med[k]
    return [name, *deltas, med["startup"], med["startup_logged_s"], f"{med['startup'] / bare_ready:.2f}x"]


def main(argv: list[str] | None = None) -> int:
    args = bl.parse(__doc__, configure, QUICK, check, argv)
    with bl.session("startup", args) as (work, payload):
        tokenizer, dataset = bl.tiny_model(work / "tiny"), bl.prepare_dataset(work)
        models = {s: bl.write_llama(work / f"{s}-v{args.vocab}", s, args.vocab, tokenizer) for s in args.shapes}
        shutil.rmtree(work / "train", ignore_errors=True)
        (work / "logs").mkdir(exist_ok=True)
        # the first shape also tokenizes; the cache is keyed by data + tokenizer, so the next reuses it
        fresh = {s: train(work, dataset, models[s], s, args.steps, f"{s}-fresh") for s in args.shapes}
        bare, resumed = [], {s: [] for s in args.shapes}
        for r in range(args.repeats):
            for s in args.shapes:  # bare, resume A, bare, resume B, ...; each run resumes from the one before
                bare_cmd = bl.worker_cmd("bench_startup.py", "bare_worker", nproc=2)
                job = bl.run(bare_cmd, log=work / "logs" / f"bare-{r}-{s}.log").check()
                extra = re.search(r"BARE extra imports .* ([\d.]+)s", job.output)
                bare.append({"ready": job.first("BARE ready")[0], "extra_imports_s": extra and float(extra[1])})
                resumed[s].append(train(work, dataset, models[s], s, args.steps + 1 + r, f"{s}-resume-{r}"))
                print(f"  bare ready {bare[-1]['ready']:.2f}s | resumed {s}: start-up line "
                      f"{resumed[s][-1]['startup']:.2f}s", flush=True)  # fmt: skip
        ready, extra = bl.median(b["ready"] for b in bare), bl.median(b["extra_imports_s"] for b in bare)
        rows = []
        for s in args.shapes:
            tokenizes = " (tokenizes)" if fresh[s]["retokenized"] else ""
            rows += [row(f"{s} resumed", resumed[s], ready), row(f"{s} fresh{tokenizes}", [fresh[s]], ready)]
        heads = ["run", "launch->train()", "->config", "->data cache", "->mesh", "->resumed", "->params",
                 "->start-up line", "->first step done", "launch->start-up line", "'Start-up took'",
                 "vs bare"]  # fmt: skip
        print(f"\n## re-run start-up, 2 ranks gloo, seconds (median of {args.repeats}; fresh: one run)\n")
        print(bl.table(heads, [*rows, ["bare import+init", *[""] * 8, ready, "", "1.00x"]]))
        print(f"\nbare torchrun + import torch, transformers + init_process_group: {ready:.2f}s to ready (median); "
              f"importing datasets, AutoTokenizer and modeling_llama on top: {extra:.2f}s more")  # fmt: skip
        ratios = {s: bl.median(x["startup"] for x in resumed[s]) / ready for s in args.shapes}
        for s in args.shapes:
            print(f"{s}: resumed/bare {bl.verdict(ratios[s], 2.0, higher_is_better=False)}; resumed / (bare + those "
                  f"imports) {ratios[s] * ready / (ready + extra):.2f}x; re-tokenized on resume: "
                  f"{'YES' if any(x['retokenized'] for x in resumed[s]) else 'no'}; rank-0 peak RSS at first step: "
                  f"fresh {fresh[s]['peak_rss_gib_rank0']} GiB, resumed "
                  f"{bl.median(x['peak_rss_gib_rank0'] for x in resumed[s])} GiB")  # fmt: skip
        payload.update(bare=bare, bare_ready_median_s=ready, bare_extra_imports_median_s=extra, fresh=fresh,
                       resumed=resumed, resumed_vs_bare=ratios)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
