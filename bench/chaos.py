"""Chaos test: kill -9 a 2-process CPU run at a random moment, re-run the same command, get bitwise-equal weights.

    python bench/chaos.py --runs 10 [--seed S] [--steps 24] [--ckpt-freq 4] [--async-checkpoint]

After one uninterrupted reference run, each run SIGKILLs a random worker or the torchrun agent right after a random
step is logged (or, on about a third of the runs, inside a save held open by FSDP_TRAIN_FAULT=sleep_in_save), re-runs
the command until it exits 0 (at most 3 times) and compares the final checkpoint's weights with the reference's,
tensor by tensor (torch.equal). Exit code 0 only if every run survived and is identical.

    run 1: killed agent at 7.10s (inside save of step 20) -> resumed from step 16, identical
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

from benchlib import ROOT, checkpoint_weights, parse, prepare_dataset, run, session, tiny_model, torchrun

TRAIN = ["-s", "64", "-b", "2", "--lr", "3e-3", "--warmup-steps", "2", "--log-freq", "1"]
QUICK = {"runs": 1, "steps": 8, "ckpt_freq": 4}


def configure(p) -> None:
    p.add_argument("--runs", type=int, default=10, help="chaos runs (default 10)")
    p.add_argument("--seed", type=int, default=None, help="victims and kill times (default: random, printed)")
    p.add_argument("--steps", type=int, default=24, help="--max-steps of every run (default 24)")
    p.add_argument("--ckpt-freq", type=int, default=4, help="--ckpt-freq of every run (default 4)")
    p.add_argument("--async-checkpoint", action="store_true", help="chaos runs save in the background (reference not)")


def check(args) -> str | None:
    if args.runs < 1 or args.steps <= args.ckpt_freq or args.ckpt_freq < 1:
        return "need --runs >= 1 and 1 <= --ckpt-freq < --steps (a save to kill inside must exist)"
    return None


def proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, session id) of every live process (zombies left out)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # the process ended while we looked
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                table[int(stat.parent.name)] = (int(fields[1]), int(fields[3]))
    return table


def workers(agent: int) -> dict[int, int]:
    """rank -> pid of the torchrun agent's children that have exec'd with RANK set (only RANK is read)."""
    found = {}
    for pid, (ppid, _) in proc_table().items():
        if ppid == agent:
            with contextlib.suppress(OSError):
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                found.update({int(v[5:]): pid for v in env if v.startswith(b"RANK=")})
    return found


def chaos_run(i: int, rng: random.Random, cmd: list[str], args, logs: Path) -> dict:
    """Start the job, SIGKILL one of its processes at its moment, let the rest end, re-run it until it exits 0."""
    in_save, victim = rng.random() < 1 / 3, rng.choice([0, 1, None])  # None: the torchrun agent
    rec = {"run": i, "victim": "agent" if victim is None else f"worker rank {victim}", "fault_step": None}
    rec["planned_step"] = None if in_save else rng.randrange(1, args.steps)
    if in_save:
        rec["fault_step"] = rng.randrange(args.ckpt_freq, args.steps, args.ckpt_freq)
    env = {"FSDP_TRAIN_FAULT": f"sleep_in_save:{rec['fault_step']}:10"} if in_save else {}
    t0 = time.monotonic()

    def watch(job, proc) -> None:  # kill right after the planned step is logged, or inside the held save
        if "killed_s" in rec:
            return
        text, target = job.output, None
        if in_save:
            said = {int(r): int(p) for r, p in re.findall(r"FAULT sleep_in_save step \d+ rank (\d+) pid (\d+)", text)}
            target = (proc.pid if said else None) if victim is None else said.get(victim)
        elif re.search(rf"step {rec['planned_step']}/\d+ \|", text):
            target = proc.pid if victim is None else workers(proc.pid).get(victim)
        if target:
            with contextlib.suppress(ProcessLookupError):  # it may have ended on its own a moment ago
                os.kill(target, signal.SIGKILL)
            logged = re.findall(r"step (\d+)/\d+ \|", text)
            rec.update(killed_s=round(time.monotonic() - t0, 2), last_logged_step=int(logged[-1]) if logged else 0)

    job = run(cmd, env=env, log=logs / f"run-{i}.log", watch=watch)  # returns once the rest has ended, or after 30 s
    left = sum(sid == job.pid for _, sid in proc_table().values())  # the job's session: its id is the agent's pid
    rec.update(first_rc=job.rc, left_after_grace=left, rerun_rcs=[], resumed_from=None)
    with contextlib.suppress(ProcessLookupError):
        if left:
            os.killpg(job.pid, signal.SIGKILL)
    if "killed_s" in rec or job.rc != 0:
        for attempt in range(1, 4):
            rerun = run(cmd, log=logs / f"run-{i}-rerun-{attempt}.log")
            rec["rerun_rcs"].append(rerun.rc)
            m = re.search(r"Resuming from step (\d+)|Run already complete", rerun.output)
            if rec["resumed_from"] is None and m:
                rec["resumed_from"] = int(m[1]) if m[1] else "complete"
            if rerun.rc == 0:
                break
    rec["survived"] = (rec["rerun_rcs"] or [job.rc])[-1] == 0
    return rec


def describe(rec: dict) -> str:
    if "killed_s" not in rec:
        head = f"finished before kill (planned after step {rec['planned_step']}, exit {rec['first_rc']})"
    else:
        where = f"last logged step {rec['last_logged_step']}"
        where = f"inside save of step {rec['fault_step']}" if rec["fault_step"] else where
        head = f"killed {rec['victim']} at {rec['killed_s']:.2f}s ({where})"
    if rec["left_after_grace"]:
        head += f", {rec['left_after_grace']} process(es) still alive after 30s"
    tail = f"resumed from step {rec['resumed_from']}"
    if not rec["rerun_rcs"]:
        tail = "run complete"
    elif rec["resumed_from"] in (None, "complete"):
        tail = "resumed from step 0 (no checkpoint yet)" if rec["resumed_from"] is None else "already complete"
    tail += "" if rec["survived"] else f", re-runs exited {rec['rerun_rcs']}"
    same = "identical" if rec["identical"] else f"NOT identical ({rec['differ']})"
    return f"run {rec['run']}: {head} -> {tail}, {same}"


def main(argv: list[str] | None = None) -> int:
    args = parse(__doc__, configure, QUICK, check, argv)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    with session("chaos", args) as (work, payload):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        save, logs = work / f"save-{stamp}", work / f"logs-{stamp}"
        logs.mkdir(parents=True)
        model = tiny_model(work / "tiny", vocab_size=512, hidden_size=64, num_layers=2)
        train = ["-d", prepare_dataset(work), "-m", model, "--save-dir", save, *TRAIN, "--max-steps", args.steps]
        train += ["--ckpt-freq", args.ckpt_freq]

        def cmd(exp: str, *extra: str) -> list[str]:
            return [*torchrun(2), ROOT / "fsdp_train.py", "-e", exp, *train, *extra]

        ref = run(cmd("ref"), log=logs / "ref.log").check()
        final = f"checkpoints/step-{args.steps}"
        reference = checkpoint_weights(save / "ref" / final)
        print(f"reference: {args.steps} steps in {ref.wall:.2f}s (seed {seed})", flush=True)

        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        rng, records = random.Random(seed), []
        background = ["--async-checkpoint", "on"] if args.async_checkpoint else []
        for i in range(1, args.runs + 1):
            rec = chaos_run(i, rng, cmd(f"run-{i}", *background), args, logs)
            try:
                weights = checkpoint_weights(save / f"run-{i}" / final)
                differ = sorted(set(reference) ^ set(weights))
                differ += [k for k in reference if k in weights and not reference[k].equal(weights[k])]
                rec["differ"] = f"{len(differ)} tensors differ: {', '.join(differ[:3])}" if differ else None
            except (Exception, CheckpointException) as e:  # a missing/unreadable checkpoint fails this run only
                rec["differ"] = f"no readable {final}: {type(e).__name__}: {e}"
            rec["identical"] = rec["differ"] is None
            records.append(rec)
            print(describe(rec), flush=True)
        survived, identical = sum(r["survived"] for r in records), sum(r["identical"] for r in records)
        print(f"survived {survived}/{args.runs}, identical {identical}/{args.runs}")
        payload.update(seed=seed, reference_s=ref.wall, survived=survived, identical=identical, runs=records)
        payload["passed"] = survived == identical == args.runs
    return 0 if payload["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
