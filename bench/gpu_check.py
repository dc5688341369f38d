"""The measured comparisons behind bench/gpu_check.sh: each subcommand compares what fsdp_train.py did with an
independent reference, prints one `= figures` line (the table's figures) and exits 1 when a figure is outside its bound.

    python bench/gpu_check.py prepare OUT                     # OUT/lines: a dataset of the corpus lines (~30 tokens
                                                              # each), OUT/sharp: OUT/tiny with context-dependent weights
    python bench/gpu_check.py isolation OUT/sharp OUT/lines sdpa    # 1. packed vs alone, 4 rows a micro-batch
    python bench/gpu_check.py step1-loss OUT/fp32.exp               # 2. step-1 loss vs plain transformers
    python bench/gpu_check.py resume OUT/demo.exp OUT/straight.exp  # 3. resumed vs uninterrupted
    python bench/gpu_check.py export OUT/demo.exp                   # 4. the export's logits vs the checkpoint's
    python bench/gpu_check.py dtypes OUT/bf16.exp OUT/fp32.exp      # 5. bf16 vs fp32 loss at the last step
    python bench/gpu_check.py same-losses OUT/compile.exp OUT/demo.exp   # --compile on vs off, step by step
    python bench/gpu_check.py metrics OUT/throughput-sdpa.exp       # the last metrics line: tok/s, MFU, peak memory

Every reference is computed on the CPU in fp32 with plain transformers, so it shares no kernel with the run it checks.
The bounds sit in BOUNDS; the CUDA ones are first guesses, not yet measured on a GPU (see bench/README.md, GPU check).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from benchlib import checkpoint_weights, packed_cache, read_metrics

import fsdp_train

CUDA = torch.cuda.is_available()
# Weights of the checks' tiny model: big enough that a document's log-probs move by ~6 when it sees another one (row 1's
# mixed feeding), small enough that its logits stay below ~8, where bf16 rounds them to within 0.03, so this check's
# absolute bound (BOUNDS["isolation"]) holds for a correct kernel in bf16.
SHARP_STD = 0.08
# Bound of each check, (CPU, CUDA). CPU: measured on 2026-12-06 (bench/README.md); CUDA: not yet run on a GPU.
BOUNDS = {
    # max |log-prob| gap of a packed document to the same document alone; the compute dtype is bf16 on CUDA
    "isolation": (1e-4, 0.25),
    # |step-1 loss - plain transformers on each document alone|, both in fp32
    "step1-loss": (2e-5, 1e-4),
    # max |loss| gap per step, resumed vs uninterrupted (CPU: bitwise; CUDA kernels may be nondeterministic)
    "resume": (1e-6, 1e-3),
    # |loss at the last step|, bf16 vs fp32 compute
    "dtypes": (0.05, 0.05),
    # max |loss| gap per step, --compile on vs off (fused kernels round differently)
    "compile": (1e-4, 0.02),
    # max |loss| gap per step, an option that changes no maths (async save, offload, in-backward steps) on vs off
    "options": (1e-5, 1e-3),
}


def bound(name: str) -> float:
    return BOUNDS[name][CUDA]


def within(value: float, limit: float) -> str:
    """'2.1e-05 <= 0.0001', or with '>' when outside: the figure and its bound as the table shows them."""
    return f"{value:.1e} {'<=' if value <= limit else '>'} {limit:g}"


def report(figures: str, ok: bool) -> None:
    """The result: one `= ` line for the table, exit status 1 on failure."""
    print(f"= {figures}")
    sys.exit(0 if ok else 1)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs


def prepare(out: Path) -> None:
    """OUT/lines: every non-empty line of data/**/*.txt a document, so a 256-token block holds ~5 of them;
    OUT/sharp: OUT/tiny with every matrix re-drawn from N(0, SHARP_STD), saved in bf16 (what a hub model ships), so
    that predictions depend on the context: the random init's are near uniform and barely move when documents mix."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(fsdp_train.__file__).parent
    lines = [x.strip() for f in sorted((root / "data").rglob("*.txt")) for x in f.read_text().splitlines()]
    datasets.Dataset.from_dict({"text": [x for x in lines if x]}).save_to_disk(out / "lines")
    model = AutoModelForCausalLM.from_pretrained(out / "tiny", dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, SHARP_STD)
    model.to(torch.bfloat16).save_pretrained(out / "sharp")
    AutoTokenizer.from_pretrained(out / "tiny").save_pretrained(out / "sharp")
    report(f"{sum(1 for x in lines if x)} documents, sharp model in bf16", True)


def load_model(path, attn: str = "sdpa", dtype=torch.float32, device="cpu"):
    """Plain transformers, no cache: with use_cache on, transformers ignores packed position_ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=dtype).to(device).eval()
    model.config.use_cache = False
    return model


def eos_cuts(row: torch.Tensor, eos: int) -> list[tuple[int, int]]:
    """(start, end) of the documents in a packed row, cut after each EOS: the packer's own positions are not used,
    so a packing bug cannot hide in the reference."""
    cuts = sorted({0, *((row == eos).nonzero().flatten() + 1).tolist(), len(row)})
    return list(zip(cuts, cuts[1:], strict=False))


# ----------------------------------------------------------------------------------------------------------------------
# 1. Packed documents are isolated


@torch.no_grad()
def packed_gap(model, ids: torch.Tensor, inputs: dict, eos: int) -> float:
    """Largest |log-prob| difference of any packed token to the same token of its document run alone through the same
    model: `model(input_ids=doc[None])`, no position_ids, no mask, no segments."""
    device = model.device
    packed = model(**fsdp_train.inputs_to(inputs, device)).logits.float().log_softmax(-1).cpu()
    gap = 0.0
    for r, row in enumerate(ids):
        for a, b in eos_cuts(row, eos):
            alone = model(input_ids=row[a:b][None].to(device)).logits[0].float().log_softmax(-1).cpu()
            gap = max(gap, (packed[r, a:b] - alone).abs().max().item())
    return gap


def isolation(model_path: Path, lines: Path, attn: str, rows: int, seq: int, broken: bool) -> None:
    """Row 1: a micro-batch of `rows` packed rows built exactly as training builds it (tokenize_documents,
    pack_sequences, model_inputs) vs each document alone. Also measures feedings that mix documents (input_ids only;
    for flash, position_ids only: what training fed before #21), which must land above the bound, so the row shows it
    can tell. --broken feeds one of those as if it were training's, to show the row fails."""
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    texts = datasets.load_from_disk(str(lines))["text"][: rows * seq // 4]
    docs = fsdp_train.tokenize_documents({"text": texts}, tokenizer)["input_ids"]
    blocks, positions, _ = fsdp_train.pack_sequences(docs, seq)
    ids, pos = torch.tensor(blocks[:rows]), torch.tensor(positions[:rows])
    assert len(ids) == rows, f"{len(ids)} blocks of {seq} tokens from {len(docs)} documents"
    dtype = torch.bfloat16 if CUDA else torch.float32
    model = load_model(model_path, attn, dtype, "cuda" if CUDA else "cpu")
    eos = tokenizer.eos_token_id
    mixed = {"input_ids only": {"input_ids": ids}}
    if fsdp_train.takes_segments(attn):
        mixed["position_ids only"] = {"input_ids": ids, "position_ids": pos}
    fed = mixed[list(mixed)[-1]] if broken else fsdp_train.model_inputs(ids, pos, attn)
    gap = packed_gap(model, ids, fed, eos)
    mixed_gaps = {name: packed_gap(model, ids, inputs, eos) for name, inputs in mixed.items()}
    limit = bound("isolation")
    ok = gap <= limit < min(mixed_gaps.values())
    docs_in = sum(len(eos_cuts(row, eos)) for row in ids)
    figures = f"gap {within(gap, limit)} ({str(dtype)[6:]}, {rows}x{seq}, {docs_in} docs)"
    figures += "".join(f"; {name}: {g:.2f}" for name, g in mixed_gaps.items())
    report(("BROKEN FEEDING " if broken else "") + figures, ok)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Step-1 loss against plain transformers


def run_meta(exp: Path):
    """The CheckpointMeta of a run's newest complete checkpoint: its Config, world size, accumulation."""
    ckpt = fsdp_train.find_latest_checkpoint(exp / "checkpoints")
    assert ckpt is not None, f"no complete checkpoint in {exp}"
    return fsdp_train.read_meta(ckpt)


def losses(exp: Path) -> dict[int, float]:
    """Logged loss by step; a step logged again (after a resume) counts with its last value."""
    return {m["global_step"]: m["loss"] for m in read_metrics(exp)}


@torch.no_grad()
def step1_loss(exp: Path) -> None:
    """Row 2: the run's logged step-1 loss (--log-freq 1) vs plain transformers in fp32 on the blocks that
    step trained on (epoch_permutation, rank_batch_indices), each document alone, cut at EOS, first token untrained."""
    from transformers import AutoTokenizer

    meta = run_meta(exp)
    cfg, world = meta.config, meta.world_size
    assert meta.grad_accum_steps == 1, "the reference takes one micro-batch a step"
    assert cfg.get("packing") != "padded", "the run trained on padded blocks, not packed documents"
    cache = packed_cache(Path(cfg["save_dir"]), cfg["dataset_name"], cfg["seq_length"])
    if cache is None:
        raise SystemExit(f"no packed training data of {cfg['dataset_name']} under {cfg['save_dir']}/.cache/tokenized")
    data = fsdp_train.load_packed(cache)
    model = load_model(cfg["model_name"])
    eos = AutoTokenizer.from_pretrained(cfg["model_name"]).eos_token_id
    perm = fsdp_train.epoch_permutation(len(data), cfg["seed"], 0)
    batches = [fsdp_train.rank_batch_indices(perm, 0, cfg["batch_size"], rank, world) for rank in range(world)]
    rows = [i for batch in batches for i in batch if i != fsdp_train.FILLER]  # a step's free places train nothing
    total, count = 0.0, 0
    for row in data[rows]["input_ids"].long():
        for a, b in eos_cuts(row, eos):
            if b - a < 2:
                continue
            logits = model(input_ids=row[a:b][None]).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, row[a + 1 : b], reduction="sum").item()
            count += b - a - 1
    expected, got = total / count, losses(exp)[1]
    limit = bound("step1-loss")
    ok = abs(got - expected) <= limit
    names = {f.name for f in dataclasses.fields(fsdp_train.Config)}
    run_cfg = fsdp_train.Config(**{k: v for k, v in cfg.items() if k in names})
    compute = run_cfg.compute_dtype(torch.device("cuda" if CUDA else "cpu"))
    assert compute == torch.float32, f"the run computed in {compute}: step1-loss compares an fp32 run"
    report(f"loss {got:.6f} vs {expected:.6f}: |gap| {within(abs(got - expected), limit)} (fp32, {count} targets)", ok)


# ----------------------------------------------------------------------------------------------------------------------
# 3. Resume, 5. dtypes, --compile: losses of two runs


def max_gap(a: dict[int, float], b: dict[int, float], steps) -> float:
    """Largest |loss gap| over these steps; inf where either run did not log one."""
    return max((abs(a[s] - b[s]) if s in a and s in b else float("inf") for s in steps), default=float("inf"))


def resume(resumed: Path, straight: Path, at: int) -> None:
    """Row 3: a run stopped at step `at` and continued by the same command with a larger --stop-at-step, vs an
    uninterrupted run: its metrics must hold every step once (a fresh start would log step 1 again), every step's loss
    must match, before and after `at` (steps before it show the kernels' own run-to-run noise), and so must the final
    checkpoint's weights."""
    steps = [m["global_step"] for m in read_metrics(resumed)]
    a, b = losses(resumed), losses(straight)
    last = max(b)
    once = steps == list(range(1, last + 1))
    before, after = max_gap(a, b, range(1, at + 1)), max_gap(a, b, range(at + 1, last + 1))
    wa, wb = (checkpoint_weights(fsdp_train.find_latest_checkpoint(e / "checkpoints")) for e in (resumed, straight))
    wgap = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wb) if wa.keys() == wb.keys() else 1e9
    limit = bound("resume")
    ok = once and max(before, after, wgap) <= limit
    logged = "logged once each" if once else f"NOT logged once each: {len(steps)} lines"
    gaps = f"|loss gap| 1..{at} {within(before, limit)}, resumed {at + 1}..{last} {within(after, limit)}"
    report(f"steps 1..{last} {logged}; {gaps}; |weight gap| at {last} {within(wgap, limit)}", ok)


def dtypes(bf16: Path, fp32: Path) -> None:
    """Row 5: the loss at the last step both runs logged (the same command in bf16 and in fp32); the largest gap of
    any earlier step is reported too."""
    a, b = losses(bf16), losses(fp32)
    last = min(max(a), max(b))
    gap = abs(a[last] - b[last])
    worst = max_gap(a, b, range(1, last + 1))
    limit = bound("dtypes")
    figures = f"step {last}: bf16 {a[last]:.4f} vs fp32 {b[last]:.4f}: |gap| {within(gap, limit)}"
    report(f"{figures} (steps 1..{last}: max {worst:.1e})", gap <= limit)


def same_losses(run: Path, base: Path, name: str) -> None:
    """Every logged step of `run` against the same step of `base`, which differs only in the setting measured."""
    a, b = losses(run), losses(base)
    gap = max_gap(a, b, a)
    limit = bound(name)
    report(f"steps 1..{max(a)}: max |loss gap| {within(gap, limit)}", gap <= limit)


# ----------------------------------------------------------------------------------------------------------------------
# 4. The export


@torch.no_grad()
def export(exp: Path) -> None:
    """Row 4: SAVE_DIR/EXP/hf, loaded with from_pretrained, vs the final checkpoint's weights, on a fixed input.
    Exact (the check): it loads with no missing, unexpected or mismatched tensor, and its logits equal those of the
    checkpoint's weights rounded to the export's dtype, both computed in fp32 on the CPU. Reported: the export computing
    in its own dtype vs the checkpoint's fp32 weights in fp32, what a bf16 export costs (0 for an fp32 one)."""
    from transformers import AutoModelForCausalLM

    hf = exp / "hf"
    ckpt = fsdp_train.find_latest_checkpoint(exp / "checkpoints")
    weights = checkpoint_weights(ckpt)
    exported, info = AutoModelForCausalLM.from_pretrained(hf, dtype="auto", output_loading_info=True)
    dtype = exported.dtype
    missing = [k for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    config = exported.config
    ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))

    def logprobs(model) -> torch.Tensor:
        model.config.use_cache = False
        return model.eval()(input_ids=ids).logits.float().log_softmax(-1)

    own = logprobs(exported)
    exported_fp32 = logprobs(exported.float())
    rounded = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rounded.load_state_dict({k: v.to(dtype).float() for k, v in weights.items()}, strict=True)
    full = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    full.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    exact = (exported_fp32 - logprobs(rounded)).abs().max().item()
    rounding = (own - logprobs(full)).abs().max().item()
    ok = not missing and exact == 0
    name, problems = str(dtype)[6:], " " + ", ".join(missing) if missing else ""
    figures = f"{ckpt.name} -> hf ({name}){problems}: gap {exact:.1e} (must be 0)"
    report(f"{figures}; computing in {name} vs fp32 weights: {rounding:.2f} (reported)", ok)


# ----------------------------------------------------------------------------------------------------------------------
# Throughput figures


def metrics(exp: Path) -> None:
    """The last metrics line of a run: loss, tok/s, MFU (where the peak is known), peak memory."""
    m = read_metrics(exp)[-1]
    mem = m.get("mem/peak_allocated_gib", m.get("mem/peak_rss_gib"))
    parts = [f"step {m['global_step']}", f"loss {m['loss']:.3f}", f"tok/s {m['tok/s']:,.0f}"]
    parts += [f"MFU {m['mfu']:.1%}"] if "mfu" in m else []
    parts += [f"{k} {v:.3f}" for k, v in m.items() if k.startswith(("loss/", "val/loss"))]  # a mixture's sources
    parts += [f"peak {mem:.2f} GiB"] if mem is not None else []
    report(", ".join(parts), True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, fn, *paths: str) -> argparse.ArgumentParser:
        """A subcommand running fn(args), with `paths` as its positional Path arguments."""
        q = sub.add_parser(name)
        q.set_defaults(fn=fn)
        for path in paths:
            q.add_argument(path, type=Path)
        return q

    command("prepare", lambda a: prepare(a.out), "out")
    q = command("isolation", lambda a: isolation(a.model, a.lines, a.attn, a.rows, a.seq, a.broken), "model", "lines")
    q.add_argument("attn")
    q.add_argument("--rows", type=int, default=4, help="packed rows a micro-batch (4)")
    q.add_argument("--seq", type=int, default=256, help="tokens a row (256)")
    q.add_argument("--broken", action="store_true", help="feed the rows so that documents mix: the row must fail")
    command("step1-loss", lambda a: step1_loss(a.exp), "exp")
    q = command("resume", lambda a: resume(a.resumed, a.straight, a.at), "resumed", "straight")
    q.add_argument("--at", type=int, default=20, help="the step the resumed run was continued from (20)")
    command("export", lambda a: export(a.exp), "exp")
    command("dtypes", lambda a: dtypes(a.bf16, a.fp32), "bf16", "fp32")
    q = command("same-losses", lambda a: same_losses(a.run, a.base, a.bound), "run", "base")
    q.add_argument("--bound", default="compile", choices=sorted(BOUNDS), help="which BOUNDS entry (compile)")
    command("metrics", lambda a: metrics(a.exp), "exp")
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
