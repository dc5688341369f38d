"""Loading pretrained weights: every rank reads only its shards' slices of the safetensors files when their tensors
map one-to-one onto the model's, else rank 0 loads and broadcasts. Checked against plain transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_hf_cache, offline_env, ok, read_metrics, reference_loss, shared, torchrun, train_args

HUB_ID = "acme/tiny-bf16-shards"
FAST = "every rank read its own slices of"
FALLBACK = "Loading weights through rank 0: checkpoint key embed_tokens.weight is no weight of LlamaForCausalLM"


def bf16_shards(src: Path, out: Path) -> Path:
    """The untied tiny model in bf16 (the loader converts to fp32 master weights), in several safetensors files."""
    import torch
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(out, max_shard_size="100KB")
    assert len(list(out.glob("*.safetensors"))) > 2
    return out


def rewrite_weights(src: Path, out: Path, change) -> Path:
    """A copy of the single-file model `src` whose model.safetensors holds change(tensors)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    tensors = change(load_file(out / "model.safetensors"))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@shared("module")
def models(prep, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("load")
    hf_home = root / "hf"
    make_hf_cache(hf_home, HUB_ID, bf16_shards(prep["model"], root / "shards"))
    return {
        "hf_home": hf_home,
        "hub_bf16_shards": HUB_ID,
        "tied": str(prep["tied"]),  # the file has no lm_head.weight
        "tied_with_head": str(
            rewrite_weights(
                prep["tied"],
                root / "tied-head",
                lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].clone()},
            )
        ),
        # A tied Llama saved without the "model." prefix: transformers adds it while loading, so only rank 0 can.
        "renamed": str(
            rewrite_weights(
                prep["tied"], root / "renamed", lambda t: {k.removeprefix("model."): v for k, v in t.items()}
            )
        ),
    }


@shared("module")
def loads(models) -> dict[str, dict]:
    """One 2-rank job loads every model; each result compared with plain from_pretrained."""
    names = [models[k] for k in ("hub_bf16_shards", "tied", "tied_with_head", "renamed")]
    worker = Path(__file__).with_name("load_worker.py")
    proc = ok(torchrun(names, script=worker, env=offline_env(models["hf_home"])))
    results = {r["model"]: r for r in map(json.loads, (x for x in proc.stdout.splitlines() if x.startswith("{")))}
    return {k: results[models[k]] for k in ("hub_bf16_shards", "tied", "tied_with_head", "renamed")}


@pytest.mark.parametrize("case", ["hub_bf16_shards", "tied", "tied_with_head", "renamed"])
def test_loaded_model_equals_from_pretrained(loads, case):
    r = loads[case]
    assert r["weights_differ"] == [] and r["weights_missing"] == [], r
    assert r["buffers_differ"] == [], r  # rotary inv_freq: in no checkpoint, recomputed (or broadcast)
    assert r["losses"] == pytest.approx([r["ref_loss"]] * 2, abs=1e-5)


def test_the_log_says_which_path_each_load_took(loads):
    for case in ("hub_bf16_shards", "tied", "tied_with_head"):
        assert not any("through rank 0" in line for line in loads[case]["log"]), loads[case]["log"]
        assert any(FAST in line for line in loads[case]["log"]), loads[case]["log"]
    assert any(f"{FAST} " in line and "/snapshots/" in line for line in loads["hub_bf16_shards"]["log"])  # the cache
    fallback = [line for line in loads["renamed"]["log"] if "through rank 0" in line]
    assert len(fallback) == 1 and fallback[0].startswith(FALLBACK), loads["renamed"]["log"]


def test_renamed_keys_train_through_rank0_from_the_right_weights(prep, models, tmp_path):
    args = train_args({**prep, "renamed": models["renamed"]}, tmp_path, "r", "--stop-at-step", 1, model="renamed")
    proc = ok(torchrun(args))
    said = [line for line in proc.stdout.splitlines() if "through rank 0" in line]
    assert len(said) == 1 and FALLBACK in said[0] and "[rank0]" in said[0], proc.stdout[-3000:]
    first = read_metrics(tmp_path / "r")[0]
    assert first["loss"] == pytest.approx(reference_loss({"renamed": models["renamed"]}, tmp_path, "renamed"), abs=1e-5)


def test_the_rank0_load_refuses_a_checkpoint_that_would_leave_weights_random(prep, tmp_path):
    """The fallback load (renamed keys) of a checkpoint that lacks one weight and holds one the model has not: before
    #21 from_pretrained initialised the missing one at random, printed a report, and training went on (exit 0)."""
    import torch
    from conftest import assert_single_error

    def damage(t):
        t = {k.removeprefix("model."): v for k, v in t.items() if k != "model.layers.0.mlp.down_proj.weight"}
        return {**t, "layers.0.mlp.extra.weight": torch.zeros(3)}

    broken = rewrite_weights(prep["tied"], tmp_path / "broken", damage)
    proc = torchrun(train_args({**prep, "broken": broken}, tmp_path / "runs", "b", "--stop-at-step", 1, model="broken"))
    line = assert_single_error(proc, "does not hold the model's weights exactly")
    assert "missing model.layers.0.mlp.down_proj.weight (1)" in line and "unexpected layers.0.mlp.extra.weight" in line
    assert "lm_head" not in line  # tied to the embedding, stored once: not missing
    assert not (tmp_path / "runs" / "b" / "checkpoints").exists() or not any((tmp_path / "runs" / "b").rglob("step-*"))


def test_incomplete_load_error_names_each_kind_of_problem():
    import fsdp_train as ft

    assert (
        ft.incomplete_load_error("m", {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": []}) is None
    )
    only_unexpected = ft.incomplete_load_error("m", {"missing_keys": set(), "unexpected_keys": {"a.b"}})
    assert "unexpected a.b (1)" in str(only_unexpected) and "missing" not in str(only_unexpected)
    many = ft.incomplete_load_error("m", {"missing_keys": {f"w{i}" for i in range(7)}})
    assert "missing w0, w1, w2, w3, w4 ... (7)" in str(many)
