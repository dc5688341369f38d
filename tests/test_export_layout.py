"""The export is what the hub would have (#21): the checkpoint layout save_pretrained writes (MoE models whose
loading fuses per-expert tensors), the base model's generation settings, and the modelling code of remote-code models.
References: transformers' own save_pretrained of the same architecture, and the trained weights in the DCP checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_weights, in_process, ok, tiny_config, torchrun, train_args

GENERATION = {"eos_token_id": [0, 3], "do_sample": True, "temperature": 0.6, "top_p": 0.9}
MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
    ),
}


def saved_keys(folder: Path) -> set[str]:
    from safetensors import safe_open

    keys = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            keys |= set(st.keys())
    return keys


def logits_of(model) -> torch.Tensor:
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", list(MOE))
def test_a_moe_export_has_the_checkpoint_layout_the_trained_logits_and_the_base_generation_config(
    prep, tmp_path, arch, capfd
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / arch
    config = tiny_config(arch, 512, num_key_value_heads=2, **MOE[arch])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(base)
    AutoTokenizer.from_pretrained(prep["model"]).save_pretrained(base)
    (base / "generation_config.json").write_text(json.dumps(GENERATION))
    on_disk = saved_keys(base)
    in_memory = set(AutoModelForCausalLM.from_pretrained(base).state_dict())
    assert on_disk != in_memory  # transformers converts this architecture's checkpoint while loading

    ok(torchrun(train_args({**prep, "moe": base}, tmp_path, "run", "--stop-at-step", 1, model="moe")))
    offline = tmp_path / "offline"
    ckpt = tmp_path / "run" / "checkpoints" / "step-1"  # a run always saves its last step
    ok(in_process(capfd, ["export", "--checkpoint", ckpt, "--out", offline]))  # the CLI, without its start-up

    trained = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    trained.load_state_dict(checkpoint_weights(ckpt))
    for hf in (tmp_path / "run" / "hf", offline):  # the distributed export of the finished run, and the offline one
        assert saved_keys(hf) == on_disk, (hf, saved_keys(hf) ^ on_disk)
        reloaded = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        assert torch.equal(logits_of(reloaded), logits_of(trained)), hf
        assert {k: json.loads((hf / "generation_config.json").read_text())[k] for k in GENERATION} == GENERATION


REMOTE_CONFIG = """from transformers import LlamaConfig


class FooConfig(LlamaConfig):
    model_type = "foo"
"""
REMOTE_MODEL = """from transformers import LlamaForCausalLM

from .configuration_foo import FooConfig
from .foo_utils import SCALE


class FooForCausalLM(LlamaForCausalLM):
    config_class = FooConfig
    scale = SCALE
"""


def test_a_remote_code_export_carries_its_modelling_code(prep, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "foo"
    shutil.copytree(prep["model"], base)
    (base / "configuration_foo.py").write_text(REMOTE_CONFIG)
    (base / "modeling_foo.py").write_text(REMOTE_MODEL)
    (base / "foo_utils.py").write_text("SCALE = 1.0\n")  # imported relatively by modeling_foo
    config = json.loads((base / "config.json").read_text())
    config["model_type"] = "foo"
    config["auto_map"] = {
        "AutoConfig": "configuration_foo.FooConfig",
        "AutoModelForCausalLM": "modeling_foo.FooForCausalLM",
    }
    (base / "config.json").write_text(json.dumps(config))

    args = train_args(
        {**prep, "foo": base}, tmp_path, "run", "--stop-at-step", 1, "--trust-remote-code", "on", model="foo"
    )
    ok(torchrun(args))
    moved = shutil.copytree(tmp_path / "run" / "hf", tmp_path / "elsewhere")
    shutil.rmtree(base)  # the export must stand alone
    assert {"modeling_foo.py", "configuration_foo.py", "foo_utils.py"} <= {p.name for p in moved.glob("*.py")}
    model = AutoModelForCausalLM.from_pretrained(moved, trust_remote_code=True)  # the code this test wrote above
    assert type(model).__name__ == "FooForCausalLM"
