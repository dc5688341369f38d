"""Operating a running job: control commands and status, HSDP, and two torchrun "nodes" on one machine."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import sys

import pytest
import torch
from conftest import (
    ROOT,
    Job,
    assert_runs_close,
    assert_single_error,
    checkpoint_weights,
    copy_run,
    in_process,
    ok,
    read_metrics,
    run,
    torchrun,
    train_args,
)

import fsdp_train as ft

pytestmark = pytest.mark.slow


def control(*args) -> subprocess.CompletedProcess:
    """`fsdp_train.py control ...` in this process: the CLI's own code without a Python start-up (the job and the
    command meet only through files). test_control_on_a_folder_that_is_no_job runs the real command line."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = ft.control_main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue())


def control_cli(*args) -> subprocess.CompletedProcess:
    return run([sys.executable, "fsdp_train.py", "control", *args])


def test_control_save_status_stop_then_resume(prep, tmp_path):
    exp = tmp_path / "exp"
    args = train_args(prep, tmp_path, "exp", "--max-steps", 5000, "--ckpt-freq", 0, "--log-freq", 20)
    job = Job(args)
    try:
        job.wait_for(r"step 40/5000")
        listed = ok(control("list", tmp_path)).stdout
        assert listed.startswith("exp: running | step ") and "ETA" in listed
        assert "requested 'save'" in ok(control("save", exp)).stdout.lower()
        (saved,) = job.wait_for(r"Saved checkpoint \S+/step-(\d+)")
        assert job.proc.poll() is None  # a save request keeps training
        ok(control("stop", exp))
        (stopped,) = job.wait_for(r"Stopped by control stop at step (\d+); checkpoint saved")
        assert job.wait() == 0
    finally:
        job.kill_all()
    step = int(stopped[1])
    assert int(saved[1]) < step < 5000
    status = ok(control("status", exp)).stdout
    assert f"exp: stopped | step {step}/5000" in status and f"last checkpoint step-{step}" in status
    assert_single_error(control("stop", exp), "is not running (stopped); nothing to stop")
    assert not (exp / "control.json").exists()

    resumed = ok(torchrun([*args, "--stop-at-step", step + 2]))
    assert f"Resuming from step {step}" in resumed.stdout
    # --stop-at-step short of the schedule: "paused", which a requeue script must not take for a stop to resume
    status = json.loads((exp / "status.json").read_text())
    assert (status["state"], status["step"], status["schedule_steps"]) == ("paused", step + 2, 5000)
    assert (
        f"exp: paused | step {step + 2}/{step + 2} (--stop-at-step; the schedule has 5000)"
        in ok(control("status", exp)).stdout
    )


def test_control_abort_exits_without_saving(prep, tmp_path):
    exp = tmp_path / "exp"
    job = Job(train_args(prep, tmp_path, "exp", "--max-steps", 5000, "--ckpt-freq", 0, "--log-freq", 20))
    try:
        job.wait_for(r"step 20/5000")
        ok(control("abort", exp))
        assert job.wait() != 0
    finally:
        job.kill_all()
    assert "error: aborted by `fsdp_train.py control abort` at step" in job.output
    assert ft.find_latest_checkpoint(exp / "checkpoints") is None
    assert "exp: aborted" in ok(control("status", exp)).stdout


def test_stale_control_request_of_a_dead_job_is_dropped(prep, four_steps, tmp_path, capfd):
    save_dir = copy_run(four_steps, tmp_path / "save")  # a finished 4-step job
    (save_dir / "exp" / "control.json").write_text(json.dumps({"command": "stop"}))
    proc = ok(in_process(capfd, train_args(prep, save_dir, "exp", "--stop-at-step", 6)))
    assert "Ignoring a stale control request 'stop'" in proc.stdout
    assert [m["global_step"] for m in read_metrics(save_dir / "exp")][-1] == 6  # it did not stop at step 5


def test_control_on_a_folder_that_is_no_job(tmp_path):
    assert_single_error(control_cli("status", tmp_path), "is no job folder")
    assert_single_error(control("list", tmp_path), "no jobs under")


def test_hsdp_2x2_trains_like_fsdp_over_4_ranks(prep, big_batch_run, tmp_path, capfd):
    # The reference: plain FSDP on 2 ranks with twice the per-rank batch, the same global batches (cheaper than 4).
    hsdp_run = ok(torchrun(train_args(prep, tmp_path, "hsdp", "--stop-at-step", 3, "--replicate-degree", 2), nproc=4))
    assert "Device mesh (2, 2) ('replicate', 'shard')" in hsdp_run.stdout  # really hybrid, not plain FSDP
    assert_runs_close(big_batch_run, tmp_path / "hsdp", step=3, weight_atol=5e-5)
    bad = in_process(capfd, train_args(prep, tmp_path, "odd", "--stop-at-step", 1, "--replicate-degree", 2))
    assert_single_error(bad, "--replicate-degree 2 does not divide the world size 1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args: list, job_id: str, second: list | None = None) -> list[Job]:
    """Two torchrun launchers of one process each, meeting through a c10d rendezvous like two nodes of one job (the
    second with its own flags if given)."""
    rdzv = (
        "--nnodes",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv-id",
        job_id,
    )
    return [Job(a, nproc=1, launcher_args=rdzv) for a in (args, second or args)]


def test_two_nodes_train_checkpoint_and_resume_like_one(prep, reference_run, tmp_path):
    for steps in (4, 6):
        nodes = two_nodes(train_args(prep, tmp_path, "multi", "--stop-at-step", steps, "--ckpt-freq", 2), f"job{steps}")
        try:
            assert [node.wait(timeout=180) for node in nodes] == [0, 0], nodes[0].output + nodes[1].output
        finally:
            for node in nodes:
                node.kill_all()
    assert "Resuming from step 4" in nodes[0].output + nodes[1].output
    single, multi = (
        checkpoint_weights(reference_run["step"](6)),
        checkpoint_weights(tmp_path / "multi/checkpoints/step-6"),
    )
    assert all(torch.equal(single[k], multi[k]) for k in single)  # same world size: same bits as one node


def test_slurm_example_launches_this_script():
    text = (ROOT / "examples" / "slurm.sbatch").read_text()
    assert "srun" in text and "torchrun" in text and "--signal=USR1@120" in text and "fsdp_train.py" in text


@pytest.mark.parametrize(
    "state, torchrun_rc, requeued, script_rc",
    [("stopped", 1, True, 0), ("hung", 1, True, 0), ("finished", 0, False, 0), ("running", 1, False, 1)],
)
def test_slurm_example_requeues_a_stopped_run_whatever_torchrun_exits_with(
    tmp_path, state, torchrun_rc, requeued, script_rc
):
    """The sbatch script's decision, with stand-ins for srun (which writes status.json as the job would and exits as
    torchrun does: 1 after a signal stop) and scontrol."""
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/bin/bash\nwhile [ $# -gt 0 ]; do case "$1" in --save-dir) d=$2;; -e) e=$2;; esac; shift; done\n'
        f'mkdir -p "$d/$e" && echo \'{{"state": "{state}"}}\' > "$d/$e/status.json"; exit {torchrun_rc}\n'
    )
    (bin_dir / "scontrol").write_text(
        f'#!/bin/bash\n[ "$1" = requeue ] && echo "$@" >> {tmp_path}/requeued\necho node0\n'
    )
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SAVE_DIR": str(tmp_path / "out"), "SLURM_JOB_ID": "42",
           "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node0"}  # fmt: skip
    proc = subprocess.run(["bash", ROOT / "examples" / "slurm.sbatch"], env=env, capture_output=True, text=True)
    assert proc.returncode == script_rc, proc.stderr
    assert (tmp_path / "requeued").exists() == requeued


def test_progress_bar_summary_tensorboard_and_loss_curve(reference_run, validated_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = validated_run["output"]  # 4 steps on a terminal, evaluated at steps 2 and 4
    bar = [line for line in out.replace("\r", "\n").splitlines() if "4/4 [" in line]
    assert bar and "step/s" in bar[-1] and "loss=" in bar[-1] and "val=" in bar[-1]
    assert "step 2/4 |" not in out  # on a terminal the bar replaces the per-step lines
    for part in ("Paused at step 4 of the schedule's ", "steps 0 -> 4 (4 in this run)", "tok/s", "final train loss", "validation loss",
                 "peak memory (rank 0)", "checkpoints/step-4", "loss curve", "TensorBoard: tensorboard --logdir"):  # fmt: skip
        assert part in out, part

    exp = validated_run["exp"]
    assert (exp / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_metrics(exp)
    events = EventAccumulator(str(exp / "tb"))
    events.Reload()
    keys = {k for m in records for k in m} - {"global_step", "total_steps"}
    assert set(events.Tags()["scalars"]) == keys  # the same keys as metrics.jsonl
    assert [e.step for e in events.Scalars("loss")] == [m["global_step"] for m in records]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([m["loss"] for m in records])

    # Not a terminal (CI, Slurm logs): plain log lines, no bar.
    plain = reference_run["stdout"]
    assert "step 2/30 |" in plain and "step/s" not in plain
