"""What a cluster does to a job: kill -9 anywhere, pre-emption signals, another world size, damaged checkpoints.

Every test re-runs the same command afterwards and checks the result against an uninterrupted run, bitwise.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from conftest import (
    Job,
    assert_same_weights,
    assert_single_error,
    copy_run,
    in_process,
    make_hf_cache,
    ok,
    read_metrics,
    shared,
    torchrun,
    traced,
    train_args,
    tree_digest,
)

import fsdp_train as ft

pytestmark = pytest.mark.slow


@shared("module")
def reference(reference_run):
    """Checkpoint folder of the uninterrupted run at a step: what every interrupted run must reproduce exactly."""
    return reference_run["step"]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until_dead(pids: list[int], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still alive: {[p for p in pids if alive(p)]}"
        time.sleep(0.1)


# ----------------------------------------------------------------------------------------------------------------------
# kill -9


@pytest.mark.parametrize("victim", ["worker", "agent"])
def test_sigkill_inside_a_checkpoint_save_then_rerun_is_bitwise_equal(prep, reference, tmp_path, victim):
    args = train_args(prep, tmp_path, "exp", "--stop-at-step", 12, "--ckpt-freq", 4)
    # 4 s: plenty to kill inside it, and what the surviving rank sleeps out before torchrun ends it.
    job = Job(args, env={"FSDP_TRAIN_FAULT": "sleep_in_save:8:4"})
    try:
        pids = {int(m[1]): int(m[2]) for m in job.wait_for(r"FAULT sleep_in_save step 8 rank (\d) pid (\d+)", 2)}
        os.kill(pids[1] if victim == "worker" else job.proc.pid, signal.SIGKILL)
        if victim == "agent":  # the workers notice their agent is gone and die too: no orphan keeps writing
            wait_until_dead(list(pids.values()))
        assert job.wait(timeout=60) != 0
    finally:
        job.kill_all()
    ckpts = tmp_path / "exp" / "checkpoints"
    assert (ckpts / ".tmp-step-8").is_dir() and not (ckpts / "step-8").exists()
    assert ft.find_latest_checkpoint(ckpts) == ckpts / "step-4"
    if victim == "agent":  # the same files on disk as a killed worker leaves; the rerun from them is tested once
        return

    again = ok(torchrun(args))
    assert "Removing incomplete checkpoint" in again.stdout and "Resuming from step 4" in again.stdout
    assert not list(ckpts.glob(".tmp-*"))
    assert_same_weights(ckpts / "step-12", reference(12))


# ----------------------------------------------------------------------------------------------------------------------
# Pre-emption and Ctrl+C, through torchrun


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_signal_to_torchrun_saves_and_stops_then_rerun_is_bitwise_equal(prep, reference, tmp_path, sig):
    args = train_args(prep, tmp_path, "exp", "--stop-at-step", 30, "--ckpt-freq", 100)
    # torchrun forwards the signals it handles; Slurm's USR1 must be added to its list (as in the README).
    job = Job(args, launcher_args=("--signals-to-handle", "SIGTERM,SIGINT,SIGUSR1"))
    try:
        job.wait_for(r"step 2/30")
        os.kill(job.proc.pid, getattr(signal, sig))
        rc = job.wait(timeout=60)
    finally:
        job.kill_all()
    # What a requeue script sees (README "Pre-emption"): the workers saved and exited 0, but torchrun's agent re-raises
    # the signal it handled as SignalException (torch/distributed/elastic/agent/server/api.py), so torchrun exits 1.
    # status.json says the stop was clean.
    assert rc == 1 and "SignalException" in job.output
    status = json.loads((tmp_path / "exp" / "status.json").read_text())
    assert (status["state"], status["stopped_by"]) == ("stopped", sig)
    (stopped,) = job.wait_for(rf"Stopped by {sig} at step (\d+); checkpoint saved")
    step = int(stopped[1])
    assert 2 <= step < 30
    ckpts = tmp_path / "exp" / "checkpoints"
    assert ft.find_latest_checkpoint(ckpts) == ckpts / f"step-{step}"
    assert_same_weights(ckpts / f"step-{step}", reference(step))  # the state after that step, exactly
    if sig != "SIGTERM":  # a signal's save is the same save; resuming from it is tested once
        return

    again = ok(torchrun(args))
    assert f"Resuming from step {step}" in again.stdout
    assert_same_weights(ckpts / "step-30", reference(30))


def test_sighup_asks_for_a_stop_like_sigterm():
    """A closed terminal or ssh session (torchrun forwards SIGHUP by default) saves and stops like SIGTERM: the same
    handler, so one in-process check suffices next to the torchrun runs above."""
    stop = ft.StopRequest(rank=0)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert stop.signum == signal.SIGHUP
    finally:
        stop.restore()


def test_second_sigint_aborts_at_once_without_saving(prep, tmp_path):
    job = Job(
        train_args(prep, tmp_path, "exp", "--stop-at-step", 8, "--ckpt-freq", 4),
        env={"FSDP_TRAIN_FAULT": "sleep_in_save:4:60"},
    )
    try:
        pids = [int(m[1]) for m in job.wait_for(r"FAULT sleep_in_save step 4 rank \d pid (\d+)", 2)]
        for pid in pids:
            os.kill(pid, signal.SIGINT)  # first: stop after this step (the save is still sleeping)
        time.sleep(1.2)  # a second SIGINT within 1 s is the same Ctrl+C forwarded by torchrun, not a second press
        t0 = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGINT)
        wait_until_dead(pids)
        assert time.monotonic() - t0 < 10  # not the 60 s the save would still have slept
        job.wait(timeout=60)
    finally:
        job.kill_all()
    assert "Aborted by a second SIGINT: no checkpoint saved" in job.output
    assert ft.find_latest_checkpoint(tmp_path / "exp" / "checkpoints") is None


# ----------------------------------------------------------------------------------------------------------------------
# Another number of ranks on resume


@pytest.mark.parametrize("new_world", [3])  # 2 -> 1 rank: test_mixture's run, to the exact indices of the order
def test_resume_on_another_world_size_loses_and_repeats_no_sample(prep, six_of_an_epoch, tmp_path, new_world):
    root = copy_run(six_of_an_epoch, tmp_path / "run")
    env = {"FSDP_TRAIN_TRACE_SAMPLES": str(root / "trace")}
    args = train_args(prep, root, "exp", "-b", 8, "--ckpt-freq", 3)  # then to the end of the epoch
    resumed = ok(torchrun(args, nproc=new_world, env=env))
    assert "Resuming from step 6" in resumed.stdout
    assert f"Checkpoint was saved by 2 ranks, now {new_world}: global batch 16 -> {8 * new_world}" in resumed.stdout

    records = traced(root / "trace")
    assert {r["epoch"] for r in records} == {0}
    consumed = [i for r in records for i in r["indices"] if i != ft.FILLER]
    (cache,) = (root / ".cache" / "tokenized").iterdir()
    assert sorted(consumed) == list(range(len(ft.load_packed(cache))))  # every block once: none repeated or skipped
    assert all(m["loss"] == m["loss"] for m in read_metrics(root / "exp"))  # finite after resharding


# ----------------------------------------------------------------------------------------------------------------------
# Damaged or foreign checkpoints, failed saves, NaN


def test_truncated_checkpoint_falls_back_to_the_previous_one(prep, reference, four_steps, tmp_path):
    save_dir = copy_run(four_steps, tmp_path / "save")
    shard = save_dir / "exp/checkpoints/step-4/__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = ok(torchrun(train_args(prep, save_dir, "exp", "--stop-at-step", 12, "--ckpt-freq", 4)))
    assert "step-4 is damaged" in proc.stdout and "Resuming from step 2" in proc.stdout
    assert_same_weights(save_dir / "exp/checkpoints/step-12", reference(12))


def test_running_out_of_memory_while_resuming_is_not_taken_for_a_damaged_checkpoint(monkeypatch, tmp_path):
    """A GPU out of memory (or a broken process group) while loading is the run's problem: skipping to older
    checkpoints, and then advising to move the folder away, would throw good checkpoints after it."""
    import torch

    def load(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ft, "check_compatible", lambda path, model: None)
    monkeypatch.setattr(ft, "load_checkpoint", load)
    monkeypatch.setattr(ft, "all_ok", lambda ok: ok)  # one process, no group: what every rank would agree
    d = ft.Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(torch.OutOfMemoryError):
        ft.Checkpointer.resume([tmp_path / "step-4", tmp_path / "step-2"], d, None, None)

    def load_in_dcp(*args):  # where it happens most: inside dcp.load, which wraps every rank's error
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except torch.OutOfMemoryError as e:
            raise CheckpointException("load", {0: (e, None)}) from None

    monkeypatch.setattr(ft, "load_checkpoint", load_in_dcp)
    with pytest.raises(torch.OutOfMemoryError):
        ft.Checkpointer.resume([tmp_path / "step-4", tmp_path / "step-2"], d, None, None)


def test_a_checkpoint_written_on_a_cpu_host_seeds_the_gpus_stream_on_resume(monkeypatch):
    import random

    import torch

    seeded, restored = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "manual_seed", seeded.append)
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    cpu_written = {"torch": torch.get_rng_state(), "python": random.getstate()}
    ft.restore_rng(cpu_written, seed=7)
    assert seeded == [7] and restored == []  # per rank and step, not CUDA's default seed on every rank
    ft.restore_rng({**cpu_written, "cuda": torch.zeros(16, dtype=torch.uint8)}, seed=8)
    assert seeded == [7] and len(restored) == 1  # a GPU host's checkpoint: its own stream back, exactly


def test_garbage_state_json_does_not_stop_a_resume(prep, four_steps, tmp_path, capfd):
    save_dir = copy_run(four_steps, tmp_path / "save")
    (save_dir / "exp/state.json").write_text("{not json")
    proc = ok(in_process(capfd, train_args(prep, save_dir, "exp", "--stop-at-step", 6, "--ckpt-freq", 2)))
    assert "Resuming from step 4" in proc.stdout
    assert json.loads((save_dir / "exp/state.json").read_text())["global_step"] == 6


def test_checkpoint_of_a_different_model_is_refused_before_loading(prep, four_steps, tmp_path, capfd):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    save_dir = copy_run(four_steps, tmp_path / "save")
    other = tmp_path / "other"  # the tiny model's shape, half as wide
    config = AutoConfig.from_pretrained(prep["model"])
    config.hidden_size, config.intermediate_size = 32, config.intermediate_size // 2
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(prep["model"]).save_pretrained(other)
    before = tree_digest(save_dir / "exp")
    args = train_args(prep, save_dir, "exp", "--stop-at-step", 6, "--resume-from", "latest")  # past the name check
    args[args.index(prep["model"])] = other
    line = assert_single_error(in_process(capfd, args), "was saved from a different model")
    assert "lm_head.weight is [512, 64] there but [512, 32] here" in line
    assert tree_digest(save_dir / "exp") == before


def test_disk_full_during_save_keeps_the_previous_checkpoint(prep, four_steps, tmp_path):
    save_dir = copy_run(four_steps, tmp_path / "save")
    before = tree_digest(save_dir / "exp/checkpoints")
    proc = torchrun(
        train_args(prep, save_dir, "exp", "--stop-at-step", 6, "--ckpt-freq", 2),
        env={"FSDP_TRAIN_FAULT": "enospc_in_save:6"},
    )
    assert_single_error(proc, "checkpoint at step 6 could not be saved (No space left on device); step-4 is intact")
    assert tree_digest(save_dir / "exp/checkpoints") == before  # no step-6, no temp folder, step-2/4 untouched


def test_nan_loss_stops_without_saving(prep, four_steps, tmp_path):
    save_dir = copy_run(four_steps, tmp_path / "save")
    before = tree_digest(save_dir / "exp/checkpoints")
    proc = torchrun(
        train_args(prep, save_dir, "exp", "--stop-at-step", 8, "--ckpt-freq", 2), env={"FSDP_TRAIN_FAULT": "nan_loss:5"}
    )
    assert_single_error(proc, "became NaN/inf by step 5; stopped without saving it (the last good checkpoint, step-4")
    assert tree_digest(save_dir / "exp/checkpoints") == before


def test_model_not_in_the_cache_is_refused_without_the_network_and_names_the_cached_one(prep, tmp_path):
    make_hf_cache(tmp_path / "hf", "Acme/Tiny-Llama", prep["model"])
    args = train_args(prep, tmp_path, "exp", "--stop-at-step", 2)
    args[args.index(prep["model"])] = "acme/tiny-llama"  # a case typo of the cached id
    # No HF_HUB_OFFLINE: the cache is looked at first, so no request is tried (an offline node spent ~27 s in them).
    proc = torchrun(args, env={"HF_HOME": str(tmp_path / "hf")}, nproc=1)
    line = assert_single_error(proc, "model 'acme/tiny-llama' is neither a local folder nor in the Hugging Face cache")
    assert "did you mean 'Acme/Tiny-Llama', which is cached?" in line and "model_download.py --model-name" in line
    assert not (tmp_path / "exp").exists()  # a refused run leaves no folder behind


def test_an_exception_on_one_rank_ends_the_whole_job_promptly(prep, four_steps, tmp_path):
    save_dir = copy_run(four_steps, tmp_path / "save")
    before = tree_digest(save_dir / "exp/checkpoints")
    t0 = time.monotonic()
    proc = torchrun(train_args(prep, save_dir, "exp", "--stop-at-step", 8), env={"FSDP_TRAIN_FAULT": "crash:6"})
    assert proc.returncode != 0 and "injected crash at step 6" in proc.stdout
    assert time.monotonic() - t0 < 60  # no rank left waiting in a collective for the timeout
    assert tree_digest(save_dir / "exp/checkpoints") == before
