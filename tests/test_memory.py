"""Memory-saving modes (#7): shard-aware Adafactor, optimizer-in-backward, activation offload."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_runs_close,
    checkpoint_weights,
    copy_run,
    in_process,
    ok,
    read_metrics,
    shared,
    torchrun,
    train_args,
)

import fsdp_train as ft


def test_adafactor_computes_what_torch_adafactor_computes():
    torch.manual_seed(0)
    ours = [torch.randn(37, 19, dtype=torch.float64), torch.randn(19, dtype=torch.float64)]
    theirs = [p.clone() for p in ours]
    a = ft.Adafactor(ours, lr=0.05, weight_decay=0.1)
    b = torch.optim.Adafactor(theirs, lr=0.05, weight_decay=0.1, foreach=False)
    for _ in range(5):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs, strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)
    assert a.state[ours[0]]["row_var"].shape == (37, 1) and a.state[ours[0]]["col_var"].shape == (1, 19)


def test_adafactor_refuses_tensors_it_cannot_factor():
    with pytest.raises(ft.InputError, match="1-D and 2-D"):
        ft.Adafactor([torch.zeros(2, 3, 4, requires_grad=True)])


def test_activation_offload_moves_only_the_block_inputs(monkeypatch):
    packed = []

    class CountingSaveOnCpu(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory=False):
            super().__init__(lambda t: packed.append(t.shape) or t.clone(), lambda t: t)

    block = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    x = torch.randn(4, 8, requires_grad=True)
    block(x).square().sum().backward()
    expected = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
    block.zero_grad()
    x.grad = None
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    ft.offloaded_checkpoint(block, x).square().sum().backward()
    assert packed == [(4, 8)]  # the block input only: everything inside is recomputed, not kept
    got = [p.grad for p in block.parameters()] + [x.grad]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_optimizer_in_backward_refuses_accumulation_with_the_reason():
    cfg = ft.Config(dataset_name="d", model_name="m", optimizer_in_backward=True, max_norm=0, global_batch_size=16)
    assert ft.Config(dataset_name="d", model_name="m", global_batch_size=16).resolve_grad_accum(2) == 2
    with pytest.raises(ft.InputError, match="nothing to accumulate 2 micro-batches into"):
        cfg.resolve_grad_accum(2)
    assert cfg.resolve_grad_accum(4) == 1


# ----------------------------------------------------------------------------------------------------------------------
# Real torchrun runs


# No clipping, so optimizer-in-backward (which cannot clip) runs the same maths.
ADAFACTOR = ("--optimizer", "adafactor", "--lr", "5e-2", "--max-norm", 0)


@shared("module")
def adafactor_runs(prep, tmp_path_factory) -> dict[str, Path]:
    """6 Adafactor steps with checkpoints at 3 and 6: on 1 process (batch 4) and on 2 ranks (batch 2 each). The tests
    resume copies of them."""
    save_dir = tmp_path_factory.mktemp("adafactor")
    steps = (*ADAFACTOR, "--stop-at-step", 6, "--ckpt-freq", 3)
    ok(in_process(None, train_args(prep, save_dir, "one", *steps, "-b", 4)))  # one process: this one
    ok(torchrun(train_args(prep, save_dir, "two", *steps)))
    return {name: save_dir / name for name in ("one", "two")}


def resume_copy_from_step_3(run: Path, dst: Path) -> Path:
    """A copy of a finished 6-step run whose newest checkpoint is step 3 again (as if it had stopped there)."""
    copy = copy_run(run, dst / run.name)
    shutil.rmtree(copy / "checkpoints" / "step-6")
    return copy


@pytest.mark.slow
def test_adafactor_on_shards_trains_like_one_process_and_reshards_its_state(prep, adafactor_runs, tmp_path, capfd):
    assert_runs_close(adafactor_runs["one"], adafactor_runs["two"], step=6)
    losses = [m["loss"] for m in read_metrics(adafactor_runs["two"])]
    assert losses[-1] < losses[0] - 0.1, losses  # it learns
    # Factored state saved by 2 ranks, resumed by 1: DCP reshards row_var (split like the rows) and col_var.
    moved = resume_copy_from_step_3(adafactor_runs["two"], tmp_path)
    proc = ok(in_process(capfd, train_args(prep, tmp_path, "two", *ADAFACTOR, "--stop-at-step", 6, "-b", 4)))
    assert "Resuming from step 3" in proc.stdout
    assert_runs_close(adafactor_runs["one"], moved, step=6)


@pytest.mark.slow
def test_optimizer_in_backward_equals_normal_steps_and_resumes_exactly(prep, tmp_path):
    # AdamW (the default): the hooks step each parameter as its gradient is ready, the same update as one step at the
    # end. (Adafactor goes through the same per-parameter wrapper; its factored state is covered by the plan and
    # resharding tests.)
    opt = ("--lr", "3e-3", "--max-norm", 0, "--stop-at-step", 6, "--ckpt-freq", 3)
    ok(torchrun(train_args(prep, tmp_path, "normal", *opt)))
    ok(torchrun(train_args(prep, tmp_path, "hooked", *opt, "--optimizer-in-backward", "on")))
    normal, hooked = tmp_path / "normal", tmp_path / "hooked"
    assert_runs_close(normal, hooked, step=6, atol=1e-6)
    norms = [[m["grad_norm"] for m in read_metrics(e)] for e in (normal, hooked)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-6)  # the hooks still report the global gradient norm
    # Resumed at step 3: the per-parameter optimizer states come back exactly.
    resumed = resume_copy_from_step_3(hooked, tmp_path / "resumed")
    args = (*opt, "--optimizer-in-backward", "on")
    assert "Resuming from step 3" in ok(torchrun(train_args(prep, tmp_path / "resumed", "hooked", *args))).stdout
    a, b = (checkpoint_weights(e / "checkpoints/step-6") for e in (hooked, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_activation_offload_is_a_noop_with_a_notice_on_cpu(prep, tmp_path, capfd):
    proc = ok(in_process(capfd, train_args(prep, tmp_path, "off", "--stop-at-step", 2, "--activation-offload", "on")))
    assert proc.stdout.count("--activation-offload does nothing on a CPU host") == 1


# ----------------------------------------------------------------------------------------------------------------------
# The memory planner


def test_plan_lists_components_and_the_options_that_fit(prep, capfd):
    proc = ok(in_process(capfd, ["plan", "-m", prep["small"], "--nproc", 2, "-b", 1, "-s", 64, "--gpu-mem", 0.05]))
    for line in ("params", "optimizer", "gradients", "activations", "peak", "Option sets within 85%"):
        assert line in proc.stdout
    fits = proc.stdout.split("cheapest first")[1]
    assert "--optimizer adafactor" in fits and "--activation-checkpointing off" not in fits


def test_plan_refuses_bad_input_in_one_line(prep, tmp_path, capfd):
    proc = in_process(capfd, ["plan", "-m", tmp_path / "nothing", "--nproc", 1])
    assert proc.returncode == 2 and proc.stdout.startswith("error:") and len(proc.stdout.splitlines()) == 1


def plan(prep, model: str, nproc: int, *flags) -> dict:
    """`fsdp_train.py plan ... --json`, run in this process (the CLI's own code, without a Python start-up)."""
    import contextlib
    import io

    argv = ["-m", prep[model], "--nproc", nproc, "--device", "cpu", "--json", "--shard-unit", "block", *flags]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert ft.plan_main([str(a) for a in argv]) == 0
    return json.loads(out.getvalue())["plans"]["as given"]


ADAFACTOR_IN_BACKWARD = ["--optimizer", "adafactor", "--optimizer-in-backward", "on", "--max-norm", "0"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, flags",
    [
        ("small", []),
        # Full activations; factored optimizer state, and each gradient freed once its parameter stepped.
        ("small", ["--activation-checkpointing", "off", *ADAFACTOR_IN_BACKWARD]),
        ("small", ["--shard-unit", "model", "-b", 1, "-s", 64]),  # gathered params and gradients dominate
    ],
)
def test_plan_is_within_25_percent_of_the_measured_peak(prep, tmp_path, model, flags):
    shape = ["-b", 8, "-s", 512]
    # glibc keeps freed heap memory, so peak RSS would count allocator retention; mmap-backed large blocks are
    # returned at free and the peak is then the live memory the plan estimates.
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    # Step 2 is the first with every state present through forward and backward; later steps repeat it.
    ok(torchrun(train_args(prep, tmp_path, "m", *shape, "--stop-at-step", 2, *flags, model=model), env=env))
    measured = max(m["mem/train_peak_gib"] for m in read_metrics(tmp_path / "m")) * 2**30
    estimate = plan(prep, model, 2, *shape, *flags)["peak"]
    assert estimate == pytest.approx(measured, rel=0.25), (estimate / 2**20, measured / 2**20)


# 48 MB, above glibc's largest automatic mmap threshold (32 MiB): by default each allocation is a fresh mapping
# whose ~11.7k pages fault in again, the cost every CPU step paid for its all-gathers, gradients and logits.
ALLOCATE_AND_FREE = """
import resource, torch
import fsdp_train as ft
ft.reuse_freed_memory()
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(12_000_000).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[len(faults) // 2])  # the median allocation
"""


def test_cpu_training_reuses_freed_memory_unless_the_environment_says_otherwise():
    def faults(**malloc_env) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        cmd = [sys.executable, "-c", ALLOCATE_AND_FREE]
        proc = subprocess.run(
            cmd, cwd=Path(ft.__file__).parent, env={**env, **malloc_env}, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.split()[-1])

    assert faults() < 100  # after the first allocations, the heap pages are reused
    assert faults(MALLOC_MMAP_THRESHOLD_="4194304") > 11_000  # the environment wins: each one faults again


def test_reuse_freed_memory_takes_32_mib_where_glibc_refuses_more_and_yields_to_the_environment(monkeypatch):
    import ctypes

    calls = []

    class OlderGlibc:  # refuses an mmap threshold above HEAP_MAX_SIZE / 2, as some glibc versions do
        def mallopt(self, param, value):
            calls.append((param, value))
            return 0 if param == -3 and value > 32 << 20 else 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: OlderGlibc())
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    ft.reuse_freed_memory()
    assert calls == [(-3, 1 << 30), (-3, 32 << 20), (-1, 1 << 30)]  # a frozen 128 KiB threshold would fault more
    calls.clear()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=65536")
    ft.reuse_freed_memory()
    assert calls == []


def test_stochastic_rounding_keeps_updates_smaller_than_a_bf16_step_on_average():
    torch.manual_seed(0)
    weight = torch.tensor(0.02).bfloat16().float().item()  # a bf16 value; its spacing there is 1.2e-4
    target = torch.full((100_000,), weight) - 1e-5
    stochastic = torch.empty(100_000, dtype=torch.bfloat16)
    ft.stochastic_round_(stochastic, target)
    assert target.to(torch.bfloat16).float().unique().tolist() == [weight]  # round-to-nearest loses the update
    assert stochastic.float().mean().item() == pytest.approx(weight - 1e-5, abs=1e-6)
    assert len(stochastic.unique()) == 2  # only the two bf16 neighbours of the target
