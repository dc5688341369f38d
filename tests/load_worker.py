"""torchrun worker for test_load: build_model(load_pretrained=True) from each model given on the command line, then
rank 0 compares the result with plain transformers' from_pretrained of the same model (the independent reference):
every weight and every rank's non-persistent buffers bit for bit, and the loss of one fixed batch. One JSON line per model, with
the lines build_model logged."""

import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fsdp_train as ft  # noqa: E402


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def compare(name: str, d: ft.Dist) -> dict | None:
    """Collective: load `name` the fsdp_train way; on rank 0, how it differs from from_pretrained."""
    from transformers import AutoModelForCausalLM

    lines = Lines()
    ft.log.addHandler(lines)
    model = ft.build_model(ft.Config(dataset_name="-", model_name=name, shard_unit="block"), d, load_pretrained=True)
    ft.log.removeHandler(lines)
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    # Every rank's own buffers and loss: each rank computes with its own copy of the buffers.
    mine, everyone = ({k: b.clone() for k, b in ft.nonpersistent_buffers(model).items()}, loss), [None] * d.world_size
    dist.all_gather_object(everyone, mine)
    if not d.is_main:
        return None
    ref = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    ref_buffers = dict(ref.named_buffers())
    with torch.no_grad():
        ref_loss = ref(input_ids=ids, labels=ids).loss.item()
    return {
        "model": name,
        "log": lines.lines,
        "weights_differ": sorted(k for k, v in ref.state_dict().items() if not torch.equal(v, weights.get(k))),
        "weights_missing": sorted(set(ref.state_dict()) - set(weights)),
        "buffers_differ": sorted(
            {k for buffers, _ in everyone for k, v in buffers.items() if not torch.equal(v, ref_buffers[k])}
        ),
        "losses": [loss for _, loss in everyone],
        "ref_loss": ref_loss,
    }


d = ft.setup_distributed()
for name in sys.argv[1:]:
    result = compare(name, d)
    if result is not None:
        ft.say(json.dumps(result))
# Leave together: rank 1 used to tear down gloo while rank 0 still compared, and once in a while it aborted at exit
# ("terminate called without an active exception") after every result was correct.
dist.barrier()
ft.teardown_distributed()
ft.exit_now(0)  # no interpreter finalization: it aborted a finished worker now and then (see exit_now)
