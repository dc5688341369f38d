"""Re-run start-up: how long a resumed fsdp_train.py job takes to reach its first step, vs a bare torchrun job that
only imports torch + transformers and joins a gloo process group.

    python bench/bench_startup.py [--repeats 3] [--shapes small,medium] [--vocab 32000] [--steps 2]

Per shape (benchlib.SHAPES) one run trains --steps steps and checkpoints; then each repeat runs, alternately, the bare
job and the same command one step further, which resumes (the tokenized data cache is reused). Times are the arrival
of rank 0's "Start-up took" and first step lines after launch. Target: resumed <= 2x bare.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import benchlib as bl

QUICK = {"repeats": 1, "shapes": ["small"], "vocab": 0}


def configure(p) -> None:
    p.add_argument("--repeats", type=int, default=3, help="resumed runs per shape, each after a bare job (3)")
    p.add_argument("--shapes", type=bl.csv(), default=["small", "medium"], help="comma list (small,medium)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary rows; 0: the tiny tokenizer's (32000)")
    p.add_argument("--steps", type=int, default=2, help="--stop-at-step of the first run (2)")


def check(args) -> str | None:
    if args.repeats < 1 or args.steps < 1 or not set(args.shapes) <= set(bl.SHAPES):
        return f"need --repeats >= 1, --steps >= 1 and --shapes from {sorted(bl.SHAPES)}"
    return None


def bare_worker() -> None:
    """What every torchrun job pays before any work: the imports and the gloo rendezvous."""
    import torch.distributed as dist
    import transformers  # noqa: F401

    dist.init_process_group("gloo")
    dist.barrier()
    if dist.get_rank() == 0:
        print("BARE ready", flush=True)
        t0 = time.perf_counter()  # not part of the bare time: what fsdp_train.py imports on top (transformers is lazy)
        import datasets  # noqa: F401
        from transformers import AutoTokenizer  # noqa: F401
        from transformers.models.llama import modeling_llama  # noqa: F401

        print(f"BARE extra imports {time.perf_counter() - t0:.2f}s", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def train(work: Path, dataset: Path, model: Path, shape: str, steps: int, log: str) -> dict:
    """One fsdp_train.py run to --stop-at-step `steps`: launch -> its start-up line and first step line, seconds."""
    data = ["-e", shape, "-d", dataset, "-m", model, "--save-dir", work / "train", "-s", 128, "-b", 2]
    loop = ["--log-freq", 1, "--warmup-steps", 1, "--stop-at-step", steps]
    job = bl.run([*bl.torchrun(2), bl.ROOT / "fsdp_train.py", *data, *loop], log=work / f"{log}.log").check()
    first = job.first(r"step \d+/\d+ \|")
    startup = job.first(r"Start-up took")[0]
    return {"startup": startup, "first_step": first[0] - startup, "retokenized": "Tokenizing " in job.output}


def main(argv: list[str] | None = None) -> int:
    args = bl.parse(__doc__, configure, QUICK, check, argv)
    with bl.session("startup", args) as (work, payload):
        tokenizer, dataset = bl.tiny_model(work / "tiny"), bl.prepare_dataset(work)
        v = args.vocab
        models = {s: bl.write_llama(work / f"{s}-v{v}", bl.SHAPES[s], v, tokenizer) for s in args.shapes}
        shutil.rmtree(work / "train", ignore_errors=True)
        for s in args.shapes:  # the first also tokenizes; the cache is keyed by data + tokenizer, so the next reuses it
            train(work, dataset, models[s], s, args.steps, f"{s}-fresh")
        bare, resumed = [], {s: [] for s in args.shapes}
        for r in range(args.repeats):
            for s in args.shapes:  # bare, resume A, bare, resume B, ...; each run resumes from the one before
                job = bl.run(bl.worker_cmd("bench_startup.py", "bare_worker", nproc=2)).check()
                extra = float(re.search(r"BARE extra imports ([\d.]+)s", job.output)[1])
                bare.append({"ready": job.first("BARE ready")[0], "extra_imports_s": extra})
                resumed[s].append(train(work, dataset, models[s], s, args.steps + 1 + r, f"{s}-resume-{r}"))
                print(f"  bare ready {bare[-1]['ready']:.2f}s | {s} resumed: {resumed[s][-1]['startup']:.2f}s")
        ready, extra = bl.median(b["ready"] for b in bare), bl.median(b["extra_imports_s"] for b in bare)
        rows = [["bare torchrun + `import torch, transformers` + `init_process_group`", ready, "", "1.00x"]]
        for s in args.shapes:
            startup, first = (bl.median(x[k] for x in resumed[s]) for k in ("startup", "first_step"))
            rows.append([f"{s}, resumed", startup, f"+{first:.2f}", f"{startup / ready:.2f}x"])
        print(f"\n## re-run start-up, 2 ranks gloo, seconds (median of {args.repeats})\n")
        print(bl.table(["run", "launch → `Start-up took` line", "first step done", "vs bare"], rows))
        print(f"\nimporting datasets, AutoTokenizer and modeling_llama on top of bare: {extra:.2f}s")
        for s in args.shapes:
            ratio = bl.median(x["startup"] for x in resumed[s]) / ready
            again = any(x["retokenized"] for x in resumed[s])
            vs_imports = ratio * ready / (ready + extra)
            print(f"{s}: resumed/bare {bl.verdict(ratio, 2.0, False)}; vs bare + those imports {vs_imports:.2f}x")
            print(f"{s}: re-tokenized on resume: {'YES' if again else 'no'}")
        payload.update(bare=bare, resumed=resumed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
