r"""fsdp-train: fine-tune a Hugging Face causal LM with PyTorch FSDP2, sharded DCP checkpoints and exact resume.

CPU smoke run (2 processes, gloo; the data and tiny model come from `make demo`):
    torchrun --standalone --nproc_per_node 2 fsdp_train.py --config configs/cpu-smoke.yaml

One GPU node (NCCL, bf16 compute with fp32 master weights):
    torchrun --standalone --nproc_per_node 8 fsdp_train.py -e llama-ft -d /data/my_dataset \
        -m meta-llama/Llama-3.1-8B -s 4096 -b 1 --lr 2e-5 --warmup-steps 100 --val-split 0.01 --eval-freq 500

Multi-node (run on every node; HF_HOME and --save-dir on shared storage; USR1 for Slurm pre-emption):
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 --rdzv-id $JOB \
        --signals-to-handle SIGTERM,SIGINT,SIGUSR1,SIGHUP --shutdown-timeout 120 \
        fsdp_train.py -e llama-ft -d /shared/data -m meta-llama/Llama-3.1-8B --save-dir /shared/outputs

Resume: run the very same command again. It continues from the newest complete checkpoint in
SAVE_DIR/EXP/checkpoints/ with the same samples in the same order; a finished run says so and exits 0.

Per-GPU memory of a configuration from the model config alone, and which memory savers would fit a 24 GB card:
    python fsdp_train.py plan -m configs/models/llama-2-7b --nproc 1 -b 1 -s 2048 --gpu-mem 24

Export a checkpoint to a Hugging Face folder (one process, no GPU; a finished run writes SAVE_DIR/EXP/hf itself):
    python fsdp_train.py export --checkpoint outputs/demo/checkpoints/step-100 --out outputs/demo-hf

Subcommands (each has its own --help); without one, the flags below train:
    prepare   tokenize and pack the data into SAVE_DIR/.cache as a CPU job, before the GPU job (same flags)
    plan      per-GPU (and host) memory and checkpoint size of a configuration, from the model config alone
    control   list, status, stop, save or abort running jobs through files in their folders
    export    write a Hugging Face model folder from a checkpoint
"""

# Code map: the sections below, in file order; start reading a section at the function named.
#   Config          OPTIMIZERS / LR_SCHEDULES / ATTENTION (each choice once), Config (every flag with its rules)
#   Distributed     setup_distributed; StopRequest (signals and control.json become a checkpoint-and-stop)
#   Model and FSDP  build_model (meta device -> shard_model -> weights), isolation_problem (packed-document check)
#   Loss            causal_lm_loss (chunked cross-entropy summed over tokens; loss_divisor makes it a mean; RowLoss
#                   gives a mixture each row's loss)
#   Data            prepare_sources -> prepare_data (rank 0 tokenizes and packs a source into its own cache, the
#                   others wait); Mixture / mixture_order (several weighted sources in one seeded order); the packers
#                   (TextPacker, ChatPacker, PaddedPacker: one interface, packer_for picks), write_packed;
#                   chat_example (what a chat row trains), rank_batch_indices (the seeded order any world resumes)
#   Optimizer       build_optimizer, lr_factor, optimizer_step
#   Checkpoints     Checkpointer (where to resume, when to save, one state-dict layout, seal, prune, background)
#   Telemetry       Throughput, MetricsLogger, Watchdog (hangs), memory_stats
#   Export          export_hf (a Hugging Face folder at the end of a run)
#   Training        train() -> prepare_run (everything before step 1) -> train_loop (reads top to bottom)
#   Optional        Adafactor / OptimizerInBackward, the memory planner (plan_main), job control (control_main)
#   Test hooks      hook_for_tests (fault injection for the kill -9, hang and data-order tests)
#   Main            main() dispatches the subcommands; report_job_error prints the one `error:` line

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import errno
import faulthandler
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import signal
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("fsdp_train")

# ======================================================================================================================
# Config


class JobError(Exception):
    """A reason to stop that the user can act on. main() prints it as one line from rank 0 and exits `exit_code`.

    Raise it on every rank at the same point (inputs are checked identically, or agreed with raise_if_any_failed).
    """

    exit_code = 1


class RankStalled(JobError):
    """Rank 0 stopped making progress while the other ranks wait for it outside any collective: rank 1 says so (rank
    0 cannot) and every waiting rank exits non-zero, so torchrun ends the job."""


class InputError(JobError, ValueError):
    """Bad user input: flags, paths, data, a checkpoint that does not fit."""

    exit_code = 2


RESUME_RULES = {
    "refuse": "what is trained: a plain rerun that changes it is refused (--resume-from continues anyway)",
    "warn": "the numbers of a step: a resumed run may change it, and says so",
    "ok": "when a run stops, logs or saves, or how fast it runs, but no number it trains: free to change on resume",
}


def _opt(default, help: str, short=None, choices=None, within: str | None = None, on_resume: str = "warn"):
    """A Config field and its rules, in one place: its flag's help, short form and choices; `within` the interval its
    value must lie in, e.g. "[1, inf)" or "[0, 1)"; `on_resume` what a rerun that changes it does (RESUME_RULES)."""
    assert on_resume in RESUME_RULES and (within is None or re.fullmatch(r"[\[(]\S+, \S+[\])]", within)), within
    meta = {"help": help, "short": short, "choices": choices, "within": within, "on_resume": on_resume}
    return field(default=default, metadata=meta)


def range_problem(name: str, value: float, within: str) -> str | None:
    """Why `value` is outside the interval `within` ("[0, 1)", "(0, inf)"), in the flag's words; None inside it."""
    lo, hi = (float(x) for x in within[1:-1].split(", "))
    above = value >= lo if within[0] == "[" else value > lo
    below = value <= hi if within[-1] == "]" else value < hi
    if above and below:  # NaN fails both
        return None
    if hi == math.inf:
        number = "a finite number " if not math.isfinite(value) else ""
        return f"{flag_name(name)} must be {number}{'>=' if within[0] == '[' else '>'} {lo:g}, got {value}"
    return f"{flag_name(name)} must be in {within}, got {value}"


def flag_name(field: str) -> str:
    """The command-line flag of a Config field (what errors and messages name)."""
    return f"--{field.replace('_', '-')}"


# Each kind of choice is declared once, in a table below; Config's choices and help, the builders and the memory
# planner all read it. Adding an optimizer or an LR schedule is one entry here (and its README line).


@dataclass(frozen=True)
class OptimizerChoice:
    help: str
    build: Callable  # (param_groups, cfg, seed, fused) -> torch.optim.Optimizer; `seed` for stochastic rounding
    state: Callable  # (ModelShape, shard_ranks) -> optimizer-state elements per rank (shard_ranks=1: on disk)
    fused_on_cuda: bool  # steps in one fused CUDA kernel (the planner counts no temporary copy of the update)


OPTIMIZERS = {
    "adamw": OptimizerChoice(
        "2 states per weight",
        build=lambda groups, cfg, seed, fused: torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused, foreach=not fused
        ),
        state=lambda shape, n: 2 * shape.params / n,
        fused_on_cuda=True,
    ),
    "adafactor": OptimizerChoice(
        "factored second moment, no momentum: almost no optimizer memory",
        build=lambda groups, cfg, seed, fused: Adafactor(groups, lr=cfg.lr, seed=seed),
        state=lambda shape, n: sum(rows / n + cols for rows, cols in shape.matrices) + shape.vectors / n,
        fused_on_cuda=False,
    ),
}


def _cosine(progress: float, min_ratio: float, decay_fraction: float) -> float:
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _linear(progress: float, min_ratio: float, decay_fraction: float) -> float:
    return 1 - (1 - min_ratio) * progress


def _wsd(progress: float, min_ratio: float, decay_fraction: float) -> float:
    """Warmup-stable-decay: hold the peak, then decay linearly over the last decay_fraction."""
    if decay_fraction == 0 or progress <= 1 - decay_fraction:
        return 1.0
    return _linear((progress - (1 - decay_fraction)) / decay_fraction, min_ratio, decay_fraction)


@dataclass(frozen=True)
class ScheduleChoice:
    help: str
    decay: Callable[[float, float, float], float]  # (progress in [0, 1] after warmup, min_ratio, decay_fraction)


LR_SCHEDULES = {
    "cosine": ScheduleChoice("cosine decay to --min-lr-ratio x lr", _cosine),
    "linear": ScheduleChoice("linear decay to --min-lr-ratio x lr", _linear),
    "constant": ScheduleChoice("the peak LR throughout", lambda progress, min_ratio, decay_fraction: 1.0),
    "wsd": ScheduleChoice("stable, then linear decay to --min-lr-ratio x lr over the last --decay-fraction", _wsd),
}


def choices_help(table: dict) -> str:
    return "; ".join(f"{name}: {choice.help}" for name, choice in table.items())


@dataclass(frozen=True)
class AttentionChoice:
    """An --attn-implementation (transformers' name for it): how it keeps packed documents apart, and where it runs."""

    help: str
    cuda_only: bool = False
    # Told the packed documents as variable-length segments (cu_seqlens, model_inputs) instead of through a mask that
    # transformers builds from position_ids.
    segments: bool = False
    package: str | None = None  # the package it needs: auto picks it only where that is installed
    # On CUDA: the kernel computes in bf16/fp16 only, and on GPUs of this compute capability or newer.
    half_only: bool = False
    min_capability: tuple[int, int] = (0, 0)


ATTENTION = {
    "sdpa": AttentionChoice("torch's scaled_dot_product_attention, an S x S block-diagonal mask from position_ids"),
    "eager": AttentionChoice("transformers' matmul attention with the same mask: slowest, for checking"),
    "flex_attention": AttentionChoice("torch's flex attention, a block-sparse document mask (CUDA)", cuda_only=True),
    "flash_attention_2": AttentionChoice(
        "the flash-attn package's kernel, documents as variable-length segments, no S x S mask (CUDA, bf16)",
        cuda_only=True,
        segments=True,
        package="flash_attn",
        half_only=True,
        min_capability=(8, 0),  # flash-attn 2: Ampere or newer
    ),
}
ATTN_IMPLEMENTATIONS = ("auto", *ATTENTION)
CUDA_ONLY_ATTENTION = frozenset(k for k, a in ATTENTION.items() if a.cuda_only)  # tests/flash_emulation.py empties it
PACKINGS = ("auto", "isolated", "padded")


@dataclass
class Config:
    config: str = _opt(
        "",
        "YAML file setting any of these flags (snake_case or kebab-case keys); flags given "
        "on the command line override it",
        on_resume="ok",
    )
    experiment_name: str = _opt("default", "run name; outputs go to SAVE_DIR/EXP", "-e")
    dataset_name: str = _opt(
        "",
        "training data: a save_to_disk folder, a .jsonl/.json/.parquet file, or a hub dataset id (cache). Columns: "
        "'text' (documents), or for SFT 'messages' (OpenAI style, tool calls too), 'conversations' (ShareGPT), "
        "'prompt'+'completion' (TRL, plain or conversational), 'instruction'+'output' (Alpaca); see --chat-columns",
        "-d",
        on_resume="refuse",
    )
    val_dataset: str = _opt("", "validation data, in any form --dataset-name accepts", on_resume="refuse")
    val_split: float = _opt(
        0.0,
        "carve this fraction of the training documents out for validation (seeded)",
        within="[0, 1)",
        on_resume="refuse",
    )
    eval_freq: int = _opt(
        0, "evaluate on the validation data every N steps (0: only at the last step)", within="[0, inf)", on_resume="ok"
    )
    eval_steps: int = _opt(
        0,
        "evaluate on at most N batches per rank, the same seeded subset of the validation blocks every time, so the "
        "figures stay comparable (0: all of them)",
        within="[0, inf)",
        on_resume="ok",
    )
    drop_long_examples: bool = _opt(
        False,
        "chat data: drop examples longer than --seq-length instead of truncating them (both are counted and "
        "reported) (on|off)",
        on_resume="refuse",
    )
    chat_template: str = _opt(
        "",
        "Jinja chat template file for chat data (e.g. configs/chatml.jinja); default: the tokenizer's own",
        on_resume="refuse",
    )
    chat_columns: str = _opt(
        "",
        "where your SFT data keeps what the formats above name, as NAME=YOURS pairs: columns (messages, prompt, "
        "completion, instruction, input, output, text), message keys (role, content) and role names (system, user, "
        "assistant, tool), e.g. 'messages=dialog,role=speaker,content=text,assistant=agent'",
        on_resume="refuse",
    )
    train_on: str = _opt(
        "assistant",
        "SFT data: which tokens carry loss. assistant: the assistant turns (or the completion) with their end of turn; "
        "all: every token of the rendered example",
        choices=("assistant", "all"),
        on_resume="refuse",
    )
    model_name: str = _opt("", "local HF model folder, or a hub id resolved through HF_HOME", "-m", on_resume="refuse")
    save_dir: str = _opt("outputs", "root folder for runs", on_resume="ok")
    seed: int = _opt(0, "seed for data order and RNG", on_resume="refuse")
    num_epochs: int = _opt(
        1,
        "epochs over the packed data: the run's length and the LR schedule's, unless --max-steps is set",
        within="[1, inf)",
    )
    max_steps: int = _opt(
        0,
        "optimizer steps in the whole run (0: --num-epochs decides): the LR schedule spans exactly these and the "
        "data cycles through as many epochs as they take (as in HF Trainer and torchtitan). To stop early inside a "
        "longer schedule, use --stop-at-step",
        within="[0, inf)",
        on_resume="ok",
    )
    stop_at_step: int = _opt(
        0,
        "stop (with a checkpoint, as a finished run) after this step without changing the LR schedule, so steps "
        "1..N are exactly those of the full run; a rerun without it (or with a larger N) continues (0: run to the end)",
        within="[0, inf)",
        on_resume="ok",
    )
    fresh: bool = _opt(
        False,
        "start this experiment over: an existing SAVE_DIR/EXP is first moved aside to EXP.old-<date-time> (nothing "
        "is deleted). A one-off: a requeue script that reruns the command to resume must not carry it (on|off)",
        on_resume="ok",
    )
    resume_from: str = _opt(
        "",
        "'latest' or a checkpoint folder (.../checkpoints/step-N, also another experiment's): resume from it even "
        "though what is trained changed (dataset, model, --seq-length, chat template, packing, seed, optimizer), "
        "which a plain rerun refuses",
        on_resume="ok",
    )
    lr: float = _opt(
        1e-4,
        "peak learning rate (adafactor: relative to each weight's RMS; PyTorch's default is 1e-2)",
        within="(0, inf)",
    )
    optimizer: str = _opt(
        "adamw",
        choices_help(OPTIMIZERS),
        choices=tuple(OPTIMIZERS),
        on_resume="refuse",
    )
    optimizer_in_backward: bool = _opt(
        False,
        "step each weight's optimizer as soon as its gradient is reduced, then free the gradient, so the full set of "
        "gradients never exists (needs --max-norm 0 and one micro-batch per step) (on|off)",
    )
    lr_scheduler: str = _opt(
        "cosine",
        f"LR after warmup. {choices_help(LR_SCHEDULES)}",
        choices=tuple(LR_SCHEDULES),
    )
    warmup_steps: int = _opt(10, "linear warmup steps from lr/warmup to lr", within="[0, inf)")
    min_lr_ratio: float = _opt(0.1, "final LR as a fraction of --lr (cosine, linear, wsd)", within="[0, 1]")
    decay_fraction: float = _opt(0.2, "wsd: fraction of the steps after warmup spent decaying", within="[0, 1]")
    weight_decay: float = _opt(0.0, "decoupled weight decay (matrices only, not norms/biases)", within="[0, inf)")
    max_norm: float = _opt(
        1.0, "gradient clipping max global L2 norm (0: no clipping, norm still logged)", within="[0, inf)"
    )
    batch_size: int = _opt(4, "sequences per rank per micro-batch", "-b", within="[1, inf)")
    grad_accum_steps: int = _opt(
        1,
        "micro-batches per optimizer step (each one's gradients are reduce-scattered into the sharded sum)",
        within="[1, inf)",
    )
    accumulate_unsharded: bool = _opt(
        False,
        "with --grad-accum-steps > 1, keep full unsharded fp32 gradients on every rank between micro-batches and "
        "reduce once per step: fewer reduce-scatters, but 4 bytes x all params per rank (not divided by the "
        "world size) (on|off)",
    )
    global_batch_size: int = _opt(
        0, "sequences per optimizer step over all ranks; sets --grad-accum-steps (0: unset)", within="[0, inf)"
    )
    seq_length: int = _opt(1024, "tokens per packed sequence", "-s", within="[1, inf)", on_resume="refuse")
    activation_checkpointing: bool = _opt(
        True, "recompute each block's activations in backward (on|off)", on_resume="ok"
    )
    cpu_offload: bool = _opt(False, "keep sharded params, grads and optimizer state in CPU memory (on|off)")
    activation_offload: bool = _opt(
        False,
        "CUDA: keep the block inputs that activation checkpointing saves in pinned host memory (on|off)",
        on_resume="ok",
    )
    dtype: str = _opt(
        "auto",
        "compute dtype: bf16 (fp32 master weights and gradient reduction) or fp32; auto = bf16 on GPUs that compute it "
        "natively (compute capability 8.0, Ampere, or newer), else fp32",
        choices=("auto", "bf16", "fp32"),
    )
    pure_bf16: bool = _opt(
        False,
        "params, gradients and AdamW state in bf16: half the memory, but small updates "
        "are lost to rounding; for memory-bound runs (on|off)",
    )
    compile: bool = _opt(False, "torch.compile each block (first step pays the compilation) (on|off)", on_resume="ok")
    attn_implementation: str = _opt(
        "auto",
        "attention kernel; every choice keeps packed documents apart (checked at start-up). auto: "
        "flash_attention_2 in bf16 on an Ampere or newer GPU when the flash-attn package is installed, else sdpa. "
        + choices_help(ATTENTION),
        choices=ATTN_IMPLEMENTATIONS,
    )
    packing: str = _opt(
        "auto",
        "how documents share a block. isolated: packed end to end, each attending only to itself (needs an "
        "architecture and --attn-implementation that honour restarting position_ids; checked at start-up). padded: one "
        "document (or a block-sized piece of a longer one) per block, the rest padding that is neither trained nor "
        "counted (costs the padding's compute). auto: isolated where the start-up check passes, else padded, with a "
        "warning",
        choices=PACKINGS,
        on_resume="refuse",
    )
    reshard_after_forward: bool = _opt(
        True,
        "free each block's gathered params after its forward (off: keep them until backward, more memory); per-block "
        "units only (--shard-unit) (on|off)",
    )
    shard_unit: str = _opt(
        "auto",
        "what FSDP gathers at once. block: one transformer block at a time (FULL_SHARD). model: the whole model once "
        "per step, one all-gather and one reduce-scatter: faster where communication cannot overlap compute (CPU/gloo), "
        "but a step holds every unsharded parameter and gradient; optimizer state stays sharded. auto: block on GPUs "
        "and with --optimizer-in-backward, model otherwise on CPU",
        choices=("auto", "block", "model"),
        on_resume="ok",  # the same sums on the same shards, in bigger collectives (test_shard_unit_model_...)
    )
    export_dtype: str = _opt(
        "auto",
        "dtype of the Hugging Face export written at the end (auto: the base model's, from its config)",
        choices=("auto", "bf16", "fp32"),
        on_resume="ok",
    )
    tensorboard: bool = _opt(
        True, "TensorBoard events in SAVE_DIR/EXP/tb when the package is installed (on|off)", on_resume="ok"
    )
    peak_tflops: float = _opt(
        0.0,
        "dense peak TFLOP/s of one device in the compute dtype, for the MFU figure (0: looked up for known GPUs; "
        "MFU is left out where unknown, e.g. on CPU)",
        within="[0, inf)",
        on_resume="ok",
    )
    replicate_degree: int = _opt(
        1, "HSDP: shard within groups of world/R ranks (a node), replicate across R groups", within="[1, inf)"
    )
    log_freq: int = _opt(10, "log metrics every N steps", within="[1, inf)", on_resume="ok")
    ckpt_freq: int = _opt(
        100, "checkpoint every N steps (0: only at the end); always at the end", within="[0, inf)", on_resume="ok"
    )
    keep_latest_k: int = _opt(2, "complete checkpoints to keep", within="[1, inf)", on_resume="ok")
    async_checkpoint: bool = _opt(
        False,
        "write checkpoints in the background while training continues: the saving step pays for a host copy of the "
        "shards (pinned memory on CUDA), not for the disk; a checkpoint counts (COMPLETE) once every rank's files "
        "are on disk, and the run waits for it before it exits. Costs one host copy of the shards per rank (on|off)",
        on_resume="ok",
    )
    dist_timeout: float = _opt(
        30.0, "minutes a collective may wait before the job fails instead of hanging", within="(0, inf)", on_resume="ok"
    )
    hang_timeout: float = _opt(
        10.0,
        "minutes a rank may make no progress (no step, evaluation batch or checkpoint) before every rank writes its "
        "stacks to EXP/hang/ and the job exits for a rerun to resume; the limit grows to 3x the slowest step seen, "
        "and a checkpoint save or the export may take 6x it (0: off)",
        within="[0, inf)",
        on_resume="ok",
    )
    trust_remote_code: bool = _opt(False, "allow model/tokenizer code from the model repo to run (on|off)")
    load_weights: str = _opt(
        "auto",
        "how a fresh run reads the pretrained weights. auto: every rank reads only its shards' slices of the "
        "safetensors files when their tensors match the model's one-to-one, else rank 0 loads the whole model and "
        "broadcasts it (said in the log); rank0: always the latter",
        choices=("auto", "rank0"),
        on_resume="ok",
    )

    def validate(self) -> None:
        for name in ("dataset_name", "model_name"):
            if not getattr(self, name):
                raise InputError(f"{flag_name(name)} is required")
        if not re.fullmatch(r"[\w.\-]+", self.experiment_name):
            raise InputError(f"--experiment-name {self.experiment_name!r}: use letters, digits, '.', '_', '-' only")
        for f in dataclasses.fields(self):
            problem = f.metadata["within"] and range_problem(f.name, getattr(self, f.name), f.metadata["within"])
            if problem:
                raise InputError(problem)
            if f.metadata["choices"] and getattr(self, f.name) not in f.metadata["choices"]:
                choices = ", ".join(f.metadata["choices"])
                raise InputError(f"{flag_name(f.name)} must be one of {choices}, got {getattr(self, f.name)!r}")
        if self.fresh and self.resume_from:
            raise InputError("--fresh starts over and --resume-from continues: use one of them")
        parse_chat_columns(self.chat_columns)  # a typo is an error before anything starts
        parse_sources(self.dataset_name)  # so is a bad weight or two sources of one name
        if self.val_split and self.val_dataset:
            raise InputError("use either --val-split or --val-dataset, not both")
        if self.optimizer_in_backward and self.max_norm > 0:
            raise InputError(
                "--optimizer-in-backward steps each weight before the global gradient norm is known, so it cannot "
                "clip: add --max-norm 0 (the norm is still logged)"
            )
        if self.activation_offload and not self.activation_checkpointing:
            raise InputError(
                "--activation-offload moves the block inputs that activation checkpointing keeps: it needs "
                "--activation-checkpointing on"
            )
        if self.pure_bf16 and self.dtype == "fp32":
            raise InputError("--pure-bf16 on needs --dtype bf16 or auto")

    def resolve_grad_accum(self, world_size: int) -> int:
        """Micro-batches per step: --grad-accum-steps, or derived from --global-batch-size for this world size."""
        accum = self.grad_accum_steps
        if self.global_batch_size:
            per_micro = self.batch_size * world_size
            if self.global_batch_size % per_micro:
                raise InputError(
                    f"--global-batch-size {self.global_batch_size} is not a multiple of --batch-size "
                    f"{self.batch_size} x {world_size} ranks = {per_micro}"
                )
            accum = self.global_batch_size // per_micro
        if accum > 1 and self.optimizer_in_backward:
            raise InputError(
                f"--optimizer-in-backward steps and frees each gradient inside backward, so there is nothing to "
                f"accumulate {accum} micro-batches into: use one micro-batch per step (raise --batch-size instead)"
            )
        return accum

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        if self.pure_bf16:
            return torch.bfloat16
        if self.dtype == "auto":  # bf16 where the GPU computes it natively (Ampere on); older ones emulate it slowly
            return torch.bfloat16 if cuda_capability(device, default=(8, 0)) >= (8, 0) else torch.float32
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

    def shard_unit_on(self, device: torch.device, num_params: int = 0, host_bytes: float = math.inf,
                      local_ranks: int = 1) -> str:  # fmt: skip
        """--shard-unit auto: per block on GPUs, where CUDA streams overlap the collectives with compute and memory is
        what is scarce. On CPU hosts every collective blocks the compute thread (gloo has no streams), and one
        all-gather plus one reduce-scatter a step cost least (bench/README.md, 2 ranks on 2 cores, activation
        checkpointing off: 0.94x the HF Trainer's tok/s per block, 1.11x with one unit), but a step then holds the
        whole unsharded model and its gradients on every rank: the whole model only while that, for the host's
        `local_ranks`, fits in half of `host_bytes` (the other half for activations, optimizer state and the runtime).
        Per block also with --optimizer-in-backward, whose point is that a unit's gradients are freed once reduced."""
        if self.shard_unit != "auto":
            return self.shard_unit
        if device.type == "cuda" or self.optimizer_in_backward:
            return "block"
        return "model" if local_ranks * one_unit_bytes(num_params, self, device) <= host_bytes / 2 else "block"

    @property
    def exp_dir(self) -> Path:
        return Path(self.save_dir) / self.experiment_name


class _Parser(argparse.ArgumentParser):
    """argparse without its prefix matching (`--max-step 3` must not quietly mean --max-steps, nor `--warmup` a
    flag that a later version makes ambiguous), whose errors are an InputError with a "did you mean" for a mistyped
    flag: argparse prints and exits on every rank; raising lets main() report it once, from rank 0."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        import difflib

        if message.startswith("unrecognized arguments:"):
            hints = []
            for word in message.split(":", 1)[1].split():
                if word.startswith("-"):
                    close = difflib.get_close_matches(word.split("=")[0], list(self._option_string_actions), n=1)
                    hints += [f"{word}: did you mean {close[0]}?"] if close else []
            message += f" ({'; '.join(hints)})" if hints else f" (see {self.prog} --help)"
        raise InputError(message)


def _on_off(value: str) -> bool:
    if value.lower() in ("on", "true", "1", "yes"):
        return True
    if value.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")


class _Sources(argparse.Action):
    """-d given more than once: the sources of a mixture, joined by SOURCE_SEP (the first replaces --config's)."""

    def __call__(self, parser, namespace, value, option_string=None):
        given = getattr(namespace, "_given", False)
        setattr(namespace, self.dest, f"{getattr(namespace, self.dest)}{SOURCE_SEP}{value}" if given else value)
        namespace._given = True


def _kind(f: dataclasses.Field):
    return _on_off if isinstance(f.default, bool) else type(f.default)


def load_config_file(path: str) -> dict:
    """Flag values from a YAML file, keyed by Config field name. Unknown keys are an error naming the closest."""
    import difflib

    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise InputError(f"cannot read --config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise InputError(f"--config {path} is not valid YAML: {first_line(e)}") from None
    if not isinstance(raw, dict):
        raise InputError(f"--config {path} must be a mapping of flag: value")
    fields = {f.name: f for f in dataclasses.fields(Config) if f.name != "config"}
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise InputError(f"unknown key '{key}' in --config {path}{hint}")
        if name == "chat_columns" and isinstance(value, dict):  # its NAME=YOURS pairs as a YAML mapping
            value = ",".join(f"{ours}={theirs}" for ours, theirs in value.items())
        if name == "dataset_name" and isinstance(value, list):  # a mixture: one PATH[:WEIGHT] per item
            value = SOURCE_SEP.join(map(str, value))
        try:  # through the flag's own parser, so `on`, `true` and 1e-4 mean what they mean on the command line
            values[name] = _kind(fields[name])(str(value).lower() if isinstance(value, bool) else str(value))
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise InputError(f"bad value for '{key}' in --config {path}: {e}") from None
    return values


def parse_args(argv: list[str] | None = None, prog: str | None = None, description: str | None = None) -> Config:
    """Build the Config from command-line flags (over --config YAML); every flag comes from a Config field."""
    p = _Parser(prog=prog, description=description or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flags = [flag_name(f.name)] + ([f.metadata["short"]] if f.metadata["short"] else [])
        shown = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
        bare = dict(nargs="?", const=True) if isinstance(f.default, bool) else {}  # `--compile` alone means on
        bare |= {"action": _Sources} if f.name == "dataset_name" else {}
        p.add_argument(
            *flags, type=_kind(f), default=f.default, choices=f.metadata["choices"],
            help=f"{f.metadata['help']} (default: {shown})", **bare,
        )  # fmt: skip
    config_file = p.parse_known_args(argv)[0].config
    if config_file:
        p.set_defaults(**load_config_file(config_file))
    args = vars(p.parse_args(argv))
    args.pop("_given", None)
    cfg = Config(**args)
    cfg.validate()
    return cfg


# ======================================================================================================================
# Distributed


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(timeout_minutes: float = 30.0) -> Dist:
    """Join the torchrun job (or a 1-process group when run directly). NCCL+CUDA if GPUs exist, else gloo+CPU."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # before the rendezvous, which would wait for a dead agent's store
        exit_with_parent()
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        fail_fast_nccl(timeout_minutes)
        # gloo alongside NCCL so small CPU-side agreements (flags, errors) need no device copy.
        backend = "cpu:gloo,cuda:nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        reuse_freed_memory()
    if not dist.is_initialized():
        kwargs = dict(device_id=device if device.type == "cuda" else None, timeout=timedelta(minutes=timeout_minutes))
        if "RANK" in os.environ:
            dist.init_process_group(backend, **kwargs)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    setup_logging(rank)
    return Dist(rank, local_rank, world_size, device)


# NCCL settings that make a stuck collective end the process instead of hanging it (names as in torch 2.13's
# ProcessGroupNCCL.hpp; tests/test_hangs.py checks they are still there). A user's own value wins.
NCCL_FAIL_FAST = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",  # a timed-out or failed collective tears the process down
    "TORCH_NCCL_ENABLE_MONITORING": "1",  # a thread that aborts the process when NCCL's own watchdog is stuck ...
    "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": None,  # ... for this long: --dist-timeout + 1 min, so timeouts fire first
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # the flight recorder: the last collectives of each rank ...
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",  # ... written out when a collective times out
}


def fail_fast_nccl(timeout_minutes: float) -> None:
    for name, value in NCCL_FAIL_FAST.items():
        os.environ.setdefault(name, value or str(int(timeout_minutes * 60) + 60))


def reuse_freed_memory(limit: int = 1 << 30) -> None:
    """CPU training: keep the memory a step frees for the next step, as CUDA's caching allocator does.

    glibc serves blocks above its mmap threshold (at most 32 MiB) from fresh mmaps and unmaps them at free, and trims
    the heap top, so every step faulted in new zeroed pages for its all-gathers, gradients and logits: ~20k page
    faults a step (80 MB) on the small bench model, 415k (1.6 GB) on the medium one, at ~4 us each on this VM. With
    blocks up to 1 GiB served from the heap and the heap trimmed only beyond 1 GiB, a step faults a few hundred pages
    (bench/README.md: small, one FSDP unit, 363-378 -> 312-322 ms a step; medium 4.42 -> 3.72 s). The price: RSS
    includes the memory kept for reuse (medium: peak 1.18 -> 1.64 GiB a rank). MALLOC_MMAP_THRESHOLD_=4194304 in the
    environment gives blocks of 4 MiB and more back at once, so that RSS tracks live tensors (what `plan` estimates);
    a threshold set in the environment (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES) wins.
    """
    import ctypes

    in_env = {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ)
    if sys.platform != "linux" or in_env or "threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_THRESHOLD; a fixed value also stops glibc's own adjusting. Some glibc versions refuse more than
        # 32 MiB (HEAP_MAX_SIZE / 2) and return 0: take that maximum then, or the trim setting below would freeze the
        # threshold at its 128 KiB default (more page faults than glibc's own adjusting).
        if not libc.mallopt(-3, limit):
            libc.mallopt(-3, 32 << 20)
        libc.mallopt(-1, limit)  # M_TRIM_THRESHOLD


def exit_with_parent(poll_seconds: float = 0.2) -> None:
    """Die when the torchrun agent dies. A SIGKILLed agent cannot stop its workers, and orphans would keep
    training and writing checkpoints next to the re-run job. Exiting abruptly is safe: a checkpoint only counts
    once complete."""
    parent, stop = os.getppid(), threading.Event()

    def watch():
        while not stop.wait(poll_seconds):
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    watcher = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    watcher.start()
    # Joined before the interpreter finalizes: a daemon thread waking up during finalization is ended with
    # pthread_exit, which aborted a worker now and then ("terminate called without an active exception").
    atexit.register(lambda: (stop.set(), watcher.join()))


def local_world_size() -> int:
    """Ranks on this host (torchrun's LOCAL_WORLD_SIZE; 1 when run directly)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def setup_logging(rank: int) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.handlers[:] = [handler]
    log.propagate = False
    # Rank 0 speaks for the job: every warning here is about something all ranks share (they agree through
    # collectives), and eight copies of a library's warning are noise. Other ranks print only errors of their own.
    log.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    if rank != 0:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def all_ok(ok: bool) -> bool:
    """Agree across ranks whether every rank succeeded; a rank that failed alone must not leave others waiting."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
    dist.all_reduce(flag)
    return flag.item() == 0


CONTROL_COMMANDS = ("save", "stop", "abort")  # in rising priority when several arrive together


def take_control_request(path: Path) -> str | None:
    """The command `fsdp_train.py control` left in `path` (consumed: the file is removed)."""
    try:
        command = json.loads(path.read_text()).get("command")
        path.unlink()
    except (OSError, ValueError, AttributeError):
        return None
    if command not in CONTROL_COMMANDS:
        log.warning(f"Ignoring unknown control request {command!r} in {path}")
        return None
    return command


class StopRequest:
    """SIGTERM, SIGUSR1 (Slurm's --signal), SIGHUP and a first SIGINT ask for a checkpoint and a clean exit at the
    next step boundary; a second SIGINT aborts at once without saving. `fsdp_train.py control` requests arrive through
    a file that rank 0 polls at step boundaries.

    torchrun forwards the signals it handles to every worker; after a Ctrl+C in a terminal a worker gets SIGINT
    twice within milliseconds (from the terminal and from torchrun), so a second SIGINT counts only after 1 s.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)  # SIGHUP: the terminal or ssh closed

    def __init__(self, rank: int):
        self.rank, self.signum = rank, 0
        self.first_sigint = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def restore(self) -> None:
        """Give the signals back (after train() returns in a notebook, Ctrl+C must interrupt again)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.first_sigint is not None:
            if time.monotonic() - self.first_sigint > 1.0:
                say(f"[rank{self.rank}] Aborted by a second SIGINT: no checkpoint saved")
                os._exit(130)
            return
        if signum == signal.SIGINT:
            self.first_sigint = time.monotonic()
        if not self.signum:
            self.signum = signum

    def agreed(self, control_file: Path | None = None, writing: bool = False) -> tuple[str | None, str | None, bool]:
        """Collective: (the signal any rank received, the control command rank 0 found in `control_file`, whether
        any rank is still writing a background checkpoint), so every rank acts at the same step. Only rank 0 passes
        the file. `writing` rides on this all-reduce so that an async save costs no collective of its own per step."""
        command = take_control_request(control_file) if control_file is not None else None
        code = CONTROL_COMMANDS.index(command) + 1 if command else 0
        flags = torch.tensor([self.signum, code, int(writing)], dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, code, writing = flags.tolist()
        signame = signal.Signals(signum).name if signum else None
        return signame, (CONTROL_COMMANDS[code - 1] if code else None), bool(writing)


def say(line: str) -> None:
    """One line in one write(), so lines from several ranks never interleave mid-line (unlike print)."""
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def raise_if_any_failed(error: BaseException | None) -> None:
    """Collective: re-raise a rank's error there; other ranks raise a silent InputError so every rank exits."""
    if not all_ok(error is None):
        if error is not None:
            raise error
        raise InputError("another rank failed (its message is above)")


# ======================================================================================================================
# Model and FSDP


def first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


DATA_FILES = (".jsonl", ".json", ".parquet")  # the data files -d loads (load_dataset_any)
DATA_SUFFIXES = (*DATA_FILES, ".csv", ".txt", ".arrow")  # what makes a missing name a file, not a hub id


def reads_as_path(name: str) -> bool:
    """Whether a -m or -d name that is not here can only be a local path with a typo, never a hub id (ORG/NAME): asking
    the hub for it would spend ~30 s in retries on an offline node and end in a message about the hub."""
    path = Path(name).expanduser()
    one_folder_down = name.count("/") == 1 and path.parent.is_dir()
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or one_folder_down or path.suffix in DATA_SUFFIXES


def did_you_mean(path: Path) -> str:
    """'; did you mean FOLDER/NAME?' for the closest entry of a missing path's folder, or ''."""
    import difflib

    names = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
    close = difflib.get_close_matches(path.name, names, n=1)
    return f"; did you mean {path.parent / close[0]}?" if close else ""


def model_problem(name: str, cache_dir: str | None = None) -> str | None:
    """Why --model-name names no model on this host, found without touching the network (an offline node would spend
    ~30 s in retries before saying so), or None. A name that reads as a path must be a folder; a hub id (ORG/NAME)
    must be in the Hugging Face cache, which model_download.py fills."""
    import difflib

    path = Path(name).expanduser()
    if path.is_dir():
        return None if (path / "config.json").is_file() else f"model folder {name} has no config.json"
    if reads_as_path(name):
        return f"model folder {name} does not exist{did_you_mean(path)}"
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    cache_dir = cache_dir or HF_HUB_CACHE
    if isinstance(try_to_load_from_cache(name, "config.json", cache_dir=cache_dir), str):
        return None
    cached = [p.name.removeprefix("models--").replace("--", "/") for p in Path(cache_dir).glob("models--*")]
    close = [c for c in cached if c.lower() == name.lower()] or difflib.get_close_matches(name, cached, n=1)
    hint = f"; did you mean '{close[0]}', which is cached?" if close else ""
    return (
        f"model '{name}' is neither a local folder nor in the Hugging Face cache {cache_dir}{hint} (download it first "
        f"where there is network, with the same HF_HOME: python model_download.py --model-name {name})"
    )


def load_model_config(name: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    problem = model_problem(name)
    if problem:
        raise InputError(problem)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load model '{name}': {first_line(e)}") from None
    config.use_cache = False  # training never reuses the KV cache, and transformers warns on every forward otherwise
    return config


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the tokenizer of '{name}': {first_line(e)}") from None
    if tokenizer.eos_token_id is None:
        raise InputError(f"the tokenizer of '{name}' has no EOS token to separate packed documents")
    return tokenizer


def max_positions(config) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    return None


_AC_PREFIX = "_checkpoint_wrapped_module."


def clean_fqn(name: str) -> str:
    """Parameter/buffer name without activation-checkpoint wrappers, as in the HF checkpoint."""
    return name.replace(_AC_PREFIX, "")


def find_blocks(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute, block) for each module whose class is in the model's `_no_split_modules`.

    A block holding one side of a tied weight (e.g. an embedding tied to lm_head) is left to the root unit,
    because an FSDP unit that owns only one side of a tie would shard the shared tensor twice.
    """
    classes = set(getattr(model, "_no_split_modules", None) or [])
    if not classes:
        raise InputError(f"{type(model).__name__} declares no _no_split_modules, so its blocks are unknown")
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    blocks = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if type(child).__name__ not in classes:
                continue
            owned = list(child.named_parameters(remove_duplicate=False))
            if any(counts[id(p)] > sum(q is p for _, q in owned) for _, p in owned):
                log.warning(f"{type(child).__name__} {attr} shares a tied weight; it stays in the root FSDP unit")
                continue
            blocks.append((parent, attr, child))
    if not blocks:
        raise InputError(f"no module of class {sorted(classes)} found in {type(model).__name__}")
    return blocks


def offloaded_checkpoint(fn, *args, **kwargs):
    """Non-reentrant activation checkpointing whose saved block inputs go to pinned host memory.

    A checkpointed block keeps only its inputs for backward; checkpoint saves them through autograd's saved-tensor
    hooks outside its own recompute hooks, so save_on_cpu moves exactly those (one b x s x h tensor per block) to the
    host and brings each back when backward recomputes that block.
    """
    from torch.utils.checkpoint import checkpoint

    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def shard_model(model: torch.nn.Module, cfg: Config, d: Dist) -> None:
    """Activation checkpointing around each block, then fully_shard each block and the root (FULL_SHARD); with
    --shard-unit model only the root, which then holds every parameter."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if cfg.replicate_degree > 1:  # a 2-D mesh makes fully_shard hybrid: all-gathers stay inside a shard group
        shape, names = (cfg.replicate_degree, d.world_size // cfg.replicate_degree), ("replicate", "shard")
        mesh = init_device_mesh(d.device.type, shape, mesh_dim_names=names)
    else:
        mesh = init_device_mesh(d.device.type, (d.world_size,))
    log.info(f"Device mesh {tuple(mesh.shape)} {mesh.mesh_dim_names or ('shard',)}")
    cuda = d.device.type == "cuda"
    mixed = cfg.compute_dtype(d.device) == torch.bfloat16 and not cfg.pure_bf16
    fsdp_kwargs = dict(
        mesh=mesh,
        reshard_after_forward=cfg.reshard_after_forward,
        # bf16 compute with fp32 master weights and fp32 gradient reduction; with --pure-bf16 the params already
        # are bf16, so there is nothing to cast.
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed
        else MixedPrecisionPolicy(),
        # Pinned host memory needs a CUDA device; a CPU-only host must not ask for it.
        offload_policy=CPUOffloadPolicy(pin_memory=cuda) if cfg.cpu_offload else OffloadPolicy(),
    )
    offload = cfg.activation_offload and cuda
    if cfg.activation_offload and not cuda:
        log.info("--activation-offload does nothing on a CPU host: activations already live in host memory")
    params, room, local = count_params(model), host_available_bytes(), local_world_size()
    unit, why = cfg.shard_unit_on(d.device, params, room, local), ""
    if cfg.shard_unit == "auto" and d.device.type == "cpu" and not cfg.optimizer_in_backward:  # memory decides
        unit = "model" if all_ok(unit == "model") else "block"  # a host short of memory makes every rank go per block
        why = (f"; --shard-unit auto: the unsharded model and its gradients take "
               f"{byte_size(local * one_unit_bytes(params, cfg, d.device))} on this host's {local} rank(s), "
               f"{'within' if unit == 'model' else 'over'} half of its {byte_size(room)} available")  # fmt: skip
    blocks = find_blocks(model)
    for i, (parent, attr, block) in enumerate(blocks):
        if cfg.activation_checkpointing:
            checkpoint_fn = offloaded_checkpoint if offload else None
            block = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, checkpoint_fn=checkpoint_fn)
            parent.register_module(attr, block)
        if cfg.compile:  # in place (Module.compile), so parameter names and state dicts keep their keys
            block.compile()
        if unit == "model":
            continue  # the root's fully_shard below takes every block's parameters
        # Backward starts with the last block, so resharding it after forward would only gather it again at once.
        last = i == len(blocks) - 1
        fully_shard(
            block, **{**fsdp_kwargs, "reshard_after_forward": fsdp_kwargs["reshard_after_forward"] and not last}
        )
    # The root unit stays gathered from forward to backward: backward needs its weights at once (the head) and again
    # at the end (the embedding). FSDP2 only does that for a root left at reshard_after_forward=None ("auto"): an
    # explicit True reshards it after forward and all-gathers it again at the start of backward, which cost one more
    # all-gather of the embedding and head every step (of the whole model with --shard-unit model: 2 all-gathers a
    # step instead of 1; test_the_root_unit_stays_gathered_from_forward_to_backward).
    fully_shard(model, **{**fsdp_kwargs, "reshard_after_forward": None if cfg.reshard_after_forward else False})
    units = sum(isinstance(m, FSDPModule) for m in model.modules())  # counted, not inferred from the flag
    log.info(f"FSDP units: {units} ({'the whole model' if units == 1 else f'{units - 1} blocks + the root'}){why}")


def nonpersistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers missing from state_dict (e.g. rotary inv_freq): garbage after to_empty, so we carry them ourselves."""
    persistent = set(model.state_dict())
    return {clean_fqn(n): b for n, b in model.named_buffers() if clean_fqn(n) not in persistent}


def param_dtype(cfg: Config) -> torch.dtype:
    """Dtype of the sharded (master) parameters: fp32, or bf16 with --pure-bf16."""
    return torch.bfloat16 if cfg.pure_bf16 else torch.float32


def import_model_code(cfg: Config, device: torch.device) -> None:
    """Import the model's code and all it pulls in before the memory baseline is read: imported modules are a
    start-up cost, not training memory. (transformers 5.24 first imports torch._dynamo from masking_utils when the
    model class loads, ~25 MiB per process; 5.23 had already imported it with the config.) A meta-device build
    allocates no tensor memory."""
    from transformers import AutoModelForCausalLM

    config = load_model_config(cfg.model_name, cfg.trust_remote_code)
    with contextlib.suppress(ImportError, ValueError), torch.device("meta"):  # build_model reports those
        AutoModelForCausalLM.from_config(
            config, attn_implementation=attn_implementation(cfg, device), trust_remote_code=cfg.trust_remote_code
        )


def build_model(cfg: Config, d: Dist, load_pretrained: bool) -> torch.nn.Module:
    """Meta-device build, shard, allocate only the local shards, then fill them.

    Fresh run: the pretrained weights go straight into the shards (load_pretrained_weights), so no rank, and not the
    node, holds N full copies. Resume: weights come from the DCP checkpoint instead, so nothing is loaded here.
    """
    from transformers import AutoModelForCausalLM

    config = load_model_config(cfg.model_name, cfg.trust_remote_code)
    dtype = param_dtype(cfg)
    attn = attn_implementation(cfg, d.device)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code
            )
    except (ImportError, ValueError) as e:  # e.g. flash_attention_2 without the flash-attn package
        raise InputError(f"--attn-implementation {attn}: {first_line(e)}") from None
    model.loss_function = causal_lm_loss
    shard_model(model, cfg, d)
    model.to_empty(device="cpu" if cfg.cpu_offload else d.device)
    if cfg.cpu_offload:  # FSDP keeps offloaded params on the host, but buffers are used where compute happens
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                setattr(module, name, buf.to(d.device))

    if load_pretrained:
        load_pretrained_weights(model, cfg, d, config)
    model.train()
    return model


def load_pretrained_weights(model: torch.nn.Module, cfg: Config, d: Dist, config) -> None:
    """Collective: fill the allocated shards with the pretrained weights and the non-persistent buffers.

    Where the safetensors tensors map one-to-one onto the model's, every rank reads only its shards' slices (an 8B
    model's fp32 master weights cost each rank 32 GB / N). Otherwise (keys that transformers renames or converts
    while loading, a .bin checkpoint, other shapes) rank 0 loads the whole model and broadcasts it, as transformers
    alone knows those conversions. Rank 0 decides and tells the others: every rank must take the same path.
    """
    t0 = time.perf_counter()
    reason = ["--load-weights rank0"] if cfg.load_weights == "rank0" else [None]
    if cfg.load_weights == "auto":
        if d.is_main:
            reason = [direct_load_problem(cfg.model_name, model)]
        dist.broadcast_object_list(reason, src=0)
    if reason[0] is None:
        folder = model_folder(cfg.model_name)
        load_sharded_weights(model, folder)
        how = f"every rank read its own slices of {folder}"
    else:
        log.info(f"Loading weights through rank 0: {reason[0]}")
        broadcast_weights(model, cfg, d, config)
        how = "rank 0 read them and broadcast them"
    log.info(f"Loaded pretrained weights in {time.perf_counter() - t0:.1f}s: {how}")


def model_folder(name: str) -> Path | None:
    """The local folder from_pretrained reads `name` from: the folder itself, or a hub id's snapshot in the HF cache
    (found offline with HF_HUB_OFFLINE=1). None where there is none."""
    if Path(name).is_dir():
        return Path(name)
    from transformers.utils import cached_file

    try:
        config_file = cached_file(name, "config.json", _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):
        return None
    return Path(config_file).parent if config_file else None


FLOAT_SAFETENSORS = ("F16", "BF16", "F32", "F64")


def safetensors_headers(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) of every tensor stored in the folder's safetensors files, from their headers alone.

    Raises ValueError where the folder is no plain safetensors checkpoint (model.safetensors, or the files its
    model.safetensors.index.json names): DCP's HuggingFaceStorageReader reads every *.safetensors file there.
    """
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no safetensors files")
    named = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else None
    if files != (named or ["model.safetensors"]):
        raise ValueError(f"{folder} holds the safetensors files {files}, not just {named or ['model.safetensors']}")
    tensors: dict[str, tuple[str, list[int]]] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is no dict
                if key in tensors:
                    raise ValueError(f"{key} is stored twice")
                tensors[key] = (f.get_slice(key).get_dtype(), f.get_slice(key).get_shape())
    return tensors


def direct_load_problem(name: str, model: torch.nn.Module) -> str | None:
    """Why the checkpoint's tensors cannot be read straight into the model's shards (None: they can): each stored
    tensor must be a float weight of the model under its own name and shape, and each weight must be stored (a tied
    weight may be stored under either name or both: from_pretrained ties them again)."""
    from safetensors import SafetensorError

    folder = model_folder(name)
    if folder is None:
        return f"no local folder found for '{name}'"
    try:
        stored = safetensors_headers(folder)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        return first_line(e)
    shapes = {clean_fqn(k): list(t.shape) for k, t in model.state_dict().items()}  # DTensors: the global shapes
    tied, kind = tied_names(model), type(model).__name__.removeprefix("FSDP")
    for key, (dtype, shape) in stored.items():
        if key not in shapes:
            return f"checkpoint key {key} is no weight of {kind} (transformers renames or converts such keys)"
        if shape != shapes[key]:
            return f"checkpoint key {key} has shape {shape}, the model's {shapes[key]}"
        if dtype not in FLOAT_SAFETENSORS:
            return f"checkpoint key {key} is stored as {dtype}, not a float"
    missing = [k for k in shapes if k not in stored and k not in tied]
    return f"the model's {missing[0]} is not in the checkpoint ({len(missing)} missing)" if missing else None


def load_sharded_weights(model: torch.nn.Module, folder: Path) -> None:
    """Collective: every rank reads its shards' slices of the safetensors files (DCP's HuggingFaceStorageReader,
    converting the stored dtype to the shards' on the fly) and recomputes the non-persistent buffers itself."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    init_nonpersistent_buffers(model)
    tied = tied_names(model)
    # A tied weight is one tensor: read it once, under the name the checkpoint always has (the file may lack the other).
    state = {k: v for k, v in get_model_state_dict(model).items() if k not in tied}
    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)))
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))  # strict: tied names are left out


@torch.no_grad()
def init_nonpersistent_buffers(model: torch.nn.Module) -> None:
    """Recompute the buffers no checkpoint holds (rotary inv_freq: garbage after to_empty) exactly as transformers
    does for FSDP's ranks that load nothing (modeling_utils `_initialize_missing_keys`): mark every weight and
    persistent buffer as initialised, then `initialize_weights()` runs the model's own `_init_weights`, whose guarded
    init functions skip the marked tensors. Building even one real copy of the model to copy buffers from is what
    this load avoids; the weights are read after this, so an init that ignores the marks changes nothing."""
    buffers = {id(b) for b in nonpersistent_buffers(model).values()}
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in buffers:
            t._is_hf_initialized = True
    model.initialize_weights()


def broadcast_weights(model: torch.nn.Module, cfg: Config, d: Dist, config) -> None:
    """Collective: rank 0 alone loads the whole model with from_pretrained (all of transformers' key conversions) and
    broadcasts it shard by shard, buffers too; the other ranks hold only their shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM

    full_sd, ref_buffers, error = {}, {}, None
    if d.is_main:
        ref, info = AutoModelForCausalLM.from_pretrained(
            cfg.model_name,
            config=config,
            dtype=param_dtype(cfg),
            attn_implementation="eager",  # only its weights are used
            trust_remote_code=cfg.trust_remote_code,
            output_loading_info=True,
        )
        error = incomplete_load_error(cfg.model_name, info)
        full_sd, ref_buffers = ref.state_dict(), dict(ref.named_buffers())
    raise_if_any_failed(error)  # before the broadcast, which the other ranks are about to enter
    set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buf in nonpersistent_buffers(model).items():
        if d.is_main:
            buf.copy_(ref_buffers[name])
        dist.broadcast(buf, src=0)


def incomplete_load_error(name: str, info: dict) -> InputError | None:
    """from_pretrained initialises a weight the checkpoint lacks at random and only prints a report: fine-tuning from
    it would silently train a partly random model. Refuse where any weight was missing, unexpected or of another
    shape (a tied weight that the checkpoint stores once is not missing: transformers does not report it)."""
    problems = [
        f"{what} {', '.join(sorted(map(str, keys))[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
        for what, keys in (
            ("missing", info.get("missing_keys") or []),
            ("unexpected", info.get("unexpected_keys") or []),
            ("of another shape", info.get("mismatched_keys") or []),
        )
        if keys
    ]
    if not problems:
        return None
    return InputError(
        f"{name} does not hold the model's weights exactly: {'; '.join(problems)}. Training would start from random "
        "values there: point -m at a complete checkpoint of this architecture"
    )


def cuda_capability(device: torch.device, default: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device; (0, 0) on other devices; `default` for a CUDA device this
    host does not have (`plan --device cuda` on a CPU host plans for a current GPU)."""
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device) if torch.cuda.is_available() else default


def attention_problem(name: str, cfg: Config, device: torch.device) -> str | None:
    """Why this attention implementation cannot train here (None: it can), from its ATTENTION entry."""
    choice = ATTENTION[name]
    if name in CUDA_ONLY_ATTENTION and device.type != "cuda":
        return f"--attn-implementation {name} trains on CUDA only: use sdpa or eager"
    if device.type != "cuda":
        return None
    if choice.half_only and cfg.compute_dtype(device) == torch.float32:
        return f"--attn-implementation {name} has no fp32 kernel: use --dtype bf16, or sdpa"
    have = cuda_capability(device, default=choice.min_capability)
    if have < choice.min_capability:
        need, this = (".".join(map(str, c)) for c in (choice.min_capability, have))
        return f"--attn-implementation {name} needs a GPU of compute capability {need} or newer (this one: {this})"
    return None


def attn_implementation(cfg: Config, device: torch.device) -> str:
    """--attn-implementation, with auto resolved: flash-attention takes packed documents as variable-length segments
    (no S x S mask, no wasted work across documents) but needs a recent GPU, bf16 and the flash-attn package; sdpa is
    everywhere, and with packed position_ids transformers gives it an explicit block-diagonal mask (B x 1 x S x S
    booleans)."""
    import importlib.util

    if cfg.attn_implementation != "auto":
        if problem := attention_problem(cfg.attn_implementation, cfg, device):
            raise InputError(problem)
        return cfg.attn_implementation
    flash = "flash_attention_2"
    usable = device.type == "cuda" and attention_problem(flash, cfg, device) is None
    return flash if usable and importlib.util.find_spec(ATTENTION[flash].package) is not None else "sdpa"


def takes_segments(attn: str) -> bool:
    """Whether this attention implementation is told the packed documents as variable-length segments (cu_seqlens)
    instead of through a mask built from position_ids."""
    return ATTENTION[attn].segments


def model_inputs(ids: torch.Tensor, positions: torch.Tensor, attn: str, labels: torch.Tensor | None = None) -> dict:
    """The forward's keyword arguments for a micro-batch of packed rows (host tensors; every row starts a document).

    Restarting position_ids keep packed documents apart for sdpa, eager and flex attention at any batch size:
    transformers builds a block-diagonal mask from them row by row. Flash-attention builds no mask, and transformers
    infers the segments from position_ids only for a single row (`_is_packed_sequence` needs batch size 1); with more
    rows it runs the plain causal kernel over whole rows, every document seeing the ones before it. So flash gets the
    segments explicitly, over the B x S tokens flattened (transformers' varlen-kwargs path reshapes q/k/v to exactly
    that): `cu_seq_lens_q/k` (int32 offsets of each document, then the total) and `max_length_q/k` (the longest, a
    Python int, so no device sync in every layer).
    """
    inputs = {"input_ids": ids, "position_ids": positions}
    if labels is not None:
        inputs["labels"] = labels
    if takes_segments(attn):
        assert bool((positions[:, 0] == 0).all()), "every packed row starts a segment"
        flat = positions.flatten()
        starts = torch.nonzero(flat == 0).flatten()
        offsets = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
        longest = int(offsets.diff().max())
        inputs.update(cu_seq_lens_q=offsets, cu_seq_lens_k=offsets, max_length_q=longest, max_length_k=longest)
    return inputs


def inputs_to(inputs: dict, device: torch.device) -> dict:
    return {k: to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


# Of the isolation gap, which is relative to the logits' size: bf16 rounds logits to a spacing proportional to their
# size (0.125 at 16-32), so the same document packed and alone differs by ~1% of the largest logit with no mixing at
# all (0.75 in log-prob at logits of 59), while a document that sees another moves by 70-130% of it (measured on tiny
# llamas with logits from 1 to 59: 0.003-0.012 isolated, 0.7-1.3 mixed).
ISOLATION_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.05}
ISOLATION_SPLITS = ((16, 32), (28, 20))  # document lengths in the check's rows, alternating


@torch.no_grad()
def document_isolation_gap(model, device: torch.device, vocab_size: int, rows: int, attn: str) -> float:
    """Collective (FSDP forwards on every rank): the largest log-prob difference between a document packed in a
    micro-batch of `rows` rows, fed exactly as training feeds it (model_inputs), and the same document alone, relative
    to the size of the document's largest logit alone (|a - b| / (1 + max |logit|), see ISOLATION_TOLERANCE). ~0 when
    the attention implementation keeps packed documents apart at this shape; of order 1 when one attends to another.

    Every row holds two documents (cut at alternating points), so later rows and second documents are checked: a
    kernel that is right for one row only (flash-attention's batch-1 inference of segments) fails here. The documents
    alone are fed without segments or restarts, one length per forward: plain causal attention, the reference. Uses
    its own generator and eval mode, so training's RNG streams and results are untouched."""
    g = torch.Generator().manual_seed(0)
    splits = [ISOLATION_SPLITS[r % len(ISOLATION_SPLITS)] for r in range(rows)]
    docs = [[torch.randint(0, vocab_size, (n,), generator=g) for n in split] for split in splits]
    ids = torch.stack([torch.cat(row) for row in docs])
    positions = torch.stack([torch.cat([torch.arange(len(doc)) for doc in row]) for row in docs])
    model.eval()
    try:
        packed = model(**inputs_to(model_inputs(ids, positions, attn), device)).logits.float().log_softmax(-1)
        gap = 0.0
        for length in sorted({n for split in splits for n in split}):
            where = [(r, i) for r, split in enumerate(splits) for i, n in enumerate(split) if n == length]
            alone_ids = torch.stack([docs[r][i] for r, i in where]).to(device)
            alone_pos = torch.arange(length).expand(len(where), length).to(device)
            logits = model(input_ids=alone_ids, position_ids=alone_pos).logits.float()
            alone = logits.log_softmax(-1)
            for k, (r, i) in enumerate(where):
                start = sum(splits[r][:i])
                diff = (packed[r, start : start + length] - alone[k]).abs().max()
                gap = max(gap, (diff / (1 + logits[k].abs().max())).item())
    finally:
        model.train()
        reshard_all(model)
    return gap


def reshard_all(model: torch.nn.Module) -> None:
    """Free every gathered FSDP unit after a forward without backward (evaluation, the isolation check). The root and
    the last block are not resharded after forward (backward would gather them again at once); without a backward
    they stay gathered, and while gathered their modules hold the unsharded tensors: a parameter list taken then (the one
    clipping uses) missed that block's real parameters, whose gradients were then neither counted in the norm nor
    clipped (found by bench_train: grad norm 2.069 vs plain transformers' 2.152)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def isolation_problem(model, cfg: Config, d: Dist) -> str | None:
    """Collective: None where packed documents attend only to themselves with this architecture and attention
    implementation, at the run's micro-batch shape; else what mixes them. --packing isolated refuses such a run,
    saying what can run here; auto trains it on padded blocks instead (prepare_run)."""
    attn, rows = attn_implementation(cfg, d.device), max(2, cfg.batch_size)
    gap = document_isolation_gap(model, d.device, model.config.vocab_size, rows, attn)
    if gap <= ISOLATION_TOLERANCE[cfg.compute_dtype(d.device)]:
        log.info(
            f"Packed documents are isolated ({attn}, {rows} rows a micro-batch): log-probs within {gap:.1e} "
            "(relative) of each document alone"
        )
        return None
    problem = (
        f"{type(model).__name__.removeprefix('FSDP')} with --attn-implementation {attn} lets packed documents attend "
        f"to each other (a document's log-probs move by {gap:.3g} (relative) next to another in a micro-batch of "
        f"{rows} rows)"
    )
    if cfg.packing == "isolated":
        usable = [a for a in ATTN_IMPLEMENTATIONS[1:] if d.device.type == "cuda" or a not in CUDA_ONLY_ATTENTION]
        others = " or ".join(f"--attn-implementation {a}" for a in usable if a != attn)
        raise InputError(
            f"{problem}: try {others + ', or ' if others else ''}--packing padded (one document per block)"
        )
    return problem


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # DTensor numel is the global size


# ======================================================================================================================
# Loss

# A step minimises the mean next-token cross-entropy over every trained token of its global batch (all ranks and
# micro-batches): each rank sums its token losses and divides by loss_divisor; evaluation sums and counts.

LOSS_CHUNK_ELEMENTS = 2**24  # logits handled at once by the loss: 64 MiB in fp32


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed next-token cross-entropy of (tokens, vocab) logits, computed in fp32 chunks, with the gradient written
    during forward into one buffer of the logits' dtype.

    transformers' loss upcasts all logits to fp32 and autograd keeps the log-softmax, then backward adds two more
    full-size tensors: ~6 logits-sized bf16 units at the peak (measured), 8 GiB for a 128k vocabulary at 8k tokens.
    Here the logits plus their gradient are the only full-size tensors (2 units) and fp32 exists one chunk at a time.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, per_token: torch.Tensor | None = None):
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        rows = max(1, LOSS_CHUNK_ELEMENTS // logits.shape[1])
        for start in range(0, logits.shape[0], rows):
            x = logits[start : start + rows].to(torch.float32, copy=True)  # a copy: modified in place below
            y = labels[start : start + rows]
            keep = y != -100
            target = y.clamp(min=0).unsqueeze(1)
            # In place on the fp32 copy: loss = log(sum(exp(x - max))) - (x_target - max). torch.logsumexp would
            # allocate a chunk-sized temporary and exponentiate a second time for the gradient (2x slower on CPU).
            x.sub_(x.amax(dim=1, keepdim=True))
            picked = x.gather(1, target).squeeze(1)
            sums = x.exp_().sum(dim=1)
            token_loss = (sums.log() - picked) * keep
            total += token_loss.sum()
            if per_token is not None:  # each token's loss too (RowLoss), written into the caller's buffer
                per_token[start : start + rows] = token_loss
            if grad is not None:  # d(loss)/d(logits) = softmax - one_hot(target), zero for ignored tokens
                x.div_(sums.unsqueeze(1))
                x.scatter_add_(1, target, -torch.ones_like(target, dtype=x.dtype))
                grad[start : start + rows] = x.mul_(keep.unsqueeze(1))
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_total.to(grad.dtype)), None, None  # in place: the buffer is used once


def trained_targets(labels: torch.Tensor) -> torch.Tensor:
    """How many next-token targets of `labels` (batch, seq) are trained: every position but the first of each row
    (nothing precedes it in the row) whose label is not -100 (prompt, padding, a document's first token)."""
    return (labels[..., 1:] != -100).sum()


def loss_divisor(step_targets: int, world_size: int) -> float:
    """What each rank divides its summed token loss by: the step's trained targets over all ranks and micro-batches
    (an all-reduced trained_targets) / world size. FSDP averages gradients over ranks, so the step's gradient is the
    mean over every trained token of the global batch, however unevenly masking spread them over ranks."""
    return max(step_targets, 1) / world_size


def causal_lm_loss(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100, **kwargs):
    """transformers' ForCausalLMLoss maths (shift, ignore -100) through ChunkedCrossEntropy: the summed token loss
    divided by `num_items_in_batch` (transformers' name for the divisor; training passes loss_divisor, evaluation 1 to
    get the sum), or the mean over trained targets without it. Installed as the model's `loss_function` (a
    transformers setter), so that model(..., labels=...) uses it."""
    assert ignore_index == -100, ignore_index
    count = num_items_in_batch if num_items_in_batch is not None else trained_targets(labels)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].to(logits.device)
    per_token = torch.zeros(shifted.numel(), device=logits.device) if RowLoss.armed else None
    total = ChunkedCrossEntropy.apply(logits.flatten(0, -2), shifted.flatten(), per_token)
    if per_token is not None:
        RowLoss.rows = per_token.view(shifted.shape).sum(-1)
    return total / count


class RowLoss:
    """Each row's summed next-token loss from the last loss computed while armed: a mixture's loss per source.
    transformers calls the loss inside model(...), so train_step and evaluate read it here, not from an argument."""

    armed = False
    rows: torch.Tensor | None = None


# ======================================================================================================================
# Data


def load_dataset_any(name: str, columns: dict | None = None):
    """A `save_to_disk` folder, a local .jsonl/.json/.parquet file, or a hub dataset id from the cache; its columns
    renamed to the names we train on (--chat-columns's map, ShareGPT's 'conversations')."""
    import datasets

    path = Path(name)
    try:
        if path.is_file() and path.suffix in DATA_FILES:
            builder = "parquet" if path.suffix == ".parquet" else "json"
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif path.is_dir() and not any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json")):
            raise FileNotFoundError(
                f"{name} is a folder of files, not a saved dataset: make one with python data_to_hf.py --data_folder "
                f"{name} --save_dir OUT, then -d OUT"
            )
        elif path.exists():
            ds = datasets.load_from_disk(name)
        elif reads_as_path(name):
            raise FileNotFoundError(f"no such folder or .jsonl/.json/.parquet file: {name}{did_you_mean(path)}")
        elif re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name) and not name.startswith("."):
            ds = datasets.load_dataset(name)
        else:
            raise FileNotFoundError(f"no such folder or .jsonl/.json/.parquet file: {name}")
    except (FileNotFoundError, ValueError, OSError) as e:
        raise InputError(f"cannot load dataset '{name}': {first_line(e)}") from None
    except IndexError:  # datasets saves an empty Dataset with 0 shards, then cannot load it back
        raise InputError(f"dataset '{name}' is empty") from None
    except datasets.exceptions.DatasetGenerationError as e:
        raise InputError(f"cannot read dataset file '{name}': {first_line(e.__cause__ or e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise InputError(f"dataset '{name}' has splits {sorted(ds)} but no 'train' split")
        ds = ds["train"]
    ds = rename_columns(ds, name, columns or {})
    dataset_kind(ds, name)
    if len(ds) == 0:
        raise InputError(f"dataset '{name}' is empty")
    return ds


def rename_columns(ds, name: str, columns: dict):
    """`ds` with its columns renamed as --chat-columns maps them ({theirs: ours}); ShareGPT's 'conversations' holds
    what we call 'messages'."""
    have = set(ds.column_names)
    renames = dict(columns)
    if "conversations" in have and "messages" not in have and not renames:
        renames.setdefault("conversations", "messages")
    missing = sorted(c for c in renames if c not in have)
    if missing:
        raise InputError(
            f"--chat-columns names column(s) {', '.join(missing)} that dataset '{name}' does not have; "
            f"columns: {', '.join(sorted(have))}"
        )
    clash = sorted(ours for theirs, ours in renames.items() if ours in have and ours not in renames)
    if clash:
        raise InputError(f"dataset '{name}' already has column(s) {', '.join(clash)} that --chat-columns maps onto")
    return ds.rename_columns(renames) if renames else ds


def column_hint(columns: set) -> str:
    """A --chat-columns example for a dataset's own column names."""
    answer = next((c for c in ("response", "answer", "output", "chosen") if c in columns), None)
    if "prompt" in columns and answer:
        return f"completion={answer}"
    if "question" in columns and answer:
        return f"prompt=question,completion={answer}"
    return f"text={min(columns)} or messages={min(columns)}"


def dataset_kind(ds, name: str) -> str:
    """'messages' (a conversation a row), 'prompt' (TRL's prompt+completion, plain or conversational), 'alpaca'
    (instruction/input/output) or 'text' (plain documents)."""
    columns = set(ds.column_names)
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if "text" in columns:
        return "text"
    raise InputError(
        f"dataset '{name}' has none of the columns we train on: 'text' (documents), 'messages' or 'conversations' "
        f"(chat), 'prompt'+'completion', 'instruction'+'output'; it has {', '.join(sorted(columns))} "
        f"(name yours with --chat-columns, e.g. {column_hint(columns)})"
    )


def text_problem(value) -> str | None:
    """Why a text field cannot be trained ('null', 'not a string', 'empty'), or None when it can."""
    if value is None:
        return "null"
    if not isinstance(value, str):
        return "not a string"
    return None if value.strip() else "empty"


def tokenize_documents(batch: dict, tokenizer) -> dict:
    """Token ids of each document, ending in EOS (what tells a model reading packed text that a document ended). A
    row whose text is null, not a string or empty gets no tokens and the reason in `skipped` (counted at packing)."""
    eos = tokenizer.eos_token_id
    problems = [text_problem(t) for t in batch["text"]]
    texts = [t for t, p in zip(batch["text"], problems, strict=True) if p is None]
    good = iter(tokenizer(texts)["input_ids"] if texts else [])
    ids = [[] if p else next(good) for p in problems]
    return {
        "input_ids": [x if not x or x[-1] == eos else x + [eos] for x in ids],
        "skipped": [f"'text' is {p}" if p else "" for p in problems],
    }


def segment_positions(starts: np.ndarray) -> np.ndarray:
    """(blocks, seq) positions that restart at 0 wherever `starts` is True (each segment's first token) and at
    column 0. Given as position_ids, they make transformers (sdpa/eager: a block-diagonal mask; flash/flex
    attention: varlen segments) keep each document's attention and RoPE positions to itself."""
    idx = np.broadcast_to(np.arange(starts.shape[1], dtype=np.int32), starts.shape)
    return idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)


def block_labels(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The labels with every segment's first token masked: its prediction would cross from the end of the previous
    document or conversation (labels are shifted by the loss, so label t is predicted at t - 1). Text blocks pass their
    tokens; chat blocks their assistant-only labels, which a template that opens inside an assistant span would
    otherwise leave trained at position 0."""
    return labels.masked_fill(position_ids == 0, -100)


# The packers: how tokenized rows become training blocks. Each has one interface, which write_packed drives:
#   pack(table) -> blocks    an Arrow batch of tokenized rows -> the blocks it completes ({column: rows})
#   finish() -> blocks       what is left at the end of the data
#   stats() -> dict          its counts, for info.json and the start-up line (describe_packing)
#   columns, version         the block columns it writes; `version` goes into the cache key (data_cache_key), so
#                            changing what a packer writes and bumping it is all it takes to re-pack old caches
#   settings                 what else it was built with, also in the cache key
# packer_for picks one for a dataset.


class TextPacker:
    """Concatenates documents into full `seq_length` blocks with per-document positions.

    The unfinished block carries over from one batch of documents to the next, so the whole dataset loses at most its
    last partial block, and the blocks do not depend on how the documents were batched or how many workers
    tokenized them. A document cut at a block boundary continues in the next block from position 0.
    """

    version = "pack-v5"
    columns = ("input_ids", "position_ids")
    settings = "drop_long=False"

    def __init__(self, seq_length: int):
        self.seq_length = seq_length
        self.tokens = np.zeros(0, dtype=np.int32)
        self.starts = np.zeros(0, dtype=bool)

    def pack(self, table) -> dict[str, np.ndarray]:
        return self.add(*list_columns(table, "input_ids"))

    def finish(self) -> dict:
        return {}  # the partial last block is dropped: it would need padding

    def stats(self) -> dict:
        return {"dropped_tokens": self.leftover}

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
        """Documents given as their concatenated tokens and lengths -> the blocks they complete."""
        starts = np.zeros(len(flat), dtype=bool)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        starts[offsets[lengths > 0]] = True
        tokens = np.concatenate([self.tokens, flat.astype(np.int32, copy=False)])
        starts = np.concatenate([self.starts, starts])
        n = len(tokens) // self.seq_length
        full = n * self.seq_length
        self.tokens, self.starts = tokens[full:], starts[full:]
        shape = (n, self.seq_length)
        return {
            "input_ids": tokens[:full].reshape(shape),
            "position_ids": segment_positions(starts[:full].reshape(shape)),
        }

    @property
    def leftover(self) -> int:
        """Tokens of the partial block that the end of the data leaves (dropped: it would need padding)."""
        return len(self.tokens)


def pack_sequences(token_lists: list[list[int]], seq_length: int) -> tuple[list[list[int]], list[list[int]], int]:
    """(blocks, their positions, dropped tokens) of some documents: TextPacker on one batch, for tests and tools."""
    packer = TextPacker(seq_length)
    lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
    flat = np.array([t for tokens in token_lists for t in tokens], dtype=np.int32)
    blocks = packer.add(flat, lengths)
    return blocks["input_ids"].tolist(), blocks["position_ids"].tolist(), packer.leftover


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# What ShareGPT and function-calling sets call the roles that chat templates know.
ROLE_ALIASES = {
    "human": "user",
    "gpt": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "function": "tool",
}
CHAT_COLUMNS = ("messages", "prompt", "completion", "instruction", "input", "output", "text")


def parse_chat_columns(spec: str) -> dict:
    """--chat-columns 'messages=dialog,role=speaker,assistant=agent' -> {"columns": {theirs: ours}, "role": key,
    "content": key, "roles": {theirs: ours}}."""
    out = {"columns": {}, "role": None, "content": None, "roles": {}}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        ours, sep, theirs = (x.strip() for x in item.partition("="))
        if not sep or not ours or not theirs:
            raise InputError(f"--chat-columns: '{item}' is not NAME=YOURS (e.g. messages=dialog)")
        if ours in CHAT_COLUMNS:
            out["columns"][theirs] = ours
        elif ours in ("role", "content"):
            out[ours] = theirs
        elif ours in CHAT_ROLES:
            out["roles"][theirs] = ours
        else:
            names = ", ".join((*CHAT_COLUMNS, "role", "content", *CHAT_ROLES))
            raise InputError(f"--chat-columns: unknown name '{ours}' (one of {names})")
    return out


class ExampleProblem(Exception):
    """Why one row cannot be trained: it is skipped and counted under this reason."""


def with_article(word: str) -> str:
    return f"{'an' if word[:1] in 'aeio' else 'a'} {word}"  # a user, an assistant


def drop_nulls(value):
    """`value` without the keys Arrow filled with null because other rows have them (a file's tool calls share one
    struct type, so each call would otherwise carry every other call's argument names as nulls)."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def parse_json_field(value, name: str):
    """A field that some formats store as a JSON string (ShareGPT's tools and function calls) as its value."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise ExampleProblem(f"'{name}' is a string but not JSON") from None


def text_of_parts(content):
    """OpenAI's content parts ([{"type": "text", "text": ...}]) as the text they hold; other content as it is."""
    if isinstance(content, list) and content and all(isinstance(p, dict) and "text" in p for p in content):
        if any(p.get("type", "text") != "text" for p in content):
            raise ExampleProblem("a message's content has parts that are not text")
        return "".join(p["text"] for p in content if isinstance(p["text"], str))
    return content


def tool_call_name(call) -> str | None:
    """The function name of a tool call, OpenAI's nested shape or a flat one."""
    if not isinstance(call, dict):
        return None
    fn = call.get("function")
    return fn.get("name") if isinstance(fn, dict) else call.get("name")


def normalize_messages(raw, keys: dict) -> list[dict]:
    """A row's messages as chat templates take them: role and content under those names, ShareGPT's from/value and
    role names mapped (its function_call turns as tool_calls), text content parts joined, keys that Arrow filled
    with null for this row dropped. ExampleProblem when the row is not a conversation we can train: a bad role or
    content, or no assistant reply at the end."""
    if not isinstance(raw, list) or not raw:
        raise ExampleProblem("'messages' is null or empty" if not raw else "'messages' is not a list")
    out = []
    for m in raw:
        if not isinstance(m, dict):
            raise ExampleProblem("a message is not an object")
        m = drop_nulls(m)
        sharegpt = "role" not in m and "from" in m
        name = m.pop(keys["role"] or ("from" if sharegpt else "role"), None)
        content = text_of_parts(m.pop(keys["content"] or ("value" if sharegpt else "content"), None))
        if not isinstance(name, str):
            raise ExampleProblem("a message has no role")
        role = keys["roles"].get(name, ROLE_ALIASES.get(name, name))
        if role not in CHAT_ROLES:
            raise ExampleProblem(
                f"a message's role '{role}' is unknown (name it with --chat-columns, e.g. assistant={role} or "
                f"user={role})"
            )
        if name == "function_call" and "tool_calls" not in m:  # ShareGPT: the call as JSON in the value
            call = parse_json_field(content, "function_call")
            m["tool_calls"], content = [{"type": "function", "function": call}], None
        if "tool_calls" in m:
            m["tool_calls"] = parse_json_field(m["tool_calls"], "tool_calls")
            if not isinstance(m["tool_calls"], list) or not all(tool_call_name(c) for c in m["tool_calls"]):
                raise ExampleProblem("an assistant message's 'tool_calls' is not a list of named calls")
        calls = m.get("tool_calls")
        if role == "assistant" and calls and content is None:
            content = ""  # a reply that only calls tools (OpenAI gives it null content); templates expect a string
        problem = text_problem(content)
        # An empty system prompt or tool result is data; an empty question or reply would train an empty answer.
        if problem and not (problem == "empty" and (role in ("system", "tool") or (role == "assistant" and calls))):
            raise ExampleProblem(f"{with_article(role)} message's 'content' is {problem}")
        out.append({"role": role, "content": content, **m})
    if out[-1]["role"] != "assistant":
        raise ExampleProblem("the conversation does not end with an assistant reply")
    return out


def alpaca_to_messages(instruction: str, input: str | None, output: str) -> list[dict]:
    prompt = f"{instruction}\n\n{input}" if input else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def render_chat(tokenizer, template: str | None, messages: list[dict], prompt: bool = False, tools=None) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=prompt
        )
    except Exception as e:  # noqa: BLE001 - a template's raise_exception, or its maths on this row's values
        raise ExampleProblem(f"the chat template cannot render it ({type(e).__name__}: {first_line(e)[:80]})") from e


def labelled_tokens(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of `text` and labels that keep the tokens starting inside `spans` (character ranges), -100 elsewhere.
    Characters are mapped to tokens through offsets, so BPE merges across a boundary cannot shift the mask."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tok if any(s <= a < e for s, e in spans) else -100
        for tok, (a, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return enc["input_ids"], labels


def reply_start(prompt: str, turn: str) -> int:
    """Where a reply starts in the conversation rendered through it: after the generation prompt, or where the two
    part when the template starts the turn otherwise (DeepSeek-R1's prompt opens <think>, its turns show none)."""
    return len(prompt) if turn.startswith(prompt) else len(os.path.commonprefix([prompt, turn]))


def chat_example(
    messages: list[dict], tokenizer, template: str | None, train_from: int = 0, train_all: bool = False, tools=None
) -> dict:
    """A conversation as training examples: {"ids", "labels", "parts" (each example's length), "hidden_reasoning",
    "departs"}.

    Each assistant reply (from message `train_from` on, but not one with OpenAI's "weight": 0) is trained from the end
    of the conversation rendered up to it with the generation prompt to the end of the conversation rendered through
    it: its reasoning and content as the template shows them, and its end-of-turn tokens, learned so the model stops.
    When the template renders every such prefix as a prefix of the whole conversation (ChatML), that is one example
    with all replies labelled. Templates that rewrite earlier turns once a later user turn follows (Qwen3: reasoning
    kept only after the last user query) give one example per reply instead: the conversation rendered through it, as
    the model saw it when writing that reply; the repeated context is the cost, reported at packing. Where the
    generation prompt is not how the template starts the turn (DeepSeek-R1's opens <think> but its turns show none),
    the reply is trained from where the two part, as the template writes the turn; counted in `departs`.
    --train-on all labels every token of the whole render. `tools` (the row's tool definitions) go to the template.
    """
    text = render_chat(tokenizer, template, messages, tools=tools)
    if train_all:
        ids, labels = labelled_tokens(tokenizer, text, [(0, len(text))])
        return {"ids": ids, "labels": labels, "parts": [len(ids)], "hidden_reasoning": 0, "departs": 0}
    turns, hidden, departs = [], 0, 0  # (the conversation rendered through a reply, where the reply starts in it)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < train_from or message.get("weight") == 0:
            continue
        prompt = render_chat(tokenizer, template, messages[:i], True, tools)
        turn = render_chat(tokenizer, template, messages[: i + 1], tools=tools)
        start = reply_start(prompt, turn)
        departs += start < len(prompt)
        reply = turn[start:]
        if any(tool_call_name(call) not in reply for call in message.get("tool_calls") or []):
            raise ExampleProblem("the chat template does not show an assistant's tool_calls")
        reasoning = message.get("reasoning_content")
        if not reasoning and "</think>" in message["content"]:  # reasoning written into the content
            reasoning = message["content"].split("</think>")[0].split("<think>")[-1]
        hidden += isinstance(reasoning, str) and bool(reasoning.strip()) and reasoning.strip() not in reply
        turns.append((turn, start))
    if all(text.startswith(turn) for turn, _ in turns):
        examples = [(text, [(start, len(turn)) for turn, start in turns])]
    else:
        examples = [(turn, [(start, len(turn))]) for turn, start in turns]
    out = {"ids": [], "labels": [], "parts": [], "hidden_reasoning": int(hidden), "departs": int(departs)}
    for example_text, spans in examples:
        ids, labels = labelled_tokens(tokenizer, example_text, spans)
        out["ids"] += ids
        out["labels"] += labels
        out["parts"].append(len(ids))
    return out


def completion_example(prompt: str, completion: str, tokenizer, train_all: bool = False) -> dict:
    """TRL's plain prompt/completion: the prompt's tokens (with the tokenizer's BOS), the completion's and EOS; the
    completion and EOS are trained (all with --train-on all). No chat template: the text is what the model sees."""
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"ids": p + c, "labels": (p if train_all else [-100] * len(p)) + c, "parts": [len(p) + len(c)],
            "hidden_reasoning": 0, "departs": 0}  # fmt: skip


def row_tools(row: dict):
    """The row's tool definitions (OpenAI's `tools` list, or ShareGPT's JSON string of it), for the template."""
    tools = drop_nulls(parse_json_field(row.get("tools"), "tools"))
    return tools or None


def row_messages(row: dict, kind: str, keys: dict) -> tuple[list[dict] | None, int]:
    """(the row's conversation, the index of its first message trained), or (None, 0) for a plain prompt/completion
    row. ExampleProblem when the row cannot be trained."""
    if kind == "prompt" and (isinstance(row["prompt"], str) or isinstance(row["completion"], str)):
        for name, value in (("prompt", row["prompt"]), ("completion", row["completion"])):
            problem = text_problem(value)
            if problem and not (name == "prompt" and problem == "empty"):  # no prompt: the completion is a document
                raise ExampleProblem(f"'{name}' is {problem}")
        return None, 0
    if kind == "alpaca":
        for name in ("instruction", "output"):
            if text_problem(row[name]):
                raise ExampleProblem(f"'{name}' is {text_problem(row[name])}")
        input_ = row.get("input")
        return alpaca_to_messages(row["instruction"], input_ if isinstance(input_, str) else None, row["output"]), 0
    if kind == "prompt":  # TRL's conversational form: the completion's replies are trained, not the prompt's
        if not isinstance(row["prompt"], list) or not isinstance(row["completion"], list):
            raise ExampleProblem("'prompt' and 'completion' are neither both text nor both lists of messages")
        return normalize_messages(row["prompt"] + row["completion"], keys), len(row["prompt"])
    return normalize_messages(row["messages"], keys), 0


def example_of_row(row: dict, kind: str, tokenizer, template: str | None, keys: dict, train_all: bool) -> dict:
    """One dataset row as its training example(s) (chat_example, completion_example) and its messages per role
    (CHAT_ROLES order). ExampleProblem when the row cannot be trained."""
    messages, train_from = row_messages(row, kind, keys)
    if messages is None:
        example = completion_example(row["prompt"], row["completion"], tokenizer, train_all)
        roles = {"user": 1, "assistant": 1}
    else:
        example = chat_example(messages, tokenizer, template, train_from, train_all, row_tools(row))
        roles = {r: sum(m["role"] == r for m in messages) for r in CHAT_ROLES}
    if all(label == -100 for label in example["labels"]):
        raise ExampleProblem("it has no assistant reply to train")
    example["roles"] = [roles.get(r, 0) for r in CHAT_ROLES]
    return example


def tokenize_chat_batch(batch: dict, tokenizer, template: str | None, kind: str, keys: dict, train_all: bool) -> dict:
    """The rows' examples (example_of_row), one output row per input row: a conversation trained one reply at a time
    keeps its examples concatenated, their lengths in `parts`. A row that cannot be trained gets no tokens and the
    reason in `skipped`, like tokenize_documents."""
    out = {
        "input_ids": [],
        "labels": [],
        "parts": [],
        "roles": [],
        "hidden_reasoning": [],
        "departs": [],
        "skipped": [],
    }
    for j in range(len(next(iter(batch.values())))):
        row = {k: v[j] for k, v in batch.items()}
        try:
            example, reason = example_of_row(row, kind, tokenizer, template, keys, train_all), ""
        except ExampleProblem as e:
            example = {"ids": [], "labels": [], "parts": [], "roles": [0] * len(CHAT_ROLES)}
            example.update(hidden_reasoning=0, departs=0)
            reason = str(e)
        out["input_ids"].append(example["ids"])
        out["skipped"].append(reason)
        for k in ("labels", "parts", "roles", "hidden_reasoning", "departs"):
            out[k].append(example[k])
    return out


def end_of_turn(ds, first: int, kind: str, tokenizer, template: str | None, keys: dict) -> str | None:
    """What follows an assistant's reply inside its trained span (ChatML: <|im_end|> and a newline; a plain
    completion: EOS), on the first row from `first` whose last reply has text: the tokens that teach the model to
    stop. None when no row of the first 100 shows it. InputError when the template writes nothing there: the model
    would never learn to end an answer."""
    for i in range(first, min(first + 100, len(ds))):
        try:
            messages, _ = row_messages(ds[i], kind, keys)
            if messages is None:
                return tokenizer.eos_token
            tools = row_tools(ds[i])
            prompt = render_chat(tokenizer, template, messages[:-1], True, tools)
            turn = render_chat(tokenizer, template, messages, tools=tools)
        except ExampleProblem:
            continue
        span = turn[reply_start(prompt, turn) :]
        reply = messages[-1]["content"].split("</think>")[-1].strip()  # what follows reasoning, however it is shown
        at = span.find(reply) if reply else -1  # the first: a short reply can also occur inside the end marker
        if at < 0:
            continue
        tail = span[at + len(reply) :]
        if not tail:
            raise InputError(
                "the chat template writes nothing after an assistant's reply inside its turn, so a model trained on "
                "it never learns to stop: end the assistant turn in the template (e.g. with {{ eos_token }})"
            )
        special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        if not special & set(tokenizer(tail, add_special_tokens=False)["input_ids"]):
            log.warning(
                f"An assistant turn ends with {tail!r}, which holds no special token of the tokenizer (its EOS is "
                f"{tokenizer.eos_token!r}): generation stops there only if your inference stops on that text"
            )
        return tail
    return None


class ChatPacker:
    """Greedy packing of (ids, labels) examples that never splits one across blocks; the rest of a block is padding
    (label -100) with positions of its own, so it is a segment like any example and no example attends to it.
    With `one_per_block`, every example gets a block of its own (--packing padded).

    An example longer than a block is truncated to the block, or dropped with `drop_long`; both are counted. One
    whose trained tokens all lie past the cut is dropped too (it would only cost compute) and counted apart.
    The open block carries over between batches, so the blocks do not depend on batching or worker count.
    Its tables are tokenized conversations (tokenize_chat_batch), whose messages per role it counts too.
    """

    version = "pack-v5"
    columns = ("input_ids", "position_ids", "labels", "num_tokens")

    def __init__(self, seq_length: int, pad_id: int, drop_long: bool = False, one_per_block: bool = False):
        self.seq_length, self.pad_id, self.drop_long = seq_length, pad_id, drop_long
        self.one_per_block = one_per_block
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.used = 0
        self.long_examples = self.long_tokens_lost = self.cut_untrained = 0
        self.conversations = dict(roles=dict.fromkeys(CHAT_ROLES, 0), per_reply=0, repeated_tokens=0,
                                  hidden_reasoning=0, departs=0)  # fmt: skip
        self.settings = f"drop_long={drop_long}" + ("|padded" if one_per_block else "")

    def pack(self, table) -> dict:
        ids, labels = list_columns(table, "input_ids")[0], list_columns(table, "labels")[0]
        parts, per_row = list_columns(table, "parts")
        count_conversations(table, parts, per_row, self.conversations)
        return self.add(document_pieces(ids, labels, parts, None))

    def stats(self) -> dict:
        return {**self.cuts(), **self.conversations}

    def cuts(self) -> dict:
        counts = {"long_examples": self.long_examples, "long_tokens_lost": self.long_tokens_lost}
        return {**counts, "cut_untrained": self.cut_untrained, **({"padded": True} if self.one_per_block else {})}

    def _close(self, out: dict) -> None:
        if not self.parts:
            return
        pad = self.seq_length - self.used
        ids = np.concatenate([p[0] for p in self.parts] + [np.full(pad, self.pad_id, dtype=np.int32)])
        labels = np.concatenate([p[1] for p in self.parts] + [np.full(pad, -100, dtype=np.int32)])
        positions = np.concatenate([np.arange(len(p[0]), dtype=np.int32) for p in self.parts] + [np.arange(pad)])
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(positions.astype(np.int32))
        out["num_tokens"].append(self.used)
        self.parts, self.used = [], 0

    @staticmethod
    def _empty() -> dict:
        return {"input_ids": [], "labels": [], "position_ids": [], "num_tokens": []}

    def add(self, examples) -> dict:
        """(ids, labels) arrays -> the blocks they complete, as lists of arrays."""
        out = self._empty()
        for ids, labels in examples:
            if len(ids) > self.seq_length:
                self.long_examples += 1
                drop = self.drop_long or not np.any(np.asarray(labels[1 : self.seq_length]) != -100)
                self.long_tokens_lost += len(ids) if drop else len(ids) - self.seq_length
                if drop:
                    self.cut_untrained += not self.drop_long
                    continue
                ids, labels = ids[: self.seq_length], labels[: self.seq_length]
            if self.used + len(ids) > self.seq_length or self.one_per_block:
                self._close(out)
            self.parts.append((np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)))
            self.used += len(ids)
        return out

    def finish(self) -> dict:
        out = self._empty()
        self._close(out)
        return out


class PaddedPacker(ChatPacker):
    """--packing padded: text documents one per block, a document longer than a block cut into consecutive
    block-sized pieces (as packing end to end cuts it at a block boundary), the rest padding; labels and a real-token
    count, so that padding is neither trained nor counted."""

    def __init__(self, seq_length: int, pad_id: int):
        super().__init__(seq_length, pad_id, one_per_block=True)

    def pack(self, table) -> dict:
        ids, lengths = list_columns(table, "input_ids")
        return self.add(document_pieces(ids, ids, lengths, self.seq_length))

    def stats(self) -> dict:
        return self.cuts()


def packer_for(kind: str, cfg: Config, pad_id: int):
    """The packer of a dataset of this kind (dataset_kind): conversations whole, text end to end or padded."""
    if kind != "text":
        return ChatPacker(cfg.seq_length, pad_id, cfg.drop_long_examples, one_per_block=cfg.packing == "padded")
    return PaddedPacker(cfg.seq_length, pad_id) if cfg.packing == "padded" else TextPacker(cfg.seq_length)


def pack_examples(examples, seq_length: int, pad_id: int, drop_long: bool = False, one_per_block: bool = False) -> dict:
    """ChatPacker over one list of examples, as lists (for tests and tools)."""
    packer = ChatPacker(seq_length, pad_id, drop_long, one_per_block)
    a, b = packer.add(examples), packer.finish()
    return {k: [x.tolist() if isinstance(x, np.ndarray) else x for x in a[k] + b[k]] for k in a}


def chat_template_for(cfg: Config, tokenizer) -> str | None:
    """--chat-template FILE, else the tokenizer's own template (None when there is neither)."""
    if not cfg.chat_template:
        return tokenizer.chat_template
    try:
        return Path(cfg.chat_template).read_text()
    except OSError as e:
        raise InputError(f"cannot read --chat-template {cfg.chat_template}: {e.strerror}") from None


def data_cache_key(dataset, tokenizer, seq_length: int, extra: str = "", packer=TextPacker) -> str:
    """Names the packed data by what determines it (`packer`'s version among it), so any run with the same inputs
    reuses it. The worker count is not part of it: the packers give the same blocks whatever it is."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tok_id = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    # datasets' fingerprint is private API and follows how a dataset was built, not what its files hold now (a
    # dataset re-made with --overwrite can keep it), so the Arrow files' size and mtime go into the key too.
    files = [
        (f["filename"], os.stat(f["filename"]).st_size, os.stat(f["filename"]).st_mtime_ns) for f in dataset.cache_files
    ]
    parts = [
        dataset._fingerprint,
        json.dumps(files),
        hashlib.sha256(tok_id.encode()).hexdigest(),
        str(seq_length),
        extra,
        packer.version,
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def load_datasets(cfg: Config, name: str, val_dataset: bool = True):
    """(train, validation or None) raw datasets of the source `name`: --val-dataset (if `val_dataset`), or a seeded
    --val-split of its documents."""
    columns = parse_chat_columns(cfg.chat_columns)["columns"]
    train = load_dataset_any(name, columns)
    if cfg.val_dataset:
        return train, load_dataset_any(cfg.val_dataset, columns) if val_dataset else None
    if cfg.val_split > 0:
        if len(train) < 2:
            raise InputError(f"--val-split needs at least 2 documents, dataset '{name}' has {len(train)}")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).numpy()
        n_val = max(1, round(len(train) * cfg.val_split))
        # keep_in_memory: the index mapping would otherwise be written into the user's dataset folder.
        return (
            train.select(np.sort(order[n_val:]), keep_in_memory=True),
            train.select(np.sort(order[:n_val]), keep_in_memory=True),
        )
    return train, None


def worker_count(num_docs: int) -> int | None:
    """Tokenizer processes: the CPUs this process may use (not the node's count under Slurm/cgroups), one per 2,000
    documents; None (in-process) for small data."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cpus, num_docs // 2000) or None


def list_columns(table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column of an Arrow table as (concatenated values, lengths), without Python objects per row."""
    col = table.column(name).combine_chunks()
    offsets = col.offsets.to_numpy()
    return col.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]], np.diff(offsets)


def document_pieces(ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray, size: int | None):
    """(ids, labels) of each concatenated document in turn, cut into consecutive pieces of at most `size` tokens
    (None: whole)."""
    for end, n in zip(np.cumsum(lengths), lengths, strict=True):
        for a in range(end - n, end, size or max(n, 1)):
            b = min(a + (size or n), end)
            yield ids[a:b], labels[a:b]


def write_packed(tokenized, packer, path: Path) -> dict:
    """Stream the tokenized rows in their order through `packer` into an Arrow file of blocks; returns the counts."""
    import pyarrow as pa
    import pyarrow.compute as pc

    s = packer.seq_length
    types = {"num_tokens": pa.int32()}
    schema = pa.schema([(c, types.get(c, pa.list_(pa.int32(), s))) for c in packer.columns])
    stats = {"examples": len(tokenized), "tokens": 0, "blocks": 0, "packed_tokens": 0}
    stats["trained_tokens"] = 0  # tokens that carry loss: labelled, and not a segment's first (block_labels)
    last_report = time.monotonic()

    def write(writer, blocks: dict) -> None:
        n = len(blocks.get("input_ids", ()))
        if n == 0:
            return
        arrays = []
        for c in packer.columns:
            if c == "num_tokens":
                arrays.append(pa.array(np.asarray(blocks[c], dtype=np.int32)))
            else:
                flat = np.asarray(blocks[c], dtype=np.int32).reshape(-1)
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, s))
        writer.write_batch(pa.record_batch(arrays, schema=schema))
        stats["blocks"] += n
        stats["packed_tokens"] += int(np.sum(blocks["num_tokens"])) if "num_tokens" in blocks else n * s
        trained = np.asarray(blocks["position_ids"]) != 0
        if "labels" in blocks:
            trained &= np.asarray(blocks["labels"]) != -100
        stats["trained_tokens"] += int(trained.sum())

    skipped, rows_seen = {}, 0
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, schema) as writer:
        for table in tokenized.with_format("arrow").iter(batch_size=10_000):
            if "first_kept_row" not in stats and "skipped" in table.column_names:
                kept = pc.equal(table.column("skipped"), "")
                if pc.any(kept).as_py():
                    stats["first_kept_row"] = rows_seen + int(pc.index(kept, True).as_py())
            table, rows_seen = drop_skipped(table, rows_seen, skipped), rows_seen + len(table)
            stats["tokens"] += int(list_columns(table, "input_ids")[1].sum())
            write(writer, packer.pack(table))
            if time.monotonic() - last_report > 30:
                log.info(f"Packed {stats['blocks']:,} blocks so far")
                last_report = time.monotonic()
        write(writer, packer.finish())
    stats["skipped"] = skipped
    return {"dropped_tokens": stats["tokens"] - stats["packed_tokens"], **stats, **packer.stats()}


def count_conversations(table, parts: np.ndarray, per_row: np.ndarray, stats: dict) -> None:
    """Add a tokenized chat batch's messages per role, the conversations trained one reply at a time and the context
    tokens that repeats (every example of such a conversation but its last, which is the whole conversation)."""
    import pyarrow.compute as pc

    roles = list_columns(table, "roles")[0].reshape(-1, len(CHAT_ROLES)).sum(axis=0)
    for role, n in zip(CHAT_ROLES, roles, strict=True):
        stats["roles"][role] += int(n)
    last = np.zeros(len(parts), dtype=bool)
    last[np.cumsum(per_row)[per_row > 0] - 1] = True
    stats["per_reply"] += int(np.sum(per_row > 1))
    stats["repeated_tokens"] += int(parts[~last].sum())
    for name in ("hidden_reasoning", "departs"):
        stats[name] += int(pc.sum(table.column(name)).as_py() or 0)


def drop_skipped(table, first_row: int, skipped: dict):
    """The rows of a tokenized Arrow batch that have tokens; the others are counted in `skipped` by reason, with the
    first such row's index (in the dataset) kept under "first"."""
    import pyarrow.compute as pc

    if "skipped" not in table.column_names:  # a cache written before rows were checked
        return table
    reasons = table.column("skipped")
    bad = pc.not_equal(reasons, "")
    if not pc.any(bad).as_py():
        return table.drop_columns(["skipped"])
    for reason, n in zip(
        *np.unique(reasons.filter(bad).to_numpy(zero_copy_only=False), return_counts=True), strict=True
    ):
        skipped[str(reason)] = skipped.get(str(reason), 0) + int(n)
    if "first" not in skipped:
        i = int(pc.index(bad, True).as_py())
        skipped["first"] = f"row {first_row + i}: {reasons[i].as_py()}"
    return table.filter(pc.invert(bad)).drop_columns(["skipped"])


def describe_skipped(skipped: dict) -> str:
    counts = {k: v for k, v in skipped.items() if k != "first"}
    if not counts:
        return ""
    reasons = ", ".join(f"{n:,} where {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{sum(counts.values()):,} rows skipped ({reasons}; first: {skipped['first']})"


def padding_share(stats: dict, cfg: Config) -> float:
    return 1 - stats["packed_tokens"] / max(stats["blocks"] * cfg.seq_length, 1)


def describe_packing(stats: dict, role: str, cfg: Config) -> str:
    kept = 100 * stats["packed_tokens"] / max(stats["tokens"], 1)
    line = (
        f"{role}: {stats['examples']:,} examples, {stats['tokens']:,} tokens -> {stats['blocks']:,} blocks of "
        f"{cfg.seq_length}; {stats['packed_tokens']:,} tokens packed ({kept:.2f}%), {stats['dropped_tokens']:,} dropped"
    )
    if stats.get("skipped"):
        line += f"; {describe_skipped(stats['skipped'])}"
    if stats.get("padded"):
        line += (
            f"; one document per block (--packing padded): {padding_share(stats, cfg):.1%} of the tokens are padding"
        )
    if stats.get("long_examples"):
        how = (
            "dropped (--drop-long-examples)"
            if cfg.drop_long_examples
            else "truncated (--drop-long-examples drops them)"
        )
        line += (
            f"; {stats['long_examples']:,} examples longer than --seq-length {cfg.seq_length} {how}, "
            f"{stats['long_tokens_lost']:,} tokens lost"
        )
        if stats.get("cut_untrained"):
            line += f" ({stats['cut_untrained']:,} dropped: no trained token before the cut)"
    if "trained_tokens" in stats:
        share = stats["trained_tokens"] / max(stats["packed_tokens"], 1)
        line += f"\n  trained: {stats['trained_tokens']:,} tokens carry loss ({share:.1%} of those packed)"
    roles = {role: n for role, n in stats.get("roles", {}).items() if n}
    if roles:
        line += "; messages: " + ", ".join(f"{n:,} {role}" for role, n in roles.items())
    if stats.get("end_of_turn") is not None:
        line += f"; a reply's trained span ends with {stats['end_of_turn']!r}"
    if stats.get("per_reply"):
        line += (
            f"; the chat template rewrites earlier turns, so {stats['per_reply']:,} conversations were trained one "
            f"reply at a time, each in the context the model had when writing it: {stats['repeated_tokens']:,} "
            f"context tokens repeated ({stats['repeated_tokens'] / max(stats['tokens'], 1):.1%} of the tokens)"
        )
    if stats.get("departs"):
        line += (
            f"; {stats['departs']:,} replies' generation prompt is not how the template starts their turn (e.g. it "
            "opens <think>), so they are trained from where the two part, as the template writes the turn"
        )
    if stats.get("hidden_reasoning"):
        line += f"; {stats['hidden_reasoning']:,} replies' reasoning is not shown by the chat template, so not trained"
    return line


def load_packed(cache: Path):
    import datasets

    return datasets.Dataset.from_file(str(cache / "blocks.arrow")).with_format("torch")


def build_packed_cache(cfg: Config, tokenizer, ds, role: str, kind: str, template: str | None, packer, cache: Path,
                       source: str = ""):  # fmt: skip
    """Tokenize (datasets.map over worker processes) then pack in one ordered pass into `cache`, atomically."""
    t0 = time.perf_counter()
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")  # unique across hosts too
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we parallelise with processes instead
        keys = parse_chat_columns(cfg.chat_columns)
        if kind == "text":
            fn = partial(tokenize_documents, tokenizer=tokenizer)
        else:
            train_all = cfg.train_on == "all"
            fn = partial(tokenize_chat_batch, tokenizer=tokenizer, template=template, kind=kind, keys=keys,
                         train_all=train_all)  # fmt: skip
        num_proc = worker_count(len(ds))
        log.info(f"Tokenizing {len(ds):,} {role} {kind} examples with {num_proc or 1} process(es) into {cache}")
        tokenized = ds.map(
            fn,
            batched=True,
            batch_size=1000,
            remove_columns=ds.column_names,
            num_proc=num_proc,
            # Keep map's scratch files out of the user's dataset folder, which may be read-only.
            cache_file_name=str(tmp / "map" / "tokenized.arrow"),
            desc=f"tokenize {role}",
        )
        hook_for_tests("sleep_in_prepare", 0)
        stats = write_packed(tokenized, packer, tmp / "blocks.arrow")
        del tokenized
        if stats.get("skipped") and sum(v for k, v in stats["skipped"].items() if k != "first") == len(ds):
            raise InputError(f"no {role} row can be trained: {describe_skipped(stats['skipped'])}")
        if stats["blocks"] == 0 and stats.get("long_examples"):
            raise InputError(
                f"no {role} example fits in --seq-length {cfg.seq_length}: {describe_packing(stats, role, cfg)}"
            )
        if stats["blocks"] == 0:
            raise InputError(
                f"the {role} data has {stats['tokens']:,} tokens, fewer than one block of --seq-length {cfg.seq_length}"
            )
        if stats["trained_tokens"] == 0:
            raise InputError(f"no token of the {role} data carries loss: {describe_packing(stats, role, cfg)}")
        if kind != "text":
            stats["end_of_turn"] = end_of_turn(ds, stats["first_kept_row"], kind, tokenizer, template, keys)
        info = {"role": role, "kind": kind, "dataset": source or cfg.dataset_name, "seq_length": cfg.seq_length}
        write_json_atomic(tmp / "info.json", {**info, "tokenizer": cfg.model_name, **stats})
        shutil.rmtree(tmp / "map")
        try:
            tmp.rename(cache)  # atomic: a reader sees no cache or a complete one
        except OSError:
            if not (cache / "info.json").is_file():
                raise
            # Another job on the same --save-dir (a sweep) built the same blocks and renamed first: use its cache.
            shutil.rmtree(tmp, ignore_errors=True)
            log.info(f"Another job finished the same {role} data cache first; using {cache}")
            return
        log.info(
            f"Packed in {time.perf_counter() - t0:.1f}s: {describe_packing(stats, source_label(role, source, cfg), cfg)}"
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def wait_for(ready, progress=None, limit_s: float = 0, what: str = "") -> None:
    """Poll `ready()` on the file system: briefly for short waits, then once a second (maybe a network file system).
    With `progress` (a value that changes while the awaited work advances) and `limit_s`, a wait that sees no change
    for `limit_s` seconds ends in a JobError saying `what` stalled."""
    poll, seen, changed = 0.02, None, time.monotonic()
    while not ready():
        if progress is not None and limit_s:
            now, value = time.monotonic(), progress()
            if value != seen:
                seen, changed = value, now
            elif now - changed > limit_s:
                raise RankStalled(f"{what} made no progress for {now - changed:.0f}s (--hang-timeout); rerun to retry")
        time.sleep(poll)
        poll = min(1.0, poll * 1.5)


def folder_bytes(pattern: Path) -> int:
    """Bytes in the files under the folders matching `pattern` (a glob in its parent): how far a writer has got."""
    total = 0
    for folder in pattern.parent.glob(pattern.name):
        # The writer renames or removes its folder when done, maybe in the middle of this walk: what is gone counts 0.
        with contextlib.suppress(OSError):
            for f in folder.rglob("*"):
                with contextlib.suppress(OSError):
                    total += f.stat().st_size if f.is_file() else 0
    return total


def source_label(role: str, source: str, cfg: Config) -> str:
    """'train', or in a mixture 'train <source name>', for the packing lines."""
    if SOURCE_SEP not in cfg.dataset_name:
        return role
    names = {s.path: s.name for s in parse_sources(cfg.dataset_name)}
    return f"{role} {names.get(source, Path(source).name)}"


def template_for(cfg: Config, tokenizer, ds, role: str, source: str = "") -> str | None:
    """The chat template a dataset is rendered with: None for text (plain prompt/completion text is trained as
    written); an InputError for conversations when there is none."""
    kind = dataset_kind(ds, role)
    chat = kind in ("messages", "alpaca") or (
        kind == "prompt" and getattr(ds.features["prompt"], "dtype", "") not in ("string", "large_string")
    )
    template = chat_template_for(cfg, tokenizer) if chat else None
    if chat and not template:
        raise InputError(
            f"the {role} data{f' {source}' if source else ''} is chat/instruction data but the tokenizer has no chat "
            "template; pass --chat-template configs/chatml.jinja (or another Jinja template)"
        )
    return template


def prepare_data(cfg: Config, d: Dist | None, tokenizer, ds, role: str, source: str = ""):
    """Tokenize and pack once into SAVE_DIR/.cache (rank 0, or `fsdp_train.py prepare` with no process group);
    every rank memory-maps the result.

    Text documents are concatenated with EOS and cut into full blocks; chat/instruction examples are rendered with
    the chat template, masked to the assistant turns and packed without splitting. Both carry per-document
    position_ids. The other ranks wait for the cache on the file system, not inside a collective, so tokenizing a
    big corpus is not bounded by --dist-timeout (SAVE_DIR must be shared by all nodes, as for checkpoints).
    """
    kind = dataset_kind(ds, role)
    template = template_for(cfg, tokenizer, ds, role, source)
    packer = packer_for(kind, cfg, pad_id_of(tokenizer))
    extra = f"{role}|{kind}|{template or ''}|{packer.settings}"
    if kind != "text":  # how conversations are tokenized
        extra += f"|columns={cfg.chat_columns}|train_on={cfg.train_on}"
    cache = Path(cfg.save_dir) / ".cache" / "tokenized" / data_cache_key(ds, tokenizer, cfg.seq_length, extra, packer)
    # Rank 0's view decides for all (a rank on another node may see a new folder later): one quick collective that
    # also names this job's failure marker, so a stale one is never read.
    decision = [cache.is_dir(), os.urandom(8).hex()]
    if d is not None:
        dist.broadcast_object_list(decision, src=0)
    cached, token = decision
    if cached:
        if d is None or d.is_main:
            info = json.loads((cache / "info.json").read_text())
            label = source_label(role, source, cfg)
            log.info(f"Using tokenized {role} data cache {cache}: {describe_packing(info, label, cfg)}")
        wait_for(cache.is_dir)
        return load_packed(cache)
    if d is None:
        build_packed_cache(cfg, tokenizer, ds, role, kind, template, packer, cache, source)
        return load_packed(cache)
    failed = cache.with_name(f"{cache.name}.failed-{token}")
    error = None
    if d.is_main:
        try:
            build_packed_cache(cfg, tokenizer, ds, role, kind, template, packer, cache, source)
        except Exception as e:  # noqa: BLE001 - re-raised on this rank after the other ranks are told
            error = e
            failed.parent.mkdir(parents=True, exist_ok=True)
            failed.write_text(first_line(e))
    else:
        # Rank 0's temp folder grows while it tokenizes and packs (datasets.map and the packer write as they go):
        # its growth is the progress a stuck rank 0 would stop making.
        wait_for(
            lambda: cache.is_dir() or failed.exists(),
            progress=partial(folder_bytes, cache.with_name(f"{cache.name}.tmp-*")),
            limit_s=cfg.hang_timeout * 60,
            what=f"rank 0, preparing the {role} data,",
        )
    raise_if_any_failed(error)  # everyone is here by now: a quick agreement
    if d.is_main:
        failed.unlink(missing_ok=True)
    return load_packed(cache)


def packed_tokens(blocks) -> int:
    """Real tokens in some packed blocks (a text block is full; a chat or padded one says how many it holds)."""
    if "num_tokens" in blocks.column_names:
        return int(np.sum(blocks.data.column("num_tokens").to_numpy()))
    return len(blocks) * len(blocks[0]["input_ids"])


def warn_if_split_is_uneven(fraction: float, train_tokens: int, val_tokens: int, name: str) -> None:
    """--val-split takes a fraction of the documents; when a few huge documents fall on one side, the tokens do not
    follow (a user's 19 MB corpus, issue #24: 2% of the documents held 17% of the tokens): say so, with the share."""
    share = val_tokens / max(train_tokens + val_tokens, 1)
    if not fraction / 2 <= share <= 2 * fraction:
        log.warning(
            f"--val-split {fraction} of {name}'s documents holds {share:.1%} of its tokens ({val_tokens:,}): "
            "evaluation will cost that much, and training loses them; pick another --seed or --val-split, or "
            "give --val-dataset"
        )


def load_sources(cfg: Config) -> list[tuple[Source, object, object]]:
    """(source, train, validation or None) raw datasets of each -d source; --val-dataset validates once, not per source."""
    sources = parse_sources(cfg.dataset_name)
    return [(s, *load_datasets(cfg, s.path, val_dataset=i == 0)) for i, s in enumerate(sources)]


def prepare_sources(cfg: Config, d: Dist | None, tokenizer, raw: list) -> tuple:
    """(training data, validation data or None), each source packed into its own cache (prepare_data): one source's
    blocks as ever, or a Mixture of them in its weights, validated on all sources' validation blocks together."""
    for s, t, v in raw:  # every source is checked before any is packed: a refused mixture writes nothing
        template_for(cfg, tokenizer, t, "train", s.path)
        if v is not None:
            template_for(cfg, tokenizer, v, "validation", s.path)
    train = [prepare_data(cfg, d, tokenizer, t, "train", s.path) for s, t, _ in raw]
    val = [(s, prepare_data(cfg, d, tokenizer, v, "validation", s.path)) for s, _, v in raw if v is not None]
    if cfg.val_split and (d is None or d.is_main):
        for (s, v), t in zip(val, train, strict=True):
            warn_if_split_is_uneven(cfg.val_split, packed_tokens(t), packed_tokens(v), s.path)
    if len(raw) == 1:
        return train[0], val[0][1] if val else None
    mixture = Mixture([s for s, _, _ in raw], train)
    if d is None or d.is_main:
        log.info(describe_mixture(mixture))
    unweighted = [dataclasses.replace(s, weight=None) for s, _ in val]
    return mixture, Mixture(unweighted, [v for _, v in val]) if len(val) > 1 else (val[0][1] if val else None)


FILLER = -1  # a batch index that stands for no block: a row that is computed but neither trained nor counted


def fetch_batch(data, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(input_ids, labels, position_ids, real tokens) of some packed blocks. Text blocks train on their tokens, chat
    blocks on their labels; in both, a segment's first token is never a target (block_labels). A FILLER index
    gives block 0 with every label masked: it keeps the batch's shape (and each rank's forwards, which FSDP's
    collectives need) where an epoch or an evaluation runs out of blocks, and adds no target and no token."""
    filler = torch.tensor([i == FILLER for i in indices])
    rows = data[[0 if i == FILLER else i for i in indices]]
    ids, positions = rows["input_ids"].long(), rows["position_ids"].long()
    labels = block_labels(rows["labels"].long() if "labels" in rows else ids, positions)
    labels[filler] = -100
    tokens = rows["num_tokens"] if "num_tokens" in rows else torch.full((len(indices),), ids.shape[1])
    return ids, labels, positions, int(tokens[~filler].sum())


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch to the device; on CUDA via pinned memory, so the copy is asynchronous and overlaps compute."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


@functools.lru_cache(maxsize=2)  # asked for every step: a permutation of millions of blocks takes ~0.1 s
def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of an epoch's blocks: seeded by epoch alone, the same on every rank and at any world size."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(num_samples, generator=g)


# A mixture: several training sources, `-d PATH[:WEIGHT]` repeated (or a YAML list), kept in --dataset-name joined by
# SOURCE_SEP. Each source is packed into its own cache exactly as a single dataset is, so blocks never mix sources
# and a new weight re-tokenizes nothing. Weights are shares of the blocks an epoch trains.
SOURCE_SEP = " + "


@dataclass(frozen=True)
class Source:
    name: str  # what its loss is logged as: the file or folder name without its suffix
    path: str
    weight: float | None  # None: no weight given (every source then trains its own blocks once an epoch)


def source_names(paths: list[str]) -> list[str]:
    """What each source's loss is logged as: its file name without .jsonl/.json/.parquet, or its folder's name; where
    two share one (data_to_hf.py outputs are often all called `dataset`), as many of their parent folders as tell
    them apart: corpus/dataset, chat/dataset."""
    parts = [Path(p).with_suffix("").parts if Path(p).suffix in DATA_FILES else Path(p).parts
             for p in paths]  # fmt: skip
    depth = [1] * len(paths)
    while True:
        names = ["/".join(x for x in p[-k:] if x != "/") for p, k in zip(parts, depth, strict=True)]
        clash = [i for i, n in enumerate(names) if names.count(n) > 1]
        if not clash:
            return names
        if all(depth[i] >= len(parts[i]) for i in clash):
            twins = [paths[i] for i in clash if names[i] == names[clash[0]]]
            same = len({Path(p).resolve() for p in twins}) == 1
            raise InputError(f"-d: {twins[0]} is given twice" if same else f"-d: {' and '.join(twins)} would both "
                             f"log as loss/{names[clash[0]]}: rename one")  # fmt: skip
        for i in clash:
            depth[i] = min(depth[i] + 1, len(parts[i]))


def parse_sources(spec: str) -> list[Source]:
    """--dataset-name as sources: 'a.jsonl:0.7 + corpus:0.3', or one dataset as ever. A weight is the text after the
    last ':' of an item that is not itself an existing path; all sources have one, or none does."""
    sources = []
    for item in (x.strip() for x in spec.split(SOURCE_SEP)):
        path, weight = item, None
        head, sep, tail = item.rpartition(":")
        if sep and head and not Path(item).exists():
            try:
                path, weight = head, float(tail)
            except ValueError:
                if SOURCE_SEP not in spec:  # one dataset, as ever: a ':' in its own name
                    return [Source(Path(item).name, item, None)]
                raise InputError(
                    f"-d {item}: the weight '{tail}' is not a number (PATH:WEIGHT, e.g. corpus:0.3)"
                ) from None
            if not (weight > 0 and math.isfinite(weight)):
                raise InputError(f"-d {item}: a weight must be a positive number, not {tail}")
        if not path:
            raise InputError(f"-d '{spec}': an empty source")
        sources.append(Source("", path, weight))
    if len(sources) > 1 and len({s.weight is None for s in sources}) > 1:
        raise InputError(f"-d {spec}: give every source a weight (PATH:WEIGHT), or none")
    names = source_names([s.path for s in sources])
    return [dataclasses.replace(s, name=name) for s, name in zip(sources, names, strict=True)]


def mixture_counts(sizes: list[int], weights: list[float] | None) -> list[int]:
    """Blocks each source gives one epoch. Without weights, its own blocks. With weights (shares of the epoch's
    blocks), the epoch is the shortest in which every source is seen whole at its share: the source that needs the
    most blocks for that is taken once, the others are repeated (a new order each pass) or, partly, sampled."""
    if weights is None:
        return list(sizes)
    total = sum(weights)
    length = max(n * total / w for n, w in zip(sizes, weights, strict=True))
    return [max(n, round(length * w / total)) for n, w in zip(sizes, weights, strict=True)]


@functools.lru_cache(maxsize=2)
def mixture_order(sizes: tuple[int, ...], weights: tuple[float, ...] | None, seed: int, epoch: int) -> torch.Tensor:
    """The order of an epoch's blocks over sources concatenated in the given order: a pure function of its arguments,
    the same on every rank and at any world size. One source is epoch_permutation exactly. Otherwise the sources'
    places in the order are a seeded shuffle of their counts (mixture_counts), and each source fills its places with
    its own blocks, one seeded permutation per pass."""
    if len(sizes) == 1:
        return epoch_permutation(sizes[0], seed, epoch)
    counts = mixture_counts(list(sizes), list(weights) if weights else None)
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    places = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(counts))[
        torch.randperm(sum(counts), generator=g)
    ]
    order = torch.empty(sum(counts), dtype=torch.int64)
    start = 0
    for i, (n, c) in enumerate(zip(sizes, counts, strict=True)):
        passes = [torch.randperm(n, generator=g) for _ in range(-(-c // n))]
        order[places == i] = torch.cat(passes)[:c] + start
        start += n
    return order


class Mixture:
    """Several sources' packed blocks as one dataset: index i is block i of the sources concatenated in order, len() is
    an epoch's blocks and order() its seeded order (mixture_order). Rows come with every column: a text source's
    labels are its tokens and its blocks are full."""

    def __init__(self, sources: list[Source], parts: list):
        self.sources, self.parts = sources, parts
        self.sizes = tuple(len(p) for p in parts)
        self.starts = np.cumsum((0, *self.sizes))
        self.weights = None if sources[0].weight is None else tuple(s.weight for s in sources)

    def __len__(self) -> int:
        return sum(mixture_counts(list(self.sizes), list(self.weights) if self.weights else None))

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        return mixture_order(self.sizes, self.weights, seed, epoch)

    def source_of(self, indices: list[int]) -> torch.Tensor:
        """The source of each block index (-1 for FILLER)."""
        idx = torch.tensor(indices, dtype=torch.int64)
        return torch.where(idx == FILLER, -1, torch.bucketize(idx, torch.from_numpy(self.starts[1:]), right=True))

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        which = np.searchsorted(self.starts, idx, side="right") - 1
        out = {}
        for k in np.unique(which):
            at = np.nonzero(which == k)[0]
            rows = self.parts[k][(idx[at] - self.starts[k]).tolist()]
            ids = rows["input_ids"]
            columns = {"input_ids": ids, "position_ids": rows["position_ids"], "labels": rows.get("labels", ids),
                       "num_tokens": rows.get("num_tokens", torch.full((len(at),), ids.shape[1]))}  # fmt: skip
            for name, value in columns.items():
                if name not in out:
                    out[name] = torch.zeros((len(idx), *value.shape[1:]), dtype=value.dtype)
                out[name][torch.from_numpy(at)] = value.to(out[name].dtype)
        return out


def epoch_order(data, seed: int, epoch: int) -> torch.Tensor:
    return data.order(seed, epoch) if isinstance(data, Mixture) else epoch_permutation(len(data), seed, epoch)


def describe_mixture(mixture: Mixture) -> str:
    """One line per source of a mixture (its blocks, weight, share of an epoch and passes over it), then the total."""
    counts = mixture_counts(list(mixture.sizes), list(mixture.weights) if mixture.weights else None)
    epoch = sum(counts)
    tokens = [packed_tokens(p) * c / n for p, n, c in zip(mixture.parts, mixture.sizes, counts, strict=True)]
    lines = [
        f"  {s.name}: {n:,} blocks, weight {s.weight if s.weight is not None else 'none'}, {c:,} blocks an epoch "
        f"({c / epoch:.1%} of the blocks, {t / sum(tokens):.1%} of the tokens), {c / n:.2f} passes"
        for s, n, c, t in zip(mixture.sources, mixture.sizes, counts, tokens, strict=True)
    ]
    return f"Mixture of {len(counts)} sources, {epoch:,} blocks ({sum(tokens):,.0f} tokens) an epoch:\n" + "\n".join(
        lines
    )


def rank_batch_indices(perm: torch.Tensor, offset: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    """Sample indices of one rank's batch for the global batch that starts at `offset` in this epoch's order,
    FILLER where the epoch has run out (its last global batch may be partial: no block is ever dropped).

    Rank r takes the r-th slice of the global batch. The data position is a global sample offset, so a resume
    continues exactly and, with another world size, without losing or repeating samples (unlike DistributedSampler,
    which cannot start mid-epoch).
    """
    start = offset + rank * batch_size
    mine = perm[start : start + batch_size].tolist()
    return mine + [FILLER] * (batch_size - len(mine))


def roll_epoch(state, num_samples: int) -> None:
    """Start the next epoch once this one's blocks are all taken (its last step took what was left of them)."""
    if state.offset >= num_samples:
        state.epoch, state.offset = state.epoch + 1, 0


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    offset: int = 0  # samples of this epoch's order already consumed, all ranks together


# ======================================================================================================================
# Optimizer and schedule


def lr_factor(
    step: int,
    warmup_steps: int,
    total_steps: int,
    min_ratio: float,
    kind: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """LR multiplier for the update after `step` finished steps: linear warmup, then `kind` (LR_SCHEDULES)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return LR_SCHEDULES[kind].decay(progress, min_ratio, decay_fraction)


def build_optimizer(model: torch.nn.Module, cfg: Config, d: Dist):
    """--optimizer (OPTIMIZERS) over the sharded parameters (weight decay on matrices only), one per parameter with
    --optimizer-in-backward. The LR is set before every step by set_lr() from the step count alone."""
    params = [p for p in model.parameters() if p.requires_grad]

    def make(params: list[torch.nn.Parameter], seed: int):
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        choice = OPTIMIZERS[cfg.optimizer]
        return choice.build(groups, cfg, seed, choice.fused_on_cuda and d.device.type == "cuda" and not cfg.cpu_offload)

    if cfg.optimizer_in_backward:  # one optimizer per parameter: each its own rounding-noise seed
        return OptimizerInBackward(params, lambda i, p: make([p], seed=cfg.seed * 1_000_003 + i))
    return make(params, seed=cfg.seed)


def schedule_for(cfg: Config, total_steps: int):
    """step -> LR multiplier for the update after `step` finished steps (a pure function: resume needs no state)."""
    return partial(
        lr_factor,
        warmup_steps=cfg.warmup_steps,
        total_steps=total_steps,
        min_ratio=cfg.min_lr_ratio,
        kind=cfg.lr_scheduler,
        decay_fraction=cfg.decay_fraction,
    )


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(optimizer, params: list[torch.Tensor], cfg: Config) -> torch.Tensor:
    """Clip, step and clear the gradients; returns the global gradient norm (before clipping)."""
    if isinstance(optimizer, OptimizerInBackward):  # already stepped inside backward
        return optimizer.grad_norm(cfg.replicate_degree)
    grad_norm = clip_grad_norm(params, cfg.max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def dcp_optimizers(optimizer):
    """What get_state_dict/set_state_dict take: the optimizer, or the per-parameter list of optimizer-in-backward."""
    return optimizer.optimizers if isinstance(optimizer, OptimizerInBackward) else optimizer


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global gradient L2 norm over all shards (one all-reduce), clipped to max_norm when max_norm > 0."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):  # each rank holds a partial norm of its shards
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


# ======================================================================================================================
# Checkpoints

STEP_DIR = re.compile(r"step-(\d+)")
COMPLETE = "COMPLETE"


@dataclass
class CheckpointMeta:
    """A checkpoint's meta.json: the one schema, written by seal_checkpoint and read by read_meta (the JSON keys are
    kept as earlier checkpoints wrote them, so every older checkpoint still resumes)."""

    state: TrainState  # where training stood after the step: step count, epoch, position in the epoch's order
    world_size: int
    grad_accum_steps: int
    schedule_steps: int | None  # steps the LR schedule spans (None: a checkpoint from before it was recorded)
    config: dict  # the Config the run had, as a dict
    time: str = ""

    def to_json(self) -> dict:
        return {
            "global_step": self.state.step,
            "epoch": self.state.epoch,
            "epoch_offset": self.state.offset,
            "world_size": self.world_size,
            "grad_accum_steps": self.grad_accum_steps,
            "schedule_steps": self.schedule_steps,
            "config": self.config,
            "time": self.time,
        }

    @classmethod
    def from_json(cls, obj: dict) -> CheckpointMeta:
        """Raises KeyError, TypeError or ValueError on a malformed meta.json."""
        if not isinstance(obj.get("global_step"), int) or not isinstance(obj.get("config"), dict):
            raise ValueError("meta.json has no integer global_step or no config")
        return cls(
            state=TrainState(step=obj["global_step"], epoch=int(obj["epoch"]), offset=int(obj["epoch_offset"])),
            world_size=int(obj["world_size"]),
            grad_accum_steps=int(obj.get("grad_accum_steps", 1)),
            schedule_steps=obj.get("schedule_steps"),
            config=obj["config"],
            time=str(obj.get("time", "")),
        )

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step when it was saved."""
        return self.config["batch_size"] * self.world_size * self.grad_accum_steps


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """`step-N` folders holding the COMPLETE marker (written last, so a killed save never counts), oldest first."""
    if not ckpt_root.is_dir():
        return []
    steps = [p for p in ckpt_root.iterdir() if STEP_DIR.fullmatch(p.name) and (p / COMPLETE).is_file()]
    return sorted(steps, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def find_latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = complete_checkpoints(ckpt_root)
    return found[-1] if found else None


def checkpoints_to_prune(ckpt_root: Path, keep_latest_k: int) -> list[Path]:
    complete = complete_checkpoints(ckpt_root)
    return complete[: max(0, len(complete) - max(1, keep_latest_k))]


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_writer(path: Path, step: int, rank: int, rank_files: dict[str, object]):
    """DCP's FileSystemWriter (files fsync'd) that, in the same call that writes this rank's shards, also writes
    this rank's own files (its RNG state) with fsync and passes the save's fault points. A background save thus
    sleeps, fails or dies exactly where a blocking one does, and its rank is done only when all its files are
    durable. Built on demand: importing DCP costs ~2 s that `--help` and the pure-function tests should not pay."""
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        def write_data(self, plan, planner):
            # Before any byte: an async save then writes its shards while later steps run, which a staged copy
            # that aliased the live parameters would get wrong (the bitwise tests rely on this).
            hook_for_tests("sleep_in_save", step, rank)
            written = super().write_data(plan, planner)
            for name, obj in rank_files.items():
                with open(path / name, "wb") as f:
                    torch.save(obj, f)
                    f.flush()
                    os.fsync(f.fileno())
            hook_for_tests("enospc_in_save", step, rank)
            return written

    return Writer(path)


def save_error_reason(error: BaseException | None) -> str:
    """The cause of a failed save in a few words. DCP reports a rank's failure to every rank as a
    CheckpointException holding each failed rank's exception; the first one's strerror is what the user needs."""
    failures = getattr(error, "failures", None)
    if failures:
        error = next(iter(failures.values()))[0]
    if error is None:
        return "another rank failed to write"
    return getattr(error, "strerror", None) or first_line(error)


@dataclass
class PendingSave:
    """A checkpoint whose files are being written into `tmp`: by now (blocking), or by DCP's background thread
    (`future`). Only seal_checkpoint turns it into step-N."""

    state: TrainState  # a copy: the loop's own state moves on while the files are written
    tmp: Path
    t0: float
    paused_s: float = 0.0  # what the training loop waited for (in the background case: the host copy only)
    background: bool = False
    future: Future | None = None
    error: BaseException | None = None

    def writing(self) -> bool:
        """This rank's background write has not finished yet (a local look: ranks agree on it in StopRequest)."""
        return self.future is not None and not self.future.done()

    def wait(self) -> BaseException | None:
        """Block until this rank's files are written (fsync'd); the error that stopped them, if any."""
        from torch.distributed.checkpoint.api import CheckpointException

        if self.future is not None:
            try:
                self.future.result()
            except (OSError, CheckpointException) as e:
                self.error = e
            self.future = None
        return self.error


class BackgroundWriter:
    """DCP's async_save, thread variant, on a process group of its own.

    Thread, not process: measured here (2 ranks, gloo, 2 shared cores, 256 MB per rank), the process variant's first
    save took 10-18 s instead of 1-2 s (it spawns a process that imports torch and joins a new process group) and
    the training slowed as much during later saves; its writer would outlive a killed worker (a kill -9 of the
    trainer leaves it writing next to the re-run) and could not hit our fault points in the worker.

    A group of its own: DCP plans the save and gathers its results with collectives from the background thread;
    on the training's group they would interleave with the training's all-reduces (mixed messages or a deadlock).
    """

    def __init__(self, d: Dist, timeout_minutes: float):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.group = dist.new_group(backend="gloo", timeout=timedelta(minutes=timeout_minutes))  # collective
        cuda = d.device.type == "cuda"
        # Staging in the calling thread (use_async_staging off): async_save returns only once the host copy is
        # complete, so the next optimizer step cannot change what is written. The stager reuses its host buffers
        # from save to save, which is safe because a save starts only after the previous one was sealed.
        self.stager = DefaultStager(
            StagingOptions(
                use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=cuda
            )
        )

    def start(self, state_dict: dict, writer) -> Future:
        import torch.distributed.checkpoint as dcp

        return dcp.async_save(state_dict, storage_writer=writer, process_group=self.group, async_stager=self.stager)

    def close(self) -> None:
        self.stager.close()


def checkpoint_state_dict(model, optimizer) -> dict:
    """What a checkpoint holds besides its per-rank RNG files and meta.json: the one layout that saves write and
    loads fill in place (DCP reshards it to the loading world size). Collective."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, dcp_optimizers(optimizer))
    return {"model": model_sd, "optim": optim_sd, "buffers": nonpersistent_buffers(model)}


def begin_save(cfg: Config, d: Dist, model, optimizer, state: TrainState, background: BackgroundWriter | None = None):
    """Collective: start writing step-N into a fresh `.tmp-step-N`: DCP shards and per-rank RNG, blocking, or
    (with `background`) from a host copy in DCP's background thread while training continues."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    t0 = time.perf_counter()
    tmp = cfg.exp_dir / "checkpoints" / f".tmp-step-{state.step}"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    pending = PendingSave(dataclasses.replace(state), tmp, t0)
    state_dict = checkpoint_state_dict(model, optimizer)
    writer = checkpoint_writer(tmp, state.step, d.rank, {f"rng-rank{d.rank}.pt": rng_state()})  # RNG of this step, now
    if background is not None:
        pending.future, pending.background = background.start(state_dict, writer), True
    else:
        try:
            dcp.save(state_dict, storage_writer=writer)
        except (OSError, CheckpointException) as e:
            pending.error = e
    pending.paused_s = time.perf_counter() - t0
    return pending


def seal_checkpoint(pending: PendingSave, cfg: Config, d: Dist, accum: int, schedule_steps: int) -> Path:
    """Collective, main thread: once every rank's files are on disk, rank 0 writes meta and the COMPLETE marker and
    renames the temp folder to step-N, then updates state.json and prunes. The one place a checkpoint becomes
    complete, for blocking and background saves alike.

    If any rank failed to write (disk full, I/O error), every rank learns it, the temp folder is removed and the
    previous checkpoints are left exactly as they were.
    """
    state, tmp = pending.state, pending.tmp
    root = tmp.parent
    final = root / f"step-{state.step}"
    error = pending.wait()
    if not all_ok(error is None):  # also the barrier: every rank's files are on disk before rank 0 seals them
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = find_latest_checkpoint(root)
        kept = f"{previous.name} is intact" if previous else "there is no earlier checkpoint"
        raise JobError(f"checkpoint at step {state.step} could not be saved ({save_error_reason(error)}); {kept}")
    if d.is_main:
        meta = CheckpointMeta(
            state, d.world_size, accum, schedule_steps, dataclasses.asdict(cfg), time.strftime("%Y-%m-%dT%H:%M:%S%z")
        )
        write_json_atomic(tmp / "meta.json", meta.to_json())
        (tmp / COMPLETE).write_text(f"{state.step}\n")
        fsync_dir(tmp)
        if final.exists():  # only after a fallback to an older checkpoint: replace, never mix
            trash = root / f".tmp-old-step-{state.step}"
            final.rename(trash)
            shutil.rmtree(trash)
        tmp.rename(final)
        fsync_dir(root)
        write_json_atomic(
            cfg.exp_dir / "state.json",
            {"global_step": state.step, "epoch": state.epoch, "checkpoint": str(final.relative_to(cfg.exp_dir))},
        )
        for old in checkpoints_to_prune(root, cfg.keep_latest_k):
            shutil.rmtree(old)
    dist.barrier()
    took = time.perf_counter() - pending.t0
    where = f", written in the background (training paused {pending.paused_s:.2f}s)" if pending.background else ""
    log.info(f"Saved checkpoint {final} in {took:.2f}s{where}")
    return final


def save_checkpoint(cfg: Config, d: Dist, model, optimizer, state: TrainState, accum: int, schedule_steps: int) -> Path:
    """Write step-N/ atomically and return once it is complete: DCP shards + per-rank RNG into a temp folder, then
    meta, marker, rename, prune."""
    return seal_checkpoint(begin_save(cfg, d, model, optimizer, state), cfg, d, accum, schedule_steps)


class Checkpointer:
    """Owns a run's checkpoints from its start to its end (as torchtitan's CheckpointManager does):
    - where to resume: candidates() before the model is built (the newest meta decides what is built and whether the
      rerun is the same job), then resume() once it is, falling back past a damaged checkpoint;
    - when to save: due();
    - what a checkpoint holds: checkpoint_state_dict, the one layout of save and load;
    - writing, sealing (meta, COMPLETE marker, atomic rename) and pruning: save() and wait(), with at most one save
      in flight. Blocking by default; with --async-checkpoint a save returns after the host copy and is sealed at a
      later step boundary, once every rank reports its files written (StopRequest).
    """

    @staticmethod
    def candidates(cfg: Config, d: Dist) -> tuple[list[Path], CheckpointMeta | None]:
        """Collective: the complete checkpoints to try, newest first (one with an unreadable meta.json is skipped), and
        the newest one's meta; then rank 0 removes what a killed job left (half-written saves, a control request).
        --resume-from PATH puts PATH first, until this run has saved checkpoints of its own after it."""
        own = [p for p in reversed(complete_checkpoints(cfg.exp_dir / "checkpoints"))]
        candidates, meta = [], None
        for path in own:
            found = read_meta(path)
            if found is None:
                log.warning(f"Skipping checkpoint {path}: meta.json is missing or unreadable")
            else:
                candidates.append(path)
                meta = meta or found
        if cfg.resume_from == "latest" and not candidates:
            raise InputError(
                f"--resume-from latest: {cfg.exp_dir / 'checkpoints'} holds no complete checkpoint to resume"
            )
        if cfg.resume_from not in ("", "latest") and not (meta and meta.config.get("resume_from") == cfg.resume_from):
            candidates, meta = resume_from_path(Path(cfg.resume_from), candidates)
        dist.barrier()  # every rank has listed the checkpoints before rank 0 cleans anything
        if d.is_main:
            clean_stale_temp(cfg)
            stale = take_control_request(cfg.exp_dir / "control.json")
            if stale:
                log.warning(f"Ignoring a stale control request '{stale}' left from an earlier job")
        return candidates, meta

    @staticmethod
    def resume(candidates: list[Path], d: Dist, model, optimizer) -> TrainState:
        """Load the newest checkpoint that loads on every rank; a corrupted one is skipped with a warning."""
        from torch.distributed.checkpoint.api import CheckpointException

        # The run's own problems, not the checkpoint's (falling back would skip every good one): out of memory, a
        # broken process group; DCP hands them over wrapped in a CheckpointException.
        own = (torch.OutOfMemoryError, dist.DistError)
        for path in candidates:
            error, fatal = None, None
            try:
                check_compatible(path, model)
                state = load_checkpoint(path, d, model, optimizer)
            except InputError:
                raise
            except own as e:
                fatal = e
            except CheckpointException as e:
                wrapped = [x for x, _ in e.failures.values() if isinstance(x, own)]
                fatal, error = (wrapped[0], None) if wrapped else (None, e)
            except (OSError, ValueError, RuntimeError, KeyError, EOFError) as e:
                error = e
            if isinstance(fatal, dist.DistError):
                raise fatal  # no collective can agree on it
            raise_if_any_failed(fatal)  # every rank stops, not only the one that ran out of memory
            if all_ok(error is None):
                log.info(f"Resuming from step {state.step} ({path})")
                return state
            why = first_line(error) if error else "unreadable on another rank"
            log.warning(f"Checkpoint {path} is damaged ({why}); falling back to the previous one")
        raise InputError(
            f"no checkpoint in {candidates[0].parent} could be loaded; move the folder away to start the run over"
        )

    def due(self, step: int, last: bool, requested: bool) -> bool:
        """Save after this step: every --ckpt-freq steps, at the run's last step, or when a signal or `control save`
        asked (`requested`)."""
        return bool(self.cfg.ckpt_freq and step % self.cfg.ckpt_freq == 0) or last or requested

    def __init__(self, cfg: Config, d: Dist, model, optimizer, accum: int, schedule_steps: int, heartbeat: Heartbeat):
        self.cfg, self.d, self.model, self.optimizer = cfg, d, model, optimizer
        self.accum, self.schedule_steps, self.heartbeat = accum, schedule_steps, heartbeat
        self.background = BackgroundWriter(d, cfg.dist_timeout) if cfg.async_checkpoint else None  # collective
        self.pending: PendingSave | None = None

    def writing(self) -> bool:
        return self.pending is not None and self.pending.writing()

    def save(self, state: TrainState) -> None:
        """Collective: seal the previous save first (waiting for its files), then start this one; a blocking save
        is sealed at once."""
        self.wait()
        self.pending = begin_save(self.cfg, self.d, self.model, self.optimizer, state, self.background)
        if self.background is None:
            self.wait()

    def seal_if_written(self, anyone_writing: bool) -> None:
        """Collective: seal the pending save once no rank is writing it any more (agreed in StopRequest.agreed)."""
        if self.pending is not None and not anyone_writing:
            self.wait()

    def wait(self) -> None:
        """Collective: wait for the pending save's files on this rank, then seal it (or stop the job if it failed).
        Before any exit and before the export, so that neither races with a background write."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        saved = seal_checkpoint(pending, self.cfg, self.d, self.accum, self.schedule_steps)
        self.heartbeat.beat(force=True, last_checkpoint=str(saved))

    def close(self) -> None:
        """Free the staging buffers, unless a save was abandoned mid-write (abort, NaN, an error): its thread may
        still read them, and the process is about to exit anyway. Its `.tmp-step-N` never becomes COMPLETE."""
        if self.background is not None and self.pending is None:
            self.background.close()


def read_meta(path: Path) -> CheckpointMeta | None:
    """A checkpoint's meta.json, or None when it is missing or unreadable (the checkpoint is then skipped)."""
    try:
        obj = json.loads((path / "meta.json").read_text())
        return CheckpointMeta.from_json(obj) if isinstance(obj, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_compatible(path: Path, model) -> None:
    """Refuse, before loading anything, a checkpoint whose tensors do not match this model (another model)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    saved = {
        k.removeprefix("model."): tuple(v.size)
        for k, v in FileSystemReader(str(path)).read_metadata().state_dict_metadata.items()
        if k.startswith("model.") and hasattr(v, "size")
    }
    wanted = {k: tuple(v.shape) for k, v in get_model_state_dict(model).items()}
    if saved == wanted:
        return
    missing = sorted(wanted.keys() - saved.keys())
    wrong = sorted(k for k in wanted.keys() & saved.keys() if wanted[k] != saved[k])
    detail = (
        f"{wrong[0]} is {list(saved[wrong[0]])} there but {list(wanted[wrong[0]])} here"
        if wrong
        else f"{len(missing)} of this model's tensors are missing there (e.g. {missing[0]})"
        if missing
        else f"it holds {len(saved.keys() - wanted.keys())} tensors this model does not have"
    )
    raise InputError(
        f"checkpoint {path} was saved from a different model: {detail}; "
        "use another --experiment-name or --save-dir to start a new run"
    )


def load_checkpoint(path: Path, d: Dist, model, optimizer) -> TrainState:
    """Restore model, optimizer, buffers (DCP reshards to this world size), data position and RNG.

    The LR needs no state: it is a function of the restored step count."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    meta = read_meta(path)
    if meta is None:
        raise ValueError("meta.json is missing or unreadable")
    state_dict = checkpoint_state_dict(model, optimizer)
    dcp.load(state_dict, checkpoint_id=path)  # in place; the buffers are the model's own tensors
    set_state_dict(model, dcp_optimizers(optimizer), model_state_dict=state_dict["model"],
                   optim_state_dict=state_dict["optim"])  # fmt: skip
    rng_file = path / f"rng-rank{d.rank}.pt"
    same_world = meta.world_size == d.world_size and rng_file.is_file()
    restore_rng(
        torch.load(rng_file, weights_only=True) if same_world else None, meta.config["seed"] + d.rank + meta.state.step
    )
    return dataclasses.replace(meta.state)


def restore_rng(state: dict | None, seed: int) -> None:
    """This rank's RNG streams from its checkpoint; what the checkpoint lacks is seeded from `seed` (per rank and
    step): everything after a world-size change, CUDA's stream when a CPU host wrote it (else every rank's dropout
    would draw the same default-seeded numbers)."""
    if state is None:
        torch.manual_seed(seed)  # CPU and every CUDA device
        return
    set_rng_state(state)
    if "cuda" not in state and torch.cuda.is_available():
        torch.cuda.manual_seed(seed)


def resume_from_path(path: Path, own: list[Path]) -> tuple[list[Path], CheckpointMeta]:
    """--resume-from PATH: the one checkpoint to resume. Refused where this experiment holds checkpoints of another
    line of steps (later ones of its own, or any of a run that did not start from PATH): they would mix with the new
    ones in one folder, one loss curve and one export."""
    meta = read_meta(path) if (path / COMPLETE).is_file() else None
    if meta is None:
        raise InputError(
            f"--resume-from {path}: not a complete checkpoint (a .../checkpoints/step-N folder holding COMPLETE and "
            "a readable meta.json)"
        )
    if own and own[0].resolve() != path.resolve():
        raise InputError(
            f"--resume-from {path}: this experiment already holds checkpoints of another line of steps (the newest "
            f"{own[0]}) that would mix with the resumed run: use another -e, or --fresh to move this one aside"
        )
    return [path], meta


def clean_stale_temp(cfg: Config) -> None:
    """Remove half-written checkpoint folders left by a job killed mid-save (rank 0, before anything is written)."""
    root = cfg.exp_dir / "checkpoints"
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            log.info(f"Removing incomplete checkpoint {p}")
            shutil.rmtree(p, ignore_errors=True)


# What a run trains on and with: a rerun that changes any of these is another job. Resuming the old one's checkpoint
# would mix two runs in one loss curve and one export, so it is refused unless --resume-from asks for it.
def fields_where(on_resume: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata["on_resume"] == on_resume)


RUN_IDENTITY = fields_where("refuse")  # what is trained
RUN_CADENCE = fields_where("ok")  # when it stops, logs or saves, or how fast, but no number it trains


def identity_changes(saved: dict, cfg: Config) -> list[str]:
    """The RUN_IDENTITY settings this run changes from the checkpoint's, as `--flag old -> new`."""
    now = dataclasses.asdict(cfg)

    def resolved(key: str, value):  # packing auto ran isolated unless it fell back (then padded was recorded)
        return "isolated" if key == "packing" and value == "auto" else value

    return [
        f"{flag_name(k)} {saved[k]!r} -> {now[k]!r}"
        for k in RUN_IDENTITY
        if k in saved and resolved(k, saved[k]) != resolved(k, now[k])
    ]


def config_changes(saved: dict, cfg: Config) -> list[str]:
    """The other settings that change the maths of a resumed run (not just when it stops, logs or saves)."""
    now = dataclasses.asdict(cfg)
    skip = set(RUN_IDENTITY) | set(RUN_CADENCE)
    return [
        f"{flag_name(k)} {saved[k]!r} -> {now[k]!r}" for k in now if k not in skip and k in saved and saved[k] != now[k]
    ]


def refuse_changed_run(meta: CheckpointMeta, path: Path, cfg: Config) -> None:
    """A plain rerun resumes the same job only: one that changes what is trained names the changes and the ways out."""
    changes = identity_changes(meta.config, cfg)
    if changes:
        raise InputError(
            f"{cfg.exp_dir} holds a run that trained with other settings ({path.name}): {'; '.join(changes)}. "
            f"Start a new run with another -e, start this one over with --fresh (the old run is moved aside, not "
            f"deleted), or continue its checkpoint with these changes with --resume-from latest"
        )


def schedule_change_causes(meta: CheckpointMeta, cfg: Config, global_batch: int) -> list[str]:
    """Why a resumed run's LR schedule no longer spans what the checkpoint's did, in the user's terms."""
    saved, causes = meta.config, []
    for key in ("max_steps", "num_epochs"):
        if saved.get(key) != getattr(cfg, key):
            causes.append(f"{flag_name(key)} {saved.get(key)} -> {getattr(cfg, key)}")
    if meta.global_batch != global_batch and not cfg.max_steps:
        causes.append(
            f"the global batch {meta.global_batch} -> {global_batch} sequences (--batch-size x ranks x micro-batches), "
            "so the rest of the data takes another number of steps"
        )
    return causes or ["the training data packed into another number of sequences"]


# ======================================================================================================================
# Telemetry


class PhaseTimer:
    """Per-phase wall time. On CUDA it records events and reads them only at log time, so steps never sync. A `host`
    phase (reading data) runs on the CPU while the GPU is still busy with queued work, which events around it would
    time instead: it takes the host clock everywhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def __call__(self, phase: str, host: bool = False):
        if self.cuda and not host:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self.pending.append((phase, start, end))

    def mean_ms(self, steps: int) -> dict[str, float]:
        """Mean milliseconds per step of each phase since the last call (synchronises CUDA once)."""
        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = {}
        for phase, start, end in self.pending:
            ms = (end - start) * 1e3 if isinstance(start, float) else start.elapsed_time(end)
            totals[phase] = totals.get(phase, 0.0) + ms
        self.pending.clear()
        return {f"time/{k}": v / steps for k, v in totals.items()}


class Throughput:
    """Tokens/s, ms per step and MFU over the steps since the last log line, checkpoint time left out; and the
    run's totals for the summary."""

    def __init__(self, run: Run):
        self.peak = device_peak_tflops(run.cfg, run.d.device)
        self.flops = flops_per_token(run.model.config, count_params(run.model), run.cfg.seq_length)
        self.world_size, self.first_step = run.d.world_size, run.state.step
        self.total_tokens, self.t_loop = 0, time.perf_counter()
        self.restart()

    def restart(self) -> None:
        self.start, self.steps, self.tokens, self.read_s = time.perf_counter(), 0, 0, 0.0

    def add(self, tokens: int, read_s: float = 0.0) -> None:
        self.steps, self.tokens, self.total_tokens = self.steps + 1, self.tokens + tokens, self.total_tokens + tokens
        self.read_s += read_s  # this rank's data reading, for the straggler check

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - t0

    def rates(self) -> tuple[float, float]:
        """(tokens/s, ms per step) of the window, all ranks' tokens together."""
        elapsed = time.perf_counter() - self.start
        return self.tokens / elapsed, elapsed * 1e3 / self.steps

    def mfu(self, tok_s: float) -> float:
        """Model FLOPs utilisation at `tok_s` (all ranks): per device, against its peak."""
        return self.flops * tok_s / self.world_size / (self.peak * 1e12)


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory (VmRSS) or its high-water mark (VmHWM), from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc field: the lifetime peak


def byte_size(b: float, width: int = 0) -> str:
    """Bytes in GiB, or MiB below a tenth of one, to two / one decimals."""
    return f"{b / 2**30:{width}.2f} GiB" if b >= 2**30 / 10 else f"{b / 2**20:{width}.1f} MiB"


def one_unit_bytes(num_params: int, cfg: Config, device: torch.device) -> int:
    """What one rank holds at the end of backward under --shard-unit model, beyond its shards: every parameter
    gathered and its unsharded gradient with the fp32 reduce-scatter buffer (memory_plan's "backward end")."""
    return num_params * (2 * cfg.compute_dtype(device).itemsize + 4)


def host_available_bytes() -> float:
    """MemAvailable of this host (inf where /proc/meminfo does not say)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return math.inf


def memory_baseline(device: torch.device) -> int:
    """Bytes in use before the model is built (on CPU: anonymous memory, see file_pages), with the CPU high-water mark
    reset, so that the logged mem/train_peak_gib counts what training itself holds (what `fsdp_train.py plan`
    estimates)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with contextlib.suppress(OSError):  # "5" resets VmHWM (Linux >= 4.0); without it the peak includes start-up
        Path("/proc/self/clear_refs").write_text("5")
    return rss_bytes() - file_pages()


def file_pages() -> int:
    """Resident file-backed pages (RssFile: library code, memory-mapped data), 0 where /proc has no such field.

    Not training memory: how many of a library's code pages a process maps when it first runs a kernel depends on
    the page cache (measured: +20 MiB in one venv, +35 MiB in a fresh copy of the same venv, for the same run, whose
    anonymous memory grew the same 31 MiB in both)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    return 0


def anon_peak() -> int:
    """The high-water mark of resident memory less the file-backed pages resident now (they only grow during a run,
    so at the peak there were at most these): the peak of what the process itself allocated."""
    return rss_bytes("VmHWM") - file_pages()


# Dense (no sparsity) peak TFLOP/s per device from the vendors' datasheets, matched against
# torch.cuda.get_device_name in this order: (pattern, bf16, fp32 without TF32). Others: --peak-tflops.
PEAK_TFLOPS = [
    (r"H100 NVL", 835.0, 60.0),
    (r"H100.*PCIe", 756.0, 51.2),
    (r"H100|H200", 989.4, 66.9),
    (r"A100", 312.0, 19.5),
    (r"L40S", 362.1, 91.6),
    (r"\bL4\b", 121.0, 30.3),
    (r"RTX 4090", 165.2, 82.6),
    (r"MI300X", 1307.4, 163.4),
    (r"B200", 2250.0, None),  # fp32 figures not in the tables we read: MFU left out unless --peak-tflops
    (r"A10G", 70.0, None),
]


def peak_tflops(device_name: str, dtype: torch.dtype) -> float | None:
    for pattern, bf16, fp32 in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return bf16 if dtype == torch.bfloat16 else fp32
    return None


def device_peak_tflops(cfg: Config, device: torch.device) -> float | None:
    """--peak-tflops, or the table's figure for this GPU and compute dtype; None (no MFU) when unknown."""
    if cfg.peak_tflops:
        return cfg.peak_tflops
    if device.type != "cuda":
        return None
    return peak_tflops(torch.cuda.get_device_name(device), cfg.compute_dtype(device))


def flops_per_token(config, num_params: int, seq_length: int) -> float:
    """Model FLOPs of training on one token (forward + backward), as PaLM's appendix B counts them:
    6 x N, N = the parameters taking part in matmuls (all but an untied input embedding, a table lookup), plus
    attention 12 x layers x (heads x head_dim) x seq_length. The attention term is the full S x S score matrix, as
    sdpa computes it under the packed mask: neither causal masking nor document boundaries are subtracted, so with
    flash-attention on short documents the figure is an upper bound. Activation-checkpointing recompute is not
    counted (MFU, not hardware FLOPs utilisation)."""
    embed = 0 if getattr(config, "tie_word_embeddings", False) else config.vocab_size * config.hidden_size
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_length
    return 6 * (num_params - embed) + attention


def memory_stats(device: torch.device, baseline: int = 0) -> dict[str, float]:
    gib = 2**30
    if device.type == "cuda":
        stats = {
            "mem/allocated_gib": torch.cuda.memory_allocated(device) / gib,
            "mem/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
            "mem/reserved_gib": torch.cuda.memory_reserved(device) / gib,
            "mem/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / gib,
            "mem/train_peak_gib": (torch.cuda.max_memory_allocated(device) - baseline) / gib,
        }
        torch.cuda.reset_peak_memory_stats(device)
        return stats
    return {
        "mem/rss_gib": rss_bytes() / gib,
        "mem/peak_rss_gib": rss_bytes("VmHWM") / gib,
        "mem/train_peak_gib": (anon_peak() - baseline) / gib,
    }


class Watchdog:
    """Per rank: ends the job when this rank's training loop has made no progress (a step, an evaluation batch, a
    checkpoint phase) for longer than the limit, so a stuck rank never holds the node until --dist-timeout, and says
    where everyone was.

    The limit is --hang-timeout, or 3x the slowest step seen when that is longer; a checkpoint save or the export,
    one long call that cannot report progress, gets 6x it. It is armed after the first step (compilation and the
    first collectives take what they take). When it fires, each rank writes its phase and every thread's Python
    stack to EXP/hang/rank-N.txt; rank 0 reads the others' files, logs one line naming the ranks that were not
    waiting for the others, writes status.json state "hung", and every rank exits with HANG_EXIT so that a rerun (or
    torchrun --max-restarts, or a Slurm requeue) resumes from the last complete checkpoint. A rank stuck without the
    interpreter (inside C code that holds the GIL) cannot run this thread: faulthandler's own C thread dumps its stacks
    to the log and exits a minute later.
    """

    PHASES = ("data", "step", "agreement", "evaluate", "checkpoint", "export")  # a step's, in the order of the loop
    LONG_PHASES = {"checkpoint": 6, "export": 6}

    def __init__(self, cfg: Config, d: Dist, heartbeat: Heartbeat):
        self.timeout, self.d, self.heartbeat = cfg.hang_timeout * 60, d, heartbeat
        self.folder = cfg.exp_dir / "hang"
        self.phase, self.step, self.slowest = "data", 0, 0.0
        self.last = self.step_start = time.monotonic()
        self.armed, self.done = False, threading.Event()
        self.thread = None
        if d.is_main:  # a marker an earlier hang left
            (self.folder / "reported").unlink(missing_ok=True)
        if self.timeout > 0:
            self.thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self.thread.start()

    def limit(self) -> float:
        return max(self.timeout, 3 * self.slowest) * self.LONG_PHASES.get(self.phase, 1)

    def progress(self, phase: str, step: int | None = None) -> None:
        now = time.monotonic()
        if phase == "data":
            self.step_start = now
        if step is not None:  # a step ended: its duration raises the limit for slow models
            if self.armed:
                self.slowest = max(self.slowest, now - self.step_start)
            self.step, self.armed = step, True
        self.phase, self.last = phase, now
        if self.armed and self.timeout > 0:
            faulthandler.dump_traceback_later(self.limit() + 60, exit=True)

    def close(self) -> None:
        self.done.set()
        if self.timeout > 0:
            faulthandler.cancel_dump_traceback_later()

    def _watch(self) -> None:
        while not self.done.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self.last
            if self.armed and idle > self.limit():
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rank-{self.d.rank}.txt", "w") as f:
            f.write(f"rank {self.d.rank}: step {self.step + 1}, phase {self.phase}, no progress for {idle:.0f}s\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        reported = self.folder / "reported"
        if self.d.is_main:
            line = self._who_stopped(idle)
            say(f"error: {line}")
            self.heartbeat.beat(force=True, state="hung", hang=line)
            reported.touch()
        else:  # the first rank to exit gets the others SIGTERMed by torchrun: leave rank 0 the time to report
            deadline = time.monotonic() + 15
            while not reported.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
        os._exit(HANG_EXIT)

    def _who_stopped(self, idle: float, wait: float = 10.0) -> str:
        """One line from the ranks' files: the ranks not waiting for the others are the ones that stopped."""
        deadline, phases = time.monotonic() + wait, {}
        while time.monotonic() < deadline and len(phases) < self.d.world_size:
            for r in range(self.d.world_size):
                path = self.folder / f"rank-{r}.txt"
                with contextlib.suppress(OSError, IndexError):
                    phases[r] = path.read_text().splitlines()[0].split("phase ", 1)[1].rsplit(", no progress", 1)[0]
            time.sleep(0.2)
        # Ranks move through a step's phases in order and then wait in a collective for the others: the ranks behind
        # are the ones that stopped. All in one phase: a collective nobody finished.
        order = {p: i for i, p in enumerate(self.PHASES)}
        behind = min((order.get(p, len(order)) for p in phases.values()), default=0)
        stuck = {r: p for r, p in phases.items() if order.get(p, len(order)) == behind}
        if len(stuck) == len(phases) == self.d.world_size:
            stuck = {}
        silent = [r for r in range(self.d.world_size) if r not in phases]
        named = ", ".join(f"rank {r} ({p})" for r, p in sorted(stuck.items()))
        if silent:
            named += (", " if named else "") + ", ".join(f"rank {r} (no report: stuck outside Python?)" for r in silent)
        return (
            f"no progress for {idle:.0f}s at step {self.step + 1} (limit {self.limit():.0f}s, --hang-timeout): "
            f"stopped: {named or f'every rank, in {phases.get(0)}'}; stacks in {self.folder}; the rerun resumes "
            "from the last complete checkpoint"
        )


HANG_EXIT = 3  # a rank's exit status when the hang watchdog ended the job


class Heartbeat:
    """SAVE_DIR/EXP/status.json, what `fsdp_train.py control status` reads: rank 0 rewrites it at log steps,
    checkpoints and the end, and otherwise at most every `every` seconds."""

    def __init__(self, path: Path, enabled: bool, start_step: int, stop_step: int, every: float = 5.0):
        import socket

        self.path, self.enabled, self.every, self.last = path, enabled, every, 0.0
        self.start_step, self.t0 = start_step, time.monotonic()
        self.fields = {"state": "running", "pid": os.getpid(), "host": socket.gethostname(), "step": start_step,
                       "total_steps": stop_step, "last_checkpoint": None}  # fmt: skip

    def beat(self, force: bool = False, **fields) -> None:
        self.fields.update(fields)
        now = time.monotonic()
        if not self.enabled or not (force or now - self.last >= self.every):
            return
        done = self.fields["step"] - self.start_step
        left = self.fields["total_steps"] - self.fields["step"]
        eta = (now - self.t0) / done * left if done > 0 else None
        write_json_atomic(self.path, {**self.fields, "eta_s": eta, "updated": time.time()})
        self.last = now


class _AboveTheBar:
    """A stream for the log handler while a tqdm bar is shown: lines are printed above the bar."""

    def write(self, text: str) -> None:
        from tqdm import tqdm

        if text.strip():
            tqdm.write(text.rstrip("\n"), file=sys.stdout)

    def flush(self) -> None:
        sys.stdout.flush()


class MetricsLogger:
    """The one place metrics go, one dict per log step: metrics.jsonl, TensorBoard (same keys) when installed, and
    a log line, or on a terminal a tqdm bar over optimizer steps. Everything here happens on rank 0 only."""

    def __init__(self, cfg: Config, enabled: bool, start_step: int, stop_step: int):
        self.path, self.enabled, self.writer, self.bar = cfg.exp_dir / "metrics.jsonl", enabled, None, None
        self.tensorboard = False
        self.seen: dict[str, float] = {}
        if not enabled:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops events a killed run logged after the checkpoint this run resumes from.
                self.writer = SummaryWriter(str(cfg.exp_dir / "tb"), purge_step=start_step + 1)
                self.tensorboard = True  # stays true after close(), for the summary
            except ImportError:
                log.info("TensorBoard logging is off: `pip install tensorboard` to get it")
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=stop_step, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stdout)
            for handler in log.handlers:  # other log lines go above the bar instead of through it
                handler.setStream(_AboveTheBar())

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")  # json writes floats with full precision (repr)
        for key, value in metrics.items():
            if key.startswith(("mem/peak", "val/", "loss")) or key in ("tok/s", "mfu"):
                self.seen[key] = max(value, self.seen.get(key, value)) if key.startswith("mem/") else value
            if self.writer is not None and key not in ("global_step", "total_steps"):
                self.writer.add_scalar(key, value, metrics["global_step"])
        if self.writer is not None:
            self.writer.flush()
        if self.bar is not None:
            postfix = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics['tok/s']:,.0f}"}
            if "mfu" in metrics:
                postfix["mfu"] = f"{metrics['mfu']:.1%}"
            if "val/loss" in metrics:
                postfix["val"] = f"{metrics['val/loss']:.4f}"
            self.bar.set_postfix(postfix, refresh=False)
            return
        times = " ".join(f"{k[5:]} {v:.1f}ms" for k, v in metrics.items() if k.startswith("time/"))
        mem = " ".join(f"{k[4:]} {v:.2f}" for k, v in metrics.items() if k.startswith("mem/"))
        val = f" | val_loss {metrics['val/loss']:.4f} val_ppl {metrics['val/ppl']:.2f}" if "val/loss" in metrics else ""
        each = " ".join(f"{k.removeprefix('loss/')} {v:.4f}" for k, v in metrics.items() if k.startswith("loss/"))
        each += "".join(f" val_{k[9:]} {v:.4f}" for k, v in metrics.items() if k.startswith("val/loss/"))
        val += f" | by source {each}" if each else ""
        mfu = f" | mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
        log.info(
            f"step {metrics['global_step']}/{metrics['total_steps']} | epoch {metrics['epoch']} | "
            f"loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | grad_norm {metrics['grad_norm']:.3f} | "
            f"tok/s {metrics['tok/s']:,.0f}{mfu}{val} | {times} | GiB {mem}"
        )

    def close(self) -> None:
        """Idempotent: the run's end closes it, and so does the loop's cleanup on any exit."""
        if self.bar is not None:
            self.bar.close()
            for handler in log.handlers:
                handler.setStream(sys.stdout)
        if self.writer is not None:
            self.writer.close()
        self.bar = self.writer = None


def run_summary(
    cfg: Config,
    metrics: MetricsLogger,
    first: int,
    last: int,
    tokens: str,
    tok_s: float,
    plotted: bool,
    mfu: float | None = None,
    head: str = "Done.",
) -> str:
    seen, exp = metrics.seen, cfg.exp_dir
    val = f", validation loss {seen['val/loss']:.4f}" if "val/loss" in seen else ""
    mean_mfu = f", MFU {mfu:.1%}" if mfu is not None else ""
    lines = [
        f"steps {first} -> {last} ({last - first} in this run), {tokens}",
        f"mean {tok_s:,.0f} tok/s{mean_mfu} (checkpoints and evaluation included)",
        f"final train loss {seen['loss']:.4f}{val}" + by_source(seen),
        "peak memory (rank 0) " + ", ".join(f"{k[4:]} {v:.2f} GiB" for k, v in seen.items() if k.startswith("mem/")),
        f"checkpoint {find_latest_checkpoint(exp / 'checkpoints')}",
        f"Hugging Face export {exp / 'hf'}",
        f"metrics {exp / 'metrics.jsonl'}" + (f", loss curve {exp / 'loss.png'}" if plotted else ""),
    ]
    if metrics.tensorboard:
        lines.append(f"TensorBoard: tensorboard --logdir {exp / 'tb'}")
    return f"{head}\n    " + "\n    ".join(lines)


def by_source(seen: dict) -> str:
    """A mixture's last loss of each source (train, and validation where evaluated), for the summary."""
    each = [f"{k[5:]} {v:.4f}" + (f" / {seen['val/' + k]:.4f}" if "val/" + k in seen else "")
            for k, v in seen.items() if k.startswith("loss/")]  # fmt: skip
    return f"; by source (train / validation): {', '.join(each)}" if each else ""


def plot_losses(metrics_path: Path, out: Path) -> bool:
    """loss.png of the whole run (all its starts; the last value logged for a step wins). Needs matplotlib."""
    try:
        from matplotlib.figure import Figure  # not pyplot: no GUI backend, ~0.25 s less CPU at the end of a run
    except ImportError:
        return False
    by_step = {m["global_step"]: m for m in map(json.loads, metrics_path.read_text().splitlines())}
    steps = sorted(by_step)
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(steps, [by_step[s]["loss"] for s in steps], label="train loss")
    val = [s for s in steps if "val/loss" in by_step[s]]
    if val:
        ax.plot(val, [by_step[s]["val/loss"] for s in val], "o-", label="validation loss")
    ax.set(xlabel="optimizer step", ylabel="loss (nats/token)", title=metrics_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)  # Agg, matplotlib's default canvas for a Figure made without pyplot
    return True


# ======================================================================================================================
# Hugging Face export


def export_dtype(cfg: Config, config) -> torch.dtype:
    """--export-dtype, auto: the base model's own dtype (its config's, usually bf16), else fp32."""
    if cfg.export_dtype != "auto":
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.export_dtype]
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32


def hf_files(state_dict: dict, max_bytes: int = 5 << 30) -> dict[str, int]:
    """Which model-0000i-of-N.safetensors file each tensor goes to: in order, a new file every ~5 GB."""
    mapping, index, size = {}, 1, 0
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()  # DTensor: the global size
        if size and size + nbytes > max_bytes:
            index, size = index + 1, 0
        mapping[name], size = index, size + nbytes
    return mapping


def tied_names(model: torch.nn.Module) -> set[str]:
    """Parameter names that are another name's tensor (lm_head.weight when tied to embed_tokens): stored once, and
    from_pretrained ties them again."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), clean_fqn(name))
    return {clean_fqn(n) for n, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != clean_fqn(n)}


def conversion_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """The model as transformers' save-time conversion must see it. fully_shard swaps the root's class for a generated
    FSDP<Class> whose module is torch's, which transformers takes for remote code and skips when it looks up the
    model's conversions; an unwrapped meta-device build of the same class and config has the same ones, and no memory."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return model
    name = type(model).__name__.removeprefix("FSDP")
    cls = next(c for c in type(model).__mro__ if c.__name__ == name)
    with torch.device("meta"):
        return cls(model.config)


def checkpoint_layout(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors under the names and shapes that `save_pretrained` writes. transformers 5 converts some checkpoints
    while loading (Mixtral, Qwen2-MoE: each block's per-expert weights fused into one tensor) and reverts that when
    saving, with `revert_weight_conversion` (the call save_pretrained makes); vLLM, transformers 4 and conversion tools
    read only the checkpoint layout. The identity for most models. Plain whole tensors, or meta ones to learn the
    layout; tied names already left out (as save_pretrained does first)."""
    from transformers.core_model_loading import revert_weight_conversion

    out = revert_weight_conversion(conversion_skeleton(model), dict(tensors))
    given = {id(t) for t in tensors.values()}  # only renamed: the same tensor; split: views of one storage, copied
    return {k: v if id(v) in given else v.clone(memory_format=torch.contiguous_format) for k, v in out.items()}


def converts_on_save(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether checkpoint_layout changes any name or shape, asked with meta tensors of the (global) shapes."""
    meta = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in tensors.items()}
    layout = checkpoint_layout(model, meta)
    return {k: tuple(t.shape) for k, t in layout.items()} != {k: tuple(t.shape) for k, t in meta.items()}


def base_generation_config(cfg: Config, config):
    """The base model's own generation settings (an instruct model's extra stop ids, its sampling defaults), else
    transformers' defaults for its config."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_folder(cfg.model_name) or cfg.model_name)
    except OSError:  # the base has no generation_config.json
        return GenerationConfig.from_model_config(config)


def remote_code_files(cfg: Config, config) -> list[Path]:
    """With --trust-remote-code: the base folder's Python files that config.auto_map names (modeling_x.py for
    "modeling_x.XForCausalLM") and the files they import relatively, so the export loads elsewhere. Code that auto_map
    takes from another repository ("org/repo--module.Class") is not in the folder; the export names it as the base
    did."""
    from transformers.dynamic_module_utils import get_relative_import_files

    folder = model_folder(cfg.model_name)
    if not cfg.trust_remote_code or folder is None:
        return []
    refs = [r for v in (getattr(config, "auto_map", None) or {}).values() for r in (v if isinstance(v, list) else [v])]
    files: set[Path] = set()
    for ref in refs:
        path = folder / f"{ref.split('.')[0]}.py" if ref and "--" not in ref else None
        if path is not None and path.is_file():
            files |= {path, *map(Path, get_relative_import_files(str(path)))}
    return sorted(files)


def write_hf_folder(tensors: dict, cfg: Config, out: Path, d: Dist | None = None) -> None:
    """A from_pretrained-loadable folder: safetensors files of ~5 GB with their index (the tensors as given: in the
    checkpoint layout, tied names left out), the config (use_cache on, the export dtype), the base model's generation
    config, its remote code (--trust-remote-code) and the tokenizer; written into a temp folder, renamed into place.

    With `d`, the tensors are DTensor shards and every rank writes its own slices (DCP's HuggingFaceStorageWriter),
    which rank 0 then consolidates into the final files from disk: no rank ever holds the whole model. Without, one
    process writes plain tensors.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    config = load_model_config(cfg.model_name, cfg.trust_remote_code)
    dtype = export_dtype(cfg, config)
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    tmp = out.with_name(f"{out.name}.tmp")
    is_main = d is None or d.is_main
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if d is not None:
        dist.barrier()  # the temp folder is fresh before anyone writes into it
    writer = HuggingFaceStorageWriter(
        str(tmp), fqn_to_index_mapping=hf_files(tensors), save_distributed=d is not None,
        enable_consolidation=d is not None,
    )  # fmt: skip
    dcp.save(tensors, storage_writer=writer, no_dist=d is None)
    if is_main:
        shutil.rmtree(tmp / "sharded", ignore_errors=True)  # the per-rank files, consolidated by now
        config.use_cache, config.dtype = True, dtype
        config.save_pretrained(tmp)
        base_generation_config(cfg, config).save_pretrained(tmp)
        for path in remote_code_files(cfg, config):
            shutil.copy2(path, tmp / path.name)
        tokenizer = load_tokenizer(cfg.model_name, cfg.trust_remote_code)
        if cfg.chat_template:
            tokenizer.chat_template = chat_template_for(cfg, tokenizer)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)


def export_hf(model, cfg: Config, d: Dist, out: Path) -> None:
    """Write the HF folder from the shards, every rank its own part (see write_hf_folder). A model whose checkpoint
    layout differs from its in-memory one (checkpoint_layout) needs whole tensors to convert: rank 0 gathers the
    model on the host and writes it alone (rank 0 then holds the whole model in host memory, in the master dtype)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    t0 = time.perf_counter()
    error = None
    tied = tied_names(model)
    try:
        shards = {k: v for k, v in get_model_state_dict(model).items() if k not in tied}
        if not converts_on_save(model, shards):
            write_hf_folder(shards, cfg, out, d)
        else:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # collective; rank 0 gets the tensors
            full = {k: v for k, v in get_model_state_dict(model, options=options).items() if k not in tied}
            if d.is_main:
                write_hf_folder(checkpoint_layout(model, full), cfg, out)
    except OSError as e:
        error = JobError(f"cannot write the Hugging Face export to {out}: {e.strerror or first_line(e)}")
    raise_if_any_failed(error)
    log.info(
        f"Exported Hugging Face model to {out} ({export_dtype(cfg, model.config)}) in {time.perf_counter() - t0:.1f}s"
    )


def export_checkpoint(checkpoint: Path, out: Path) -> None:
    """`fsdp_train.py export`: one process, no GPU, no process group; reads the DCP shards of any world size."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    if not checkpoint.is_dir():  # a pruned or mistyped step: name the ones there are
        there = ", ".join(p.name for p in complete_checkpoints(checkpoint.parent))
        raise InputError(f"{checkpoint} does not exist" + (f"; complete checkpoints there: {there}" if there else ""))
    meta = read_meta(checkpoint)
    if meta is None or not (checkpoint / COMPLETE).is_file():
        raise InputError(f"{checkpoint} is not a complete checkpoint (no COMPLETE marker or readable meta.json)")
    names = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in meta.config.items() if k in names})
    config = load_model_config(cfg.model_name, cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=param_dtype(cfg), trust_remote_code=cfg.trust_remote_code
        )
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty made new tensors: tied names must share one again (stored once)
    state = model.state_dict()
    dcp.load({"model": state}, checkpoint_id=checkpoint, no_dist=True)
    tied = tied_names(model)
    write_hf_folder(checkpoint_layout(model, {k: v for k, v in state.items() if k not in tied}), cfg, out)


# ======================================================================================================================
# Training


def check_writable(cfg: Config) -> None:
    """Fail early on a save dir we cannot write, without leaving a folder behind if the run is refused later."""
    created = not cfg.exp_dir.exists()
    try:
        cfg.exp_dir.mkdir(parents=True, exist_ok=True)
        probe = cfg.exp_dir / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
        if created:
            with contextlib.suppress(OSError):  # another rank may have removed it, or written into it, already
                cfg.exp_dir.rmdir()
    except OSError as e:
        raise InputError(f"cannot write to --save-dir {cfg.save_dir}: {e.strerror or first_line(e)}") from None


def count_steps(
    cfg: Config, num_samples: int, world_size: int, state: TrainState | None = None, accum: int = 1
) -> tuple[int, int]:
    """(steps per epoch, steps the LR schedule spans) for a run at `state`: --max-steps, else to the end of the last
    epoch. An epoch's last step takes the blocks that are left (fewer than a global batch), so no block is dropped.

    Counted from the data position, so a resume with another world size still ends at the end of the last epoch.
    """
    if num_samples == 0:
        raise InputError("the training data packed into no sequence at all: add data")
    state = state or TrainState()
    global_batch = cfg.batch_size * world_size * accum
    steps_per_epoch = math.ceil(num_samples / global_batch)
    if cfg.max_steps:
        return steps_per_epoch, cfg.max_steps
    total = state.step
    if state.epoch < cfg.num_epochs:
        left_in_epoch = math.ceil(max(0, num_samples - state.offset) / global_batch)
        total += left_in_epoch + (cfg.num_epochs - state.epoch - 1) * steps_per_epoch
    return steps_per_epoch, total


def run_length(cfg: Config, num_samples: int, world_size: int, state: TrainState, accum: int) -> tuple[int, int, int]:
    """(steps per epoch, steps the schedule spans, the step this job stops at)."""
    steps_per_epoch, total_steps = count_steps(cfg, num_samples, world_size, state, accum)
    return steps_per_epoch, total_steps, min(cfg.stop_at_step, total_steps) if cfg.stop_at_step else total_steps


def describe_length(
    cfg: Config, num_samples: int, global_batch: int, state: TrainState, lengths: tuple[int, int, int]
) -> str:
    """The start-up line on the run's length (run_length's steps per epoch, schedule, stop): the short last step of
    an epoch, what sets the schedule, where a resumed run stands, and where this job stops."""
    (steps_per_epoch, total, stop), last = lengths, num_samples % global_batch
    epoch = f"{steps_per_epoch} steps/epoch of global batch {global_batch}"
    epoch += f" (the last one takes the {last} sequences left; none dropped)" if last else " (none dropped)"
    spans = f"--max-steps {cfg.max_steps}" if cfg.max_steps else f"{cfg.num_epochs} epoch(s)"
    line = f"Length: {epoch}; LR schedule {total} steps ({spans})"
    if cfg.max_steps and cfg.max_steps > steps_per_epoch:
        line += f", {cfg.max_steps * global_batch / num_samples:.2f} passes over the data"
    if state.step:
        line += (
            f"; resuming after step {state.step}, at sequence {min(state.offset, num_samples):,} of epoch {state.epoch}"
        )
    return line + (f"; stopping at step {stop} (--stop-at-step)" if stop < total else "")


def short_schedule(cfg: Config, total_steps: int) -> str | None:
    """A warning when the warmup does not fit the schedule: the LR would never reach --lr (a small dataset, or a big
    batch, makes a short run of a default --warmup-steps)."""
    if cfg.warmup_steps <= total_steps:  # equal: the last step reaches --lr
        return None
    peak = cfg.lr * lr_factor(total_steps - 1, cfg.warmup_steps, total_steps, cfg.min_lr_ratio, cfg.lr_scheduler)
    return (
        f"--warmup-steps {cfg.warmup_steps} is longer than the schedule's {total_steps} step(s): the LR peaks at "
        f"{peak:.2e}, never --lr {cfg.lr:g}. Lower --warmup-steps, or train longer (--num-epochs, --max-steps)"
    )


def quiet_library_progress_bars() -> None:
    """Progress bars from datasets/transformers are noise in Slurm/CI logs; keep them only on a terminal."""
    if not sys.stderr.isatty():
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def raise_if_not_finite(bad: torch.Tensor, step: int, ckpt_root: Path) -> None:
    """Collective: stop, without saving, once any rank has seen a NaN/inf loss or gradient norm."""
    flag = bad.clone()
    dist.all_reduce(flag)
    if flag.item() > 0:
        last = find_latest_checkpoint(ckpt_root)
        kept = f"the last good checkpoint, {last.name}, is kept" if last else "no checkpoint was written"
        raise JobError(
            f"loss or gradient norm became NaN/inf by step {step}; stopped without saving it ({kept}). "
            "Lower --lr, keep --max-norm on, or check the data"
        )


def run_record(cfg: Config, d: Dist, state: TrainState) -> dict:
    """What it takes to trace and re-run this start of the job (one line per start in runs.jsonl)."""
    import subprocess

    import datasets
    import transformers

    here = Path(__file__).resolve().parent
    try:
        git = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty", "--abbrev=40"],
                             capture_output=True, text=True, timeout=10).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        git = None
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [sys.executable, *sys.argv],
        "start_step": state.step,
        "world_size": d.world_size,
        "device": str(d.device),
        "git_commit": git,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
        },
        "config": dataclasses.asdict(cfg),
    }


def eval_blocks(num_blocks: int, cap: int, seed: int) -> np.ndarray:
    """The validation blocks an evaluation reads: all of them, or (--eval-steps) the same seeded `cap` every time."""
    if not cap or cap >= num_blocks:
        return np.arange(num_blocks)
    return np.sort(np.random.default_rng(seed).permutation(num_blocks)[:cap])


@torch.no_grad()
def evaluate(model, data, cfg: Config, d: Dist, attn: str, watchdog: Watchdog | None = None) -> dict[str, float]:
    """Token-weighted loss over all validation blocks and ranks (not a mean of per-rank means).

    Every rank runs the same number of forwards (FSDP all-gathers in each one); a rank short of blocks fills in
    FILLER rows, which add nothing. No RNG is drawn, so training continues unchanged.
    """
    model.eval()
    blocks = eval_blocks(len(data), cfg.eval_steps * cfg.batch_size * d.world_size, cfg.seed)
    per_rank = math.ceil(len(blocks) / d.world_size)
    mine = blocks[d.rank :: d.world_size].tolist()
    mine += [FILLER] * (per_rank - len(mine))
    sources = data.sources if isinstance(data, Mixture) else []
    totals = torch.zeros(2, 1 + len(sources), dtype=torch.float64, device=d.device)  # loss sum, tokens: all, each
    for i in range(0, per_rank, cfg.batch_size):
        batch = mine[i : i + cfg.batch_size]
        ids, labels, positions, _ = fetch_batch(data, batch)
        RowLoss.armed = bool(sources)
        out = model(**inputs_to(model_inputs(ids, positions, attn, labels), d.device), num_items_in_batch=1)
        RowLoss.armed = False
        totals[0, 0] += out.loss.double()  # a sum: divided by 1
        totals[1, 0] += trained_targets(labels)
        if sources:
            add_source_losses(totals[:, 1:], data.source_of(batch), (labels[:, 1:] != -100).sum(1))
        if watchdog is not None:
            watchdog.progress("evaluate")
    dist.all_reduce(totals)
    model.train()
    reshard_all(model)
    loss, *each = (totals[0] / totals[1].clamp(min=1)).tolist()
    per_source = {f"val/loss/{s.name}": x for s, x in zip(sources, each, strict=True)}
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 700.0)), **per_source}


def check_inputs(cfg: Config, d: Dist) -> tuple[int, object]:
    """Collective: refuse, before anything is written, what cannot run; (micro-batches per step, tokenizer)."""
    error = None
    if d.is_main:  # one rank: the probe folder it may create and remove must not race with another rank's probe
        try:
            check_writable(cfg)
        except InputError as e:
            error = e
    raise_if_any_failed(error)
    limit = max_positions(load_model_config(cfg.model_name, cfg.trust_remote_code))
    if limit is not None and cfg.seq_length > limit:
        raise InputError(f"--seq-length {cfg.seq_length} exceeds the model's maximum of {limit} positions")
    accum = cfg.resolve_grad_accum(d.world_size)
    attn_implementation(cfg, d.device)  # an attention kernel this GPU (or a CPU host) cannot run
    if d.world_size % cfg.replicate_degree:
        raise InputError(f"--replicate-degree {cfg.replicate_degree} does not divide the world size {d.world_size}")
    return accum, load_tokenizer(cfg.model_name, cfg.trust_remote_code)


def warn_about_resume(meta: CheckpointMeta, cfg: Config, d: Dist, accum: int, total_steps: int) -> None:
    """Rank 0: what differs from the run that wrote the checkpoint: allowed, but said once, with its cause."""
    if not d.is_main:
        return
    global_batch = cfg.batch_size * d.world_size * accum
    if cfg.resume_from:
        for change in identity_changes(meta.config, cfg):
            log.warning(f"Resuming (--resume-from) with a changed setting: {change}")
    for change in config_changes(meta.config, cfg):
        log.warning(f"Resuming with a changed setting: {change}")
    if meta.schedule_steps is not None and meta.schedule_steps != total_steps:
        log.warning(
            f"The LR schedule now spans {total_steps} steps instead of {meta.schedule_steps}, because of "
            f"{'; '.join(schedule_change_causes(meta, cfg, global_batch))}: from step {meta.state.step} on, this run "
            "no longer equals an uninterrupted one"
        )
    if meta.world_size != d.world_size:
        log.warning(
            f"Checkpoint was saved by {meta.world_size} ranks, now {d.world_size}: global batch "
            f"{meta.global_batch} -> {global_batch} sequences; data continues at sample "
            f"{meta.state.offset} of epoch {meta.state.epoch} with nothing lost or repeated; per-rank RNG streams "
            "are re-seeded"
        )


def move_aside(cfg: Config, d: Dist) -> None:
    """Collective, --fresh: rank 0 renames an existing experiment folder to EXP.old-<date-time>; nothing is deleted."""
    if d.is_main and cfg.exp_dir.is_dir() and any(cfg.exp_dir.iterdir()):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = cfg.exp_dir.with_name(f"{cfg.exp_dir.name}.old-{stamp}")
        n = 1
        while aside.exists():
            aside, n = cfg.exp_dir.with_name(f"{cfg.exp_dir.name}.old-{stamp}-{n}"), n + 1
        cfg.exp_dir.rename(aside)
        log.info(f"--fresh: moved the previous run to {aside}; starting over")
    dist.barrier()


def record_start(cfg: Config, d: Dist, state: TrainState) -> None:
    """Rank 0, once nothing can refuse the run any more (a refused run leaves the experiment folder as it was):
    config.json and a line in runs.jsonl."""
    if d.is_main:
        cfg.exp_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cfg.exp_dir / "config.json", dataclasses.asdict(cfg))
        with open(cfg.exp_dir / "runs.jsonl", "a") as f:
            f.write(json.dumps(run_record(cfg, d, state)) + "\n")


@dataclass
class Run:
    """A started job: what prepare_run built and the training loop uses."""

    cfg: Config
    d: Dist
    data: object  # packed training blocks (load_packed)
    val_data: object | None
    model: torch.nn.Module
    attn: str  # the attention implementation the model runs (auto resolved): how batches tell it the documents
    optimizer: object
    schedule: Callable[[int], float]  # LR factor of a step
    state: TrainState  # where training stands; the loop advances it
    accum: int  # micro-batches per optimizer step
    total_steps: int  # what the LR schedule spans
    stop_step: int
    resumed_from: Path | None
    memory_base: int  # bytes in use before the model was built (memory_baseline)
    t_start: float

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.d.world_size * self.accum


def check_shared_save_dir(cfg: Config, d: Dist, wait: float = 5.0) -> None:
    """Collective: every rank sees a file rank 0 writes into --save-dir, or no rank goes on. Checkpoints, their
    COMPLETE markers and the packed-data cache assume one file system for all nodes: on node-local disks the other
    nodes would wait forever for rank 0's cache, and a rerun's ranks would disagree about where to resume. One error
    line from the first rank of every node that cannot see it, and from rank 0."""
    if d.world_size == 1:
        return
    token = [os.urandom(8).hex()]
    dist.broadcast_object_list(token, src=0)
    probe = Path(cfg.save_dir) / f".shared-check-{token[0]}"
    if d.is_main:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0])
    dist.barrier()
    deadline = time.monotonic() + wait  # a network file system may show a new file a moment later
    while not (seen := probe.is_file()) and time.monotonic() < deadline:
        time.sleep(0.2)
    blind = torch.zeros(d.world_size, dtype=torch.int32)
    blind[d.rank] = int(not seen)
    dist.all_reduce(blind)
    if d.is_main:
        probe.unlink(missing_ok=True)
    if blind.any():
        ranks = ", ".join(str(r) for r in blind.nonzero().flatten().tolist())
        message = (
            f"--save-dir {cfg.save_dir} is not one folder for every node: rank(s) {ranks} cannot see the file rank 0 "
            "wrote there; checkpoints and the data cache need a file system that every node shares"
        )
        if not seen and d.local_rank == 0 and not d.is_main:
            print(f"error: {message}", file=sys.stderr, flush=True)
        raise InputError(message)


@contextlib.contextmanager
def experiment_lock(cfg: Config, d: Dist):
    """Collective: rank 0 holds an exclusive lock on SAVE_DIR/EXP for the whole job, so that a second job on it (the
    same command started twice, another run given the same -e) is refused before it writes, instead of pruning the
    first one's checkpoints, interleaving its metrics and overwriting its export. An flock: the kernel drops it when
    the process dies, so a killed job leaves nothing stale (once rank 0's forked children, e.g. tokenizing workers,
    are gone too). Kept under .cache, so a refused job adds nothing to EXP. Needs an flock that spans nodes on shared
    storage (NFS does; Lustre with `localflock` only guards jobs whose rank 0 shares a node)."""
    import fcntl
    import socket

    fd, error = None, None
    if d.is_main:
        path = Path(cfg.save_dir) / ".cache" / "running" / f"{cfg.experiment_name}.lock"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode())
        except BlockingIOError:
            holder = path.read_text().strip() or "starting"  # the holder writes its line just after it locks
            error = InputError(
                f"{cfg.exp_dir} is in use by a running job ({holder}): wait for it to end, stop it (python "
                f"fsdp_train.py control stop {cfg.exp_dir}), or give this run another -e"
            )
        except OSError as e:  # a file system without flock (some network mounts): go on unguarded, and say so
            log.warning(f"Could not lock {path} ({first_line(e)}): a second job on {cfg.exp_dir} would not be refused")
            error = e
        if error is not None and fd is not None:
            os.close(fd)
            fd = None
    raise_if_any_failed(error if isinstance(error, InputError) else None)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # drops the lock


def prepare_run(cfg: Config, d: Dist, held: contextlib.ExitStack) -> Run | None:
    """Collective: check the inputs, take the experiment (experiment_lock, held by `held` until the job ends), prepare
    the data, find where to resume, build the sharded model and optimizer, record this start. None when the run is
    already complete."""
    t_start = time.perf_counter()
    autos = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) == "auto"]
    quiet_library_progress_bars()
    accum, tokenizer = check_inputs(cfg, d)
    check_shared_save_dir(cfg, d)
    held.enter_context(experiment_lock(cfg, d))
    log.info(f"Config {json.dumps(dataclasses.asdict(cfg))}")
    raw = load_sources(cfg)
    candidates, meta = ([], None) if cfg.fresh else Checkpointer.candidates(cfg, d)
    if meta is not None and cfg.packing == "auto" and meta.config.get("packing") == "padded":
        cfg.packing = "padded"  # as this run resolved it when it started (see isolation_problem below)
    if meta is not None and not cfg.resume_from:
        refuse_changed_run(meta, candidates[0], cfg)
    data, val_data = prepare_sources(cfg, d, tokenizer, raw)

    state = dataclasses.replace(meta.state) if meta else TrainState()
    steps_per_epoch, total_steps, stop_step = run_length(cfg, len(data), d.world_size, state, accum)
    if meta is not None:
        if state.step >= stop_step:
            paused = f", its --stop-at-step (the schedule has {total_steps})" if stop_step < total_steps else ""
            log.info(f"Run already complete at step {state.step}{paused} ({candidates[0]}); nothing to do")
            return None
        warn_about_resume(meta, cfg, d, accum, total_steps)

    import_model_code(cfg, d.device)
    memory_base = memory_baseline(d.device)
    model = build_model(cfg, d, load_pretrained=not candidates)
    optimizer = build_optimizer(model, cfg, d)
    if candidates:
        state = Checkpointer.resume(candidates, d, model, optimizer)
    else:
        torch.manual_seed(cfg.seed + d.rank)  # per-rank streams (dropout) that resume restores exactly
    problem = isolation_problem(model, cfg, d) if cfg.packing != "padded" else None
    if problem:
        if candidates:  # the blocks would change under the checkpoint's data position
            raise InputError(
                f"this run trained on packed blocks, which no longer keep documents apart here: start a new run (a "
                f"new -e) with --packing padded, or go back to the software that wrote {candidates[0]}"
            )
        cfg.packing = "padded"  # resolved once; config.json and checkpoints record it, so a rerun resumes padded
        data, val_data = prepare_sources(cfg, d, tokenizer, raw)
        steps_per_epoch, total_steps, stop_step = run_length(cfg, len(data), d.world_size, state, accum)
        parts = data.parts if isinstance(data, Mixture) else [data]
        padding = 1 - sum(map(packed_tokens, parts)) / (sum(map(len, parts)) * cfg.seq_length)
        if d.is_main:
            log.warning(f"{problem}: training on padded blocks instead (--packing auto), one document per block: "
                        f"{padding:.1%} of the trained block tokens are padding, compute spent on nothing")  # fmt: skip
    log.info(resolved_line(autos, cfg, d, model))
    log.info(
        f"{count_params(model):,} params, {len(data):,} sequences x {cfg.seq_length} tokens, world {d.world_size}, "
        f"{accum} micro-batch(es)/step, device {d.device}, compute {cfg.compute_dtype(d.device)}, "
        f"params {param_dtype(cfg)}"
    )
    lengths = (steps_per_epoch, total_steps, stop_step)
    log.info(describe_length(cfg, len(data), d.world_size * cfg.batch_size * accum, state, lengths))
    if problem := short_schedule(cfg, lengths[1]):
        log.warning(problem)
    if cfg.fresh:
        move_aside(cfg, d)
    record_start(cfg, d, state)
    resumed_from = candidates[0] if candidates else None
    schedule = schedule_for(cfg, total_steps)
    return Run(cfg, d, data, val_data, model, attn_implementation(cfg, d.device), optimizer, schedule, state, accum,
               total_steps, stop_step, resumed_from, memory_base, t_start)  # fmt: skip


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as the flags spell it (bf16, fp32), fp16 for the half an export may keep."""
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, str(dtype))


def resolved_line(autos: list[str], cfg: Config, d: Dist, model) -> str:
    """One line with what each flag left at auto became here (each resolved by its own function, once)."""
    from torch.distributed.fsdp import FSDPModule

    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    value = {
        "dtype": dtype_name(cfg.compute_dtype(d.device)),
        "attn_implementation": attn_implementation(cfg, d.device),
        "packing": "isolated" if cfg.packing == "auto" else cfg.packing,  # auto fell back to padded, or it held
        "shard_unit": "model" if units == 1 else "block",
        "export_dtype": dtype_name(export_dtype(cfg, model.config)),
    }  # --load-weights auto is decided by the weight files, a fresh run only: the "Loaded pretrained weights" line
    return "Resolved auto: " + ", ".join(f"{flag_name(name)} {value[name]}" for name in autos if name in value)


def next_batches(run: Run) -> tuple[list[dict], float, int, float, list]:
    """Collective: this rank's micro-batches of the next step, in the epoch's seeded order from the global sample
    offset (so any world size continues where another stopped), the loss divisor, the step's real tokens, the time
    this rank read for, and (a mixture) each micro-batch's rows as (source, trained targets)."""
    cfg, d, state = run.cfg, run.d, run.state
    roll_epoch(state, len(run.data))
    order = epoch_order(run.data, cfg.seed, state.epoch)
    batches, rows, tally = [], [], torch.zeros(2, dtype=torch.int64)  # trained targets, real (non-pad) tokens
    t0 = time.perf_counter()
    for m in range(run.accum):
        offset = state.offset + m * cfg.batch_size * d.world_size
        idx = rank_batch_indices(order, offset, cfg.batch_size, d.rank, d.world_size)
        hook_for_tests("batch", state.step + 1, d.rank, epoch=state.epoch, indices=idx)
        ids, labels, positions, real = fetch_batch(run.data, idx)
        tally += torch.tensor([int(trained_targets(labels)), real])
        if isinstance(run.data, Mixture):
            rows.append((run.data.source_of(idx), (labels[:, 1:] != -100).sum(1)))
        batches.append(inputs_to(model_inputs(ids, positions, run.attn, labels), d.device))
    hook_for_tests("slow_data", state.step + 1, d.rank)
    read_s = time.perf_counter() - t0  # this rank's own work, before the first collective makes ranks wait
    dist.all_reduce(tally)  # the step's totals over ranks (one small all-CPU sum)
    step_targets, step_tokens = tally.tolist()
    return batches, loss_divisor(step_targets, d.world_size), step_tokens, read_s, rows


def add_source_losses(tally: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor) -> None:
    """Add the rows of the forward just run (RowLoss) to `tally` (2 x sources: summed loss, trained targets). Filler
    rows (source -1) add zeros; no boolean indexing of device tensors and no blocking host-to-device copy, so no
    device sync in the step."""
    sources, targets = to_device(sources, tally.device), to_device(targets, tally.device)  # not a blocking copy
    keep = (sources >= 0).to(tally.dtype)
    at = sources.clamp(min=0)
    tally[0].index_add_(0, at, RowLoss.rows.detach().to(tally.dtype) * keep)
    tally[1].index_add_(0, at, targets.to(tally.dtype) * keep)


def train_step(run: Run, batches, divisor: float, lr: float, params, timer: PhaseTimer, rows=(), tally=None):
    """Collective: forward and backward over the micro-batches, then the optimizer step. Returns the rank's summed
    loss share and the global gradient norm, both still on the device (no host sync per step). A mixture's rows
    (next_batches) add each source's loss and targets to `tally`."""
    model, cfg = run.model, run.cfg
    set_lr(run.optimizer, lr)  # before backward: --optimizer-in-backward steps inside it
    loss_sum = torch.zeros((), device=run.d.device)
    for m, batch in enumerate(batches):
        if cfg.accumulate_unsharded:  # reduce-scatter once per step; FSDP keeps full gradients until then
            model.set_requires_gradient_sync(m == run.accum - 1)
        with timer("forward"):
            RowLoss.armed = bool(rows)
            loss = model(**batch, num_items_in_batch=divisor).loss
            RowLoss.armed = False
            if rows:
                add_source_losses(tally, *rows[m])
            hook_for_tests("crash", run.state.step + 1, run.d.rank)
        if hook_for_tests("nan_loss", run.state.step + 1, run.d.rank):
            loss = loss * float("nan")
        with timer("backward"):
            loss.backward()
        loss_sum += loss.detach()
    with timer("update"):
        grad_norm = optimizer_step(run.optimizer, params, cfg)
    return loss_sum, grad_norm


@dataclass
class StepEvents:
    """What every rank does after a step: agreed in one all-reduce (signals, control commands, background saves)
    plus each cadence, so that no rank acts alone."""

    stopped_by: str | None
    command: str | None
    writing: bool  # a rank is still writing a background checkpoint
    evaluate: bool
    log: bool
    save: bool


def step_events(run: Run, stop: StopRequest, ckpt: Checkpointer) -> StepEvents:
    """Collective (the one per-step all-reduce): what happens after the step that just ended."""
    cfg, step, last = run.cfg, run.state.step, run.state.step == run.stop_step
    control = cfg.exp_dir / "control.json" if run.d.is_main else None
    stopped_by, command, writing = stop.agreed(control, ckpt.writing())
    if command == "stop":
        stopped_by = "control stop"
    evaluate = run.val_data is not None and (last or bool(cfg.eval_freq and step % cfg.eval_freq == 0))
    log_now = step % cfg.log_freq == 0 or last or bool(stopped_by) or evaluate
    save = ckpt.due(step, last, requested=bool(stopped_by) or command == "save")
    return StepEvents(stopped_by, command, writing, evaluate, log_now, save)


def train(cfg: Config, d: Dist | None = None) -> None:
    """Run (or resume) the job described by `cfg` in this process; inside torchrun every rank calls it.

    Python API: `from fsdp_train import Config, train`. Joins the process group torchrun or the caller set up, or
    makes a 1-process one (and removes it at the end); see launch() for a multi-process job from a notebook.
    """
    cfg.validate()
    own_group = d is None
    d = d or setup_distributed(cfg.dist_timeout)
    try:
        with contextlib.ExitStack() as held:
            run = prepare_run(cfg, d, held)
            if run is not None:
                train_loop(run)
    finally:
        if own_group:
            teardown_distributed()


def train_loop(run: Run) -> None:
    """Collective: optimizer steps until the stop step, a signal or a control command; then the export and summary."""
    cfg, d, state = run.cfg, run.d, run.state
    stop, metrics, ckpt, watchdog = StopRequest(d.rank), None, None, None
    try:
        heartbeat = Heartbeat(cfg.exp_dir / "status.json", d.is_main, state.step, run.stop_step)
        heartbeat.beat(force=True, last_checkpoint=str(run.resumed_from) if run.resumed_from else None)
        metrics = MetricsLogger(cfg, d.is_main, state.step, run.stop_step)
        ckpt = Checkpointer(cfg, d, run.model, run.optimizer, run.accum, run.total_steps, heartbeat)
        params = [p for p in run.model.parameters() if p.requires_grad]
        timer, window = PhaseTimer(d.device), Throughput(run)
        not_finite = torch.zeros((), device=d.device)  # accumulated on device: no host sync per step
        sources = run.data.sources if isinstance(run.data, Mixture) else []
        by_source = torch.zeros(2, len(sources), dtype=torch.float64, device=d.device)  # loss, targets: log window
        watchdog, slow = Watchdog(cfg, d, heartbeat), {}
        log.info(f"Start-up took {time.perf_counter() - run.t_start:.1f}s")
        while state.step < run.stop_step:
            watchdog.progress("data")
            with timer("data", host=True):
                batches, divisor, step_tokens, read_s, rows = next_batches(run)
            hook_for_tests("hang", state.step + 1, d.rank)
            watchdog.progress("step")
            lr = cfg.lr * run.schedule(state.step)
            loss_sum, grad_norm = train_step(run, batches, divisor, lr, params, timer, rows, by_source)
            not_finite += (~torch.isfinite(loss_sum)).float() + (~torch.isfinite(grad_norm)).float()
            state.step, state.offset = state.step + 1, state.offset + run.global_batch
            window.add(step_tokens, read_s)
            metrics.step()

            watchdog.progress("agreement", step=state.step)
            events = step_events(run, stop, ckpt)
            if events.command == "abort":  # a background save still being written stays a .tmp-step-N
                heartbeat.beat(force=True, state="aborted", step=state.step)
                raise JobError(f"aborted by `fsdp_train.py control abort` at step {state.step}; nothing saved")
            if events.log or events.save:  # a NaN model is never logged as fine, or saved
                raise_if_not_finite(not_finite, state.step, cfg.exp_dir / "checkpoints")
            if events.log:
                record = step_record(run, loss_sum, lr, grad_norm, timer, window, slow, by_source)
                if events.evaluate:
                    t0 = time.perf_counter()
                    record.update(evaluate(run.model, run.val_data, cfg, d, run.attn, watchdog))
                    record["time/eval"] = (time.perf_counter() - t0) * 1e3
                metrics.log(record)
                heartbeat.beat(force=True, step=state.step, loss=record["loss"], **{"tok/s": record["tok/s"]})
                window.restart()
            heartbeat.beat(step=state.step)  # written every few seconds, and by each checkpoint sealed below
            watchdog.progress("checkpoint")
            with window.paused():  # checkpoint time is not training throughput
                ckpt.seal_if_written(events.writing)
                if events.save:
                    ckpt.save(state)
            if events.stopped_by:
                watchdog.progress("checkpoint")
                ckpt.wait()
                heartbeat.beat(force=True, state="stopped", stopped_by=events.stopped_by)
                log.info(f"Stopped by {events.stopped_by} at step {state.step}; checkpoint saved")
                return
        ckpt.wait()  # the final save is sealed before the export reads the model and before anyone exits
        watchdog.progress("export")
        finish(run, metrics, heartbeat, window)
    finally:
        stop.restore()
        if watchdog is not None:
            watchdog.close()
        if metrics is not None:
            metrics.close()
        if ckpt is not None:
            ckpt.close()


def step_record(
    run: Run, loss_sum, lr: float, grad_norm, timer: PhaseTimer, window: Throughput, slow: dict[int, int],
    by_source: torch.Tensor,
) -> dict:  # fmt: skip
    """Collective: one metrics.jsonl line for the steps since the last one (the loss of this step, means and rates
    over the window, a mixture's token-weighted loss per source over the window, the slowest rank's data reading).
    `slow` counts each rank's consecutive slow windows; `by_source` is emptied for the next window."""
    d = run.d
    # One all-reduce: the loss (each rank holds world_size x its share of the global token mean), each rank's
    # data-reading ms per step in its own place (the straggler check), and a mixture's per-source loss and targets.
    packed = torch.zeros(1 + d.world_size + by_source.numel(), dtype=torch.float64, device=d.device)
    packed[0] = loss_sum.double()
    packed[1 + d.rank] = window.read_s * 1e3 / max(window.steps, 1)
    packed[1 + d.world_size :] = by_source.flatten()
    dist.all_reduce(packed)
    loss_sum, read_ms = packed[0], packed[1 : 1 + d.world_size].tolist()
    per_source = {}
    if by_source.numel():
        losses, targets = packed[1 + d.world_size :].view(2, -1).tolist()
        per_source = {f"loss/{s.name}": t / n for s, t, n in zip(run.data.sources, losses, targets, strict=True) if n}
        by_source.zero_()
    if d.is_main and (rank := straggler(read_ms, slow)) is not None:
        log.warning(
            f"Rank {rank} is a straggler: it reads its data in {read_ms[rank]:.0f} ms a step against a median of "
            f"{statistics.median(read_ms):.0f} ms over the last {STRAGGLER_WINDOWS} log windows, and every rank waits "
            "for it (a slow disk or file system, a busy host?)"
        )
    tok_s, ms_per_step = window.rates()
    slowest = max(range(d.world_size), key=read_ms.__getitem__)
    return {
        "global_step": run.state.step,
        "total_steps": run.stop_step,
        "epoch": run.state.epoch,
        "loss": (loss_sum / d.world_size).item(),
        **per_source,
        "lr": lr,
        "grad_norm": grad_norm.item(),
        "tok/s": tok_s,
        **({"mfu": window.mfu(tok_s)} if window.peak else {}),
        **timer.mean_ms(window.steps),
        "time/total": ms_per_step,
        "time/slowest_read_rank": slowest,
        "time/slowest_read": read_ms[slowest],
        **memory_stats(d.device, run.memory_base),
    }


STRAGGLER_WINDOWS = 2  # consecutive log windows a rank must be slow in before it is named


def straggler(read_ms: list[float], slow: dict[int, int]) -> int | None:
    """The rank that has just been slow for STRAGGLER_WINDOWS log windows in a row: its data reading over 1.5x the
    median and 20 ms more. `slow` carries each rank's run of slow windows between calls; a rank is named once a run.
    Only reading is compared: everything after it waits in collectives for the slowest rank, so every rank's step
    takes the same time."""
    median = statistics.median(read_ms)
    named = None
    for rank, ms in enumerate(read_ms):
        slow[rank] = slow.get(rank, 0) + 1 if ms > max(1.5 * median, median + 20) else 0
        if slow[rank] == STRAGGLER_WINDOWS:
            named = rank
    return named


def finish(run: Run, metrics: MetricsLogger, heartbeat: Heartbeat, window: Throughput) -> None:
    """Collective: the Hugging Face export, then on rank 0 the loss curve and the summary."""
    cfg, d = run.cfg, run.d
    metrics.close()
    train_s = time.perf_counter() - window.t_loop
    export_hf(run.model, cfg, d, cfg.exp_dir / "hf")
    # --stop-at-step before the schedule's end: "paused", not "finished" (done) nor "stopped" (a requeue script's
    # cue: the same command would stop there again); the export is of that step.
    paused = run.stop_step < run.total_steps
    heartbeat.beat(
        force=True, **({"state": "paused", "schedule_steps": run.total_steps} if paused else {"state": "finished"})
    )
    if d.is_main:
        plotted = plot_losses(cfg.exp_dir / "metrics.jsonl", cfg.exp_dir / "loss.png")
        total_s = time.perf_counter() - run.t_start
        tokens = f"{window.total_tokens:,} tokens in {train_s:.1f}s of training, {total_s:.1f}s in all"
        tok_s = window.total_tokens / max(train_s, 1e-9)
        mfu = window.mfu(tok_s) if window.peak else None
        head = (f"Paused at step {run.state.step} of the schedule's {run.total_steps} (--stop-at-step): the same "
                "command without it, or with a larger one, continues" if paused else "Done.")  # fmt: skip
        log.info(run_summary(cfg, metrics, window.first_step, run.state.step, tokens, tok_s, plotted, mfu, head))
    dist.barrier()  # leave together: a rank tearing down while another still talks to it can abort at exit


def config_to_argv(cfg: Config) -> list[str]:
    """The command-line flags that rebuild `cfg` (non-default fields only)."""
    argv = []
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if value != f.default:
            shown = ("on" if value else "off") if isinstance(value, bool) else str(value)
            argv += [flag_name(f.name), shown]
    return argv


def launch(cfg: Config, nproc_per_node: int | None = None) -> None:
    """Start the job on this machine with PyTorch's elastic launcher (what torchrun uses) and wait for it.

    For notebooks: `launch(Config(dataset_name=..., model_name=...), nproc_per_node=2)`. Each worker runs this file
    with the flags of `cfg`; raises ChildFailedError if the job fails.
    """
    import uuid

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    cfg.validate()
    nproc = nproc_per_node or max(1, torch.cuda.device_count())
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"fsdp-train-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
    )
    elastic_launch(config, entrypoint=sys.executable)(os.path.abspath(__file__), *config_to_argv(cfg))


# ======================================================================================================================
# Optional: memory-saving optimizers (--optimizer adafactor, --optimizer-in-backward, --pure-bf16)
#
# Needed when AdamW's two fp32 states per parameter do not fit: factored second moments on the shards, an update
# as soon as each gradient is ready, stochastic rounding of bf16 weights. build_optimizer picks them.


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor (a view: in-place ops on it update the sharded parameter), or t itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def shard_group(p: torch.Tensor):
    """The process group over which p's rows are split (FSDP shards dim 0), or None for a whole tensor."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return None
    dims = [i for i, placement in enumerate(p.placements) if isinstance(placement, Shard)]
    assert all(p.placements[i].dim == 0 for i in dims), p.placements  # fully_shard shards dim 0 only
    return p.device_mesh.get_group(dims[0]) if dims else None


def _zeros_like_shard(
    p: torch.Tensor, local_shape: tuple, global_shape: tuple, replicated: bool, dtype: torch.dtype
) -> torch.Tensor:
    """A zero DTensor laid out like p (Shard(0) rows) or replicated, so DCP saves and reshards it like p."""
    from torch.distributed.tensor import DTensor, Replicate

    t = torch.zeros(local_shape, dtype=dtype, device=local_shard(p).device)
    if not isinstance(p, DTensor):
        return t
    placements = [Replicate()] * p.device_mesh.ndim if replicated else p.placements
    stride = (global_shape[1], 1)
    return DTensor.from_local(t, p.device_mesh, placements, run_check=False, shape=global_shape, stride=stride)


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Write fp32 `src` into bf16 `dst`, rounding up with probability equal to the dropped fraction.

    A bf16 weight near 0.02 cannot move by less than ~1e-4 with round-to-nearest, so fine-tuning updates of that size
    vanish in pure bf16; rounded stochastically they survive on average (the expected result is exactly `src`).
    Adding 16 random low bits to the fp32 pattern and truncating does that.
    """
    bits = src.view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, generator=generator, dtype=torch.int32, device=bits.device)
    dst.copy_(((bits + noise) & -65536).view(torch.float32))  # low 16 bits zero: the bf16 cast is exact


def rounding_generator(seed: int, param_index: int, step: int, p: torch.Tensor) -> torch.Generator:
    """The noise source for rounding one shard at one step: a function of the shard's place in the shard group, not
    of the rank, so HSDP replicas that hold the same shard round it identically and never drift apart; and of the
    step, so a resumed run draws the same noise without any RNG state."""
    group = shard_group(p)
    shard = dist.get_rank(group) if group is not None else 0
    key = hashlib.blake2b(f"{seed}:{param_index}:{step}:{shard}".encode(), digest_size=8).digest()
    return torch.Generator(device=local_shard(p).device).manual_seed(int.from_bytes(key, "little") >> 1)


class Adafactor(torch.optim.Optimizer):
    """PyTorch's Adafactor algorithm (as torch.optim.Adafactor: no momentum, factored second moment, updates sized
    relative to each weight's RMS and clipped to RMS d) on FSDP2 shards.

    torch.optim.Adafactor cannot run on DTensor parameters (an in-place pow on a partial norm is refused): its column
    statistics, mean row statistic and the weight and update RMS are sums over every shard. FSDP shards dim 0, so each
    rank owns whole rows: row statistics stay local and the sums take two all-reduces per step over the shard group,
    batched over all parameters. On whole tensors it computes what torch.optim.Adafactor computes (tested to 1e-6),
    without its per-parameter host syncs. bf16 weights (--pure-bf16) are updated in fp32 and rounded stochastically. The factored state (row_var like the param's rows, col_var replicated,
    variance for vectors) is kept as DTensors, so DCP checkpoints reshard it to another world size.
    """

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, seed=0):
        super().__init__(params, dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay))
        self.seed = seed  # of the bf16 rounding noise (see rounding_generator)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim > 2:
                    raise InputError(f"--optimizer adafactor supports 1-D and 2-D parameters, not {tuple(p.shape)}")

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            dtype = self._stat_dtype(p)
            if p.ndim == 2:
                (rows, cols), local_rows = p.shape, local_shard(p).shape[0]
                state["row_var"] = _zeros_like_shard(p, (local_rows, 1), (rows, 1), replicated=False, dtype=dtype)
                state["col_var"] = _zeros_like_shard(p, (1, cols), (1, cols), replicated=True, dtype=dtype)
            else:
                state["variance"] = torch.zeros_like(p, dtype=dtype)
        return state

    @staticmethod
    def _stat_dtype(p: torch.Tensor) -> torch.dtype:
        """Statistics and updates in fp32 at least: in bf16, squared gradients of ~1e-5 round coarsely and the slow
        running averages stop moving (an increment below 1/256 of the value is lost)."""
        return torch.promote_types(p.dtype, torch.float32)

    @staticmethod
    def _all_reduce(params: list, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum each parameter's statistics over its shard group: one all-reduce per group for all parameters."""
        by_group: dict = {}
        for i, p in enumerate(params):
            by_group.setdefault(shard_group(p), []).append(i)
        out = list(parts)
        for group, idx in by_group.items():
            if group is None:
                continue
            flat = torch.cat([parts[i] for i in idx])
            dist.all_reduce(flat, group=group)
            for i, piece in zip(idx, flat.split([parts[i].numel() for i in idx]), strict=True):
                out[i] = piece
        return out

    def _update(self, p: torch.Tensor, state: dict, row_mean: torch.Tensor, eps1: float) -> torch.Tensor:
        """The unscaled update G / sqrt(V) for this rank's rows."""
        if p.ndim == 2:
            var = local_shard(state["row_var"]) @ local_shard(state["col_var"])
            var.div_(row_mean.clamp(min=eps1))
        else:
            var = local_shard(state["variance"]).clone()
        return var.clamp_(min=eps1 * eps1).rsqrt_().mul_(local_shard(p.grad).to(var.dtype))

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "closures are not supported"
        todo = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not todo:
            return
        params = [p for _, p in todo]
        # 1. Second-moment statistics. Each entry: [sum x^2, (2-D:) sum of row_var, per-column sum of g^2].
        stats, weights = [], []
        for group, p in todo:
            state = self._state(p)
            state["step"] += 1
            weights.append(state["step"].item() ** group["beta2_decay"])  # a CPU scalar: no device sync
            dtype = self._stat_dtype(p)
            x, grad = local_shard(p), local_shard(p.grad).to(dtype)
            parts = [torch.linalg.vector_norm(x, dtype=dtype).square().reshape(1)]
            if p.ndim == 2:
                row_mean = torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1))
                local_shard(state["row_var"]).lerp_(row_mean, weights[-1])
                parts += [local_shard(state["row_var"]).sum().reshape(1), torch.norm(grad, dim=-2).square_()]
            else:
                local_shard(state["variance"]).lerp_(grad * grad, weights[-1])
            stats.append(torch.cat(parts))
        stats = self._all_reduce(params, stats)
        eps1s, row_means = [], []
        for (group, p), s, w in zip(todo, stats, weights, strict=True):
            # torch.optim.Adafactor's default eps1 is finfo(param dtype).eps: 7.8e-3 for bf16 weights, which floors
            # sqrt(V) far above the gradients of a large model (~1e-5) and shrinks their updates ~1000x.
            eps1s.append(group["eps"][0] if group["eps"][0] is not None else torch.finfo(s.dtype).eps)
            if p.ndim == 2:
                rows = p.shape[0]
                local_shard(self.state[p]["col_var"]).lerp_((s[2:] / rows).reshape(1, -1), w)
                row_means.append(s[1] / rows)
            else:
                row_means.append(None)
        # 2. The update's RMS also sums over shards: compute each update once for its norm, reduce, then recompute
        # while applying, so no more than one parameter's update is ever held.
        update_sq = [
            self._update(p, self.state[p], m, e).to(stats[0].dtype).square().sum().reshape(1)
            for p, m, e in zip(params, row_means, eps1s, strict=True)
        ]
        update_sq = self._all_reduce(params, update_sq)
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for (group, p), s, u2, m, e in zip(todo, stats, update_sq, row_means, eps1s, strict=True):
            lr, step = float(group["lr"]), self.state[p]["step"].item()
            rho = min(lr, 1 / step**0.5)
            alpha = (s[0] / p.numel()).sqrt().clamp(min=group["eps"][1]) * rho
            denom = ((u2[0] / p.numel()).sqrt() / group["d"]).clamp(min=1.0)
            x, update = local_shard(p), self._update(p, self.state[p], m, e)
            if x.dtype == torch.bfloat16:  # --pure-bf16: see stochastic_round_
                new = x.float().mul_(1 - lr * group["weight_decay"]).sub_(update.mul_(alpha / denom))
                stochastic_round_(x, new, rounding_generator(self.seed, index[p], int(step), p))
            else:
                if group["weight_decay"]:
                    x.mul_(1 - lr * group["weight_decay"])
                x.sub_(update.mul_(alpha / denom).to(p.dtype))


class OptimizerInBackward:
    """--optimizer-in-backward: one optimizer per parameter, stepped by the parameter's post-accumulate-grad hook as
    soon as FSDP has reduce-scattered its gradient, which is freed right after: the full set of gradients never
    exists at once. step() and zero_grad() are no-ops for the train loop; param_groups spans every optimizer, so the
    LR schedule reaches all of them before backward starts; DCP saves `optimizers` as one state dict keyed by
    parameter name (the same keys as a single optimizer's)."""

    def __init__(self, params: list[torch.nn.Parameter], make_optimizer):
        self.optimizers = [make_optimizer(i, p) for i, p in enumerate(params)]
        by_param = dict(zip(params, self.optimizers, strict=True))
        self.grad_sumsq = torch.zeros((), device=local_shard(params[0]).device)  # this rank's share of |g|^2, for logs

        def step_now(p):
            self.grad_sumsq += local_shard(p.grad).float().square().sum().to(self.grad_sumsq.device)
            by_param[p].step()
            by_param[p].zero_grad(set_to_none=True)

        self.hooks = [p.register_post_accumulate_grad_hook(step_now) for p in params]

    @property
    def param_groups(self) -> list[dict]:
        # Looked up each time: Optimizer.load_state_dict (resume) replaces each optimizer's group dicts.
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def grad_norm(self, replicas: int) -> torch.Tensor:
        """Global L2 norm of the gradients the hooks applied since the last call (one all-reduce)."""
        sumsq, self.grad_sumsq = self.grad_sumsq, torch.zeros_like(self.grad_sumsq)
        dist.all_reduce(sumsq)
        return (sumsq / replicas).sqrt()  # HSDP replicas hold identical shards: count each once


# ======================================================================================================================
# Optional: memory planner (`fsdp_train.py plan`)
#
# Before a launch: which flags fit a model on N devices, from its config alone (no weights, no GPU).


@dataclass
class ModelShape:
    """What per-rank memory depends on, measured from the model config alone (fake tensors: nothing allocated)."""

    params: int  # all trainable parameters (a tied weight counted once)
    root_params: int  # those outside the blocks (embeddings, final norm, head): one FSDP unit, gathered all step
    block_params: int  # the largest block's
    blocks: int
    matrices: list[tuple[int, int]]  # 2-D parameter shapes (Adafactor factors them)
    vectors: int  # elements of 1-D parameters
    block_saved: int  # bytes autograd keeps for the largest block's backward, without checkpointing
    block_input: int  # bytes of one block's input: all that a checkpointed block keeps
    head_saved: int  # bytes kept outside the blocks: embeddings, final norm, logits and the loss
    logits: int  # elements of the logits (batch x seq x vocab)
    loss_chunk: int  # elements of the logits the loss handles at once (ChunkedCrossEntropy)


def model_shape(cfg: Config, batch: int, seq: int, compute_dtype: torch.dtype) -> ModelShape:
    """Build the model from its config under FakeTensorMode and run one forward with the loss, counting the bytes
    autograd saves per block: the model's own code decides what it keeps (fp32 norm upcasts, attention kernel),
    so no per-architecture formula is needed. Takes seconds even for a 70B config."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    config = load_model_config(cfg.model_name, cfg.trust_remote_code)
    config.use_cache = False
    attn = attn_implementation(cfg, torch.device("cpu")) if cfg.attn_implementation == "auto" else None
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = AutoModelForCausalLM.from_config(
            config, dtype=compute_dtype, attn_implementation=attn or cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
        )  # fmt: skip
        model.loss_function = causal_lm_loss
        model.train()
        blocks = [block for _, _, block in find_blocks(model)]
        saved: dict[str, int] = {}
        seen: set[int] = set()
        where = ["head"]

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage._cdata not in seen:  # a tensor several ops save (e.g. q/k/v's input) costs once
                seen.add(storage._cdata)
                saved[where[0]] = saved.get(where[0], 0) + storage.nbytes()
            return t

        inputs = []

        def enter(i: int, args: tuple, kwargs: dict) -> None:
            where[0] = i
            inputs.append(args[0] if args else kwargs["hidden_states"])

        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda m, args, kwargs, i=i: enter(i, args, kwargs), with_kwargs=True)
            block.register_forward_hook(lambda m, args, out: where.__setitem__(0, "head"))
        ids = torch.zeros(batch, seq, dtype=torch.long)
        # Two documents per block, as packed data has: restarting positions make transformers build the packed mask.
        half = seq // 2
        positions = torch.cat([torch.arange(half), torch.arange(seq - half)]).expand(batch, seq)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, position_ids=positions, labels=ids)
        params = list(model.parameters())
        block_sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
        return ModelShape(
            params=sum(p.numel() for p in params),
            root_params=sum(p.numel() for p in params) - sum(block_sizes),
            block_params=max(block_sizes),
            blocks=len(blocks),
            matrices=[tuple(p.shape) for p in params if p.ndim == 2],
            vectors=sum(p.numel() for p in params if p.ndim < 2),
            block_saved=max(saved.get(i, 0) for i in range(len(blocks))),
            block_input=inputs[0].numel() * inputs[0].element_size(),
            head_saved=saved.get("head", 0),
            logits=batch * seq * config.vocab_size,
            loss_chunk=min(batch * seq, max(1, LOSS_CHUNK_ELEMENTS // config.vocab_size)) * config.vocab_size,
        )


def memory_plan(shape: ModelShape, cfg: Config, shard_ranks: int, device: str) -> dict[str, float]:
    """Estimated peak bytes per rank, by component, for these options (see README "Fitting a big model").

    Parameters and optimizer state are always there; on top, the largest of four moments: the end of forward (kept
    activations, the loss's saved gradient, the logits and one fp32 loss chunk), backward (one block recomputed, the
    root's unsharded gradient and one block's gradient), the end of backward (every gradient) and the optimizer step.
    """
    n = shard_ranks
    cb = cfg.compute_dtype(torch.device(device)).itemsize
    room = host_available_bytes() if device == "cpu" else math.inf  # a CPU plan is for this host
    one_unit = cfg.shard_unit_on(torch.device(device), shape.params, room, n * cfg.replicate_degree) == "model"
    pb = param_dtype(cfg).itemsize
    host = cfg.cpu_offload  # sharded params, grads and optimizer state live in host memory
    choice = OPTIMIZERS[cfg.optimizer]
    optimizer, state_on_disk = choice.state(shape, n) * pb, choice.state(shape, 1) * pb
    on_host = (shape.params * pb / n) * 2 + optimizer if host else 0.0  # fp32 shards, their gradients, the state
    params = 0 if host else shape.params * pb / n
    optimizer = 0 if host else optimizer
    grads = shape.block_params * pb / n if cfg.optimizer_in_backward else shape.params * pb / n
    grads = 0 if host else grads
    # --accumulate-unsharded: between micro-batches FSDP holds every parameter's full gradient in the reduce dtype
    # instead of the sharded one (which appears only as the last micro-batch reduce-scatters, group by group).
    accum = cfg.resolve_grad_accum(shard_ranks * cfg.replicate_degree)
    if cfg.accumulate_unsharded and accum > 1 and not host:
        grads = shape.params * (pb if cfg.pure_bf16 else 4)
    accumulated = grads if accum > 1 else 0  # the earlier micro-batches' gradients, held through each backward
    # FSDP keeps the root unit gathered from forward to the end of backward and prefetches one block ahead.
    gathered = (shape.root_params + 2 * shape.block_params) * cb
    if not cfg.reshard_after_forward or one_unit:
        gathered = (shape.root_params + shape.blocks * shape.block_params) * cb
    if not cfg.activation_checkpointing:
        kept, recompute = shape.blocks * shape.block_saved, 0
    else:  # each block keeps its input (on the host with offload); backward recomputes one block at a time
        offload = cfg.activation_offload and device == "cuda"
        kept, recompute = (2 if offload else shape.blocks) * shape.block_input, shape.block_saved
    loss = shape.logits * cb + shape.loss_chunk * 4  # while the loss runs: the logits and one fp32 chunk
    block_grad = shape.block_params * (cb + 4)  # unsharded gradient + fp32 reduce-scatter buffer
    # With --shard-unit model every unsharded gradient waits for the one reduce-scatter at the end of backward.
    last_grad = shape.params * (cb + 4) if one_unit else block_grad
    fused = device == "cuda" and not host and choice.fused_on_cuda
    step_temp = 0 if fused or host else (shape.block_params if cfg.optimizer_in_backward else shape.params) * pb / n
    moments = {
        "end of forward": gathered + kept + shape.head_saved + loss,
        # The loss's saved gradient is consumed by the head first; then blocks are recomputed one by one while the
        # root's unsharded gradient and one block's gradient wait to be reduce-scattered.
        "backward": gathered + kept + recompute + shape.root_params * cb + block_grad + accumulated,
        "backward end": gathered + grads + last_grad,
        "optimizer step": grads + step_temp,
    }
    worst = max(moments, key=moments.get)
    return {
        "params": params,
        "optimizer": optimizer,
        "gradients": grads,
        "gathered params": float(gathered),
        "activations": float(kept + recompute + shape.head_saved),
        "loss": float(loss),
        "peak": params + optimizer + moments[worst],
        "peak at": worst,
        "host (--cpu-offload)": float(on_host),
        "checkpoint on disk": float(shape.params * pb + state_on_disk),
    }


def scaled_shape(shape: ModelShape, batch: int, from_batch: int) -> ModelShape:
    """The shape at another micro-batch: what autograd keeps, the logits and the loss chunk grow with the batch
    (the weights do not)."""

    def grow(x: int) -> int:
        return x * batch // from_batch

    chunk = min(grow(shape.logits), max(shape.loss_chunk, 1))
    return dataclasses.replace(shape, block_saved=grow(shape.block_saved), block_input=grow(shape.block_input),
                               head_saved=grow(shape.head_saved), logits=grow(shape.logits), loss_chunk=chunk)  # fmt: skip


def largest_batch(shape: ModelShape, cfg: Config, shard_ranks: int, device: str, limit: float) -> int:
    """The largest --batch-size whose planned peak stays within `limit` bytes (0: not even 1)."""
    fits = 0
    for batch in range(1, 4097):
        if memory_plan(scaled_shape(shape, batch, cfg.batch_size), cfg, shard_ranks, device)["peak"] > limit:
            break
        fits = batch
    return fits


def shipped_shape(name: str) -> Path | None:
    """configs/models/<name>: the config.json of a model the presets use, for `plan` without its download (a named
    shape such as llama-2-7b, or a hub id whose last part, lower-cased, names one)."""
    root = Path(__file__).resolve().parent / "configs" / "models"
    for key in (name, name.split("/")[-1].lower(), name.split("/")[-1].lower().removesuffix("-hf")):
        if key and (root / key / "config.json").is_file():
            return root / key
    return None


# Options the planner tries for --gpu-mem, cheapest first: each saver costs speed (or precision, for bf16 weights).
PLAN_OPTIONS = [
    {"activation_checkpointing": False},
    {"activation_checkpointing": True},
    {"activation_checkpointing": True, "optimizer": "adafactor"},
    {"activation_checkpointing": True, "optimizer": "adafactor", "optimizer_in_backward": True},
    {"activation_checkpointing": True, "pure_bf16": True, "optimizer": "adafactor", "optimizer_in_backward": True},
    {
        "activation_checkpointing": True,
        "activation_offload": True,
        "pure_bf16": True,
        "optimizer": "adafactor",
        "optimizer_in_backward": True,
    },
    {"activation_checkpointing": True, "cpu_offload": True},
    {"activation_checkpointing": True, "activation_offload": True, "cpu_offload": True},
]


def option_flags(options: dict) -> str:
    flags = [f"{flag_name(k)} {v if isinstance(v, str) else 'on' if v else 'off'}" for k, v in options.items()]
    if options.get("optimizer_in_backward"):
        flags.append("--max-norm 0")
    return " ".join(flags)


def plan_main(argv: list[str]) -> int:
    """`fsdp_train.py plan -m MODEL --nproc N -b B -s S [training flags] [--gpu-mem GiB]`: per-GPU memory estimate."""
    p = _Parser(
        prog="fsdp_train.py plan",
        description=plan_main.__doc__,
        epilog="Every training flag is read as for a run, the ones that matter most: -m/--model-name (a model folder, "
        "a cached hub id, or a shape shipped in configs/models/ such as llama-2-7b, meta-llama-3-8b), "
        "-b/--batch-size, -s/--seq-length, --config PRESET.yaml, --grad-accum-steps, --dtype, --optimizer, "
        "--activation-checkpointing, --cpu-offload, --pure-bf16 (see fsdp_train.py --help).",
    )
    p.add_argument("--nproc", type=int, default=1, help="ranks that shard the model (GPUs in all)")
    p.add_argument("--gpu-mem", type=float, default=0.0, help="GiB per GPU: also list the option sets that fit")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="what the ranks run on (default cuda)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    try:
        args, rest = p.parse_known_args(argv)
        cfg = parse_args(["-d", "-", *rest], prog="fsdp_train.py plan")  # training flags, validated as for a run
        shipped = shipped_shape(cfg.model_name) if model_problem(cfg.model_name) else None
        if shipped:
            named, cfg.model_name = cfg.model_name, str(shipped)
        if args.nproc < 1 or args.nproc % cfg.replicate_degree:
            raise InputError(f"--nproc {args.nproc} must be a positive multiple of --replicate-degree")
        shard_ranks = args.nproc // cfg.replicate_degree
        plans = {}
        candidates = [{}] + (PLAN_OPTIONS if args.gpu_mem else [])
        shapes: dict[torch.dtype, ModelShape] = {}
        limit = 0.85 * args.gpu_mem * 2**30  # CUDA context, NCCL buffers and allocator fragmentation take the rest
        for options in candidates:
            trial = dataclasses.replace(cfg, **options) if options else cfg
            dtype = trial.compute_dtype(torch.device(args.device))
            if dtype not in shapes:
                shapes[dtype] = model_shape(trial, trial.batch_size, trial.seq_length, dtype)
            plan = memory_plan(shapes[dtype], trial, shard_ranks, args.device)
            if args.gpu_mem:
                plan["largest batch"] = largest_batch(shapes[dtype], trial, shard_ranks, args.device, limit)
            plans[option_flags(options) if options else "as given"] = plan
    except JobError as e:
        return report_job_error(e, 0)
    except (OSError, ValueError) as e:
        return report_job_error(InputError(first_line(e)), 0)
    gib = 2**30
    shape = next(iter(shapes.values()))
    size = partial(byte_size, width=8)

    if args.json:
        print(json.dumps({"shape": dataclasses.asdict(shape) | {"matrices": len(shape.matrices)}, "plans": plans}))
        return 0
    mine = plans["as given"]
    if shipped:
        print(f"{named}: not on this host; its shape from {shipped}/config.json (no weights needed)")
    print(
        f"{cfg.model_name}: {shape.params / 1e6:,.1f}M params, {shape.blocks} blocks; {args.nproc} rank(s) on "
        f"{args.device}, {cfg.batch_size} x {cfg.seq_length} tokens per rank, compute "
        f"{str(cfg.compute_dtype(torch.device(args.device))).removeprefix('torch.')}, params "
        f"{str(param_dtype(cfg)).removeprefix('torch.')}"
    )
    for key in ("params", "optimizer", "gradients", "gathered params", "activations", "loss"):
        print(f"  {key:<16} {size(mine[key])}")
    print(f"  {'peak':<16} {size(mine['peak'])} per rank (at {mine['peak at']})")
    if cfg.cpu_offload:  # then the binding limit is often the host's
        host = mine["host (--cpu-offload)"]
        print(f"  {'host memory':<16} {size(host)} per rank, {size(host * args.nproc).strip()} for all {args.nproc} "
              "(the offloaded shards, their gradients and the optimizer state)")  # fmt: skip
    if args.device == "cpu":
        print("  (CPU: tensors only; a process's RSS adds the Python/torch runtime and what the allocator keeps cached "
              "after freeing: compare with a run's peak_rss_gib)")  # fmt: skip
    disk = mine["checkpoint on disk"]
    print(f"Checkpoint on disk: {size(disk).strip()} each (weights and optimizer state; --keep-latest-k "
          f"{cfg.keep_latest_k} kept: {size(disk * cfg.keep_latest_k).strip()}), plus the export")  # fmt: skip
    if args.gpu_mem:
        usable = limit / gib
        print(f"Largest --batch-size within 85% of --gpu-mem at --seq-length {cfg.seq_length}, as given: "
              f"{mine['largest batch'] or 'none (not even 1)'}")  # fmt: skip
        print(f"Option sets within 85% of --gpu-mem {args.gpu_mem:g} GiB ({usable:.1f} GiB), cheapest first "
              "in speed, not in memory (and the largest --batch-size each fits):")  # fmt: skip
        fits = [(k, v) for k, v in plans.items() if k != "as given" and v["peak"] / gib <= usable]
        for flags, plan in fits:
            print(f"  {size(plan['peak'])}  (-b {plan['largest batch']:>3})  {flags}")
        if not fits:
            print("  none: use more GPUs (--nproc), a shorter --seq-length or a smaller --batch-size")
    return 0


# ======================================================================================================================
# Optional: job control (`fsdp_train.py control`)
#
# Watching and steering a running job through files in its folder (status.json, control.json): no server.


def job_status(exp_dir: Path) -> dict:
    """A job's status.json plus whether it is alive: its process on this host, or a recent heartbeat elsewhere."""
    import socket

    try:
        status = json.loads((exp_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {"state": "unknown", "alive": False, "step": None}
    alive = status.get("state") == "running"
    if alive and status.get("host") == socket.gethostname():
        try:
            os.kill(status["pid"], 0)
        except (OSError, KeyError, TypeError):
            alive = False
    elif alive:  # another node: trust a heartbeat younger than 10 minutes
        alive = time.time() - status.get("updated", 0) < 600
    if status.get("state") == "running" and not alive:
        status["state"] = "dead"
    return {**status, "alive": alive}


def describe_status(name: str, st: dict) -> str:
    parts = [f"{name}: {st['state']}"]
    if st.get("step") is not None:
        schedule = f" (--stop-at-step; the schedule has {st['schedule_steps']})" if st.get("schedule_steps") else ""
        parts.append(f"step {st['step']}/{st.get('total_steps')}{schedule}")
    if st.get("loss") is not None:
        parts.append(f"loss {st['loss']:.4f}")
    if st.get("tok/s"):
        parts.append(f"tok/s {st['tok/s']:,.0f}")
    if st.get("alive") and st.get("eta_s") is not None:
        parts.append(f"ETA {timedelta(seconds=round(st['eta_s']))}")
    if st.get("last_checkpoint"):
        parts.append(f"last checkpoint {Path(st['last_checkpoint']).name}")
    if st.get("updated"):
        parts.append(f"updated {time.time() - st['updated']:.0f}s ago")
    return " | ".join(parts)


def control_main(argv: list[str]) -> int:
    """`fsdp_train.py control {list,status,stop,save,abort} [DIR]`: watch and steer running jobs, no server."""
    p = _Parser(prog="fsdp_train.py control", description=control_main.__doc__)
    p.add_argument("command", choices=("list", "status", *CONTROL_COMMANDS))
    p.add_argument("dir", nargs="?", type=Path, help="SAVE_DIR for list (default outputs), else SAVE_DIR/EXP")
    try:
        args = p.parse_args(argv)
        if args.command == "list":
            root = args.dir or Path("outputs")
            jobs = sorted(e for e in root.glob("*") if (e / "status.json").is_file()) if root.is_dir() else []
            if not jobs:
                raise InputError(f"no jobs under {root} (folders with a status.json)")
            for exp in jobs:
                print(describe_status(exp.name, job_status(exp)))
            return 0
        if args.dir is None or not (args.dir / "status.json").is_file():
            raise InputError(
                f"{args.dir or 'an experiment folder'} is no job folder (no status.json); try: control list"
            )
        status = job_status(args.dir)
        if args.command == "status":
            print(describe_status(args.dir.name, status))
            return 0
        if not status["alive"]:
            raise InputError(f"the job in {args.dir} is not running ({status['state']}); nothing to {args.command}")
        write_json_atomic(args.dir / "control.json", {"command": args.command, "time": time.time()})
    except JobError as e:
        return report_job_error(e, 0)
    print(f"Requested '{args.command}' of {args.dir} (at step {status.get('step')}); the job acts at its next step")
    return 0


# ======================================================================================================================
# Test hooks (the kill -9, fault and data-order tests)

# FSDP_TRAIN_FAULT=KIND:STEP[:SECONDS] injects one fault, FSDP_TRAIN_TRACE_SAMPLES=DIR logs every rank's samples.
# Read once at import, so that in the hot path a hook costs one test of two constants.
TEST_FAULT = os.environ.get("FSDP_TRAIN_FAULT", "")
TEST_TRACE = os.environ.get("FSDP_TRAIN_TRACE_SAMPLES", "")


def hook_for_tests(point: str, step: int, rank: int = 0, **info) -> bool:
    """The one test hook, doing nothing (False) unless a test set a variable above. `point` is where the code is:

    batch (trace only: the sample indices in `info`); crash (rank 1 raises, in forward); nan_loss (True: the caller
    poisons the loss); sleep_in_save / enospc_in_save (a rank's checkpoint write, before its files / after them: the
    tests kill a job inside a save, or fail it like a full disk); sleep_in_prepare (rank 0 tokenizing, step 0);
    hang (rank 1 stops after reading its data, for ARG seconds or for good); slow_data (rank 1 reads each step's
    data ARG seconds slower from step AT on). FSDP_TRAIN_FAULT holds one KIND:AT[:ARG] or several, comma-separated.
    """
    if not (TEST_FAULT or TEST_TRACE):
        return False
    if point == "batch":
        if TEST_TRACE:
            with open(Path(TEST_TRACE) / f"rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "epoch": info["epoch"], "indices": info["indices"]}) + "\n")
        return False
    hit = False
    for fault in filter(None, TEST_FAULT.split(",")):
        kind, _, rest = fault.partition(":")
        at, _, arg = rest.partition(":")
        if kind != point or not at or int(at) > step or (int(at) != step and kind != "slow_data"):
            continue
        hit = True
        if kind == "slow_data" and rank == 1:
            time.sleep(float(arg))
        elif kind == "hang" and rank == 1:
            say(f"FAULT hang step {step} rank {rank} pid {os.getpid()}")
            time.sleep(float(arg or 1e9))
        elif kind in ("sleep_in_save", "sleep_in_prepare"):
            say(f"FAULT {kind} step {step} rank {rank} pid {os.getpid()}")
            time.sleep(float(arg or 60))
        elif kind == "enospc_in_save" and rank == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        elif kind == "crash" and rank == 1:
            raise RuntimeError(f"injected crash at step {step}")
    return hit


# ======================================================================================================================
# Main


def report_job_error(e: JobError, rank: int) -> int:
    """Rank 0 prints the one line and fails the job. Every rank meets the same JobError (inputs are checked
    identically, or agreed through a collective), so the others leave with 0: a failing rank would make
    torchrun SIGTERM rank 0 before it has printed why."""
    if rank != (1 if isinstance(e, RankStalled) else 0):
        return e.exit_code if isinstance(e, RankStalled) else 0
    print(f"error: {e}", file=sys.stderr, flush=True)
    return e.exit_code


def export_main(argv: list[str]) -> int:
    p = _Parser(prog="fsdp_train.py export", description="Write a Hugging Face model folder from a checkpoint.")
    p.add_argument("--checkpoint", required=True, type=Path, help="SAVE_DIR/EXP/checkpoints/step-N")
    p.add_argument("--out", required=True, type=Path, help="output folder (replaced if it exists)")
    try:
        args = p.parse_args(argv)
        with warnings.catch_warnings():  # DCP warns that it runs in one process: that is what export is for
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            export_checkpoint(args.checkpoint, args.out)
    except JobError as e:
        return report_job_error(e, 0)
    print(f"Exported {args.checkpoint} to {args.out}")
    return 0


def show_examples(data, tokenizer, n: int) -> str:
    """The first `n` packed examples (segments) of the blocks as text, the tokens that carry loss between [[ and ]]:
    the mask exactly as training applies it (block_labels), truncation and all."""
    out = [f"The first {n} training example(s) as packed; [[ ]] marks the tokens that carry loss:"]
    shown = 0
    for b in range(len(data)):
        row = data[b]
        ids, positions = row["input_ids"], row["position_ids"]
        trained = block_labels(row.get("labels", ids), positions) != -100
        real = int(row["num_tokens"]) if "num_tokens" in row else len(ids)
        starts = [*(positions[:real] == 0).nonzero().flatten().tolist(), real]
        for a, z in itertools.pairwise(starts):
            if shown == n:
                return "\n".join(out)
            shown += 1
            out.append(f"--- example {shown} (block {b}, {z - a} tokens, {int(trained[a:z].sum())} trained) ---")
            text, cut = "", a
            for t in range(a + 1, z + 1):  # runs of tokens with the same mark, each decoded whole
                if t == z or trained[t] != trained[cut]:
                    piece = tokenizer.decode(ids[cut:t].tolist())
                    text += f"[[{piece}]]" if trained[cut] else piece
                    cut = t
            out.append(text)
    return "\n".join(out)


def prepare_main(argv: list[str]) -> int:
    """`fsdp_train.py prepare [training flags]`: tokenize and pack the training (and validation) data into
    SAVE_DIR/.cache, then exit. No process group and no GPU: a cluster runs it as a CPU job before the GPU job, which
    then finds the cache and starts in seconds. Takes the same flags as training; the cache key uses only the data,
    tokenizer, --seq-length, --val-split/--val-dataset, --seed, the chat flags and --drop-long-examples.

    --show N prints the first N training examples as packed, with the tokens that carry loss marked, to check the
    chat template and the mask before paying for GPUs."""
    setup_logging(0)
    try:
        show = 0
        while "--show" in argv:  # the last one wins, like any flag
            at = argv.index("--show")
            value = argv[at + 1] if at + 1 < len(argv) else ""
            if not value.isdigit():
                raise InputError(f"--show takes a number of examples, got {value!r}")
            show, argv = int(value), argv[:at] + argv[at + 2 :]
        cfg = parse_args(argv, prog="fsdp_train.py prepare", description=prepare_main.__doc__)
        quiet_library_progress_bars()
        tokenizer = load_tokenizer(cfg.model_name, cfg.trust_remote_code)
        train_data, _ = prepare_sources(cfg, None, tokenizer, load_sources(cfg))
        if show:
            print(
                show_examples(train_data.parts[0] if isinstance(train_data, Mixture) else train_data, tokenizer, show)
            )
    except JobError as e:
        return report_job_error(e, 0)
    except OSError as e:
        return report_job_error(InputError(f"cannot prepare the data under {cfg.save_dir}: {first_line(e)}"), 0)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    if argv[:1] == ["control"]:
        return control_main(argv[1:])
    if argv[:1] == ["plan"]:
        return plan_main(argv[1:])
    if argv[:1] == ["prepare"]:
        return prepare_main(argv[1:])
    try:
        cfg = parse_args(argv)
    except InputError as e:
        return report_job_error(e, int(os.environ.get("RANK", 0)))  # before the process group: no Dist yet
    d = setup_distributed(cfg.dist_timeout)
    try:
        train(cfg, d)
    except JobError as e:
        return report_job_error(e, d.rank)
    finally:
        teardown_distributed()
    return 0


def exit_now(code: int) -> None:
    """Flush and leave without interpreter finalization. Destroying library threads during finalization aborted a
    finished worker now and then under load ("terminate called without an active exception": 1 of ~200 runs of the
    test suite on 2 busy cores), which torchrun reports as a failed job. Everything of ours is closed by now (metrics,
    TensorBoard, checkpoints, the process group); atexit handlers are skipped too, which the parent watchdog's join
    in exit_with_parent only needed to survive finalization."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
