"""--async-checkpoint: saves written by DCP's background thread while training goes on, with the guarantees of a
blocking save: the same weights bitwise, exact resume, no partial checkpoint after kill -9, one error line when the
disk is full, and a stop that seals the pending save before it exits.

The background writes are held open with FSDP_TRAIN_FAULT=sleep_in_save, so that they land while later steps have
already changed the parameters (a staged copy that aliased them would be caught) and so that a test can act inside.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from conftest import (
    Job,
    assert_same_weights,
    assert_single_error,
    checkpoint_weights,
    ok,
    read_metrics,
    torchrun,
    train_args,
)

import fsdp_train as ft

pytestmark = pytest.mark.slow

ASYNC = "--async-checkpoint"  # bare flag: on


def checkpoint_names(ckpts: Path) -> list[str]:
    return sorted(p.name for p in ckpts.iterdir())


def test_async_saves_equal_blocking_saves_bitwise(prep, reference_run, tmp_path):
    # The shared reference run saved after every step, blocking. Here the step-4 write sleeps 3 s in the background.
    args = train_args(prep, tmp_path, "async", "--stop-at-step", 12, "--ckpt-freq", 4, "--keep-latest-k", 5, ASYNC)
    out = ok(torchrun(args, env={"FSDP_TRAIN_FAULT": "sleep_in_save:4:3"})).stdout
    # Written in the background: steps 5-7 were trained (and logged) before step-4 was sealed.
    sealed = out.index("Saved checkpoint " + str(tmp_path / "async/checkpoints/step-4"))
    assert out.index("step 7/12") < sealed, out
    assert "written in the background (training paused" in out[sealed:].splitlines()[0]
    for step in (4, 8, 12):
        assert_same_weights(reference_run["step"](step), tmp_path / f"async/checkpoints/step-{step}")
    assert [m["loss"] for m in read_metrics(tmp_path / "async")] == [m["loss"] for m in reference_run["metrics"][:12]]
    assert checkpoint_names(tmp_path / "async/checkpoints") == ["step-12", "step-4", "step-8"]


def test_kill_during_background_save_then_rerun_resumes_bitwise(prep, reference_run, tmp_path):
    args = train_args(prep, tmp_path, "exp", "--stop-at-step", 12, "--ckpt-freq", 4, ASYNC)
    job = Job(args, env={"FSDP_TRAIN_FAULT": "sleep_in_save:8:30"})
    try:
        pids = {int(m[1]): int(m[2]) for m in job.wait_for(r"FAULT sleep_in_save step 8 rank (\d) pid (\d+)", 2)}
        job.wait_for(r"step 10/12")  # training went on while step-8 was (not) being written
        os.kill(pids[1], signal.SIGKILL)
        assert job.wait(timeout=60) != 0
    finally:
        job.kill_all()
    ckpts = tmp_path / "exp" / "checkpoints"
    assert checkpoint_names(ckpts) == [".tmp-step-8", "step-4"]  # step-4 was written in the background too

    again = ok(torchrun(args))
    assert "Removing incomplete checkpoint" in again.stdout and "Resuming from step 4" in again.stdout
    assert not list(ckpts.glob(".tmp-*"))
    assert_same_weights(ckpts / "step-12", reference_run["step"](12))


def test_background_disk_full_is_one_error_and_keeps_the_previous_checkpoint(prep, tmp_path):
    proc = torchrun(
        train_args(prep, tmp_path, "exp", "--stop-at-step", 8, "--ckpt-freq", 2, ASYNC),
        env={"FSDP_TRAIN_FAULT": "enospc_in_save:4"},
    )
    assert_single_error(proc, "checkpoint at step 4 could not be saved (No space left on device); step-2 is intact")
    assert "step 5/8" in proc.stdout  # noticed when the background write ended, after training went on
    ckpts = tmp_path / "exp" / "checkpoints"
    assert checkpoint_names(ckpts) == ["step-2"]  # no step-4, no temp folder
    assert ft.find_latest_checkpoint(ckpts) == ckpts / "step-2"


def test_sigterm_during_background_save_seals_it_and_the_stop_save(prep, tmp_path):
    job = Job(
        train_args(prep, tmp_path, "exp", "--stop-at-step", 40, "--ckpt-freq", 3, ASYNC),
        env={"FSDP_TRAIN_FAULT": "sleep_in_save:3:3"},
    )
    try:
        pids = [int(m[1]) for m in job.wait_for(r"FAULT sleep_in_save step 3 rank \d pid (\d+)", 2)]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        assert job.wait(timeout=60) == 0, job.output
    finally:
        job.kill_all()
    (stopped,) = job.wait_for(r"Stopped by SIGTERM at step (\d+); checkpoint saved")
    step = int(stopped[1])
    assert 3 < step < 40
    ckpts = tmp_path / "exp" / "checkpoints"
    assert checkpoint_names(ckpts) == sorted(["step-3", f"step-{step}"])  # both sealed, nothing left half-written
    for sealed in ("step-3", f"step-{step}"):  # and sealed only once written: every rank's files are there
        assert {p.name for p in (ckpts / sealed).glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
        assert checkpoint_weights(ckpts / sealed)
    out = job.output
    assert out.index(f"Saved checkpoint {ckpts / 'step-3'}") < out.index(f"Saved checkpoint {ckpts / f'step-{step}'}")
