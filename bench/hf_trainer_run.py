"""The Hugging Face `Trainer` side of bench/bench_train.py: the same model, data, batch, steps and schedule as
fsdp_train.py, launched the same way, with per-step wall times recorded by a TrainerCallback.

bench_train.py runs it; by hand (DATA is a save_to_disk Dataset of equal-length `input_ids`/`labels` rows, already
in the order to train on; it is read sequentially, rank r taking the r-th batch_size slice of each global batch):

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/hf_trainer_run.py --model MODEL_DIR \
        --data DATA --output-dir /tmp/hf-run --result /tmp/hf-run/result.json --steps 30 -b 4 --lr 1e-3

It asks for FSDP2 FULL_SHARD with per-block wrapping (`fsdp=True` plus `fsdp_config`, the non-deprecated spelling of
`fsdp="full_shard auto_wrap"`). On a CPU-only host accelerate quietly trains with DDP instead (it enables FSDP for
accelerator backends only), so the backend actually used is read from the accelerator and the wrapped model and
written into the result, with the per-step losses and wall times, by rank 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local HF model folder")
    p.add_argument("--data", required=True, help="save_to_disk Dataset of input_ids/labels, in training order")
    p.add_argument("--output-dir", required=True, help="Trainer output folder (the final model is saved in hf/)")
    p.add_argument("--result", required=True, help="JSON file rank 0 writes: backend, step times, losses")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--batch-size", "-b", type=int, default=4, help="sequences per rank per step (4)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (1e-4)")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear warmup steps (10)")
    p.add_argument("--schedule-steps", type=int, default=0, help="LR schedule length (0: --steps)")
    p.add_argument("--lr-scheduler", default="cosine", help="fsdp_train.py's lr_factor kind (cosine)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of --lr (0.1)")
    p.add_argument("--decay-fraction", type=float, default=0.2, help="wsd decay fraction (0.2)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (0)")
    p.add_argument("--max-norm", type=float, default=1.0, help="gradient clipping norm (1.0)")
    p.add_argument("--activation-checkpointing", choices=("on", "off"), default="on", help="per block (on)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA); default fp32")
    p.add_argument("--seed", type=int, default=0, help="seed (0)")
    return p.parse_args(argv)


def backend_of(trainer) -> dict:
    """What accelerate really did with the model (it can differ from what TrainingArguments asked for)."""
    acc = trainer.accelerator
    plugin = getattr(acc.state, "fsdp_plugin", None)
    wrapped = type(trainer.model_wrapped).__name__
    if plugin is not None:
        name = f"FSDP{getattr(plugin, 'fsdp_version', 1)}"
    elif wrapped == "DistributedDataParallel":
        name = "DDP"
    else:
        name = str(acc.distributed_type.value)
    return {
        "backend": name,
        "distributed_type": str(acc.distributed_type.value),
        "wrapped_model": wrapped,
        "fsdp_enabled": plugin is not None,
        "num_processes": acc.num_processes,
    }


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from fsdp_train import lr_factor  # the very schedule fsdp_train.py uses, so both runs see the same LR per step

    class StepClock(TrainerCallback):
        """Wall time at the end of every optimizer step and the logged losses; rank 0 announces step 1 on stdout
        (bench_train.py times 'launch -> first step done' from that line)."""

        def __init__(self):
            self.t_begin, self.ends, self.losses, self.peak_alloc = 0.0, [], {}, 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            if torch.cuda.is_available():
                self.peak_alloc = max(self.peak_alloc, torch.cuda.max_memory_allocated() / 2**30)
            if state.global_step == 1 and state.is_world_process_zero:
                print("[bench] trainer step 1 done", flush=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses[state.global_step] = logs["loss"]

    class ScheduledTrainer(Trainer):
        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                schedule = partial(
                    lr_factor,
                    warmup_steps=opts.warmup_steps,
                    total_steps=opts.schedule_steps or opts.steps,
                    min_ratio=opts.min_lr_ratio,
                    kind=opts.lr_scheduler,
                    decay_fraction=opts.decay_fraction,
                )
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, schedule)
            return self.lr_scheduler

    cuda = torch.cuda.is_available()
    data = datasets.load_from_disk(opts.data)
    model = AutoModelForCausalLM.from_pretrained(opts.model, dtype=torch.float32)
    model.config.use_cache = False
    ac = opts.activation_checkpointing == "on"
    fsdp_config = {
        "version": 2,
        "reshard_after_forward": True,  # FULL_SHARD
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": list(model._no_split_modules),
        # With FSDP, FSDP's own checkpoint wrapper (as fsdp_train.py does); the TrainingArguments flag instead
        # would all-gather each block twice. Without FSDP (the CPU fallback) only the flag can do it.
        "activation_checkpointing": ac and cuda,
    }
    targs = TrainingArguments(
        output_dir=opts.output_dir,
        max_steps=opts.steps,
        per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=opts.lr,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        weight_decay=opts.weight_decay,
        max_grad_norm=opts.max_norm,
        bf16=opts.bf16,
        fsdp=True,
        fsdp_config=fsdp_config,
        activation_checkpointing=ac and not cuda,
        activation_checkpointing_kwargs={"use_reentrant": False},
        train_sampling_strategy="sequential",  # the data is already in fsdp_train.py's order
        dataloader_drop_last=True,
        dataloader_pin_memory=cuda,
        logging_steps=1,  # like fsdp_train.py --log-freq 1: a loss all-gather every step
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=opts.seed,
        use_cpu=not cuda,
    )
    clock = StepClock()
    trainer = ScheduledTrainer(model=model, args=targs, train_dataset=data, callbacks=[clock])
    trainer.train()
    trainer.save_model(str(Path(opts.output_dir) / "hf"))  # fsdp_train.py also exports at the end

    if trainer.is_world_process_zero():
        starts = [clock.t_begin, *clock.ends[:-1]]
        result = {
            **backend_of(trainer),
            "step_s": [end - start for start, end in zip(starts, clock.ends, strict=True)],
            "tokens_per_step": opts.batch_size * trainer.accelerator.num_processes * len(data[0]["input_ids"]),
            "losses": clock.losses,
            "cuda_peak_allocated_gib": clock.peak_alloc if cuda else None,
        }
        Path(opts.result).write_text(json.dumps(result, indent=1))
        print(f"[bench] trainer backend: {result['backend']} ({result['distributed_type']}, {result['wrapped_model']})")
    # Neither Trainer nor accelerate tears the process group down; a rank that exited with it alive aborted now and
    # then at interpreter exit ("terminate called without an active exception", SIGABRT), failing the whole job.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
