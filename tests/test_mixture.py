"""Data mixtures (#24): several training sources with weights, in one seeded order that any world size continues."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    Job,
    assert_same_weights,
    assert_single_error,
    in_process,
    ok,
    read_metrics,
    torchrun,
    train_args,
    unpacked_loss,
)

import fsdp_train as ft


def test_sources_parse_with_weights_names_and_one_clear_error_each(tmp_path):
    (tmp_path / "chat.jsonl").write_text("")
    one = ft.parse_sources(str(tmp_path / "corpus"))
    assert one == [ft.Source("corpus", str(tmp_path / "corpus"), None)]  # one dataset, as ever
    two = ft.parse_sources(f"{tmp_path / 'chat.jsonl'}:0.7 + {tmp_path / 'corpus'}:0.3")
    assert [(s.name, s.weight) for s in two] == [("chat", 0.7), ("corpus", 0.3)]
    for spec, error in [
        ("a:0.7 + b:0", "a weight must be a positive number"),
        ("a:0.7 + b:-1", "a weight must be a positive number"),
        ("a:0.7 + b:x", "the weight 'x' is not a number"),
        ("a:0.7 + b", "give every source a weight"),
        ("x/a:1 + y/a:1", "two sources are named a"),
    ]:
        with pytest.raises(ft.InputError, match=error):
            ft.parse_sources(spec)


def test_d_repeated_and_a_yaml_list_are_the_same_mixture_and_the_command_line_replaces_the_file():
    preset = ["--config", "configs/mixture-chat-replay.yaml", "-m", "m"]
    listed = ft.parse_args(preset).dataset_name
    repeated = ft.parse_args(["-d", "data/chat.jsonl:0.7", "-d", "outputs/corpus/dataset:0.3", "-m", "m"])
    assert listed == repeated.dataset_name == "data/chat.jsonl:0.7 + outputs/corpus/dataset:0.3"
    assert [(s.name, s.weight) for s in ft.parse_sources(listed)] == [("chat", 0.7), ("dataset", 0.3)]
    assert ft.parse_args([*preset, "-d", "mine"]).dataset_name == "mine"


def test_one_source_is_todays_order_bit_for_bit():
    assert torch.equal(ft.mixture_order((1000,), None, 3, 2), ft.epoch_permutation(1000, 3, 2))
    assert torch.equal(ft.mixture_order((1000,), (0.5,), 3, 2), ft.epoch_permutation(1000, 3, 2))


@pytest.mark.parametrize("sizes, weights", [((1200, 300, 57), (0.5, 0.3, 0.2)), ((40, 5000), (0.9, 0.1))])
def test_each_source_takes_its_weight_of_an_epoch_within_one_percent_and_the_order_is_pure(sizes, weights):
    order = ft.mixture_order(sizes, weights, 0, 0)
    starts = torch.tensor([0, *sizes]).cumsum(0)
    source = torch.bucketize(order, starts[1:], right=True)
    shares = torch.bincount(source, minlength=len(sizes)).double() / len(order)
    assert torch.allclose(shares, torch.tensor(weights, dtype=torch.float64), atol=0.01), shares
    for i, n in enumerate(sizes):  # every block of every source at least once an epoch; none from outside it
        mine = order[source == i] - starts[i]
        assert set(mine.tolist()) == set(range(n))
    # The source that needs the longest epoch for its share is seen exactly once; the others repeat.
    limiting = max(range(len(sizes)), key=lambda i: sizes[i] / weights[i])
    assert int((source == limiting).sum()) == sizes[limiting]
    ft.mixture_order.cache_clear()
    assert torch.equal(ft.mixture_order(sizes, weights, 0, 0), order)  # a pure function of its arguments
    assert not torch.equal(ft.mixture_order(sizes, weights, 0, 1), order)  # a new order each epoch


def test_without_weights_each_source_is_taken_once():
    order = ft.mixture_order((30, 70), None, 1, 0)
    assert sorted(order.tolist()) == list(range(100))


# ----------------------------------------------------------------------------------------------------------------------
# A mixture run: two text sources, 2 ranks, then resumed on 3


def two_sources(tmp_path) -> tuple[Path, Path]:
    """The sample corpus's lines as two sources of unequal size: 'prose' (.txt lines) and 'records' (the rest)."""
    import datasets

    txt = [x.strip() for f in sorted((ROOT / "data").rglob("*.txt")) for x in f.read_text().splitlines() if x.strip()]
    other = [f.read_text() for f in sorted((ROOT / "data").rglob("*")) if f.is_file() and f.suffix != ".txt"]
    paths = tmp_path / "prose", tmp_path / "records"
    for path, texts in zip(paths, (txt, other), strict=True):
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(path))
    return paths


def traced(folder: Path) -> dict[int, list[int]]:
    """step -> the global batch's block indices, rank by rank (FSDP_TRAIN_TRACE_SAMPLES)."""
    steps: dict[int, dict[int, list[int]]] = {}
    for f in sorted(folder.glob("rank*.jsonl")):
        rank = int(f.stem.removeprefix("rank"))
        for line in f.read_text().splitlines():
            r = json.loads(line)
            steps.setdefault(r["step"], {})[rank] = r["indices"]
    return {s: [i for rank in sorted(b) for i in b[rank]] for s, b in steps.items()}


def mixture_caches(save_dir: Path, sources: list[Path], role: str = "train") -> list:
    """The packed blocks of each source, in the order given (from its info.json)."""
    found = {}
    for cache in (save_dir / ".cache" / "tokenized").iterdir():
        info = json.loads((cache / "info.json").read_text())
        if info["role"] == role:
            found[info["dataset"]] = ft.load_packed(cache)
    return [found[str(s)] for s in sources]


@pytest.mark.slow
def test_a_mixture_trains_its_seeded_order_logs_each_sources_loss_and_another_world_size_continues_it(
    prep, tmp_path, capfd
):
    from transformers import AutoModelForCausalLM

    prose, records = two_sources(tmp_path)
    # -d repeated: the first is train_args's own, the second adds to it
    args = train_args(prep, tmp_path, "mix", "-d", f"{records}:0.25", "--ckpt-freq", 2, data=f"{prose}:0.75")
    args += ["--val-split", 0.1, "--eval-freq", 3]
    env = {"FSDP_TRAIN_TRACE_SAMPLES": str(tmp_path / "trace")}
    (tmp_path / "trace").mkdir()
    first = ok(torchrun([*args, "--stop-at-step", 3], env=env))
    assert "Mixture of 2 sources" in first.stdout and "  prose: " in first.stdout and "  records: " in first.stdout
    blocks = mixture_caches(tmp_path, [prose, records])  # each source packed on its own: blocks never mix sources
    sizes = tuple(len(b) for b in blocks)
    order = ft.mixture_order(sizes, (0.75, 0.25), 0, 0).tolist()
    steps = traced(tmp_path / "trace")
    assert [i for s in (1, 2, 3) for i in steps[s]] == order[:12]  # 2 ranks x batch 2 a step, in the mixture's order

    # Step 1's loss of each source: plain transformers on that source's blocks of the step, each document alone.
    model = AutoModelForCausalLM.from_pretrained(prep["model"], dtype=torch.float32)
    sums = {"prose": [0.0, 0], "records": [0.0, 0]}
    for i in steps[1]:
        name, k = ("prose", i) if i < sizes[0] else ("records", i - sizes[0])
        row = blocks[0 if name == "prose" else 1][k]
        ids, positions = row["input_ids"], row["position_ids"]
        t, n = unpacked_loss(model, ids, ids, [*(positions == 0).nonzero().flatten().tolist(), len(ids)])
        sums[name][0] += t
        sums[name][1] += n
    metrics = read_metrics(tmp_path / "mix")
    for name, (t, n) in sums.items():
        if n:
            assert metrics[0][f"loss/{name}"] == pytest.approx(t / n, abs=1e-5), name
    assert {"val/loss/prose", "val/loss/records"} <= metrics[2].keys()
    assert "by source (train / validation): prose " in first.stdout

    # Resumed from step 2 on 3 ranks: the same order from where it stopped (global batch 4 -> 6), nothing lost or
    # taken twice.
    shutil.rmtree(tmp_path / "mix" / "checkpoints" / "step-3")
    shutil.rmtree(tmp_path / "trace")
    (tmp_path / "trace").mkdir()
    again = ok(torchrun([*args, "--stop-at-step", 4], nproc=3, env=env))
    assert "Resuming from step 2" in again.stdout
    steps = traced(tmp_path / "trace")
    assert [i for s in (3, 4) for i in steps[s]] == order[8:20]
    # ... and on 1 rank (global batch 2) from the same checkpoint.
    shutil.rmtree(tmp_path / "mix" / "checkpoints" / "step-4")
    shutil.rmtree(tmp_path / "trace")
    (tmp_path / "trace").mkdir()
    assert "Resuming from step 2" in ok(torchrun([*args, "--stop-at-step", 4], nproc=1, env=env)).stdout
    steps = traced(tmp_path / "trace")
    assert [i for s in (3, 4) for i in steps[s]] == order[8:12]

    # Bad input: one error line each, nothing written (a source that is missing, or chat without a template, is
    # found before the first source is packed).
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}) + "\n"
    )
    save = tmp_path / "fresh"
    for second, error in [
        (f"{records}:0", "a weight must be a positive number"),
        (f"{tmp_path / 'nowhere'}:0.25", "cannot load dataset"),
        (f"{chat}:0.25", f"the train data {chat} is chat/instruction data but the tokenizer has no chat template"),
    ]:
        bad = in_process(capfd, train_args(prep, save, "mix", "-d", second, data=f"{prose}:0.75"))
        assert_single_error(bad, error)
        assert not list(save.rglob("blocks.arrow")) and not (save / "mix" / "checkpoints").exists()


def test_a_val_split_whose_token_share_is_far_from_the_fraction_is_warned_about(caplog):
    ft.warn_if_split_is_uneven(0.02, train_tokens=98_000, val_tokens=2_100, name="even")
    ft.warn_if_split_is_uneven(0.02, train_tokens=83_000, val_tokens=17_000, name="few-huge-files")
    warned = [r.getMessage() for r in caplog.records if "--val-split" in r.getMessage()]
    assert len(warned) == 1 and "few-huge-files's documents holds 17.0% of its tokens" in warned[0], warned


@pytest.mark.slow
def test_a_mixture_of_text_and_chat_killed_inside_a_save_reruns_to_the_same_weights(prep, tmp_path):
    prose, _ = two_sources(tmp_path)
    turn = [{"role": "user", "content": "Name a root vegetable."}, {"role": "assistant", "content": "A carrot."}]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": turn}) + "\n" for _ in range(80)))
    mix = ["-d", f"{chat}:0.4", "--chat-template", "configs/chatml.jinja", "--stop-at-step", 6, "--ckpt-freq", 2]
    ok(torchrun(train_args(prep, tmp_path / "ref", "mix", *mix, data=f"{prose}:0.6")))
    records = read_metrics(tmp_path / "ref" / "mix")
    assert any("loss/chat" in m for m in records) and any("loss/prose" in m for m in records)

    args = train_args(prep, tmp_path / "killed", "mix", *mix, data=f"{prose}:0.6")
    job = Job(args, env={"FSDP_TRAIN_FAULT": "sleep_in_save:4:4"})
    try:
        pids = {int(m[1]): int(m[2]) for m in job.wait_for(r"FAULT sleep_in_save step 4 rank (\d) pid (\d+)", 2)}
        os.kill(pids[1], signal.SIGKILL)
        assert job.wait(timeout=60) != 0
    finally:
        job.kill_all()
    again = ok(torchrun(args))
    assert "Resuming from step 2" in again.stdout
    assert_same_weights(tmp_path / "killed/mix/checkpoints/step-6", tmp_path / "ref/mix/checkpoints/step-6")
