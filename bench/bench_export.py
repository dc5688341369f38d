"""Host memory of the end-of-run Hugging Face export on each rank, for whichever fsdp_train.py is first on the path.

    python bench/bench_export.py [--ranks 2] [--hidden 1024 --layers 8 --vocab 16384] [--code DIR]

Builds a random Llama of that shape once (model_download.py --tiny), then in a torchrun job builds the sharded model
from it exactly as training does, resets each rank's resident-memory high-water mark (VmHWM), runs export_hf, and
prints each rank's rise above its RSS before the export. --code points at another checkout (e.g. a git worktree of
an older commit) to measure its export the same way.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(code: str, model: str, out: str) -> None:
    sys.path.insert(0, code)
    import fsdp_train as ft

    cfg = ft.Config(dataset_name="-", model_name=model, save_dir=out, experiment_name="export")
    d = ft.setup_distributed()
    model_ = ft.build_model(cfg, d, load_pretrained=True)
    base = ft.memory_baseline(ft.torch.device("cpu"))  # resets VmHWM
    ft.export_hf(model_, cfg, d, Path(out) / f"hf-{os.getpid()}")
    rise = (ft.anon_peak() - base) / 2**20
    ft.say(json.dumps({"rank": d.rank, "export_peak_rise_mib": round(rise, 1)}))  # one write: no interleaving
    ft.teardown_distributed()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--code", default=str(ROOT), help="checkout whose fsdp_train.py is measured")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.code, *args.worker)
    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    model = work / "model"
    subprocess.run([sys.executable, str(ROOT / "model_download.py"), "--tiny", str(model), "--hidden-size",
                    str(args.hidden), "--num-layers", str(args.layers), "--vocab-size", str(args.vocab)],
                   check=True, cwd=ROOT, capture_output=True)  # fmt: skip
    size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
                           __file__, "--code", args.code, "--worker", str(model), str(work)],
                          env=env, capture_output=True, text=True)  # fmt: skip
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not rows:
        sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
    print(f"model {size:.0f} MiB (fp32 safetensors), {args.ranks} ranks, code {args.code}")
    for r in sorted(rows, key=lambda r: r["rank"]):
        print(f"  rank {r['rank']}: export peak +{r['export_peak_rise_mib']:.0f} MiB above its RSS before the export")


if __name__ == "__main__":
    main()
