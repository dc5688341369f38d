"""fsdp_train.py: pure functions imported directly, and real 2-process torchrun runs on CPU/gloo."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    REFERENCE_PEAK_TFLOPS,
    ROOT,
    assert_same_weights,
    assert_single_error,
    checkpoint_weights,
    copy_run,
    in_process,
    ok,
    packed_cache,
    read_metrics,
    reference_loss,
    run,
    torchrun,
    train_args,
    tree_digest,
    unpacked_loss,
)

import fsdp_train as ft

# ----------------------------------------------------------------------------------------------------------------------
# Pure functions


def test_parse_args_maps_every_flag_and_short_alias():
    cfg = ft.parse_args(
        ["-e", "x", "-d", "ds", "-m", "m", "-b", "3", "-s", "256", "--activation-checkpointing", "off",
         "--cpu-offload", "on", "--stop-at-step", "7", "--lr", "2e-5"]
    )  # fmt: skip
    assert (cfg.experiment_name, cfg.dataset_name, cfg.model_name) == ("x", "ds", "m")
    assert (cfg.batch_size, cfg.seq_length, cfg.stop_at_step, cfg.lr) == (3, 256, 7, 2e-5)
    assert cfg.activation_checkpointing is False and cfg.cpu_offload is True
    assert ft.parse_args(["-d", "ds", "-m", "m"]).activation_checkpointing is True  # default on


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-m", "m"], "--dataset-name is required"),
        (["-d", "ds", "-m", "m", "-b", "0"], "--batch-size must be >= 1"),
        (["-d", "ds", "-m", "m", "--lr", "-1"], "--lr must be > 0, got -1"),
        (["-d", "ds", "-m", "m", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["-d", "ds", "-m", "m", "--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["-d", "ds", "-m", "m", "--val-split", "1"], r"--val-split must be in \[0, 1\), got 1"),
        (["-d", "ds", "-m", "m", "--min-lr-ratio", "1.5"], r"--min-lr-ratio must be in \[0, 1\], got 1.5"),
        (["-d", "ds", "-m", "m", "--dist-timeout", "0"], "--dist-timeout must be > 0, got 0"),
        (["-d", "ds", "-m", "m", "--hang-timeout", "-1"], "--hang-timeout must be >= 0, got -1"),
        (["-d", "ds", "-m", "m", "--cpu-offload", "maybe"], "expected on or off"),
        (["-d", "ds", "-m", "m", "--no-such-flag"], "unrecognized arguments"),
        (["-d", "ds", "-m", "m", "-e", "../escape"], "--experiment-name"),
        (["-d", "ds", "-m", "m", "--optimizer", "sgd"], "invalid choice: .sgd."),
        (["-d", "ds", "-m", "m", "--optimizer-in-backward", "on"], "cannot clip: add --max-norm 0"),
        (["-d", "ds", "-m", "m", "--activation-checkpointing", "off", "--activation-offload", "on"], "needs --act"),
    ],
)
def test_parse_args_rejects_bad_input(argv, message):
    with pytest.raises(ft.InputError, match=message):
        ft.parse_args(argv)


def readme_flag_table() -> dict[str, tuple[list[str], str]]:
    """README's fsdp_train.py flag table: long flag -> (the choices its first column lists, its default column)."""
    text = (Path(ft.__file__).parent / "README.md").read_text()
    table = text.split("## fsdp_train.py flags", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in table.splitlines()[2:]:
        flag, default = [cell.strip() for cell in line.replace("\\|", "/").split("|")[1:3]]
        words = flag.strip("`").split()
        rows[words[-2] if len(words) > 1 and not words[-1].startswith("-") else words[-1]] = (
            words[-1].split("/") if "/" in words[-1] else [],
            default.strip("`"),
        )
    return rows


def test_readme_flag_table_matches_config():
    # Every flag in the table, none twice, none invented; the choices and defaults it shows are Config's.
    rows = readme_flag_table()
    fields = {ft.flag_name(f.name): f for f in dataclasses.fields(ft.Config)}
    assert set(rows) == set(fields), f"missing: {set(fields) - set(rows)}, not flags: {set(rows) - set(fields)}"
    for flag, (choices, default) in rows.items():
        f = fields[flag]
        if f.metadata["choices"]:
            assert choices == list(f.metadata["choices"]), flag
        if isinstance(f.default, bool):
            assert choices == ["on", "off"] and default == ("on" if f.default else "off"), flag
        elif isinstance(f.default, (int, float)):
            assert float(default) == f.default, flag
        elif f.default:
            assert default == f.default, flag


def test_config_file_sets_flags_and_the_command_line_overrides_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("dataset-name: ds\nmodel_name: m\nlr: 1e-4\nbatch_size: 3\nactivation_checkpointing: false\n")
    cfg = ft.parse_args(["--config", str(path), "-b", "5"])
    assert (cfg.dataset_name, cfg.model_name, cfg.lr, cfg.batch_size) == ("ds", "m", 1e-4, 5)
    assert cfg.activation_checkpointing is False and cfg.config == str(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr_schedular: wsd\n", "unknown key 'lr_schedular' in --config .*; did you mean 'lr_scheduler'\\?"),
        ("lr_scheduler: cosin\n", "--lr-scheduler must be one of cosine, linear, constant, wsd, got 'cosin'"),
        ("batch-sise: 2\n", "did you mean 'batch_size'"),
        ("batch_size: many\n", "bad value for 'batch_size'"),
        ("cpu_offload: perhaps\n", "bad value for 'cpu_offload'"),
        ("- a\n- b\n", "must be a mapping"),
        ("a: [1\n", "is not valid YAML"),
        ("!!python/object/apply:os.system ['true']\n", "is not valid YAML"),
    ],
)
def test_config_file_errors_name_the_problem(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ft.InputError, match=message):
        ft.parse_args(["--config", str(path), "-d", "ds", "-m", "m"])


@pytest.mark.parametrize("preset", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_presets_parse(preset):
    cfg = ft.parse_args(["--config", f"configs/{preset}", "-d", "ds", "-m", "m"])
    assert cfg.config == f"configs/{preset}"


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = [ft.lr_factor(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(f[3:], f[4:], strict=False))  # non-increasing after warmup
    assert f[-1] > 0.1 and ft.lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert ft.lr_factor(12, 4, 20, 0.1) == pytest.approx(0.55)  # half-way through the decay


def test_a_warmup_that_does_not_fit_the_schedule_is_warned_about():
    """A small dataset (or a big batch) made a 7-step run of the default 10 warmup steps: the LR peaked at 0.7 x --lr
    without a word."""
    cfg = ft.Config(dataset_name="d", model_name="m", lr=1e-3, warmup_steps=10)
    assert ft.short_schedule(cfg, 11) is None and ft.short_schedule(cfg, 10) is None  # the last step reaches --lr
    assert "the LR peaks at 7.00e-04, never --lr 0.001" in ft.short_schedule(cfg, 7)
    assert "schedule's 1 step(s): the LR peaks at 1.00e-04" in ft.short_schedule(cfg, 1)


@pytest.mark.parametrize("kind", ft.LR_SCHEDULES)
def test_lr_schedulers_share_the_warmup_and_end_where_they_should(kind):
    f = [ft.lr_factor(s, 2, 12, 0.1, kind=kind, decay_fraction=0.5) for s in range(13)]
    assert f[:2] == [0.5, 1.0]
    assert all(a >= b for a, b in zip(f[2:], f[3:], strict=False))
    assert f[-1] == pytest.approx(1.0 if kind == "constant" else 0.1)


def test_wsd_holds_the_peak_then_decays_linearly():
    f = [ft.lr_factor(s, 0, 10, 0.0, kind="wsd", decay_fraction=0.4) for s in range(11)]
    assert f[:7] == [1.0] * 7  # stable for the first 60% of the steps
    assert f[7:] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    assert ft.lr_factor(5, 0, 10, 0.0, kind="linear") == pytest.approx(0.5)


def test_pack_sequences_restarts_positions_per_document_and_counts_the_dropped_tail():
    blocks, positions, dropped = ft.pack_sequences([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]], 4)
    assert blocks == [[1, 2, 3, 4], [5, 6, 7, 8]]
    # A document cut by a block boundary continues from position 0: each block stands alone.
    assert positions == [[0, 1, 2, 0], [0, 0, 1, 2]]
    assert dropped == 2
    assert ft.pack_sequences([[1, 2]], 4) == ([], [], 2)


def test_boundary_predictions_are_not_trained():
    ids = torch.tensor([[7, 8, 9, 5, 6, 1]])
    labels = ft.block_labels(ids, torch.tensor([[0, 1, 2, 0, 1, 2]]))
    assert labels.tolist() == [[-100, 8, 9, -100, 6, 1]]  # 5 would be predicted from 9, across documents


def test_tokenize_documents_appends_eos_to_each_document():
    class Tok:
        eos_token_id = 0

        def __call__(self, texts):
            return {"input_ids": [[ord(c) for c in t] for t in texts]}

    assert ft.tokenize_documents({"text": ["ab", "c", "d\x00"]}, Tok())["input_ids"] == [[97, 98, 0], [99, 0], [100, 0]]


def test_bare_boolean_flags_mean_on():
    cfg = ft.parse_args(["-d", "ds", "-m", "m", "--compile", "--pure-bf16", "--activation-checkpointing", "off"])
    assert cfg.compile is True and cfg.pure_bf16 is True and cfg.activation_checkpointing is False
    assert ft.parse_args(["-d", "ds", "-m", "m", "--compile", "off", "-b", "2"]).compile is False


def test_data_cache_key_is_stable_and_changes_with_the_dataset_files(prep, tmp_path):
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(prep["model"])
    key = ft.data_cache_key(datasets.load_from_disk(str(prep["dataset"])), tok, 64)
    assert key == ft.data_cache_key(datasets.load_from_disk(str(prep["dataset"])), tok, 64)
    assert key != ft.data_cache_key(datasets.load_from_disk(str(prep["dataset"])), tok, 128)

    class Repacked(ft.TextPacker):  # a packer whose blocks changed, its version bumped and nothing else
        version = ft.TextPacker.version + "-next"

    assert key != ft.data_cache_key(datasets.load_from_disk(str(prep["dataset"])), tok, 64, packer=Repacked)
    # New content under an unchanged fingerprint (data_to_hf.py --overwrite of an edited corpus can do that)
    # must not reuse stale tokens.
    a, b = tmp_path / "a", tmp_path / "b"
    datasets.Dataset.from_dict({"text": ["one"]}).save_to_disk(str(a))
    datasets.Dataset.from_dict({"text": ["two, longer"]}).save_to_disk(str(b))
    first = ft.data_cache_key(datasets.load_from_disk(str(a)), tok, 64)
    arrow = "data-00000-of-00001.arrow"
    shutil.copy(b / arrow, a / arrow)
    edited = datasets.load_from_disk(str(a))
    assert edited[0]["text"] == "two, longer"
    assert ft.data_cache_key(edited, tok, 64) != first


def test_rank_batches_partition_the_global_batch_and_survive_a_world_size_change():
    perm = ft.epoch_permutation(100, seed=0, epoch=0)
    assert torch.equal(perm, ft.epoch_permutation(100, seed=0, epoch=0))
    assert not torch.equal(perm, ft.epoch_permutation(100, seed=0, epoch=1))
    two = [ft.rank_batch_indices(perm, 8, 3, r, 2) for r in range(2)]
    assert set(two[0]).isdisjoint(two[1]) and sorted(two[0] + two[1]) == sorted(perm[8:14].tolist())
    # The position is a global sample offset: 3 ranks resuming at offset 14 continue exactly where 2 stopped.
    three = [i for r in range(3) for i in ft.rank_batch_indices(perm, 14, 2, r, 3)]
    assert three == perm[14:20].tolist()


def test_count_steps_max_steps_is_the_schedule_and_the_last_partial_batch_is_a_step():
    cfg = ft.Config(dataset_name="d", model_name="m", batch_size=2, num_epochs=3)
    assert ft.count_steps(cfg, 41, world_size=2) == (11, 33)  # 41 = 10 x 4 + 1: the 11th step takes the last one
    assert ft.count_steps(cfg, 40, world_size=2) == (10, 30)
    assert ft.count_steps(cfg, 3, world_size=2) == (1, 3)  # less than one global batch still trains
    # Resumed after 5 steps of global batch 4 (offset 20), now on 1 rank (batch 2): 21 left in this epoch.
    assert ft.count_steps(cfg, 41, 1, ft.TrainState(step=5, epoch=0, offset=20)) == (21, 5 + 11 + 2 * 21)
    for max_steps in (50, 7):  # longer or shorter than the epochs: --max-steps is the run and the schedule
        cfg.max_steps = max_steps
        assert ft.count_steps(cfg, 41, world_size=2) == (11, max_steps)
    cfg.stop_at_step = 4
    assert ft.run_length(cfg, 41, 2, ft.TrainState(), 1) == (11, 7, 4)
    cfg.stop_at_step = 9  # past the end: the run ends where its schedule does
    assert ft.run_length(cfg, 41, 2, ft.TrainState(), 1) == (11, 7, 7)
    with pytest.raises(ft.InputError, match="no sequence"):
        ft.count_steps(cfg, 0, world_size=2)


@pytest.mark.parametrize("n, batch, world, accum", [(41, 2, 2, 1), (15, 4, 1, 1), (7, 2, 2, 2), (3, 4, 2, 1)])
def test_every_block_is_trained_once_per_epoch_even_across_a_world_size_change(n, batch, world, accum):
    """The batches next_batches() builds, walked over two epochs: each block exactly once per epoch, the short last
    step padded with FILLER; and a switch to 3 ranks of batch 1 in mid-epoch changes none of that."""

    def walk(state, epochs, batch, world):
        seen = {}
        while True:
            ft.roll_epoch(state, n)  # next_batches' own rule
            if state.epoch >= epochs:
                return seen
            perm = ft.epoch_permutation(n, 0, state.epoch)
            for m in range(accum):
                for r in range(world):
                    idx = ft.rank_batch_indices(perm, state.offset + m * batch * world, batch, r, world)
                    assert len(idx) == batch
                    seen.setdefault(state.epoch, []).extend(i for i in idx if i != ft.FILLER)
            state.offset += batch * world * accum
            state.step += 1
            if state.step == 2 and world != 3:  # resume with another world size mid-epoch
                seen2 = walk(state, epochs, 1, 3)
                return {e: seen.get(e, []) + seen2.get(e, []) for e in range(epochs)}

    seen = walk(ft.TrainState(), 2, batch, world)
    for epoch in range(2):
        assert sorted(seen[epoch]) == list(range(n)), epoch


def _ckpt(root: Path, step: int, complete: bool = True) -> Path:
    p = root / f"step-{step}"
    p.mkdir(parents=True)
    if complete:
        (p / ft.COMPLETE).write_text(str(step))
    return p


def test_find_latest_checkpoint_ignores_incomplete_and_temp_folders(tmp_path):
    assert ft.find_latest_checkpoint(tmp_path / "none") is None
    _ckpt(tmp_path, 9)
    newest = _ckpt(tmp_path, 10)  # numeric, not lexical, order
    _ckpt(tmp_path, 12, complete=False)
    (tmp_path / ".tmp-step-14").mkdir()
    assert ft.find_latest_checkpoint(tmp_path) == newest


def test_prune_keeps_newest_k_and_never_the_only_checkpoint(tmp_path):
    for s in (4, 8, 12):
        _ckpt(tmp_path, s)
    _ckpt(tmp_path, 16, complete=False)
    assert [p.name for p in ft.checkpoints_to_prune(tmp_path, 2)] == ["step-4"]
    assert [p.name for p in ft.checkpoints_to_prune(tmp_path, 0)] == ["step-4", "step-8"]


def test_find_blocks_shards_decoder_layers_and_keeps_tied_embeddings_in_the_root():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    blocks = ft.find_blocks(model)
    assert [type(b).__name__ for _, _, b in blocks] == ["LlamaDecoderLayer"] * 3
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(b is not model.model.embed_tokens for _, _, b in blocks)


@pytest.mark.parametrize("unit", ["block", "model"])
def test_the_root_unit_stays_gathered_from_forward_to_backward(unit):
    # FSDP2 keeps the root unit gathered from forward to backward only when its reshard_after_forward is left to
    # "auto"; an explicit True (as --reshard-after-forward on passed it) freed it after forward and all-gathered it
    # again at the start of backward: one more all-gather of the embedding and head every step, of the whole model
    # with --shard-unit model. Gathered parameters are plain tensors; sharded ones are DTensors.
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    cfg = ft.parse_args(["-d", "ds", "-m", "m", "--activation-checkpointing", "off", "--shard-unit", unit])
    assert cfg.reshard_after_forward is True  # the default

    def gathered(module):
        return not any(isinstance(p, DTensor) for p in module.parameters())

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ft.shard_model(model, cfg, ft.Dist(0, 0, 1, torch.device("cpu")))
        ids = torch.randint(0, 64, (1, 8))
        loss = model(input_ids=ids, labels=ids).loss
        root = [model.model.embed_tokens, model.model.norm, model.lm_head]
        assert all(gathered(m) for m in root)
        blocks = model.model.layers
        assert gathered(blocks[-1])  # backward starts with it: never resharded after forward
        assert gathered(blocks[0]) is (unit == "model")  # a block unit is freed after its forward
        loss.backward()
        assert not any(gathered(m) for m in (*root, *blocks))  # everything sharded again after backward
    finally:
        dist.destroy_process_group()


def test_shard_unit_auto_is_per_block_on_gpus_and_one_unit_on_cpu_where_it_fits():
    cfg = ft.parse_args(["-d", "ds", "-m", "m"])
    assert cfg.shard_unit == "auto"
    assert cfg.shard_unit_on(torch.device("cuda", 0)) == "block"
    assert cfg.shard_unit_on(torch.device("cpu")) == "model"
    # One unit holds every parameter gathered plus its gradient and fp32 reduce buffer on each rank of the host: a 1B
    # model (fp32: 12 GB a rank) on 2 ranks does not fit half of a 32 GiB host, a 100M one does.
    cpu, host = torch.device("cpu"), 32 * 2**30
    assert ft.one_unit_bytes(10**9, cfg, cpu) == 12 * 10**9
    assert cfg.shard_unit_on(cpu, num_params=10**9, host_bytes=host, local_ranks=2) == "block"
    assert cfg.shard_unit_on(cpu, num_params=10**8, host_bytes=host, local_ranks=2) == "model"
    assert cfg.shard_unit_on(torch.device("cuda", 0), num_params=10**8, host_bytes=host) == "block"
    assert ft.parse_args(["-d", "ds", "-m", "m", "--shard-unit", "model"]).shard_unit_on(cpu, 10**9, host, 2) == "model"
    # --optimizer-in-backward frees each unit's gradients once reduced: with one unit nothing would be freed early
    in_backward = ft.parse_args(["-d", "ds", "-m", "m", "--optimizer-in-backward", "on", "--max-norm", "0"])
    assert in_backward.shard_unit_on(torch.device("cpu")) == "block"
    for unit in ("block", "model"):
        cfg = ft.parse_args(["-d", "ds", "-m", "m", "--shard-unit", unit])
        assert cfg.shard_unit_on(torch.device("cuda", 0)) == cfg.shard_unit_on(torch.device("cpu")) == unit


def test_shard_unit_auto_goes_per_block_where_the_host_lacks_the_memory(prep, tmp_path, capfd, monkeypatch):
    # The decision as a run takes it (the test model needs a few MB for one unit): a host with 2 MiB available
    # trains per block and says why; test_python_api_... sees one unit on this host.
    monkeypatch.setattr(ft, "host_available_bytes", lambda: 2 * 2**20)
    proc = ok(in_process(capfd, train_args(prep, tmp_path, "low", "--stop-at-step", 1, "--shard-unit", "auto")))
    assert "FSDP units: 3 (2 blocks + the root); --shard-unit auto: the unsharded model and its gradients take" in (
        proc.stdout
    )
    assert "over half of its 2.0 MiB available" in proc.stdout and ", --shard-unit block, " in proc.stdout


def test_config_changes_flags_only_settings_that_change_the_maths():
    cfg = ft.Config(dataset_name="d", model_name="m")
    saved = {**ft.dataclasses.asdict(cfg), "lr": 1.0, "max_steps": 99, "log_freq": 3, "seq_length": 7}
    assert ft.config_changes(saved, cfg) == [f"--lr 1.0 -> {cfg.lr!r}"]
    assert ft.identity_changes(saved, cfg) == [f"--seq-length 7 -> {cfg.seq_length}"]
    # packing auto ran isolated (a fallback to padded is recorded as padded)
    assert ft.identity_changes({"packing": "auto"}, ft.Config(packing="isolated")) == []
    assert ft.identity_changes({"packing": "padded"}, ft.Config(packing="isolated")) == [
        "--packing 'padded' -> 'isolated'"
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Real torchrun runs (2 processes, gloo)


@pytest.mark.slow
def test_train_checkpoint_and_resume_is_bitwise_equal_to_an_uninterrupted_run(prep, reference_run, tmp_path, capfd):
    ok(torchrun(train_args(prep, tmp_path, "resumed", "--stop-at-step", "8", "--ckpt-freq", "4")))
    resumed = ok(torchrun(train_args(prep, tmp_path, "resumed", "--stop-at-step", "12", "--ckpt-freq", "4")))
    assert "Resuming from step 8" in resumed.stdout
    assert "Tokenized" not in resumed.stdout and "Using tokenized train data cache" in resumed.stdout

    straight, again = reference_run["metrics"][:12], read_metrics(tmp_path / "resumed")
    assert [m["global_step"] for m in again] == list(range(1, 13))
    for key in ("loss", "grad_norm", "lr"):
        assert [m[key] for m in again] == [m[key] for m in straight], key  # bitwise, every step
    assert straight[-1]["loss"] < straight[0]["loss"] - 0.5  # it learns the repeated corpus
    assert straight[0]["lr"] == pytest.approx(1.5e-3)  # the LR this step used: warmup 1/2 of 3e-3
    for key in ("tok/s", "time/data", "time/forward", "time/backward", "time/update", "time/total", "mem/rss_gib"):
        assert straight[-1][key] > 0, key

    a = checkpoint_weights(reference_run["step"](12))
    b = checkpoint_weights(tmp_path / "resumed/checkpoints/step-12")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    ckpts = sorted(p.name for p in (tmp_path / "resumed/checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step-12", "step-8"]  # pruned to --keep-latest-k 2
    state = json.loads((tmp_path / "resumed/state.json").read_text())
    assert state == {"global_step": 12, "epoch": 0, "checkpoint": "checkpoints/step-12"}
    starts = [json.loads(line) for line in (tmp_path / "resumed/runs.jsonl").read_text().splitlines()]
    assert [r["start_step"] for r in starts] == [0, 8] and starts[1]["world_size"] == 2
    assert "--stop-at-step" in starts[1]["command"] and starts[1]["versions"]["torch"] == torch.__version__
    meta = json.loads((tmp_path / "resumed/checkpoints/step-12/meta.json").read_text())
    assert meta["config"]["stop_at_step"] == 12 and meta["world_size"] == 2

    before = tree_digest(tmp_path / "resumed/checkpoints")
    done = ok(in_process(capfd, train_args(prep, tmp_path, "resumed", "--stop-at-step", "12", "--ckpt-freq", "4")))
    assert "Run already complete at step 12" in done.stdout
    assert tree_digest(tmp_path / "resumed/checkpoints") == before


@pytest.mark.slow
def test_shard_unit_model_trains_bitwise_like_per_block_units(prep, reference_run, tmp_path):
    # One FSDP unit: one all-gather and one reduce-scatter per step instead of one per block. The shards and the
    # elementwise sums are the same, so every logged number and every weight must be bitwise the reference's.
    proc = ok(torchrun(train_args(prep, tmp_path, "one", "--stop-at-step", 3, "--shard-unit", "model")))
    assert "FSDP units: 1 (the whole model)" in proc.stdout
    assert "FSDP units: 3 (2 blocks + the root)" in reference_run["stdout"]
    one, per_block = read_metrics(tmp_path / "one"), reference_run["metrics"][:3]
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in one] == [m[key] for m in per_block], key
    assert_same_weights(tmp_path / "one/checkpoints/step-3", reference_run["step"](3))


@pytest.mark.slow
def test_throughput_window_excludes_checkpoint_time(prep, reference_run):
    from transformers import AutoModelForCausalLM

    # The shared run saves after every step, between one logged step and the next: none of it is in a logged time.
    # MFU from the outside: 6 x the matmul parameters (all but the untied input embedding) + 12 x layers x width x
    # sequence, per token, times each rank's tokens/s, over the peak the run was given.
    hf = AutoModelForCausalLM.from_pretrained(prep["model"])
    c = hf.config
    matmul_params = sum(p.numel() for p in hf.parameters()) - hf.get_input_embeddings().weight.numel()
    flops = 6 * matmul_params + 12 * c.num_hidden_layers * c.hidden_size * 64
    for m in reference_run["metrics"]:
        phases = sum(m[f"time/{k}"] for k in ("data", "forward", "backward", "update"))
        assert phases <= m["time/total"] <= 2 * phases + 50, m  # the step's own time, no save in it
        assert m["tok/s"] == pytest.approx(2 * 2 * 64 * 1000 / m["time/total"], rel=0.01)
        assert m["mfu"] == pytest.approx(flops * m["tok/s"] / 2 / (REFERENCE_PEAK_TFLOPS * 1e12), rel=1e-9)
    assert "| mfu " in reference_run["stdout"] and ", MFU " in reference_run["stdout"]


def test_mfu_peaks_come_from_the_device_name_or_the_flag_and_are_never_guessed():
    assert ft.peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4
    assert ft.peak_tflops("NVIDIA H100 PCIe", torch.float32) == 51.2
    assert ft.peak_tflops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312.0
    assert ft.peak_tflops("NVIDIA L4", torch.bfloat16) == 121.0
    assert ft.peak_tflops("NVIDIA L40", torch.bfloat16) is None  # not the L4, not the L40S: unknown
    cpu = torch.device("cpu")
    assert ft.device_peak_tflops(ft.Config(dataset_name="d", model_name="m"), cpu) is None
    assert ft.device_peak_tflops(ft.Config(dataset_name="d", model_name="m", peak_tflops=2.5), cpu) == 2.5


def check_step0_loss_and_checkpoint(prep, save_dir: Path, exp: Path, model: str) -> None:
    first = read_metrics(exp)[0]
    assert first["loss"] == pytest.approx(reference_loss(prep, save_dir, model), abs=1e-5)
    weights = checkpoint_weights(exp / "checkpoints/step-2")
    if model == "tied":  # one tensor saved under both names, still equal after training
        assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])


def test_sharded_step0_loss_equals_the_single_process_model(prep, reference_run, tmp_path):
    save_dir, exp = reference_run["save_dir"], reference_run["exp"]  # the shared run of the tiny model
    check_step0_loss_and_checkpoint(prep, save_dir, exp, "model")
    # Checkpointing changes no bit (once is enough: it does not care about ties).
    ok(torchrun(train_args(prep, tmp_path, "b", "--stop-at-step", "2", "--activation-checkpointing", "off")))
    assert [m["loss"] for m in read_metrics(tmp_path / "b")] == [m["loss"] for m in read_metrics(exp)[:2]]


@pytest.mark.smoke  # `make test-fast`'s one short run: prep, 2 ranks, checkpoint and export, against transformers
def test_sharded_step0_loss_of_a_tied_model_equals_the_single_process_model(prep, tied_run):
    check_step0_loss_and_checkpoint(prep, tied_run, tied_run / "exp", "tied")
    assert "mfu" not in read_metrics(tied_run / "exp")[0]  # CPU: no known peak, none given


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line from rank 0, non-zero exit, nothing touched


def _make_dataset(path: Path, rows: dict) -> Path:
    import datasets

    datasets.Dataset.from_dict(rows).save_to_disk(str(path))
    return path


BAD_INPUTS = {
    "missing dataset": (lambda p, t: ["-d", t / "nope"], "cannot load dataset"),
    "missing model": (lambda p, t: ["-m", t / "no-model"], "does not exist"),
    "no text column": (
        lambda p, t: ["-d", _make_dataset(t / "ds", {"body": ["a b c"]})],
        "it has body (name yours with --chat-columns, e.g. text=body",
    ),
    "empty dataset": (lambda p, t: ["-d", _make_dataset(t / "ds", {"text": []})], "is empty"),
    "shorter than one block": (
        lambda p, t: ["--fresh", "-d", _make_dataset(t / "ds", {"text": ["hi"]})],  # refused before the move
        "fewer than one block of --seq-length 64",
    ),
    "seq over model max": (lambda p, t: ["-s", "4096"], "exceeds the model's maximum of 1024"),
    "batch size 0": (lambda p, t: ["-b", "0"], "--batch-size must be >= 1"),
    "accumulate in backward": (
        lambda p, t: ["--optimizer-in-backward", "on", "--max-norm", "0", "--global-batch-size", "8"],
        "nothing to accumulate",  # 2 (4 in one process) micro-batches
    ),
    "unwritable save dir": (lambda p, t: ["--save-dir", t / "afile" / "sub"], "cannot write to --save-dir"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_one_line_from_rank0_and_checkpoint_untouched(prep, four_steps, tmp_path, case, capfd):
    make_args, message = BAD_INPUTS[case]
    save_dir = copy_run(four_steps, tmp_path / "save")
    (tmp_path / "afile").write_text("not a folder")
    before = tree_digest(save_dir / "exp")
    # argparse keeps the last value, so the bad flag overrides the good default; --stop-at-step 6 would train on.
    args = train_args(prep, save_dir, "exp", "--stop-at-step", "6") + make_args(prep, tmp_path)
    # 2 ranks under torchrun once (one line, from rank 0 only); the same checks of the other inputs in one process
    proc = torchrun(args) if case == "missing dataset" else in_process(capfd, args)
    assert proc.returncode != 0
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stdout[-3000:]
    assert 'fsdp_train.py", line' not in proc.stdout  # no Python traceback from any rank
    assert tree_digest(save_dir / "exp") == before


@pytest.mark.slow
def test_an_attention_kernel_this_host_cannot_run_is_refused_before_any_data_is_packed(prep, tmp_path, capfd):
    proc = in_process(capfd, train_args(prep, tmp_path, "exp", "--attn-implementation", "flex_attention"))
    assert_single_error(proc, "--attn-implementation flex_attention trains on CUDA only")
    assert not (tmp_path / ".cache").exists() and not (tmp_path / "exp").exists()  # nothing tokenized, no folder


@pytest.mark.slow
def test_a_rerun_that_changes_what_is_trained_is_refused_until_fresh_or_resume_from(prep, four_steps, tmp_path, capfd):
    def job(*args):  # in this process (a 1-rank group): what is checked is the same on every rank
        return in_process(capfd, args)

    save_dir = copy_run(four_steps, tmp_path / "save")  # a finished 4-step run
    exp, before = save_dir / "exp", tree_digest(save_dir / "exp")
    changed = train_args(prep, save_dir, "exp", "--stop-at-step", 5, "--seed", 7, "-s", 32, "--log-freq", 5)
    line = assert_single_error(job(*changed), "holds a run that trained with other settings (step-4)")
    assert "--seed 0 -> 7; --seq-length 64 -> 32." in line  # the log cadence is no reason (flags in Config order)
    assert "another -e" in line and "--fresh" in line and "--resume-from latest" in line
    assert tree_digest(exp) == before

    accepted = ok(job(*changed, "--resume-from", "latest"))
    assert "Resuming from step 4" in accepted.stdout
    assert accepted.stdout.count("Resuming (--resume-from) with a changed setting") == 2
    meta = json.loads((exp / "checkpoints/step-5/meta.json").read_text())
    assert (meta["config"]["seed"], meta["config"]["seq_length"]) == (7, 32)  # a plain rerun now compares with these

    fresh = ok(job(*changed, "--fresh", "--stop-at-step", 1))
    (aside,) = save_dir.glob("exp.old-*")
    assert f"moved the previous run to {aside}" in fresh.stdout and "Resuming" not in fresh.stdout
    assert [m["global_step"] for m in read_metrics(exp)] == [1]
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step-4", "step-5"]

    step4 = aside / "checkpoints/step-4"
    assert_single_error(job(*changed, "--resume-from", step4), "holds checkpoints of another line")
    elsewhere = train_args(prep, tmp_path / "other", "sft", "--stop-at-step", 5, "--resume-from", step4)
    assert "Resuming from step 4" in ok(job(*elsewhere)).stdout  # another experiment's checkpoint, into a new one
    assert "Run already complete at step 5" in ok(job(*elsewhere)).stdout  # the same command: its own now


def test_help_is_fast_and_lists_every_flag():
    proc = ok(run([sys.executable, "fsdp_train.py", "--help"]))
    for f in ft.dataclasses.fields(ft.Config):
        assert f"--{f.name.replace('_', '-')}" in proc.stdout


@pytest.mark.parametrize("masked", [False, True])
def test_chunked_loss_equals_transformers_loss_and_gradient(monkeypatch, masked):
    from transformers.loss.loss_utils import ForCausalLMLoss

    monkeypatch.setattr(ft, "LOSS_CHUNK_ELEMENTS", 8 * 50)  # several chunks of this small batch
    torch.manual_seed(0)
    logits = torch.randn(2, 11, 50, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 11))
    if masked:
        labels[0, :5] = -100
    grads = []
    for fn in (ForCausalLMLoss, ft.causal_lm_loss):
        loss = fn(logits, labels, vocab_size=50, num_items_in_batch=17.0)
        (grad,) = torch.autograd.grad(loss, logits)
        grads.append((loss.detach(), grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-12) and torch.allclose(grads[0][1], grads[1][1], atol=1e-12)
    assert grads[1][1][0, -1].abs().sum() == 0  # the last position predicts nothing
    mean = ft.causal_lm_loss(logits, labels)  # no count given: the mean over labelled tokens, as transformers does
    assert torch.allclose(mean, ForCausalLMLoss(logits, labels, vocab_size=50), atol=1e-12)


def test_chunked_loss_on_bf16_logits_of_large_magnitude_matches_transformers_in_fp32(monkeypatch):
    """bf16 logits as a model emits them, spread over +-100 (the shifted-max maths must not overflow): the loss equals
    transformers' on the same values in fp32, and the bf16 gradient is that gradient rounded to bf16."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    monkeypatch.setattr(ft, "LOSS_CHUNK_ELEMENTS", 16 * 300)  # several chunks
    torch.manual_seed(0)
    logits = (torch.randn(2, 33, 300) * 30).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 300, (2, 33))
    labels[1, :9] = -100
    fp32 = logits.detach().float().requires_grad_()
    ref = ForCausalLMLoss(fp32, labels, vocab_size=300)
    (ref_grad,) = torch.autograd.grad(ref, fp32)
    loss = ft.causal_lm_loss(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.dtype == torch.bfloat16
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    # each entry is the fp32 gradient in bf16 (8 significant bits), rounded when stored and again when backward scales
    # it by the bf16-rounded 1/count
    assert ((grad.float() - ref_grad).abs() <= 2**-6 * ref_grad.abs() + 1e-30).all()


@pytest.mark.slow
def test_the_short_last_step_of_each_epoch_trains_the_blocks_left_and_max_steps_is_the_schedule(prep, tmp_path):
    """7 one-document blocks at a global batch of 4: each epoch is a full step and a step of the 3 blocks left, none
    dropped. --max-steps 5 is the run and its LR schedule, the data cycling into a third epoch. Every step's logged
    loss is plain transformers' on the blocks that step traced (each alone), from the weights the step started with:
    the filler rows add neither a target nor a token. Then --max-steps 6 on resume: one warning, with its cause."""
    import datasets
    from transformers import AutoModelForCausalLM

    files = sorted((ROOT / "data").rglob("*.txt"))
    lines = [line for f in files for line in f.read_text().splitlines() if 20 < len(line) < 100][:7]  # < 64 tokens
    datasets.Dataset.from_dict({"text": lines}).save_to_disk(tmp_path / "seven")
    (tmp_path / "trace").mkdir()
    env = {"FSDP_TRAIN_TRACE_SAMPLES": str(tmp_path / "trace")}
    args = train_args(prep, tmp_path, "short", "--packing", "padded", "--ckpt-freq", 1, "--keep-latest-k", 9,
                      data=tmp_path / "seven")  # fmt: skip
    proc = ok(torchrun([*args, "--max-steps", 5], env=env))
    assert (
        "Length: 2 steps/epoch of global batch 4 (the last one takes the 3 sequences left; none dropped); "
        "LR schedule 5 steps (--max-steps 5), 2.86 passes over the data"
    ) in proc.stdout

    data = ft.load_packed(packed_cache(tmp_path))
    assert len(data) == 7
    steps = {}
    for f in sorted((tmp_path / "trace").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], (record["epoch"], []))[1].extend(record["indices"])
    assert {step: epoch for step, (epoch, _) in steps.items()} == {1: 0, 2: 0, 3: 1, 4: 1, 5: 2}
    for epoch in (0, 1):
        trained = [i for s in steps.values() if s[0] == epoch for i in s[1] if i != ft.FILLER]
        assert sorted(trained) == list(range(7)), (epoch, steps)
    real = sum(int(data[i]["num_tokens"]) for _, indices in steps.values() for i in indices if i != ft.FILLER)
    assert f"{real:,} tokens in" in proc.stdout  # every real token trained, nothing more
    metrics = {m["global_step"]: m for m in read_metrics(tmp_path / "short")}
    # The schedule ends at --max-steps: step 5 decays 2 of the 3 post-warmup steps, cosine to 0.1 (worked out by hand)
    assert metrics[5]["lr"] == pytest.approx(3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 3))))

    model = AutoModelForCausalLM.from_pretrained(prep["model"], dtype=torch.float32)
    for step, (_, indices) in steps.items():
        if step > 1:
            model.load_state_dict(checkpoint_weights(tmp_path / f"short/checkpoints/step-{step - 1}"))
        total, count = 0.0, 0
        for i in (i for i in indices if i != ft.FILLER):
            n = int(data[i]["num_tokens"])
            ids = data[i]["input_ids"][:n]
            t, c = unpacked_loss(model, ids, ids, [0, n])
            total, count = total + t, count + c
        assert metrics[step]["loss"] == pytest.approx(total / count, abs=2e-5), step

    longer = ok(torchrun([*args, "--max-steps", 6]))
    warnings = [line for line in longer.stdout.splitlines() if "LR schedule now spans" in line]
    assert len(warnings) == 1 and "[rank0]" in warnings[0], longer.stdout  # said once, by rank 0, with its cause
    assert "spans 6 steps instead of 5, because of --max-steps 5 -> 6: from step 5 on" in warnings[0]
