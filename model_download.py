"""Get a model ready for offline training: download it into the Hugging Face cache, or build a tiny one locally.

Download config, tokenizer and safetensors weights into the normal HF cache (``$HF_HOME/hub``), then verify the
snapshot without allocating any weights (the model is built on the meta device):

    python model_download.py --model-name meta-llama/Llama-3.2-1B
    HF_HUB_OFFLINE=1 python model_download.py --model-name meta-llama/Llama-3.2-1B   # verify what is cached

    model meta-llama/Llama-3.2-1B @ 4e20de36...
      snapshot   /data/hf/hub/models--meta-llama--Llama-3.2-1B/snapshots/4e20de36...
      params     1,235,814,400 (1.24 G)
      on disk    2.47 GB in 9 files
      weights    146/146 expected tensors present (tied: lm_head.weight)
    OK: ready for offline use (HF_HUB_OFFLINE=1)

Build a tiny random Llama with a byte-level BPE tokenizer trained on the bundled corpus (what the demo and the tests
train, since no hub is reachable from CI):

    python model_download.py --tiny outputs/demo-data/tiny-llama [--corpus data] [--tied]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Only what training needs: config, tokenizer files, chat template, safetensors weights (not .bin/.pth/GGUF copies).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "tokenizer*"]
EOS_TOKEN, BOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<|endoftext|>", "<|begin|>", "<|pad|>", "<|unk|>"


class ModelError(Exception):
    """A problem with the user's model or inputs; reported as one line."""


@dataclass
class Report:
    snapshot: Path
    num_params: int
    disk_bytes: int
    num_files: int
    expected: int
    missing: list[str]
    tied: list[str]

    @property
    def ok(self) -> bool:
        return not self.missing


# ----------------------------------------------------------------------------------------------------------------------
# Hub download and offline verification


def download(model_name: str, revision: str | None = None) -> Path:
    """Fetch (or, with HF_HUB_OFFLINE=1, look up) a snapshot in the HF cache and return its folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id=model_name, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError:
        raise ModelError(
            f"'{model_name}' is not in the cache at {hf_cache_dir()} and the hub cannot be reached "
            "(offline?); download it on a machine with network access into the same HF_HOME"
        ) from None
    except (RepositoryNotFoundError, HfHubHTTPError, ValueError) as e:
        raise ModelError(f"cannot download '{model_name}': {first_line(e)}") from None


def hf_cache_dir() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return HF_HUB_CACHE


def checkpoint_keys(snapshot: Path) -> set[str]:
    """Tensor names stored in a snapshot's safetensors files, read from headers only (no weights loaded)."""
    from safetensors import safe_open

    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    files = sorted(snapshot.glob("*.safetensors"))
    if not files:
        raise ModelError(f"no safetensors weights in {snapshot} (only safetensors checkpoints are supported)")
    keys: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            keys.update(sf.keys())
    return keys


def verify(snapshot: Path) -> Report:
    """Build the model from its config on the meta device and check every weight it expects is in the checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(snapshot)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the model config in {snapshot}: {first_line(e)}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)

    # A tied pair (lm_head <-> embed_tokens) is one tensor stored under one of its names.
    names_by_param: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(p), []).append(name)
    stored = checkpoint_keys(snapshot)
    persistent_buffers = set(model.state_dict()) - {n for names in names_by_param.values() for n in names}
    missing = [names[0] for names in names_by_param.values() if not stored.intersection(names)]
    missing += sorted(b for b in persistent_buffers if b not in stored)
    tied = [n for names in names_by_param.values() if len(names) > 1 for n in names[1:]]

    files = [f for f in snapshot.rglob("*") if f.is_file()]
    return Report(
        snapshot=snapshot,
        num_params=sum(p.numel() for p in model.parameters()),
        disk_bytes=sum(f.stat().st_size for f in files),  # stat() follows the cache's symlinks into blobs/
        num_files=len(files),
        expected=len(names_by_param) + len(persistent_buffers),
        missing=missing,
        tied=tied,
    )


def print_report(model_name: str, report: Report) -> None:
    print(f"model {model_name} @ {report.snapshot.name}")
    print(f"  snapshot   {report.snapshot}")
    print(f"  params     {report.num_params:,} ({human(report.num_params)})")
    print(f"  on disk    {human(report.disk_bytes)}B in {report.num_files} files")
    tied = f" (tied: {', '.join(report.tied)})" if report.tied else ""
    print(f"  weights    {report.expected - len(report.missing)}/{report.expected} expected tensors present{tied}")


# ----------------------------------------------------------------------------------------------------------------------
# Tiny local model


def train_tokenizer(corpus: Path, vocab_size: int):
    """A byte-level BPE tokenizer trained on every document data_to_hf.py would extract from `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from data_to_hf import BadFileError, find_files, iter_file_documents

    def documents():
        for path in find_files(corpus)[0]:
            try:
                yield from iter_file_documents(path)
            except BadFileError:
                continue

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, BOS_TOKEN, PAD_TOKEN, UNK_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents(), trainer=trainer)
    if tok.get_vocab_size() <= len(pre_tokenizers.ByteLevel.alphabet()) + 4:
        raise ModelError(f"no text found under {corpus} to train a tokenizer on")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=BOS_TOKEN, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN
    )


def build_tiny(
    out_dir: Path,
    corpus: Path = Path("data"),
    *,
    vocab_size: int = 2048,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = 1024,
    tied: bool = False,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a random-init Llama causal LM and its tokenizer to `out_dir` in HF format (atomically)."""
    if not corpus.is_dir():
        raise ModelError(f"corpus folder not found: {corpus}")
    if out_dir.exists() and not overwrite:
        raise ModelError(f"{out_dir} already exists (pass --overwrite to replace it)")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(corpus, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 8 // 3 // 16 * 16 or 16,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)

    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------------------------------
# CLI


def human(n: float) -> str:
    """1234567 -> '1.23 M'."""
    for unit in ("", " k", " M", " G", " T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g} P"


def first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def main(argv: list[str] | None = None) -> int:
    from organize_data import OneLineParser

    p = OneLineParser(description=__doc__)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model-name", help="hub id (ORG/NAME) to download into $HF_HOME and verify")
    what.add_argument("--tiny", type=Path, metavar="OUT_DIR", help="build a tiny random Llama + tokenizer here")
    p.add_argument("--revision", help="branch, tag or commit for --model-name (default: main)")
    p.add_argument("--corpus", type=Path, default=Path("data"), help="text to train the tiny tokenizer on (data)")
    p.add_argument("--vocab-size", type=int, default=2048, help="tiny tokenizer vocabulary (2048)")
    p.add_argument("--hidden-size", type=int, default=128, help="tiny model width (128)")
    p.add_argument("--num-layers", type=int, default=4, help="tiny model decoder layers (4)")
    p.add_argument("--tied", action="store_true", help="tie the tiny model's input and output embeddings")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --tiny folder")
    args = p.parse_args(argv)
    if args.revision and not args.model_name:
        p.error("--revision only applies to --model-name")
    if args.vocab_size < 300 or args.hidden_size < 8 or args.num_layers < 1:
        p.error("--vocab-size must be >= 300, --hidden-size >= 8 and --num-layers >= 1")

    t0 = time.perf_counter()
    try:
        if args.tiny:
            out = build_tiny(
                args.tiny,
                args.corpus,
                vocab_size=args.vocab_size,
                hidden_size=args.hidden_size,
                num_layers=args.num_layers,
                tied=args.tied,
                overwrite=args.overwrite,
            )
            report = verify(out)
            print_report(str(out), report)
            print(f"OK: tiny model written to {out} in {time.perf_counter() - t0:.1f}s")
            return 0
        snapshot = download(args.model_name, args.revision)
        report = verify(snapshot)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_report(args.model_name, report)
    if not report.ok:
        shown = ", ".join(report.missing[:5]) + (" ..." if len(report.missing) > 5 else "")
        print(f"error: {len(report.missing)} expected weights missing from the checkpoint: {shown}", file=sys.stderr)
        return 1
    print(f"OK: ready for offline use (HF_HUB_OFFLINE=1), checked in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
