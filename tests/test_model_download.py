"""model_download.py: the tiny model, and the hub path through a local HF cache (no network)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from conftest import COMMIT, TRAIN, make_hf_cache, offline_env, ok, read_metrics, run, torchrun

import model_download as md


def test_tiny_model_loads_with_transformers_and_its_tokenizer_round_trips(prep):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(prep["model"])
    tok = AutoTokenizer.from_pretrained(prep["model"])
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    assert tok.decode(tok("The lighthouse keeper")["input_ids"]) == "The lighthouse keeper"
    assert tok.eos_token == md.EOS_TOKEN and model.config.eos_token_id == tok.eos_token_id
    tied = AutoModelForCausalLM.from_pretrained(prep["tied"])
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_tiny_refuses_to_overwrite_without_flag(prep):
    proc = run([sys.executable, "model_download.py", "--tiny", prep["model"]])
    assert (
        proc.returncode == 2
        and proc.stdout.strip() == f"error: {prep['model']} already exists (pass --overwrite to replace it)"
    )


def test_verify_reports_params_and_catches_a_missing_weight(prep, tmp_path):
    report = md.verify(prep["tied"])
    assert report.ok and report.tied == ["lm_head.weight"]
    from transformers import AutoModelForCausalLM

    assert report.num_params == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(prep["tied"]).parameters())

    broken = tmp_path / "broken"
    shutil.copytree(prep["model"], broken)
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    assert md.verify(broken).missing == ["model.layers.1.mlp.down_proj.weight"]


def test_hub_id_verifies_offline_from_a_local_hf_cache(prep, tmp_path):
    make_hf_cache(tmp_path / "hf", "acme/tiny-llama", prep["model"])
    proc = ok(
        run([sys.executable, "model_download.py", "--model-name", "acme/tiny-llama"], env=offline_env(tmp_path / "hf"))
    )
    assert f"snapshots/{COMMIT}" in proc.stdout and "OK: ready for offline use" in proc.stdout
    assert "weights    21/21 expected tensors present" in proc.stdout

    missing = run(
        [sys.executable, "model_download.py", "--model-name", "acme/absent"], env=offline_env(tmp_path / "hf")
    )
    assert missing.returncode == 2 and missing.stdout.startswith("error: 'acme/absent' is not in the cache")


def test_missing_weight_in_cached_snapshot_fails(prep, tmp_path):
    snapshot = make_hf_cache(tmp_path / "hf", "acme/sharded", prep["model"])
    # A sharded checkpoint's index that forgot one tensor.
    from safetensors import safe_open

    with safe_open(str(snapshot / "model.safetensors"), framework="pt") as f:
        keys = [k for k in f.keys() if k != "lm_head.weight"]  # noqa: SIM118 - safe_open is no dict
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, "model.safetensors")}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    proc = run([sys.executable, "model_download.py", "--model-name", "acme/sharded"], env=offline_env(tmp_path / "hf"))
    assert (
        proc.returncode == 1 and "error: 1 expected weights missing from the checkpoint: lm_head.weight" in proc.stdout
    )


@pytest.mark.slow
def test_fsdp_train_trains_from_a_hub_id_in_the_cache(prep, tmp_path):
    make_hf_cache(tmp_path / "hf", "acme/tiny-llama", prep["model"])
    args = [
        "-e",
        "hub",
        "-d",
        prep["dataset"],
        "-m",
        "acme/tiny-llama",
        "--save-dir",
        tmp_path,
        *TRAIN,
        "--stop-at-step",
        "2",
    ]
    ok(torchrun(args, env=offline_env(tmp_path / "hf")))
    assert [m["global_step"] for m in read_metrics(tmp_path / "hub")] == [1, 2]
