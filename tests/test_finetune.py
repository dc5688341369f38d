"""Fine-tuning features: gradient accumulation, validation, precision, HF export, chat SFT, Python API, compile."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    assert_runs_close,
    assert_single_error,
    checkpoint_weights,
    in_process,
    ok,
    read_metrics,
    run,
    shared,
    torchrun,
    train_args,
    unpacked_loss,
)

import fsdp_train as ft

CHATML = (ROOT / "configs" / "chatml.jinja").read_text()
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How long does bread rise?"},
    {"role": "assistant", "content": "About two hours."},
    {"role": "user", "content": "And sourdough?"},
    {"role": "assistant", "content": "Longer, often overnight."},
]


def packed(save_dir: Path, role: str):
    """The packed blocks a run trained (or validated) on, from its tokenized cache."""
    (folder,) = [
        f
        for f in (save_dir / ".cache" / "tokenized").iterdir()
        if json.loads((f / "info.json").read_text())["role"] == role
    ]
    return ft.load_packed(folder)


# ----------------------------------------------------------------------------------------------------------------------
# Pure functions


def test_global_batch_size_sets_accumulation_or_says_why_not():
    cfg = ft.Config(dataset_name="d", model_name="m", batch_size=2, global_batch_size=16)
    assert cfg.resolve_grad_accum(world_size=2) == 4
    with pytest.raises(ft.InputError, match="--global-batch-size 16 is not a multiple of --batch-size 2 x 3 ranks"):
        cfg.resolve_grad_accum(world_size=3)
    assert ft.Config(dataset_name="d", model_name="m", grad_accum_steps=3).resolve_grad_accum(8) == 3


def test_chat_labels_keep_assistant_content_and_end_of_turn(prep):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(prep["model"])
    example = ft.chat_example(CONVERSATION, tok, CHATML)
    ids, labels = example["ids"], example["labels"]
    assert example["parts"] == [len(ids)]  # ChatML renders history as it was: one example, both replies trained
    assert len(ids) == len(labels)
    assert tok.decode(ids) == tok.apply_chat_template(CONVERSATION, chat_template=CHATML, tokenize=False)
    trained = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])
    assert trained == "About two hours.<|im_end|>\nLonger, often overnight.<|im_end|>\n"
    assert all(lab in (-100, i) for i, lab in zip(ids, labels, strict=True))


def test_alpaca_rows_become_a_user_and_an_assistant_turn():
    assert ft.alpaca_to_messages("Translate", "chat", "cat") == [
        {"role": "user", "content": "Translate\n\nchat"},
        {"role": "assistant", "content": "cat"},
    ]
    assert ft.alpaca_to_messages("Say hi", "", "hi")[0]["content"] == "Say hi"


def test_pack_examples_never_splits_an_example_and_masks_padding():
    examples = [
        ([1, 2, 3], [-100, 2, 3]),
        ([4, 5], [-100, 5]),
        ([6, 7, 8, 9], [-100, -100, 8, 9]),
        ([10] * 9, [10] * 9),
    ]
    out = ft.pack_examples(examples, seq_length=6, pad_id=0)
    assert out["input_ids"] == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0], [10] * 6]
    assert out["labels"] == [[-100, 2, 3, -100, 5, -100], [-100, -100, 8, 9, -100, -100], [10] * 6]
    # Each example, and the padding run, is a segment of its own.
    assert out["position_ids"] == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5]]
    assert out["num_tokens"] == [5, 4, 6]
    dropped = ft.pack_examples(examples, seq_length=6, pad_id=0, drop_long=True)
    assert dropped["input_ids"] == out["input_ids"][:2]  # the 9-token example is gone, not cut


# ----------------------------------------------------------------------------------------------------------------------
# Gradient accumulation and validation


@pytest.mark.slow
def test_accumulated_micro_batches_give_the_update_of_one_big_batch(prep, big_batch_run, tmp_path):
    accum = ok(torchrun(train_args(prep, tmp_path, "accum", "-b", 2, "--grad-accum-steps", 2, "--stop-at-step", 3)))
    assert "2 micro-batch(es)/step" in accum.stdout
    assert_runs_close(
        big_batch_run, tmp_path / "accum", step=3, weight_atol=5e-5
    )  # sharded: reduce-scatter per micro-batch
    # The global batch derives the same K; unsharded accumulation (one reduce-scatter per step) is the same maths.
    unsharded = ["-b", 2, "--global-batch-size", 8, "--accumulate-unsharded", "--stop-at-step", 3]
    assert "2 micro-batch(es)/step" in ok(torchrun(train_args(prep, tmp_path, "global", *unsharded))).stdout
    assert_runs_close(big_batch_run, tmp_path / "global", step=3, weight_atol=5e-5)


@pytest.mark.slow
def test_validation_is_token_weighted_over_all_ranks_and_leaves_training_unchanged(prep, validated_run, tmp_path):
    from transformers import AutoModelForCausalLM

    ok(torchrun(train_args(prep, tmp_path, "end-only", "--stop-at-step", 4, "--val-split", "0.1")))
    records = read_metrics(validated_run["exp"])
    # Evaluating at step 2 changes nothing in training: same losses, bit for bit.
    assert [m["loss"] for m in records] == [m["loss"] for m in read_metrics(tmp_path / "end-only")]
    assert [m["global_step"] for m in read_metrics(tmp_path / "end-only") if "val/loss" in m] == [4]
    evaluated = [m for m in records if "val/loss" in m]
    assert [m["global_step"] for m in evaluated] == [2, 4]
    assert evaluated[-1]["val/ppl"] == pytest.approx(math.exp(evaluated[-1]["val/loss"]))

    # The reference: the exported final model over every document piece of every validation block, each run alone,
    # one token-weighted mean.
    model = AutoModelForCausalLM.from_pretrained(validated_run["exp"] / "hf")
    eos = model.config.eos_token_id
    data = packed(validated_run["save_dir"], "validation")
    total, tokens = 0.0, 0
    for row in data["input_ids"]:
        t, n = unpacked_loss(model, row, row, sorted({0, *((row == eos).nonzero().flatten() + 1).tolist(), len(row)}))
        total, tokens = total + t, tokens + n
    assert evaluated[-1]["val/loss"] == pytest.approx(total / tokens, abs=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face export and precision


@pytest.mark.slow
@pytest.mark.parametrize("model", ["model", "tied"])
def test_export_loads_in_transformers_with_the_trained_weights(reference_run, tied_run, tmp_path, model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Written by both ranks from their shards; the tied model exported in bf16 (the shared 2-step run), the other (the
    # shared 30-step run) in its own fp32.
    if model == "tied":
        exp, last = tied_run / "exp", tied_run / "exp/checkpoints/step-2"
    else:
        exp, last = reference_run["exp"], reference_run["step"](30)
    hf = exp / "hf"
    loaded = AutoModelForCausalLM.from_pretrained(hf)
    trained = checkpoint_weights(last)
    state = loaded.state_dict()
    cast = torch.bfloat16 if model == "tied" else torch.float32
    assert loaded.dtype == cast and all(torch.equal(state[k], trained[k].to(cast)) for k in trained)
    assert loaded.config.use_cache is True and (hf / "generation_config.json").is_file()
    stored = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(stored) == set(trained) - ({"lm_head.weight"} if model == "tied" else set())  # a tie stored once
    assert not (hf / "sharded").exists()
    if model == "tied":
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    tok = AutoTokenizer.from_pretrained(hf)
    ids = tok("The garden soil", return_tensors="pt")["input_ids"]
    generated = loaded.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5

    # Offline re-export of the same checkpoint: one process, no torchrun, same tensors and logits.
    out = tmp_path / "re-export"
    exported = ok(run([sys.executable, "fsdp_train.py", "export", "--checkpoint", last, "--out", out]))
    assert exported.stdout == f"Exported {last} to {out}\n"  # and nothing else: no library warning
    again = AutoModelForCausalLM.from_pretrained(out)  # the dtype the run asked for, from the checkpoint's config
    assert again.dtype == cast and all(torch.equal(v, state[k]) for k, v in again.state_dict().items())
    if cast == torch.float32:
        with torch.no_grad():
            assert torch.equal(again(ids).logits, loaded(ids).logits)


def test_export_of_a_folder_that_is_no_checkpoint(tmp_path, capfd):
    proc = in_process(capfd, ["export", "--checkpoint", tmp_path, "--out", tmp_path / "out"])
    assert_single_error(proc, "is not a complete checkpoint")
    for step in (10, 100, 2, 7):
        (tmp_path / "checkpoints" / f"step-{step}").mkdir(parents=True)
        if step != 7:  # step-7: a save that never finished
            (tmp_path / "checkpoints" / f"step-{step}" / ft.COMPLETE).touch()
    proc = in_process(capfd, ["export", "--checkpoint", tmp_path / "checkpoints" / "step-50", "--out", tmp_path / "o"])
    assert_single_error(proc, "step-50 does not exist; complete checkpoints there: step-2, step-10, step-100")


@pytest.mark.slow
def test_bf16_keeps_fp32_master_weights_and_pure_bf16_does_not(prep, tmp_path):
    mixed = ok(torchrun(train_args(prep, tmp_path, "mixed", "--stop-at-step", 2, "--dtype", "bf16")))
    assert "compute torch.bfloat16, params torch.float32" in mixed.stdout
    assert {t.dtype for t in checkpoint_weights(tmp_path / "mixed/checkpoints/step-2").values()} == {torch.float32}
    pure = ok(torchrun(train_args(prep, tmp_path, "pure", "--stop-at-step", 2, "--pure-bf16", "on")))
    assert "compute torch.bfloat16, params torch.bfloat16" in pure.stdout
    assert {t.dtype for t in checkpoint_weights(tmp_path / "pure/checkpoints/step-2").values()} == {torch.bfloat16}
    assert all(math.isfinite(m["loss"]) for m in read_metrics(tmp_path / "pure"))


# ----------------------------------------------------------------------------------------------------------------------
# Chat / instruction SFT


@shared("module")
def chat_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("chat")
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}] * 40
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    alpaca = [{"instruction": "Name a root vegetable.", "input": "", "output": "A carrot."}] * 60
    (folder / "alpaca.json").write_text(json.dumps(alpaca))
    return {"chat": folder / "chat.jsonl", "alpaca": folder / "alpaca.json"}


@pytest.mark.slow
def test_chat_sft_trains_on_assistant_tokens_only(prep, chat_files, tmp_path, capfd):
    from transformers import AutoModelForCausalLM

    extra = ["--chat-template", "configs/chatml.jinja", "--stop-at-step", 2, "-s", 320]  # two conversations a block
    ok(torchrun(train_args(prep, tmp_path, "chat", *extra, data=chat_files["chat"])))
    data = packed(tmp_path, "train")
    first = data[0]
    assert (first["labels"] != -100).sum() > 0 and (first["labels"] == -100).sum() > 0
    kept = first["labels"] != -100
    assert torch.equal(first["labels"][kept], first["input_ids"][kept])  # labels line up with their inputs

    # Step-1 loss of the run equals the plain model's token-weighted loss over the assistant tokens of that step,
    # each packed conversation run alone (so packing changed nothing).
    ref = AutoModelForCausalLM.from_pretrained(prep["model"])
    perm = ft.epoch_permutation(len(data), seed=0, epoch=0)
    total, tokens = 0.0, 0
    for rank in range(2):
        rows = data[ft.rank_batch_indices(perm, 0, 2, rank, 2)]
        for ids, labels, positions in zip(rows["input_ids"], rows["labels"], rows["position_ids"], strict=True):
            cuts = [*(positions == 0).nonzero().flatten().tolist(), len(ids)]
            assert len(cuts) > 2  # several conversations in the block: the comparison is about packing
            t, n = unpacked_loss(ref, ids, labels, cuts)
            total, tokens = total + t, tokens + n
    assert read_metrics(tmp_path / "chat")[0]["loss"] == pytest.approx(total / tokens, abs=1e-5)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "chat" / "hf").chat_template == CHATML  # the export can chat

    # Alpaca rows take the same path once they are conversations: prepared (one process), assistant tokens only.
    alpaca = tmp_path / "alpaca"
    ok(in_process(capfd, ["prepare", *train_args(prep, alpaca, "a", *extra, data=chat_files["alpaca"])]))
    (cache,) = (alpaca / ".cache" / "tokenized").iterdir()
    block = ft.load_packed(cache)[0]
    trained = AutoTokenizer.from_pretrained(prep["model"]).decode(block["input_ids"][block["labels"] != -100])
    assert trained.startswith("A carrot.<|im_end|>\nA carrot.<|im_end|>\n"), trained


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".json"])
def test_data_files_load_directly(tmp_path, suffix):
    import datasets

    rows = datasets.Dataset.from_dict({"instruction": ["a", "b"], "input": ["", ""], "output": ["x", "y"]})
    path = tmp_path / f"data{suffix}"
    if suffix == ".parquet":
        rows.to_parquet(str(path))
    elif suffix == ".jsonl":
        rows.to_json(str(path), lines=True)
    else:
        path.write_text(json.dumps(rows.to_list()))
    ds = ft.load_dataset_any(str(path))
    assert ds["output"] == ["x", "y"] and ft.dataset_kind(ds, "t") == "alpaca"


def test_chat_data_without_a_template_is_refused(prep, chat_files, tmp_path, capfd):
    proc = in_process(capfd, train_args(prep, tmp_path, "chat", "--stop-at-step", 1, data=chat_files["chat"]))
    assert_single_error(proc, "pass --chat-template configs/chatml.jinja")


# ----------------------------------------------------------------------------------------------------------------------
# Python API and compile


@pytest.mark.slow
def test_python_api_in_process_and_through_the_elastic_launcher(prep, reference_run, tmp_path):
    common = f"dataset_name={str(prep['dataset'])!r}, model_name={str(prep['model'])!r}, save_dir={str(tmp_path)!r}, "
    # = TRAIN, but --shard-unit left to auto (one unit on CPU): bitwise the per-block reference all the same
    common += "seq_length=64, batch_size=2, lr=3e-3, warmup_steps=2, stop_at_step=2, log_freq=1"
    # train() gives the signal handlers back as it found them (whatever the parent process left: pytest's may be
    # inherited as ignored).
    in_process = "import signal; before = signal.getsignal(signal.SIGINT); from fsdp_train import Config, train; "
    in_process += f"train(Config(experiment_name='one', {common})); after = signal.getsignal(signal.SIGINT); "
    in_process += "assert after is before, (before, after)"
    assert "world 1," in ok(run([sys.executable, "-c", in_process])).stdout
    assert [m["global_step"] for m in read_metrics(tmp_path / "one")] == [1, 2]
    launched = (
        f"from fsdp_train import Config, launch; launch(Config(experiment_name='two', {common}), nproc_per_node=2)"
    )
    proc = ok(run([sys.executable, "-c", launched]))
    assert "world 2" in proc.stdout
    assert "FSDP units: 1 (the whole model); --shard-unit auto: the unsharded model and its gradients" in proc.stdout
    # Every flag left at auto, in one line, as this host resolved it (the tiny model's config says fp32).
    resolved = "Resolved auto: --dtype fp32, --attn-implementation sdpa, --packing isolated, --shard-unit model, "
    assert resolved + "--export-dtype fp32\n" in proc.stdout
    # The same job as the torchrun command line's (per block), to the bit.
    expected = [m["loss"] for m in reference_run["metrics"][:2]]
    assert [m["loss"] for m in read_metrics(tmp_path / "two")] == expected


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(prep, reference_run, tmp_path):
    # One rank with the reference's global batch (4): compiling the blocks is most of this test's time, and two ranks
    # compiled the same graphs twice (60 s of the suite); FSDP's hooks around the compiled blocks run the same way.
    args = train_args(prep, tmp_path, "compiled", "--stop-at-step", 2, "--compile", "on", "-b", 4)
    ok(torchrun(args, nproc=1))
    eager, compiled = reference_run["metrics"][:2], read_metrics(tmp_path / "compiled")
    assert [m["loss"] for m in compiled] == pytest.approx([m["loss"] for m in eager], abs=1e-4)
