#!/usr/bin/env bash
# What only a GPU can show, in about 5 minutes on one GPU (see bench/README.md "GPU check"):
#   1. the demo path on CUDA: bf16, activation checkpointing, packed documents (the start-up isolation check),
#      a checkpoint, a resume, the Hugging Face export and generation from it;
#   2. --compile on;
#   3. every attention implementation that is installed: sdpa, eager, flex_attention, flash_attention_2;
#   4. a ~1B Llama-shaped throughput run: tok/s, MFU and peak memory.
# Prints one table and exits non-zero if any check failed. Needs the CUDA build of torch and requirements.txt.
#   bench/gpu_check.sh                  # PY=python OUT=/tmp/gpu_check by default
#   DEVICE_CHECK_QUICK=1 bench/gpu_check.sh   # smaller shapes (the script's own smoke test; also runs on CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT=${OUT:-/tmp/gpu_check}
QUICK=${DEVICE_CHECK_QUICK:-0}
rm -rf "$OUT" && mkdir -p "$OUT"
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1)
ROWS=()
FAILED=0

# [EXP=name] check NAME CMD...: run, keep the log, add a table row (status, seconds, figures of the last metrics
# line of experiment EXP, default NAME).
check() {
    local name=$1; shift
    local t0=$SECONDS status=ok
    "$@" >"$OUT/$name.log" 2>&1 || { status=FAIL; FAILED=1; }
    local figures
    figures=$("$PY" - "$OUT/${EXP:-$name}.exp/metrics.jsonl" <<'EOF' 2>/dev/null
import json, sys
try:
    m = json.loads(open(sys.argv[1]).read().splitlines()[-1])
except (OSError, IndexError, ValueError):
    sys.exit()
mem = m.get("mem/peak_allocated_gib", m.get("mem/peak_rss_gib"))
parts = [f"loss {m['loss']:.3f}", f"tok/s {m['tok/s']:,.0f}"]
parts += [f"MFU {m['mfu']:.1%}"] if "mfu" in m else []
parts += [f"peak {mem:.2f} GiB"] if mem is not None else []
print(", ".join(parts))
EOF
)
    ROWS+=("$(printf '%-22s %-5s %5ss  %s' "$name" "$status" "$((SECONDS - t0))" "$figures")")
    [ "$status" = ok ] || tail -n 5 "$OUT/$name.log" | sed "s/^/    [$name] /"
}

train() {  # train EXP_NAME FLAGS...: the tiny model on the demo data, outputs under $OUT/EXP.exp
    local exp=$1; shift
    "${TORCHRUN[@]}" fsdp_train.py -e "$exp.exp" --save-dir "$OUT" -d "$OUT/dataset" -m "$OUT/tiny" \
        -s 256 -b 8 --lr 1e-3 --warmup-steps 5 --log-freq 5 --num-epochs 50 "$@"
}

"$PY" - >"$OUT/env.txt" 2>&1 <<'EOF'
import torch, transformers
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"{name} | torch {torch.__version__} (CUDA {torch.version.cuda}) | transformers {transformers.__version__}")
EOF
ENV=$(cat "$OUT/env.txt")

check prep bash -c "$PY organize_data.py --src_dir data --dst_root $OUT/splits --num_dirs 2 &&
    $PY data_to_hf.py --data_folder $OUT/splits --save_dir $OUT/dataset &&
    $PY model_download.py --tiny $OUT/tiny"
# 1. Demo path: 20 steps with a checkpoint at 10, then the same command to 30 resumes; the finished run exports.
check demo train demo --max-steps 20 --ckpt-freq 10
check isolation-check grep -q "Packed documents are isolated" "$OUT/demo.log"
EXP=demo check demo-resume-to-30 train demo --max-steps 30 --ckpt-freq 10
check resumed grep -q "Resuming from step 20" "$OUT/demo-resume-to-30.log"
check generate "$PY" examples/generate.py "$OUT/demo.exp/hf" "The lighthouse keeper" --max-new-tokens 20
# 2. torch.compile of each block.
check compile train compile --max-steps 10 --compile on
# 3. Each attention implementation that is installed; each must pass the start-up isolation check.
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
for attn in sdpa eager flex_attention flash_attention_2; do
    if [ "$CUDA" = 0 ] && [[ $attn = flex_attention || $attn = flash_attention_2 ]]; then
        ROWS+=("$(printf '%-22s %-5s' "attn-$attn" "n/a") (CUDA only)")
        continue
    fi
    if [ "$attn" = flash_attention_2 ] && ! "$PY" -c "import flash_attn" 2>/dev/null; then
        ROWS+=("$(printf '%-22s %-5s' "attn-$attn" "n/a") (flash-attn not installed)")
        continue
    fi
    check "attn-$attn" train "attn-$attn" --max-steps 10 --attn-implementation "$attn"
done
# 4. A Llama-shaped ~1B model (TinyLlama's shape: h2048, 22 layers, 32 heads, 4 KV heads, vocab 32000), random
# weights in bf16, 1 x 4 x 2048 tokens a step.
if [ "$QUICK" = 1 ]; then SHAPE="hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2"; SEQ=256
else SHAPE="hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4"; SEQ=2048; fi
check build-1b "$PY" - "$OUT" <<EOF
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
out = sys.argv[1]
config = LlamaConfig(vocab_size=32000, $SHAPE, max_position_embeddings=4096)
model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(f"{out}/llama-1b")
AutoTokenizer.from_pretrained(f"{out}/tiny").save_pretrained(f"{out}/llama-1b")
print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params")
EOF
check throughput-1b "${TORCHRUN[@]}" fsdp_train.py -e throughput-1b.exp --save-dir "$OUT" -d "$OUT/dataset" \
    -m "$OUT/llama-1b" -s "$SEQ" -b 4 --lr 1e-4 --max-steps 20 --log-freq 10 --ckpt-freq 0 --num-epochs 100

echo
echo "GPU check $(date -u +%Y-%m-%d) | $ENV"
printf '%-22s %-5s %6s  %s\n' check state time figures
printf '%s\n' "${ROWS[@]}"
exit $FAILED
