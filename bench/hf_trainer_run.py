"""The Hugging Face `Trainer` side of bench/bench_train.py: transformers.Trainer run from fsdp_train.py's own flags,
with per-step wall times recorded by a TrainerCallback. bench_train.py runs it; by hand (DATA: a save_to_disk Dataset
of input_ids, position_ids and labels rows in training order; rank r takes the r-th slice of each global batch):

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/hf_trainer_run.py --data DATA \
        -d DATASET -m MODEL_DIR -e hf-run --save-dir /tmp -s 256 -b 4 --max-steps 30 --lr 1e-3 --warmup-steps 5

Every flag but --data is fsdp_train.py's (its parse_args), and so are the optimizer (build_optimizer) and the LR
schedule (schedule_for over count_steps). It asks for FSDP2 FULL_SHARD per block; on a CPU-only host accelerate
quietly trains with DDP instead, so rank 0 writes the backend really used into SAVE_DIR/EXP/result.json, with the
per-step losses and wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import benchlib  # noqa: F401 - puts the repo root on sys.path, for fsdp_train


def backend_of(trainer) -> dict:
    """What accelerate really did with the model (it can differ from what TrainingArguments asked for)."""
    acc = trainer.accelerator
    plugin = getattr(acc.state, "fsdp_plugin", None)
    wrapped = type(trainer.model_wrapped).__name__
    name = str(acc.distributed_type.value)
    if plugin is not None:
        name = f"FSDP{getattr(plugin, 'fsdp_version', 1)}"
    elif wrapped == "DistributedDataParallel":
        name = "DDP"
    kind = str(acc.distributed_type.value)
    return {"backend": name, "distributed_type": kind, "wrapped_model": wrapped, "fsdp_enabled": plugin is not None}


def training_args(cfg, device, no_split_modules: list[str]):
    """TrainingArguments for the Config: FSDP2 FULL_SHARD per block, fsdp_train.py's batch, steps, clipping, dtype."""
    import torch
    from transformers import TrainingArguments

    ac, cuda = cfg.activation_checkpointing, device.type == "cuda"
    fsdp_config = {
        "version": 2,
        "reshard_after_forward": cfg.reshard_after_forward,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": no_split_modules,
        # With FSDP, FSDP's own checkpoint wrapper (as fsdp_train.py does); the TrainingArguments flag instead
        # would all-gather each block twice. Without FSDP (the CPU fallback) only the flag can do it.
        "activation_checkpointing": ac and cuda,
    }
    run = {"output_dir": str(cfg.exp_dir), "max_steps": cfg.max_steps, "seed": cfg.seed, "max_grad_norm": cfg.max_norm}
    batch = {"per_device_train_batch_size": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum_steps}
    fsdp = {"fsdp": True, "fsdp_config": fsdp_config, "bf16": cfg.compute_dtype(device) == torch.bfloat16}
    ckpt = {"activation_checkpointing": ac and not cuda, "activation_checkpointing_kwargs": {"use_reentrant": False}}
    # the data is already in fsdp_train.py's order; bench_train.py passes --log-freq 1: a loss all-gather every step
    data = {"train_sampling_strategy": "sequential", "dataloader_drop_last": True, "dataloader_pin_memory": cuda}
    quiet = {"logging_steps": cfg.log_freq, "save_strategy": "no", "report_to": "none", "disable_tqdm": True}
    return TrainingArguments(**run, **batch, **fsdp, **ckpt, **data, **quiet, use_cpu=not cuda)


def make_trainer(cfg, d, schedule_steps: int, model, data):
    """(Trainer, its StepClock): the Trainer with fsdp_train.py's optimizer and LR schedule built from the same Config,
    so both runs see the same update."""
    import torch
    from transformers import Trainer, TrainerCallback

    import fsdp_train as ft

    class StepClock(TrainerCallback):
        """Wall time at the end of every optimizer step and the logged losses; rank 0 announces step 1 on stdout
        (bench_train.py times 'launch -> first step done' from that line)."""

        def __init__(self):
            self.t_begin, self.ends, self.losses, self.peak_alloc = 0.0, [], {}, 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            if d.device.type == "cuda":
                self.peak_alloc = max(self.peak_alloc, torch.cuda.max_memory_allocated() / 2**30)
            if state.global_step == 1 and state.is_world_process_zero:
                print("[bench] trainer step 1 done", flush=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses[state.global_step] = logs["loss"]

    class FsdpTrainOptimizer(Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = ft.build_optimizer(model or self.model, cfg, d)
            return self.optimizer

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                schedule = ft.schedule_for(cfg, schedule_steps)
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, schedule)
            return self.lr_scheduler

    clock, targs = StepClock(), training_args(cfg, d.device, list(model._no_split_modules))
    return FsdpTrainOptimizer(model=model, args=targs, train_dataset=data, callbacks=[clock]), clock


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="save_to_disk Dataset of input_ids/position_ids/labels, in order")
    opts, train_flags = p.parse_known_args(argv)
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    import fsdp_train as ft

    cfg = ft.parse_args(train_flags)
    cuda = torch.cuda.is_available()
    ranks = [int(os.environ.get(k, default)) for k, default in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1))]
    d = ft.Dist(*ranks, torch.device("cuda" if cuda else "cpu"))  # torchrun's environment, read as fsdp_train does
    data = datasets.load_from_disk(opts.data)
    _, schedule_steps = ft.count_steps(cfg, len(data), d.world_size)
    model = AutoModelForCausalLM.from_pretrained(cfg.model_name, dtype=torch.float32)
    model.config.use_cache = False
    trainer, clock = make_trainer(cfg, d, schedule_steps, model, data)
    trainer.train()
    trainer.save_model(str(cfg.exp_dir / "hf"))  # fsdp_train.py also exports at the end

    if trainer.is_world_process_zero():
        starts = [clock.t_begin, *clock.ends[:-1]]
        step_s = [end - start for start, end in zip(starts, clock.ends, strict=True)]
        tokens = cfg.batch_size * d.world_size * len(data[0]["input_ids"])
        result = {**backend_of(trainer), "step_s": step_s, "tokens_per_step": tokens, "losses": clock.losses}
        result["cuda_peak_allocated_gib"] = clock.peak_alloc if cuda else None
        cfg.exp_dir.mkdir(parents=True, exist_ok=True)
        (cfg.exp_dir / "result.json").write_text(json.dumps(result, indent=1))
        print(f"[bench] trainer backend: {result['backend']} ({result['distributed_type']}, {result['wrapped_model']})")
    # Neither Trainer nor accelerate tears the process group down; a rank that exited with it alive aborted now and
    # then at interpreter exit ("terminate called without an active exception", SIGABRT), failing the whole job.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
