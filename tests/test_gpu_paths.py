"""The CUDA-only attention paths, proven on CPU (#21): transformers' own flash-attention and flex-attention dispatch,
driven exactly as fsdp_train.py drives it, with only flash_attn's CUDA kernels replaced by exact references
(tests/flash_emulation.py). Every reference is plain transformers on each document alone."""

from __future__ import annotations

import copy

import flash_emulation as fe
import pytest
import torch
from conftest import (
    ROOT,
    context_sensitive_model,
    ok,
    packed_cache,
    pretrained_like,
    read_metrics,
    reference_loss,
    short_documents,
    tiny_config,
    torchrun,
    train_args,
    unpacked_loss,
    unpacked_sums,
)

import fsdp_train as ft

VOCAB = 97
ARCHS = {"llama": dict(num_key_value_heads=2), "qwen2": dict(num_key_value_heads=2)}


@pytest.fixture
def emulated_flash(monkeypatch):
    fe.install(patch=monkeypatch)
    monkeypatch.setattr(ft, "CUDA_ONLY_ATTENTION", frozenset())
    fe.KERNEL_CALLS.clear()


def model_pair(arch: str, attn: str, dtype=torch.float32):
    """(the model under `attn`, the same weights under plain sdpa): pretrained-like random weights."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, VOCAB, use_cache=False, **ARCHS[arch])
    torch.manual_seed(0)
    ref = pretrained_like(
        AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa", dtype=dtype)
    )
    ref.eval()
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn, dtype=dtype).eval()
    model.load_state_dict(ref.state_dict())
    return model, ref


def packed_rows(rows: int, seq: int = 40, seed: int = 1):
    """(ids, positions, documents per row) of `rows` packed rows of uneven documents, as TextPacker packs them."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 23, (rows * 8,), generator=g).tolist()
    docs = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]
    blocks, positions, _ = ft.pack_sequences(docs, seq)
    ids, pos = torch.tensor(blocks[:rows]), torch.tensor(positions[:rows])
    assert len(ids) == rows
    return ids, pos


def segments(positions_row: torch.Tensor) -> list[tuple[int, int]]:
    starts = (positions_row == 0).nonzero().flatten().tolist() + [len(positions_row)]
    return list(zip(starts, starts[1:], strict=False))


def max_gap_to_documents_alone(model, ref, ids, positions, inputs) -> float:
    """Largest |log-prob| difference of any packed token to the same token of its document run alone through the
    plain sdpa model (no position_ids, no mask)."""
    with torch.no_grad():
        packed = model(**inputs).logits.float().log_softmax(-1)
        gap = 0.0
        for r in range(len(ids)):
            for a, b in segments(positions[r]):
                alone = ref(input_ids=ids[r, a:b][None]).logits[0].float().log_softmax(-1)
                gap = max(gap, (packed[r, a:b] - alone).abs().max().item())
    return gap


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_flash_attention_keeps_packed_documents_apart_at_every_batch_size(emulated_flash, arch, rows):
    model, ref = model_pair(arch, "flash_attention_2")
    ids, pos = packed_rows(rows)
    fe.KERNEL_CALLS.clear()
    fed = ft.model_inputs(ids, pos, "flash_attention_2")
    gap = max_gap_to_documents_alone(model, ref, ids, pos, fed)
    assert gap < 1e-5, gap
    assert fe.KERNEL_CALLS["varlen"] == 2  # one variable-length call per layer for the packed micro-batch
    # What training fed before (position_ids only): right for one row, every row's documents mixed from two on.
    old_gap = max_gap_to_documents_alone(model, ref, ids, pos, {"input_ids": ids, "position_ids": pos})
    assert old_gap < 1e-5 if rows == 1 else old_gap > 0.1, old_gap


@pytest.mark.parametrize("rows", [2, 4])
def test_flash_attention_in_bf16_keeps_packed_documents_apart(emulated_flash, rows):
    model, ref = model_pair("llama", "flash_attention_2", torch.bfloat16)
    ids, pos = packed_rows(rows)
    gap = max_gap_to_documents_alone(model, ref, ids, pos, ft.model_inputs(ids, pos, "flash_attention_2"))
    old_gap = max_gap_to_documents_alone(model, ref, ids, pos, {"input_ids": ids, "position_ids": pos})
    # bf16 rounding of log-probs of magnitude ~20 (this init's logits are large) vs documents mixing
    assert gap < 0.3 < 3 < old_gap, (gap, old_gap)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_an_epochs_short_last_step_with_flash_attention_trains_only_its_real_rows(emulated_flash, arch):
    """The last step of an epoch, as next_batches feeds it: 3 real blocks and a FILLER row in a batch of 4, through
    transformers' flash dispatch (varlen kernel over the 4 rows' segments). Its summed loss is plain sdpa's on every
    document of the 3 real rows, each alone: the filler row adds no target."""
    import datasets

    model, ref = model_pair(arch, "flash_attention_2")
    ids, positions = packed_rows(3)
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "position_ids": positions.tolist()})
    batch_ids, labels, batch_pos, real = ft.fetch_batch(data.with_format("torch"), [2, 0, ft.FILLER, 1])
    assert real == 3 * ids.shape[1] and (labels[2] == -100).all()
    fe.KERNEL_CALLS.clear()
    with torch.no_grad():
        inputs = ft.model_inputs(batch_ids, batch_pos, "flash_attention_2", labels)
        loss_sum = model(**inputs, num_items_in_batch=1).loss.item()
    assert fe.KERNEL_CALLS and set(fe.KERNEL_CALLS) == {"varlen"}, fe.KERNEL_CALLS
    total, count = 0.0, 0
    for r in range(3):
        cuts = [a for a, _ in segments(positions[r])] + [ids.shape[1]]
        t, n = unpacked_loss(ref, ids[r], ids[r], cuts)
        total, count = total + t, count + n
    assert int(ft.trained_targets(labels)) == count
    assert loss_sum == pytest.approx(total, rel=1e-5)


def test_flex_attention_keeps_packed_documents_apart_at_every_batch_size():
    model, ref = model_pair("llama", "flex_attention")  # its CPU forward runs (compiled); only backward is CUDA-only
    for rows in (1, 2, 4):
        ids, pos = packed_rows(rows)
        gap = max_gap_to_documents_alone(model, ref, ids, pos, ft.model_inputs(ids, pos, "flex_attention"))
        assert gap < 1e-5, (rows, gap)


def test_the_start_up_check_runs_at_the_micro_batch_shape_and_refuses_a_mixing_kernel(emulated_flash, monkeypatch):
    model, _ = model_pair("llama", "flash_attention_2")
    model.train()
    d = ft.Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    cfg = ft.Config(
        dataset_name="d", model_name="m", attn_implementation="flash_attention_2", batch_size=4, packing="isolated"
    )
    assert ft.isolation_problem(model, cfg, d) is None
    assert fe.KERNEL_CALLS["varlen"] == 2  # the check took the path training takes
    # Broken on purpose: batches fed as before (no segments: the plain kernel over whole rows)...
    monkeypatch.setattr(ft, "takes_segments", lambda attn: False)
    with pytest.raises(ft.InputError, match="attend to each other.*micro-batch of 4 rows"):
        ft.isolation_problem(model, cfg, d)
    # ... which a one-row check, as before, could not see.
    assert ft.document_isolation_gap(model, d.device, VOCAB, 1, "flash_attention_2") < 1e-5
    # Broken on purpose: a varlen kernel that ignores the segments.
    monkeypatch.undo()
    fe.install(fe.mixing_varlen_fn, patch=monkeypatch)
    monkeypatch.setattr(ft, "CUDA_ONLY_ATTENTION", frozenset())
    with pytest.raises(ft.InputError, match="attend to each other"):
        ft.isolation_problem(model, cfg, d)
    assert model.training


def test_a_packed_training_step_with_flash_attention_equals_transformers_on_each_document_alone(prep, tmp_path):
    """fsdp_train.py itself on 2 ranks, 4 rows a micro-batch, transformers' flash dispatch with the stand-in kernels:
    the step-1 loss, and the validation loss, equal plain transformers on every document alone. (A kernel that mixes
    documents is refused by the start-up check: test_the_start_up_check_runs_at_the_micro_batch_shape_...)"""
    sharp = {"model": context_sensitive_model(prep, tmp_path), "dataset": short_documents(tmp_path)}
    args = train_args(sharp, tmp_path / "runs", "flash", "-b", 4, "--stop-at-step", 1, "--attn-implementation",
                      "flash_attention_2", "--val-split", 0.05, "--lr", 1e-9)  # fmt: skip
    proc = ok(torchrun(args, script=ROOT / "tests" / "flash_emulation.py"))
    assert "Packed documents are isolated (flash_attention_2, 4 rows a micro-batch)" in proc.stdout
    (step1,) = read_metrics(tmp_path / "runs" / "flash")
    expected = reference_loss(sharp, tmp_path / "runs", "model", world_size=2, batch_size=4)
    assert step1["loss"] == pytest.approx(expected, abs=2e-5), (step1["loss"], expected)
    # Evaluation (after a step of lr 1e-9, on every validation block): every validation document alone.
    val = ft.load_packed(packed_cache(tmp_path / "runs", "validation"))["input_ids"]
    total, count = unpacked_sums(sharp["model"], val)
    assert step1["val/loss"] == pytest.approx(total / count, abs=2e-5), (step1["val/loss"], total / count)


def test_position_zero_is_never_a_target_in_chat_blocks(prep):
    """A template that opens a conversation inside an assistant span labels its first token; packed after another
    conversation, that label would train the previous one's last token to predict the next conversation."""
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(prep["model"])
    # Renders only the assistant turns: the conversation's first token is the first assistant token.
    template = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    conv = [{"role": "user", "content": "why"}, {"role": "assistant", "content": "because the sea"}]
    example = ft.chat_example(conv, tok, template)
    ids, labels = example["ids"], example["labels"]
    assert labels[0] != -100  # the template leaks: the first token is an assistant token
    block = ft.pack_examples([(ids, labels), (ids, labels)], seq_length=2 * len(ids) + 3, pad_id=0)
    data = datasets.Dataset.from_dict(block).with_format("torch")
    _, fetched, positions, _ = ft.fetch_batch(data, [0])
    assert (fetched[positions == 0] == -100).all()
    assert int((fetched != -100).sum()) == 2 * (sum(x != -100 for x in labels) - 1)  # nothing else masked


def test_the_start_up_check_passes_correct_bf16_with_large_logits_and_refuses_bf16_mixing(monkeypatch):
    """bf16 rounds logits of size 16-32 to steps of 0.125: an absolute log-prob bound (0.1, before) refused a correctly
    isolated model with logits as large as a real LM's (here ~30); the bound relative to the logits' size does not, and
    still refuses documents that mix."""
    model, _ = model_pair("llama", "sdpa", torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(4)  # logits up to ~30
    model.train()
    d = ft.Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    cfg = ft.Config(dataset_name="d", model_name="m", dtype="bf16", batch_size=4, packing="isolated")
    assert ft.isolation_problem(model, cfg, d) is None
    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ft.InputError, match="attend to each other"):
        ft.isolation_problem(model, cfg, d)


def test_auto_picks_flash_attention_and_bf16_only_where_the_gpu_runs_them(monkeypatch):
    """flash-attn has no fp32 kernel and runs on Ampere (compute capability 8.0) or newer; older GPUs emulate bf16
    slowly. auto must pick what the GPU runs, and an explicit choice it cannot run is one error line, not a traceback
    from the first forward."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # only named: nothing runs on them

    def cfg(**flags):
        return ft.Config(dataset_name="d", model_name="m", **flags)

    # Planning for a GPU this host does not have: a current one.
    assert cfg().compute_dtype(cuda) == torch.bfloat16 and ft.attn_implementation(cfg(), cuda) == "flash_attention_2"
    assert ft.attn_implementation(cfg(dtype="fp32"), cuda) == "sdpa"
    assert ft.attn_implementation(cfg(), cpu) == "sdpa"
    with pytest.raises(ft.InputError, match="flash_attention_2 has no fp32 kernel"):
        ft.attn_implementation(cfg(dtype="fp32", attn_implementation="flash_attention_2"), cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # a V100
    assert cfg().compute_dtype(cuda) == torch.float32
    assert ft.attn_implementation(cfg(), cuda) == ft.attn_implementation(cfg(dtype="bf16"), cuda) == "sdpa"
    with pytest.raises(ft.InputError, match=r"compute capability 8\.0 or newer \(this one: 7\.0\)"):
        ft.attn_implementation(cfg(dtype="bf16", attn_implementation="flash_attention_2"), cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    assert cfg().compute_dtype(cuda) == torch.bfloat16 and ft.attn_implementation(cfg(), cuda) == "flash_attention_2"
