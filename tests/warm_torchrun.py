"""torchrun whose workers are forked from a process that has already imported what every rank imports.

`python tests/warm_torchrun.py TORCHRUN_FLAGS fsdp_train.py FLAGS` runs torchrun's own main (its flags, rendezvous,
elastic agent, failure report and exit status) with one difference: each worker is a fork of this process, made after
torch, transformers, datasets and fsdp_train were imported, that calls fsdp_train.main(FLAGS), instead of a fresh
interpreter that imports them all again (~5 s of CPU a rank, most of what a tiny test run costs). The suite's finished
runs use it (conftest.torchrun); the jobs that are signalled or killed (conftest.Job), the demo and the elastic-launcher
test start real torchrun with fresh interpreters, so the launcher is still tested as users run it.

Where a forked worker differs from a fresh one, and why only finished jobs use it: it inherits torchelastic's signal
handlers (a signal before training installs its own raises SignalException, where a fresh process would die of it),
transformers' logging as configured here (ranks other than 0 are noisier: their TRANSFORMERS_VERBOSITY comes too late),
and runs.jsonl records this launcher's command line.

It swaps torchrun's `config_from_args` (public in torch.distributed.run; 2.13 calls it once from `run`): if a later
torch renames it, this fails loudly; if `run` stops calling it, the workers are fresh interpreters again (slower, not
wrong).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import datasets  # noqa: F401  (imported here once, for every worker)
import torch  # noqa: F401
import transformers  # noqa: F401
from torch.distributed import run as torchrun
from transformers.models.llama import modeling_llama  # noqa: F401  (the suite's tiny models are Llamas)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fsdp_train  # noqa: E402

_config_from_args = torchrun.config_from_args


def worker(argv: list[str]) -> None:
    """One rank: fsdp_train.py's main, ending as `python fsdp_train.py` would: its exit status, or an exception's
    traceback on stderr and status 1 (a forked worker's exception would otherwise only reach an error file)."""
    try:
        code = fsdp_train.main(argv)
    except Exception:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        raise SystemExit(code)


def config_from_args(args):
    config, _, _ = _config_from_args(args)
    if Path(args.training_script).name != "fsdp_train.py":
        raise SystemExit(f"warm_torchrun runs fsdp_train.py only, not {args.training_script}")
    config.start_method = "fork"
    return config, worker, [list(args.training_script_args)]


if __name__ == "__main__":
    torchrun.config_from_args = config_from_args
    torchrun.main()
