"""A new user's first hour (#25): bad rows in a user's own file, two jobs building one cache, messages that point at
the fix, and the planner offline."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import assert_single_error, in_process, ok, torchrun_command, train_args

import fsdp_train as ft


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prepare(prep, tmp_path, capfd, data, *extra):
    return in_process(capfd, ["prepare", *train_args(prep, tmp_path / "runs", "p", "-s", 32, *extra, data=data)])


def test_rows_with_null_non_string_or_empty_fields_are_skipped_and_counted(prep, tmp_path, capfd):
    lines = [line for f in sorted((ft.Path("data")).rglob("*.txt")) for line in f.read_text().splitlines() if line]
    rows = [{"text": line} for line in lines[:200]]
    for i in (3, 50, 51, 120):
        rows[i] = {"text": None}
    rows[7], rows[8] = {"text": ""}, {"text": "   "}
    proc = ok(_prepare(prep, tmp_path, capfd, _jsonl(tmp_path / "mine.jsonl", rows)))
    assert "194 examples" not in proc.stdout  # the examples are the rows read; the skipped ones are said apart
    assert (
        "6 rows skipped (4 where 'text' is null, 2 where 'text' is empty; first: row 3: 'text' is null)" in proc.stdout
    )

    chat = [{"messages": [{"role": "user", "content": "Who lit the lamp?"}, {"role": "assistant", "content": c}]}
            for c in ["The keeper.", None, "", "At dusk."]]  # fmt: skip
    chat.append({"messages": None})
    chatml = ["--chat-template", "configs/chatml.jinja", "-s", 64]  # -s 64: each conversation fits a block
    proc = ok(_prepare(prep, tmp_path, capfd, _jsonl(tmp_path / "chat.jsonl", chat), *chatml))
    assert (
        "3 rows skipped (1 where 'messages' is null or empty, 1 where an assistant message's 'content' is empty, "
        "1 where an assistant message's 'content' is null; first: row 1: an assistant message's 'content' is null)"
    ) in proc.stdout

    alpaca = [{"instruction": "Say hi", "output": "hi"}, {"instruction": None, "output": "x"}]
    proc = ok(_prepare(prep, tmp_path, capfd, _jsonl(tmp_path / "alpaca.jsonl", alpaca), *chatml))
    assert "1 rows skipped (1 where 'instruction' is null; first: row 1" in proc.stdout

    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": None}, {"text": ""}])
    line = assert_single_error(_prepare(prep, tmp_path, capfd, bad), "no train row can be trained: 2 rows skipped")
    assert "first: row 0: 'text' is null" in line


@pytest.mark.slow
def test_two_jobs_building_the_same_cache_at_once_both_train(prep, tmp_path):
    """A sweep: two experiments on one --save-dir and the same data start together. Both tokenize (each sleeps 3 s
    before its rename, so they overlap for sure); the second rename finds the first's cache and uses it."""

    from conftest import ROOT

    env = {**ft.os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "FSDP_TRAIN_FAULT": "sleep_in_prepare:0:3"}
    launcher = torchrun_command(1)
    jobs = [
        subprocess.Popen([*launcher, *map(str, train_args(prep, tmp_path, exp, "--stop-at-step", 1, "-s", 48))],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for exp in ("a", "b")
    ]  # fmt: skip
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    assert sum("FAULT sleep_in_prepare" in out for out in outputs) == 2  # both built it
    assert sum("Another job finished the same train data cache first" in out for out in outputs) == 1
    caches = list((tmp_path / ".cache" / "tokenized").iterdir())
    assert len(caches) == 1 and (caches[0] / "info.json").is_file()  # no temp folder left behind


@pytest.mark.slow
def test_a_second_job_on_a_running_experiment_is_refused_before_it_writes(prep, four_steps, tmp_path, capfd):
    """The same command started twice (or another run given the same -e) used to train into the same folder: the
    first job pruned the second's checkpoints, their metrics interleaved, the last export won. The running job holds
    an flock (here held by this test, from another open file: what another process holds, as the kernel sees it)."""
    import fcntl

    from conftest import copy_run, tree_digest

    save_dir = copy_run(four_steps, tmp_path / "save")
    args = train_args(prep, save_dir, "exp", "--stop-at-step", 5)
    lock = save_dir / ".cache" / "running" / "exp.lock"  # the path a running job holds (an flock: see the docstring)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as running:
        fcntl.flock(running, fcntl.LOCK_EX)
        running.write("pid 4242 on node7 since 10:00:00")
        running.flush()
        before = tree_digest(save_dir)
        line = assert_single_error(in_process(capfd, args), "exp is in use by a running job (pid 4242 on node7")
        assert tree_digest(save_dir) == before  # nothing written, the holder's line included
    assert f"control stop {save_dir / 'exp'}" in line and "another -e" in line
    # Once that job has ended (or died: the kernel drops an flock with its process), the same command carries on.
    assert "Resuming from step 4" in ok(in_process(capfd, args)).stdout


def test_flags_are_never_abbreviated_and_a_typo_gets_a_did_you_mean():
    for typo, meant in (("--max-step", "--max-steps"), ("--warmup", "--warmup-steps"), ("--seq-len", "--seq-length")):
        with pytest.raises(
            ft.InputError, match=f"unrecognized arguments: {typo} 3 \\({typo}: did you mean {meant}\\?\\)"
        ):
            ft.parse_args(["-d", "x", "-m", "y", typo, "3"])


def test_help_of_each_subcommand_says_what_it_takes(capfd):
    top = ok(in_process(capfd, ["--help"])).stdout
    for sub in ("prepare", "plan", "control", "export"):
        assert f"\n    {sub} " in top, sub
    assert ok(in_process(capfd, ["prepare", "--help"])).stdout.startswith("usage: fsdp_train.py prepare")
    plan_help = ok(in_process(capfd, ["plan", "--help"])).stdout
    assert all(flag in plan_help for flag in ("-m/--model-name", "-b/--batch-size", "-s/--seq-length", "--config"))


def test_model_problem_names_missing_folders_and_close_cached_ids(tmp_path):
    from conftest import make_hf_cache

    (tmp_path / "models" / "tiny-llama").mkdir(parents=True)
    (tmp_path / "models" / "tiny-llama" / "config.json").write_text("{}")
    assert ft.model_problem(str(tmp_path / "models" / "tiny-llama")) is None
    assert ft.model_problem(str(tmp_path / "models" / "tiny-lama")) == (
        f"model folder {tmp_path}/models/tiny-lama does not exist; did you mean {tmp_path}/models/tiny-llama?"
    )
    make_hf_cache(tmp_path / "hf", "HuggingFaceTB/SmolLM2-135M", tmp_path / "models" / "tiny-llama")
    hub = str(tmp_path / "hf" / "hub")
    assert ft.model_problem("HuggingFaceTB/SmolLM2-135M", hub) is None
    assert "did you mean 'HuggingFaceTB/SmolLM2-135M', which is cached?" in ft.model_problem(
        "huggingfacetb/smollm2-135m", hub
    )


def _plan(capsys, *argv) -> str:
    assert ft.plan_main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def test_a_mistyped_local_data_path_is_refused_at_once_without_asking_the_hub(tmp_path, monkeypatch):
    """`-d outputs/my-datset` read as a hub id spent ~25 s in retries, then blamed the hub."""
    import datasets

    def hub(*args, **kwargs):
        raise AssertionError(f"asked the hub for {args}")

    (tmp_path / "outputs" / "my-dataset").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", hub)
    with pytest.raises(ft.InputError, match=r"no such .*: outputs/my-datset; did you mean outputs/my-dataset\?"):
        ft.load_dataset_any("outputs/my-datset")
    with pytest.raises(ft.InputError, match="no such folder or .jsonl/.json/.parquet file: data/chat.jsonl"):
        ft.load_dataset_any("data/chat.jsonl")  # a file name, though its folder is not here either
    (tmp_path / "outputs" / "splits" / "split_00").mkdir(parents=True)  # organize_data.py's output, not a dataset
    with pytest.raises(ft.InputError, match="outputs/splits is a folder of files, not a saved dataset: .* data_to_hf"):
        ft.load_dataset_any("outputs/splits")
    with pytest.raises(AssertionError, match="asked the hub"):  # a hub id (ORG/NAME) still goes to the hub's cache
        ft.load_dataset_any("HuggingFaceH4/ultrachat_200k")


def test_plan_works_offline_for_the_presets_and_gives_host_disk_and_batch_figures(capsys, prep):
    argv = ["--config", "configs/llama3-8b-8gpu.yaml", "--nproc", 8, "--gpu-mem", 80]
    out = _plan(capsys, *argv, "--cpu-offload", "on")
    assert "meta-llama/Meta-Llama-3-8B: not on this host; its shape from" in out and "8,030.3M params" in out
    host = float(out.split("host memory")[1].split("GiB")[0])
    assert host == pytest.approx(8030.3e6 * 16 / 8 / 2**30, abs=0.01)  # fp32 shard + gradient + 2 AdamW moments
    assert "Checkpoint on disk: 89.75 GiB each" in out  # 12 bytes a parameter: fp32 weights and two AdamW moments

    out = _plan(capsys, *argv)
    fits = int(out.split("as given: ")[1].split()[0])
    cfg = ft.parse_args(["-d", "-", "--config", "configs/llama3-8b-8gpu.yaml"])
    cfg.model_name = str(ft.shipped_shape(cfg.model_name))
    shape = ft.model_shape(cfg, cfg.batch_size, cfg.seq_length, ft.torch.bfloat16)
    peak = [ft.memory_plan(ft.scaled_shape(shape, b, cfg.batch_size), cfg, 8, "cuda")["peak"] for b in (fits, fits + 1)]
    assert peak[0] <= 0.85 * 80 * 2**30 < peak[1]

    # The scaled shape is the one the model's own forward gives at that batch.
    small = ft.parse_args(["-d", "-", "-m", str(prep["small"]), "-b", "1", "-s", "64"])
    one = ft.model_shape(small, 1, 64, ft.torch.float32)
    for batch in (2, 5):
        scaled = ft.memory_plan(ft.scaled_shape(one, batch, 1), small, 2, "cpu")["peak"]
        measured = ft.memory_plan(ft.model_shape(small, batch, 64, ft.torch.float32), small, 2, "cpu")["peak"]
        assert scaled == pytest.approx(measured, rel=0.01), batch
