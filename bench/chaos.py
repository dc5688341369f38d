"""Chaos test: kill -9 a 2-process CPU run at a random moment, re-run the same command, get bitwise-equal weights.

    python bench/chaos.py --runs 10 [--seed S] [--steps 24] [--ckpt-freq 4] [--workdir DIR] [--keep]
        [--async-checkpoint]

Prepares the bundled data/ and a tiny model, times one uninterrupted reference run, then N times: starts the same
run, SIGKILLs a random worker or the torchrun agent right after a random training step has been logged (or, on about a
third of the runs, inside a checkpoint save held open by FSDP_TRAIN_FAULT=sleep_in_save), re-runs the same command until it exits 0 (at most 3
times) and compares the final checkpoint's model weights with the reference's, tensor by tensor with torch.equal.
With --async-checkpoint the chaos runs write their checkpoints in the background (a kill "inside a save" then lands
while training goes on) and are still compared with the blocking reference.
Exit code 0 only if every run survived and is identical; a JSON summary goes to bench/results/chaos-<time>.json.

    reference: 24 steps in 8.84s (seed 762521)
    run 1: killed agent at 7.10s (inside save of step 20) -> resumed from step 16, identical
    run 2: killed worker rank 0 at 6.47s (inside save of step 8) -> resumed from step 4, identical
    run 3: killed worker rank 1 at 3.92s (last logged step 0) -> resumed from step 0 (no checkpoint yet), identical
    run 4: finished before kill (planned 7.77s, exit 0) -> run complete, identical
    survived 4/4, identical 4/4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--vocab-size", "512", "--hidden-size", "64", "--num-layers", "2"]
TRAIN = ["-s", "64", "-b", "2", "--lr", "3e-3", "--warmup-steps", "2", "--log-freq", "1"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
GRACE_S = 30.0  # after the kill, how long the rest of the job may take to die by itself before killpg


def prepare(work: Path) -> tuple[Path, Path]:
    """organize_data.py -> data_to_hf.py -> model_download.py --tiny, as tests/conftest.py's `prep` runs them."""
    splits, dataset, model = work / "splits", work / "dataset", work / "tiny"
    if not (dataset.is_dir() and model.is_dir()):  # a reused --workdir keeps its inputs
        for args in (
            ["organize_data.py", "--src_dir", "data", "--dst_root", splits, "--num_dirs", "3", "--overwrite"],
            ["data_to_hf.py", "--data_folder", splits, "--save_dir", dataset, "--overwrite"],
            ["model_download.py", "--tiny", model, "--overwrite", *TINY],
        ):
            subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, check=True, capture_output=True)
    return dataset, model


def run_to_log(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run to completion with output in `log`; exit code and wall seconds."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.monotonic() - t0


# ----------------------------------------------------------------------------------------------------------------------
# Processes, from /proc


def proc_table() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, ppid, session id) of every live process (zombies left out)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if fields[0] != "Z":
            table[int(stat.parent.name)] = (fields[0], int(fields[1]), int(fields[3]))
    return table


def workers(agent: int) -> dict[int, int]:
    """rank -> pid of the torchrun agent's children that have exec'd with RANK set (only RANK is read)."""
    found = {}
    for pid, (_, ppid, _) in proc_table().items():
        if ppid == agent:
            with contextlib.suppress(OSError):
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                found.update({int(v[5:]): pid for v in env if v.startswith(b"RANK=")})
    return found


def reap_session(job: subprocess.Popen) -> int:
    """Wait for every process of the job's session to end; killpg after GRACE_S. Returns how many had to be killed."""
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        job.poll()
        if not any(sid == job.pid for _, _, sid in proc_table().values()):
            return 0
        time.sleep(0.1)
    left = sum(sid == job.pid for _, _, sid in proc_table().values())
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    return left


# ----------------------------------------------------------------------------------------------------------------------
# One chaos run


def model_weights(ckpt: Path, out_pt: Path) -> dict:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt, out_pt)
    return torch.load(out_pt, weights_only=True)["model"]


def compare(reference: dict, weights: dict) -> str | None:
    """None when both state dicts hold the same keys and bitwise-equal tensors, else what differs."""
    differ = sorted(set(reference) ^ set(weights)) + [
        k for k in reference if k in weights and not reference[k].equal(weights[k])
    ]
    return f"{len(differ)} tensors differ: {', '.join(differ[:3])}" if differ else None


def chaos_run(i: int, rng: random.Random, cmd: list[str], ckpt_freq: int, steps: int, logs: Path) -> dict:
    """Start the job, SIGKILL one of its processes, wait for all of them to end, re-run it until it exits 0."""
    rec: dict = {"run": i, "fault_step": None, "finished_before_kill": False, "left_after_grace": 0}
    in_save = rng.random() < 1 / 3
    victim_rank = rng.choice([0, 1, None])  # None: the torchrun agent
    # Kill right after a random step is logged, so the kill lands in training, not in the start-up.
    rec["planned_step"] = None if in_save else rng.randrange(1, steps)
    env = dict(ENV)
    if in_save:
        rec["fault_step"] = rng.randrange(ckpt_freq, steps, ckpt_freq)
        env["FSDP_TRAIN_FAULT"] = f"sleep_in_save:{rec['fault_step']}:10"
    log = logs / f"run-{i}.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    target, said = None, {}
    while target is None and job.poll() is None:  # poll until the victim exists and its moment has come
        time.sleep(0.02)
        if in_save:
            said = {
                int(r): int(p)
                for r, p in re.findall(r"FAULT sleep_in_save step \d+ rank (\d+) pid (\d+)", log.read_text())
            }
            target = (job.pid if said else None) if victim_rank is None else said.get(victim_rank)
        elif re.search(rf"step {rec['planned_step']}/\d+ \|", log.read_text()):
            target = job.pid if victim_rank is None else workers(job.pid).get(victim_rank)
    rec.update(victim="agent" if victim_rank is None else f"worker rank {victim_rank}", pid=target)
    if target is None:
        rec["finished_before_kill"] = True
    else:
        with contextlib.suppress(ProcessLookupError):  # it may have ended on its own a moment ago
            os.kill(target, signal.SIGKILL)
        rec["killed_s"] = round(time.monotonic() - t0, 2)
        logged = re.findall(r"step (\d+)/\d+ \|", log.read_text())  # read now: survivors may log a little more
        rec["last_logged_step"] = int(logged[-1]) if logged else 0
    rec["left_after_grace"] = reap_session(job)
    rec["first_rc"] = job.returncode

    rec["rerun_rcs"], rec["resumed_from"] = [], None
    if not (rec["finished_before_kill"] and job.returncode == 0):
        for attempt in range(1, 4):
            rc, _ = run_to_log(cmd, logs / f"run-{i}-rerun-{attempt}.log")
            rec["rerun_rcs"].append(rc)
            text = (logs / f"run-{i}-rerun-{attempt}.log").read_text()
            if rec["resumed_from"] is None and (m := re.search(r"Resuming from step (\d+)|Run already complete", text)):
                rec["resumed_from"] = int(m[1]) if m[1] else "complete"
            if rc == 0:
                break
    rec["survived"] = job.returncode == 0 if not rec["rerun_rcs"] else rec["rerun_rcs"][-1] == 0
    return rec


def describe(rec: dict) -> str:
    if rec["finished_before_kill"]:
        head = f"finished before kill (planned after step {rec['planned_step']}, exit {rec['first_rc']})"
    else:
        where = (
            f"inside save of step {rec['fault_step']}"
            if rec["fault_step"]
            else f"last logged step {rec['last_logged_step']}"
        )
        head = f"killed {rec['victim']} at {rec['killed_s']:.2f}s ({where})"
    if rec["left_after_grace"]:
        head += f", {rec['left_after_grace']} process(es) still alive after {GRACE_S:.0f}s"
    if not rec["rerun_rcs"]:
        tail = "run complete"
    elif rec["resumed_from"] == "complete":
        tail = "already complete"
    elif rec["resumed_from"] is None:
        tail = "resumed from step 0 (no checkpoint yet)"
    else:
        tail = f"resumed from step {rec['resumed_from']}"
    if not rec["survived"]:
        tail += f", re-runs exited {rec['rerun_rcs']}"
    verdict = "identical" if rec["identical"] else f"NOT identical ({rec['differ']})"
    return f"run {rec['run']}: {head} -> {tail}, {verdict}"


# ----------------------------------------------------------------------------------------------------------------------
# main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="chaos runs (default 10)")
    parser.add_argument("--seed", type=int, default=None, help="victims and kill times (default: random, printed)")
    parser.add_argument("--steps", type=int, default=24, help="--max-steps of every run (default 24)")
    parser.add_argument("--ckpt-freq", type=int, default=4, help="--ckpt-freq of every run (default 4)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep inputs and runs here (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="do not delete the temp workdir at the end")
    parser.add_argument(
        "--async-checkpoint",
        action="store_true",
        help="the chaos runs save in the background (--async-checkpoint on); the reference still saves blocking",
    )
    args = parser.parse_args()
    if args.runs < 1 or args.steps <= args.ckpt_freq or args.ckpt_freq < 1:
        parser.error("need --runs >= 1 and 1 <= --ckpt-freq < --steps (a save to kill inside must exist)")
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="chaos-"))
    save, logs = work / f"save-{stamp}", work / f"logs-{stamp}"
    logs.mkdir(parents=True)
    t_start = time.monotonic()

    dataset, model = prepare(work)
    trainer = ROOT / "fsdp_train.py"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    train = ["-d", str(dataset), "-m", str(model), "--save-dir", str(save), *TRAIN]
    train += ["--max-steps", str(args.steps), "--ckpt-freq", str(args.ckpt_freq)]

    def cmd(exp: str, *extra: str) -> list[str]:
        return [*launcher, str(trainer), "-e", exp, *train, *extra]

    saves = ("--async-checkpoint", "on") if args.async_checkpoint else ()

    rc, ref_s = run_to_log(cmd("ref"), logs / "ref.log")
    if rc != 0:
        sys.exit(f"error: the reference run exited {rc}; see {logs / 'ref.log'}")
    final = f"checkpoints/step-{args.steps}"
    reference = model_weights(save / "ref" / final, work / "ref.pt")
    print(f"reference: {args.steps} steps in {ref_s:.2f}s (seed {seed})", flush=True)

    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    rng, records = random.Random(seed), []
    for i in range(1, args.runs + 1):
        rec = chaos_run(i, rng, cmd(f"run-{i}", *saves), args.ckpt_freq, args.steps, logs)
        try:
            rec["differ"] = compare(reference, model_weights(save / f"run-{i}" / final, work / f"run-{i}.pt"))
        except (Exception, CheckpointException) as e:  # a missing/unreadable checkpoint fails this run, not the others
            rec["differ"] = f"no readable {final}: {type(e).__name__}: {e}"
        rec["identical"] = rec["differ"] is None
        records.append(rec)
        print(describe(rec), flush=True)

    survived, identical = sum(r["survived"] for r in records), sum(r["identical"] for r in records)
    print(f"survived {survived}/{args.runs}, identical {identical}/{args.runs}")
    passed = survived == identical == args.runs
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    summary = {
        "seed": seed,
        "runs_requested": args.runs,
        "steps": args.steps,
        "ckpt_freq": args.ckpt_freq,
        "async_checkpoint": args.async_checkpoint,
        "reference_s": round(ref_s, 2),
        "total_s": round(time.monotonic() - t_start, 1),
        "survived": survived,
        "identical": identical,
        "runs": records,
    }
    (results / f"chaos-{stamp}.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.workdir is None and (args.keep or not passed):  # a failure keeps its logs and checkpoints to inspect
        print(f"workdir kept: {work}", file=sys.stderr)
    elif args.workdir is None:
        shutil.rmtree(work)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
