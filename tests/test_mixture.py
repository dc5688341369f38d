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
    Job,
    assert_same_weights,
    assert_single_error,
    in_process,
    ok,
    read_metrics,
    short_documents,
    torchrun,
    traced,
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
        ("x/a:1 + x/a:2", "x/a is given twice"),
        ("x/a.jsonl:1 + x/a.json:2", "x/a.jsonl and x/a.json would both log as loss/x/a: rename one"),
    ]:
        with pytest.raises(ft.InputError, match=error):
            ft.parse_sources(spec)
    # Folders of one name (data_to_hf.py outputs called `dataset`) are told apart by their parents, as far as needed.
    same = ft.parse_sources("out/chat/dataset:1 + out/corpus/dataset:1 + more/corpus/dataset:1 + /abs/notes.jsonl:1")
    assert [s.name for s in same] == ["chat/dataset", "out/corpus/dataset", "more/corpus/dataset", "notes"]


def test_d_repeated_and_a_yaml_list_are_the_same_mixture_and_the_command_line_replaces_the_file():
    preset = ["--config", "configs/mixture-chat-replay.yaml", "-m", "m"]
    listed = ft.parse_args(preset).dataset_name
    repeated = ft.parse_args(["-d", "data/chat.jsonl:0.7", "-d", "outputs/corpus:0.3", "-m", "m"])
    assert listed == repeated.dataset_name == "data/chat.jsonl:0.7 + outputs/corpus:0.3"
    assert [(s.name, s.weight) for s in ft.parse_sources(listed)] == [("chat", 0.7), ("corpus", 0.3)]
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
    """The sample corpus's lines as text documents ('prose'), and 80 short conversations ('chat')."""
    prose = short_documents(tmp_path).rename(tmp_path / "prose")
    turn = [{"role": "user", "content": "Name a root vegetable."}, {"role": "assistant", "content": "A carrot."}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": turn}) + "\n" for _ in range(80)))
    return prose, tmp_path / "chat.jsonl"


def global_batches(folder: Path) -> dict[int, list[int]]:
    """step -> the global batch's block indices, rank by rank (FSDP_TRAIN_TRACE_SAMPLES)."""
    steps: dict[int, list[int]] = {}
    for record in traced(folder):  # rank 0's records first, then rank 1's, ...
        steps.setdefault(record["step"], []).extend(record["indices"])
    return steps


def mixture_caches(save_dir: Path, sources: list[Path], role: str = "train") -> list:
    """The packed blocks of each source, in the order given (from its info.json)."""
    found = {}
    for cache in (save_dir / ".cache" / "tokenized").iterdir():
        info = json.loads((cache / "info.json").read_text())
        if info["role"] == role:
            found[info["dataset"]] = ft.load_packed(cache)
    return [found[str(s)] for s in sources]


def resume_on(nproc: int, ref: Path, dst: Path, args: list, stop: int) -> dict[int, list[int]]:
    """A copy of the 6-step run resumed from its step-2 checkpoint on `nproc` ranks to `stop`: its traced steps."""
    shutil.copytree(ref, dst)
    for step in (4, 6):
        shutil.rmtree(dst / "mix" / "checkpoints" / f"step-{step}")
    (dst / "trace").mkdir()
    env = {"FSDP_TRAIN_TRACE_SAMPLES": str(dst / "trace")}
    out = ok(torchrun([*args[: args.index("--save-dir") + 1], dst, *args[args.index("--save-dir") + 2 :],
                       "--stop-at-step", stop], nproc=nproc, env=env)).stdout  # fmt: skip
    assert "Resuming from step 2" in out
    return global_batches(dst / "trace")


@pytest.mark.slow
def test_a_mixture_of_text_and_chat_trains_its_order_and_each_sources_loss_and_resumes_anywhere(prep, tmp_path, capfd):
    from transformers import AutoModelForCausalLM

    prose, chat = two_sources(tmp_path)
    # -d repeated: the first is train_args's own, the second adds to it
    args = train_args(prep, tmp_path / "ref", "mix", "-d", f"{chat}:0.4", data=f"{prose}:0.6")
    args += ["--chat-template", "configs/chatml.jinja", "--ckpt-freq", 2, "--keep-latest-k", 3, "--val-split", 0.1]
    args += ["--eval-freq", 3]
    (tmp_path / "ref").mkdir()
    (tmp_path / "trace").mkdir()
    first = ok(torchrun([*args, "--stop-at-step", 6], env={"FSDP_TRAIN_TRACE_SAMPLES": str(tmp_path / "trace")}))
    assert "Mixture of 2 sources" in first.stdout and "  prose: " in first.stdout and "  chat: " in first.stdout
    blocks = mixture_caches(tmp_path / "ref", [prose, chat])  # each source packed on its own: blocks never mix sources
    sizes = tuple(len(b) for b in blocks)
    order = ft.mixture_order(sizes, (0.6, 0.4), 0, 0).tolist()
    steps = global_batches(tmp_path / "trace")
    assert [i for s in range(1, 7) for i in steps[s]] == order[:24]  # 2 ranks x batch 2 a step, the mixture's order

    # Step 1's loss of each source: plain transformers on that source's blocks of the step, each document (or
    # conversation, on its assistant tokens) alone.
    model = AutoModelForCausalLM.from_pretrained(prep["model"], dtype=torch.float32)
    sums = {"prose": [0.0, 0], "chat": [0.0, 0]}
    for i in steps[1]:
        name, row = ("prose", blocks[0][i]) if i < sizes[0] else ("chat", blocks[1][i - sizes[0]])
        ids, positions = row["input_ids"], row["position_ids"]
        labels = row.get("labels", ids)
        t, n = unpacked_loss(model, ids, labels, [*(positions == 0).nonzero().flatten().tolist(), len(ids)])
        sums[name][0] += t
        sums[name][1] += n
    metrics = read_metrics(tmp_path / "ref" / "mix")
    assert all(n for _, n in sums.values()), sums  # both sources trained in step 1
    for name, (t, n) in sums.items():
        assert metrics[0][f"loss/{name}"] == pytest.approx(t / n, abs=1e-5), name
    each = [metrics[2]["val/loss/prose"], metrics[2]["val/loss/chat"]]
    assert min(each) < metrics[2]["val/loss"] < max(each)  # the overall one is their token-weighted mean
    assert "by source (train / validation): prose " in first.stdout

    # kill -9 inside the save of step 4, then the same command: the same weights as the uninterrupted run.
    killed = [*args[: args.index("--save-dir") + 1], tmp_path / "killed", *args[args.index("--save-dir") + 2 :]]
    job = Job([*killed, "--stop-at-step", 6], env={"FSDP_TRAIN_FAULT": "sleep_in_save:4:4"})
    try:
        pids = {int(m[1]): int(m[2]) for m in job.wait_for(r"FAULT sleep_in_save step 4 rank (\d) pid (\d+)", 2)}
        os.kill(pids[1], signal.SIGKILL)
        assert job.wait(timeout=60) != 0
    finally:
        job.kill_all()
    assert "Resuming from step 2" in ok(torchrun([*killed, "--stop-at-step", 6])).stdout
    assert_same_weights(tmp_path / "killed/mix/checkpoints/step-6", tmp_path / "ref/mix/checkpoints/step-6")

    # Resumed from step 2 on 1 rank (global batch 4 -> 2): the same order from where it stopped. (More ranks, 2 -> 3, a
    # whole epoch of one dataset: test_resume_on_another_world_size_loses_and_repeats_no_sample; the offset is one.)
    on1 = resume_on(1, tmp_path / "ref", tmp_path / "on1", args, stop=4)
    assert [i for s in (3, 4) for i in on1[s]] == order[8:12]

    # Bad input: one error line each, nothing written (a source that is missing, or chat without a template, is
    # found before the first source is packed).
    save = tmp_path / "fresh"
    for second, error in [
        (f"{chat}:0", "a weight must be a positive number"),
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
