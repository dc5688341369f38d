"""Shared fixtures: the real prep chain on the bundled sample, tiny models, and a torchrun launcher for CPU/gloo."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Small enough that a 2-process step takes milliseconds, big enough to have several blocks and a real tokenizer.
TINY = ["--vocab-size", "512", "--hidden-size", "64", "--num-layers", "2"]
SMALL = ["--vocab-size", "4096", "--hidden-size", "256", "--num-layers", "4"]
TINIEST = ["--vocab-size", "300", "--hidden-size", "16", "--num-layers", "1"]  # builds in ~2 s: the prep CLIs' cases
# Any architecture at the tiny size (tiny_config): its own keys (MoE experts, OPT's ffn_dim) come on top.
TINY_ARCH = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
# --shard-unit block: the GPU default (auto picks one unit for the whole model on CPU), so the suite runs the path
# GPU users run; test_shard_unit_model_trains_bitwise_like_per_block_units covers the CPU default against it.
TRAIN = ["-s", "64", "-b", "2", "--lr", "3e-3", "--warmup-steps", "2", "--log-freq", "1", "--shard-unit", "block"]


def run(args: list, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command from the repo root; stdout and stderr together in .stdout."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [str(a) for a in args],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def tiny_config(arch: str, vocab_size: int, **extra):
    """A config of `arch` (a transformers model type) at the tiny size; GPT-2 names its sizes otherwise."""
    from transformers import AutoConfig

    return AutoConfig.for_model(arch, vocab_size=vocab_size, **({} if arch == "gpt2" else TINY_ARCH), **extra)


def pretrained_like(model):
    """Give a tiny model's matrices pretrained-like scale, in place: a random init this small barely depends on the
    context at all, so a test of what attends to what would pass whatever the mask."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model


def torchrun_command(nproc: int = 2, script="fsdp_train.py", launcher_args: tuple = (), warm: bool = False) -> list:
    """The launch every test uses: this interpreter's torchrun (python -m torch.distributed.run), one host unless
    launcher_args say --nnodes, then the script. `warm`: the same torchrun with workers forked from a process that has
    imported everything already (tests/warm_torchrun.py; fsdp_train.py only)."""
    launcher = [str(ROOT / "tests" / "warm_torchrun.py")] if warm else ["-m", "torch.distributed.run"]
    cmd = [sys.executable, *launcher, f"--nproc_per_node={nproc}"]
    cmd += [] if "--nnodes" in launcher_args else ["--standalone"]
    return [*cmd, *launcher_args, str(script)]


def torchrun(
    args: list, nproc: int = 2, env: dict | None = None, script="fsdp_train.py"
) -> subprocess.CompletedProcess:
    """A finished torchrun job. fsdp_train.py runs with warm workers (~5 s of CPU less a rank); the jobs that are
    signalled or killed (Job) start fresh interpreters, as users' do."""
    cmd = torchrun_command(nproc, script, warm=Path(script).name == "fsdp_train.py")
    return run(cmd + list(args), env={"OMP_NUM_THREADS": "1", **(env or {})})


def in_process(capfd, argv: list) -> subprocess.CompletedProcess:
    """`python fsdp_train.py ARGV` as fsdp_train.main(ARGV) in this process (a 1-rank group; no interpreter start-up,
    ~5 s of CPU saved a call), its output as a finished command's (none kept without capfd, e.g. in a fixture). For
    what one rank decides alone, and for one-process runs."""
    import fsdp_train

    try:
        code = fsdp_train.main([str(a) for a in argv])
    except SystemExit as e:  # --help
        code = e.code
    out, err = capfd.readouterr() if capfd is not None else ("", "")
    return subprocess.CompletedProcess(argv, code, stdout=out + err)


def run_on_a_terminal(cmd: list) -> tuple[int, str]:
    """Run with stdout and stderr on a pseudo-terminal of 150 columns, as a person at a shell would."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=120), b"".join(chunks).decode(errors="replace")


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc


def train_args(prep: dict, save_dir: Path, exp: str, *extra, model: str = "model", data=None) -> list:
    """fsdp_train.py flags for a tiny run of the prepared model on the prepared (or given) data."""
    return ["-e", exp, "-d", data or prep["dataset"], "-m", prep[model], "--save-dir", save_dir, *TRAIN, *extra]


def checkpoint_weights(ckpt: Path) -> dict:
    """The model tensors of a DCP checkpoint, read in this single process (no process group needed)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:  # not next to the checkpoint: shared runs stay as they were written
        out = Path(tmp) / "weights.pt"
        dcp_to_torch_save(ckpt, out)
        return torch.load(out, weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    """Two checkpoints hold bitwise the same model tensors."""
    import torch

    wa, wb = checkpoint_weights(a), checkpoint_weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]


def assert_runs_close(a: Path, b: Path, step: int, atol: float = 1e-5, weight_atol: float | None = None) -> None:
    """Two experiment folders' logged losses up to `step` and step-`step` weights agree to `atol` (same maths, other
    layout). `weight_atol`: for weights where the layouts sum gradients in another order: AdamW divides each update by
    sqrt(v), so the rounding of a near-zero gradient can move that weight by up to ~lr x 1e-2 (seen: 1.09e-5 after 3
    steps at lr 3e-3 on a 2-core VM, where the loss agreed to 1e-6)."""
    import pytest
    import torch

    losses_a, losses_b = (losses_by_step(e, step) for e in (a, b))
    assert list(losses_b) == list(losses_a) == list(range(1, step + 1))
    assert list(losses_b.values()) == pytest.approx(list(losses_a.values()), abs=atol)
    wa, wb = (checkpoint_weights(e / "checkpoints" / f"step-{step}") for e in (a, b))
    tol = weight_atol or atol
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], atol=tol) for k in wa), max((wa[k] - wb[k]).abs().max() for k in wa)


def unpacked_loss(model, ids, labels, cuts: list[int]) -> tuple[float, int]:
    """(summed next-token loss, tokens) of one packed row computed the independent way: each segment between
    consecutive `cuts` run alone through the plain transformers model, no position_ids and no mask. A segment's first
    token is never a target (nothing of its own precedes it)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for a, b in zip(cuts, cuts[1:], strict=False):
            targets = labels[a + 1 : b]
            keep = targets != -100
            if not keep.any():
                continue
            logits = model(input_ids=ids[a:b][None].long()).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits[keep], targets[keep].long(), reduction="sum").item()
            count += int(keep.sum())
    return total, count


def packed_cache(save_dir: Path, role: str = "train") -> Path:
    """The packed-data cache a run in save_dir made for `role` (train or validation)."""
    caches = (save_dir / ".cache" / "tokenized").iterdir()
    (cache,) = [c for c in caches if json.loads((c / "info.json").read_text())["role"] == role]
    return cache


def unpacked_sums(model_path, rows) -> tuple[float, int]:
    """(summed loss, targets) of packed text rows computed the independent way: every document (they end at EOS)
    alone through the plain transformers model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    eos = AutoTokenizer.from_pretrained(model_path).eos_token_id
    total, count = 0.0, 0
    for row in rows:
        cuts = [0, *((row == eos).nonzero().flatten() + 1).tolist(), len(row)]
        t, n = unpacked_loss(ref, row, row, sorted(set(cuts)))
        total, count = total + t, count + n
    return total, count


def reference_loss(prep, save_dir: Path, model: str, world_size: int = 2, batch_size: int = 2) -> float:
    """Step-0 loss of the plain (unsharded, single-process) HF model on the batches each rank trained on."""
    import fsdp_train

    data = fsdp_train.load_packed(packed_cache(save_dir))
    perm = fsdp_train.epoch_permutation(len(data), seed=0, epoch=0)
    rows = [
        row
        for rank in range(world_size)
        for row in data[
            [i for i in fsdp_train.rank_batch_indices(perm, 0, batch_size, rank, world_size) if i != fsdp_train.FILLER]
        ]["input_ids"]
    ]
    total, count = unpacked_sums(prep[model], rows)
    return total / count


def context_sensitive_model(prep, out, config=None):
    """The tiny model (or one built from `config`, with the tiny model's tokenizer) with larger weights, so that its
    predictions depend on the context: the random init's are nearly uniform (loss ~ln(vocab)) and barely move when
    documents mix."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config is None:
        model = AutoModelForCausalLM.from_pretrained(prep["model"], dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(out / "model")
    AutoTokenizer.from_pretrained(prep["model"]).save_pretrained(out / "model")
    return out / "model"


def short_documents(out):
    """The sample corpus one line a document (~30 tokens each): several documents in every 64-token block."""
    import datasets

    lines = [line.strip() for f in sorted((ROOT / "data").rglob("*.txt")) for line in f.read_text().splitlines()]
    datasets.Dataset.from_dict({"text": [x for x in lines if x]}).save_to_disk(out / "lines")
    return out / "lines"


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hf_cache(hf_home: Path, repo_id: str, model_dir: Path) -> Path:
    """The layout huggingface_hub writes: hub/models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def offline_env(hf_home: Path) -> dict:
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


def read_metrics(exp_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (exp_dir / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(exp_dir: Path, last: int) -> dict[int, float]:
    """Logged loss of steps 1..last, in step order; a step logged again after a resume counts with its last value."""
    by_step = {m["global_step"]: m["loss"] for m in read_metrics(exp_dir) if m["global_step"] <= last}
    return dict(sorted(by_step.items()))


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under root: file -> sha256, folder -> 'dir', symlink -> its target (links are never followed)."""
    out: dict[str, str] = {}
    for dirpath, dirs, names in os.walk(root, followlinks=False):
        for name in dirs + names:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# Fixtures that build one run (or a module's prepared models) for many tests are declared with @shared instead of
# @pytest.fixture: under pytest-xdist (`make test` runs 2 workers) the first worker to need one builds it under a file
# lock in the session's common temp folder and pickles its value there; the other worker waits for the lock and reads
# it, so each is built once whichever worker its tests land on. (xdist's own `--dist loadgroup` cannot do this here:
# xdist 3.8 appends the group to `item._nodeid`, which pytest 9.2's `nodeid` no longer reads, so the groups were
# silently ignored and every shared run was built twice; test_shared_fixtures_are_built_once checks ours.) A value
# must pickle (paths, numbers, text), and tests copy a shared run's folders before changing anything in them.
SHARED: set[str] = set()


def shared(scope: str):
    def declare(fn):
        SHARED.add(fn.__name__)
        names = list(inspect.signature(fn).parameters)

        def once(request, tmp_path_factory):
            def build():
                return fn(**{n: request.getfixturevalue(n) for n in names})

            if not os.environ.get("PYTEST_XDIST_WORKER"):
                return build()
            import fcntl
            import pickle

            root = tmp_path_factory.getbasetemp().parent / "shared"  # pytest-N/, common to the session's workers
            root.mkdir(exist_ok=True)
            key = f"{fn.__module__}.{fn.__name__}"
            with open(root / f"{key}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                done = root / f"{key}.pickle"
                if done.exists():
                    return pickle.loads(done.read_bytes())
                value = build()
                done.write_bytes(pickle.dumps(value))
                return value

        once.__name__ = fn.__name__
        once.__doc__ = fn.__doc__
        return pytest.fixture(scope=scope, name=fn.__name__)(once)

    return declare


def checkpoint_at(exp: Path, step: int) -> Path:
    return exp / "checkpoints" / f"step-{step}"


@shared("session")
def prep(tmp_path_factory) -> dict[str, Path]:
    """organize_data.py -> data_to_hf.py -> model_download.py --tiny on the bundled data/, as a user runs them. Shared
    like the runs built on it: a run resumed with another worker's dataset path would be another run."""
    root = tmp_path_factory.mktemp("prep")
    out = {"splits": root / "splits", "dataset": root / "dataset", "model": root / "tiny", "tied": root / "tiny-tied"}
    out["small"] = root / "small"  # the issue's `small` shape, for memory measurements
    ok(run([sys.executable, "organize_data.py", "--src_dir", "data", "--dst_root", out["splits"], "--num_dirs", "3"]))
    ok(run([sys.executable, "data_to_hf.py", "--data_folder", out["splits"], "--save_dir", out["dataset"]]))
    ok(run([sys.executable, "model_download.py", "--tiny", out["model"], *TINY]))
    # The variants in this process: the same function the command runs, without two more interpreter and library
    # start-ups (~11 s of CPU per xdist worker).
    import model_download

    def shape(flags: list[str]) -> dict:
        return {flag[2:].replace("-", "_"): int(value) for flag, value in zip(flags[::2], flags[1::2], strict=True)}

    model_download.build_tiny(out["tied"], ROOT / "data", tied=True, **shape(TINY))
    model_download.build_tiny(out["small"], ROOT / "data", **shape(SMALL))
    return out


REFERENCE_PEAK_TFLOPS = 0.01  # a made-up device peak, so that reference_run logs an MFU to check


@shared("session")
def reference_run(prep, tmp_path_factory) -> dict:
    """One uninterrupted 30-step run of the tiny model with the default TRAIN flags and a checkpoint after every step
    (all kept), shared by the tests that compare with an uninterrupted run. Its first k steps are exactly a k-step
    run's: the LR schedule spans the epoch whatever --max-steps says, and saving changes no number (nor does
    --peak-tflops, which only adds the MFU figure; --log-freq 1 logs each step's own time).
    {"save_dir", "exp", "stdout", "metrics", "step": k -> checkpoint folder}."""
    save_dir = tmp_path_factory.mktemp("reference")
    args = train_args(prep, save_dir, "ref", "--stop-at-step", 30, "--ckpt-freq", 1, "--keep-latest-k", 99)
    proc = ok(torchrun([*args, "--peak-tflops", REFERENCE_PEAK_TFLOPS]))
    exp = save_dir / "ref"
    return {
        "save_dir": save_dir,
        "exp": exp,
        "stdout": proc.stdout,
        "metrics": read_metrics(exp),
        "step": functools.partial(checkpoint_at, exp),
    }


@shared("session")
def tied_run(prep, tmp_path_factory) -> Path:
    """The save dir of 2 steps of the tied-embedding tiny model, exported in bf16 (its checkpoints stay fp32)."""
    save_dir = tmp_path_factory.mktemp("tied")
    ok(torchrun(train_args(prep, save_dir, "exp", "--stop-at-step", 2, "--export-dtype", "bf16", model="tied")))
    return save_dir


@shared("session")
def validated_run(prep, tmp_path_factory) -> dict:
    """4 steps with --val-split 0.1 evaluated at steps 2 and 4, run on a terminal as a person at a shell runs it:
    {"save_dir", "exp", "output" (what the terminal showed)}."""
    save_dir = tmp_path_factory.mktemp("validated")
    args = train_args(prep, save_dir, "val", "--stop-at-step", 4, "--val-split", "0.1", "--eval-freq", 2)
    rc, output = run_on_a_terminal(torchrun_command(2) + args)
    assert rc == 0, output[-3000:]
    return {"save_dir": save_dir, "exp": save_dir / "val", "output": output}


@shared("session")
def four_steps(prep, tmp_path_factory) -> Path:
    """The save dir of a finished 4-step run with complete checkpoints step-2 and step-4 (copy it before changing)."""
    save_dir = tmp_path_factory.mktemp("four")
    ok(torchrun(train_args(prep, save_dir, "exp", "--stop-at-step", 4, "--ckpt-freq", 2)))
    return save_dir


@shared("session")
def big_batch_run(prep, tmp_path_factory) -> Path:
    """3 steps of batch 4 per rank on 2 ranks: the one-big-batch reference for accumulation and HSDP."""
    save_dir = tmp_path_factory.mktemp("big")
    ok(torchrun(train_args(prep, save_dir, "big", "-b", 4, "--stop-at-step", 3)))
    return save_dir / "big"


@shared("session")
def six_of_an_epoch(prep, tmp_path_factory) -> Path:
    """6 steps of global batch 16 on 2 ranks (58 steps make the epoch; checkpoints at 3 and 6), every sample each rank
    took traced under trace/ (FSDP_TRAIN_TRACE_SAMPLES). Copy it before resuming."""
    root = tmp_path_factory.mktemp("six")
    (root / "trace").mkdir()
    args = train_args(prep, root, "exp", "-b", 8, "--ckpt-freq", 3, "--stop-at-step", 6)
    ok(torchrun(args, env={"FSDP_TRAIN_TRACE_SAMPLES": str(root / "trace")}))
    return root


def traced(folder: Path) -> list[dict]:
    """Every batch each rank took, as FSDP_TRAIN_TRACE_SAMPLES=folder wrote them ({"step", "epoch", "indices"}), with
    the rank ("rank") from the file name, rank by rank."""
    return [
        {**json.loads(line), "rank": int(f.stem.removeprefix("rank"))}
        for f in sorted(folder.glob("rank*.jsonl"), key=lambda f: int(f.stem.removeprefix("rank")))
        for line in f.read_text().splitlines()
    ]


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a shared run's folder, to resume or damage without touching the original."""
    shutil.copytree(src, dst)
    return dst


def assert_single_error(proc: subprocess.CompletedProcess, fragment: str) -> str:
    """A failed run that said why in exactly one `error:` line from rank 0, with no Python traceback of ours."""
    assert proc.returncode != 0, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stdout[-3000:]
    assert 'fsdp_train.py", line' not in proc.stdout, proc.stdout[-3000:]
    return errors[0]


class Job:
    """A torchrun job in the background whose output is read line by line, to act at a known moment."""

    def __init__(self, args: list, nproc: int = 2, env: dict | None = None, launcher_args: tuple = ()):
        cmd = torchrun_command(nproc, launcher_args=launcher_args) + [str(a) for a in args]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # so cleanup can kill every process of the job
        )  # fmt: skip
        self.lines: list[str] = []
        self.done = False
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.done = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 120) -> list[re.Match]:
        """Block until `count` output lines match the regex; return the matches."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = list(re.finditer(pattern, self.output))
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if self.done or left <= 0:
                    raise AssertionError(f"no {pattern!r} ({'job ended' if self.done else 'timeout'}):\n{self.output}")
                self._cond.wait(left)

    def wait(self, timeout: float = 120) -> int:
        rc = self.proc.wait(timeout=timeout)
        with self._cond:
            self._cond.wait_for(lambda: self.done, timeout=10)
        return rc

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def kill_all(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


LAUNCHES = re.compile(r"\b(torchrun|in_process|run|Job|Popen|subprocess\.run)\(")


def pytest_collection_modifyitems(config, items):
    # `make test-fast` runs what is left without the `slow` mark (pure functions, in-process checks) and the one
    # `smoke` run: a test is slow when it needs the prep chain or a shared run, or launches a process itself.
    for item in items:
        source = inspect.getsource(item.function) if hasattr(item, "function") else ""
        if "prep" in item.fixturenames or SHARED & set(item.fixturenames) or LAUNCHES.search(source):
            item.add_marker(pytest.mark.slow)
