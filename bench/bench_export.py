"""Host memory of the end-of-run Hugging Face export on each rank, for whichever fsdp_train.py is first on the path.

    python bench/bench_export.py [--ranks 2] [--hidden 1024 --layers 8 --vocab 16384] [--code DIR]

Builds a random Llama of that shape once (model_download.build_tiny), then in a torchrun job builds the sharded model
from it exactly as training does, resets each rank's resident-memory high-water mark (VmHWM), runs export_hf, and
reports each rank's rise above its RSS before the export. --code points at another checkout (e.g. a git worktree of
an older commit) to measure its export the same way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from benchlib import MALLOC_ENV, ROOT, emit, parse, run, session, tiny_model, worker_cmd

QUICK = {"hidden": 256, "layers": 2, "vocab": 4096}


def configure(p) -> None:
    p.add_argument("--ranks", type=int, default=2, help="ranks (2)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (1024)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (8)")
    p.add_argument("--vocab", type=int, default=16384, help="vocabulary (16384)")
    p.add_argument("--code", default=str(ROOT), help="checkout whose fsdp_train.py is measured (this one)")


def export_worker(code: str, model: str, out: str) -> None:
    sys.path.insert(0, code)  # before the repo root benchlib put there
    import fsdp_train as ft

    cfg = ft.Config(dataset_name="-", model_name=model, save_dir=out, experiment_name="export")
    d = ft.setup_distributed()
    model_ = ft.build_model(cfg, d, load_pretrained=True)
    base = ft.memory_baseline(ft.torch.device("cpu"))  # resets VmHWM
    ft.export_hf(model_, cfg, d, Path(out) / f"hf-{os.getpid()}")
    emit({"rank": d.rank, "export_peak_rise_mib": round((ft.anon_peak() - base) / 2**20, 1)})
    ft.teardown_distributed()


def main(argv: list[str] | None = None) -> int:
    args = parse(__doc__, configure, QUICK, None, argv)
    with session("export", args) as (work, payload):
        model = tiny_model(work / "model", hidden_size=args.hidden, num_layers=args.layers, vocab_size=args.vocab)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
        job = run(worker_cmd("bench_export.py", "export_worker", args.code, model, work, nproc=args.ranks), MALLOC_ENV)
        rows = sorted(job.check().results(), key=lambda r: r["rank"])
        print(f"model {size:.0f} MiB (fp32 safetensors), {args.ranks} ranks, code {args.code}")
        for r in rows:
            print(
                f"  rank {r['rank']}: export peak +{r['export_peak_rise_mib']:.0f} MiB above its RSS before the export"
            )
        payload.update(model_mib=size, ranks=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
