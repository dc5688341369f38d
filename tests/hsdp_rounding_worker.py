"""torchrun worker for test_packing: 2 ranks as HSDP replicas (--replicate-degree 2) train a tiny model with
pure-bf16 Adafactor, then compare their copies of the (identical) shards bit for bit."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fsdp_train as ft  # noqa: E402

cfg = ft.Config(
    dataset_name="-", model_name=sys.argv[1], optimizer="adafactor", pure_bf16=True, replicate_degree=2,
    lr=1e-2, max_norm=0.0, shard_unit="block",  # the GPU path, as the suite's TRAIN flags
)  # fmt: skip
d = ft.setup_distributed()
model = ft.build_model(cfg, d, load_pretrained=True)
optimizer = ft.build_optimizer(model, cfg, d)
before = [ft.local_shard(p).detach().clone() for p in model.parameters()]
torch.manual_seed(100 + d.rank)  # each rank's own RNG stream, as in training (dropout): must not matter
ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
for _ in range(4):
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
flat = torch.cat([ft.local_shard(p).detach().float().reshape(-1) for p in model.parameters()])
copies = [torch.empty_like(flat) for _ in range(d.world_size)]
dist.all_gather(copies, flat)
changed = any(not torch.equal(ft.local_shard(p), b) for p, b in zip(model.parameters(), before, strict=True))
if d.is_main:
    print(f"replicas equal after 4 steps: {torch.equal(copies[0], copies[1])} (changed: {changed})", flush=True)
dist.destroy_process_group()
