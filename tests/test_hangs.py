"""A stuck rank never holds the node (#23): the hang watchdog, stragglers, NCCL's fail-fast settings, and a save dir
that every node must share. Real torchrun jobs on gloo with timeouts of seconds."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from conftest import Job, assert_same_weights, ok, read_metrics, torchrun, train_args

import fsdp_train as ft

FAST = ["--hang-timeout", 0.05]  # 3 s: a tiny step takes milliseconds, a checkpoint save gets 6x


def test_a_rank_stuck_in_a_step_ends_the_job_with_every_stack_and_the_rerun_resumes_bitwise(
    prep, reference_run, tmp_path
):
    args = train_args(prep, tmp_path, "exp", "--stop-at-step", 6, "--ckpt-freq", 2, *FAST)
    job = Job(args, env={"FSDP_TRAIN_FAULT": "hang:4"})  # rank 1 stops for good after reading step 4's data
    try:
        job.wait_for("FAULT hang step 4")
        t0 = time.monotonic()
        rc = job.wait(timeout=60)  # without the watchdog: until --dist-timeout (30 min)
        waited = time.monotonic() - t0
    finally:
        job.kill_all()
    assert rc != 0 and waited < 3 + 15, (waited, job.output)  # the limit, a 1 s poll, 10 s to read the others
    hang = tmp_path / "exp" / "hang"
    stacks = {r: (hang / f"rank-{r}.txt").read_text() for r in (0, 1)}
    assert stacks[1].startswith("rank 1: step 4, phase data") and "in hook_for_tests" in stacks[1]
    assert stacks[0].startswith("rank 0: step 4, phase step")  # it went on and waits in the forward's all-gather
    (line,) = [x for x in job.output.splitlines() if "error: no progress for" in x]
    assert "at step 4" in line and "stopped: rank 1 (data)" in line and str(hang) in line, line
    status = json.loads((tmp_path / "exp" / "status.json").read_text())
    assert status["state"] == "hung" and "rank 1 (data)" in status["hang"]

    again = ok(torchrun(args))  # the same command: it resumes from the last complete checkpoint
    assert "Resuming from step 2" in again.stdout
    assert_same_weights(tmp_path / "exp" / "checkpoints" / "step-6", reference_run["step"](6))


def test_a_slow_rank_is_named_and_a_long_save_is_not_a_hang(prep, tmp_path):
    """Rank 1 reads each step's data 0.3 s slower: named once, after two log windows; metrics.jsonl has the slowest
    rank. A checkpoint save that takes 5 s (longer than the 3 s limit, within the 6x a save gets) finishes."""
    args = train_args(prep, tmp_path, "slow", "--stop-at-step", 6, "--log-freq", 2, "--ckpt-freq", 4, *FAST)
    proc = ok(torchrun(args, env={"FSDP_TRAIN_FAULT": "slow_data:1:0.3,sleep_in_save:4:5"}))
    assert proc.stdout.count("FAULT sleep_in_save step 4") == 2  # both ranks slept in the save
    warnings = [line for line in proc.stdout.splitlines() if "is a straggler" in line]
    assert len(warnings) == 1 and "Rank 1 is a straggler: it reads its data in 3" in warnings[0], proc.stdout
    assert [m["time/slowest_read_rank"] for m in read_metrics(tmp_path / "slow")] == [1, 1, 1]
    assert not (tmp_path / "slow" / "hang").exists()


def test_straggler_needs_two_slow_windows_in_a_row():
    slow: dict[int, int] = {}
    assert ft.straggler([10.0, 300.0, 11.0], slow) is None  # one window: could be a hiccup
    assert ft.straggler([10.0, 12.0, 11.0], slow) is None  # and it was
    assert ft.straggler([10.0, 300.0, 11.0], slow) is None
    assert ft.straggler([10.0, 290.0, 11.0], slow) == 1
    assert ft.straggler([10.0, 290.0, 11.0], slow) is None  # named once a run
    assert ft.straggler([10.0, 25.0, 11.0], {1: 1}) is None  # 1.5x but not 20 ms over: noise on a fast reader


def test_the_nccl_fail_fast_settings_are_torchs_own_names():
    """NCCL_FAIL_FAST sets environment variables that only torch reads: a renamed one would silently do nothing."""
    header = Path(torch.__file__).parent / "include/torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp"
    names = set(re.findall(r'"(TORCH_NCCL_[A-Z_]+)"', header.read_text()))
    assert set(ft.NCCL_FAIL_FAST) <= names, set(ft.NCCL_FAIL_FAST) - names


def test_a_save_dir_that_is_not_shared_is_refused_on_every_node(prep, tmp_path):
    from test_operate import two_nodes

    first, second = (train_args(prep, tmp_path / node, "multi", "--stop-at-step", 2) for node in ("a", "b"))
    nodes = two_nodes(first, "unshared", second)
    try:
        assert nodes[0].wait(timeout=120) != 0  # rank 0's node fails the job (the other's agent waits for it)
        nodes[1].wait_for("error: --save-dir", timeout=60)
    finally:
        for node in nodes:
            node.kill_all()
    for node in nodes:
        errors = [line for line in node.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "is not one folder for every node: rank(s) 1 cannot see" in errors[0], node.output
    assert not list((tmp_path / "a").glob(".shared-check-*"))  # the probe is removed


def test_ranks_waiting_for_a_stalled_data_preparation_end_the_job(prep, tmp_path):
    """Rank 0 tokenizes while the others wait on the file system, outside any collective: they watch its temp folder
    grow. Rank 0 stalled (a sleep after tokenizing: nothing more is written) ends the job after the limit, said by
    rank 1, instead of a wait without end."""
    args = train_args(prep, tmp_path, "p", "--stop-at-step", 1, *FAST)
    job = Job(args, env={"FSDP_TRAIN_FAULT": "sleep_in_prepare:0:600"})
    try:
        job.wait_for("FAULT sleep_in_prepare")
        t0 = time.monotonic()
        rc = job.wait(timeout=60)
        waited = time.monotonic() - t0
    finally:
        job.kill_all()
    assert rc != 0 and waited < 3 + 10, (waited, job.output)
    (line,) = [x for x in job.output.splitlines() if x.startswith("error:")]
    assert "rank 0, preparing the train data, made no progress for" in line, job.output
