#!/usr/bin/env bash
# What only a GPU can show, in about 5-10 minutes on one GPU (see bench/README.md "GPU check"). Every row is a measured
# comparison with an independent reference (bench/gpu_check.py; plain transformers on the CPU in fp32, or another run):
#   1. isolation-ATTN: per-document log-probs of 4 packed rows fed as training feeds them vs each document alone, for
#      every installed attention implementation; a feeding that mixes documents must land above the bound;
#   2. step1-loss: fsdp_train.py's step-1 loss (fp32) vs plain transformers on each document of the step alone;
#   3. resume: 20 steps (checkpoint at 10), then the same command to 30, vs one uninterrupted 30-step run;
#   4. export: the Hugging Face export's logits vs the final checkpoint's weights; generate: generation from it;
#   5. bf16-vs-fp32: the loss after 20 steps in each compute dtype; compile: --compile on vs off, step by step;
#   6. throughput-ATTN: a ~1B Llama-shaped model at seq 4096 with each attention implementation: tok/s, MFU, peak
#      memory (figures only: they settle what --attn-implementation auto should pick on CUDA).
#   7. async save, activation offload, CPU offload, optimizer-in-backward: losses vs the same run without; a mixture
#      with validation (its per-source losses).
# Prints one table and exits non-zero if any check failed. Needs the CUDA build of torch and requirements.txt.
#   bench/gpu_check.sh                  # PY=python OUT=/tmp/gpu_check by default
#   DEVICE_CHECK_QUICK=1 bench/gpu_check.sh   # tiny throughput shapes (the script's own smoke test; also runs on CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT=${OUT:-/tmp/gpu_check}
QUICK=${DEVICE_CHECK_QUICK:-0}
rm -rf "$OUT" && mkdir -p "$OUT"
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1)
CHECK=("$PY" bench/gpu_check.py)
ROWS=()
FAILED=0

# check NAME CMD...: run, keep the log, add a table row: ok/FAIL by exit status, the figures from the log's last
# `= ` line (what bench/gpu_check.py prints).
check() {
    local name=$1; shift
    local t0=$SECONDS status=ok
    "$@" >"$OUT/$name.log" 2>&1 || { status=FAIL; FAILED=1; }
    local figures
    figures=$(grep '^= ' "$OUT/$name.log" | tail -n 1 | cut -c 3-)
    ROWS+=("$(printf '%-28s %-5s %5ss  %s' "$name" "$status" "$((SECONDS - t0))" "$figures")")
    [ "$status" = ok ] || tail -n 5 "$OUT/$name.log" | sed "s/^/    [$name] /"
}
na() { ROWS+=("$(printf '%-28s %-5s %6s  %s' "$1" "n/a" "" "$2")"); }

# train EXP FLAGS...: the sharp tiny model on one-line documents, outputs under $OUT/EXP.exp, every step logged.
# --packing isolated: a start-up isolation check that fails must fail the row, not fall back to padded blocks.
train() {
    local exp=$1; shift
    "${TORCHRUN[@]}" fsdp_train.py -e "$exp.exp" --save-dir "$OUT" -d "$OUT/lines" -m "$OUT/sharp" --packing isolated \
        -s 256 -b 4 --lr 1e-3 --warmup-steps 5 --log-freq 1 --num-epochs 50 "$@" && "${CHECK[@]}" metrics "$OUT/$exp.exp"
}

"$PY" - >"$OUT/env.txt" 2>&1 <<'EOF'
import torch, transformers
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"{name} | torch {torch.__version__} (CUDA {torch.version.cuda}) | transformers {transformers.__version__}")
EOF
ENV=$(cat "$OUT/env.txt")
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
# missing ATTN: why this machine cannot run an attention implementation (empty: it can).
missing() {
    if [ "$CUDA" = 0 ] && [[ $1 = flex_attention || $1 = flash_attention_2 ]]; then echo "CUDA only"
    elif [ "$1" = flash_attention_2 ] && ! "$PY" -c "import flash_attn" 2>/dev/null; then echo "flash-attn not installed"
    fi
}
ATTNS=(sdpa eager flex_attention flash_attention_2)

check prep bash -c "$PY organize_data.py --src_dir data --dst_root $OUT/splits --num_dirs 2 &&
    $PY data_to_hf.py --data_folder $OUT/splits --save_dir $OUT/dataset &&
    $PY model_download.py --tiny $OUT/tiny && ${CHECK[*]} prepare $OUT"
# 1. Packed documents stay apart, at 4 rows a micro-batch, with each attention implementation.
for attn in "${ATTNS[@]}"; do
    why=$(missing "$attn")
    if [ -n "$why" ]; then na "isolation-$attn" "$why"; continue; fi
    check "isolation-$attn" "${CHECK[@]}" isolation "$OUT/sharp" "$OUT/lines" "$attn"
done
# 3. The demo path (auto: bf16 and flash-attention where installed on CUDA, fp32 and sdpa on CPU): 20 steps with a
# checkpoint at 10, then the same command to 30 resumes from 20; against an uninterrupted 30-step run.
check demo train demo --stop-at-step 20 --ckpt-freq 10
check demo-resume-to-30 train demo --stop-at-step 30 --ckpt-freq 10
check straight-30 train straight --stop-at-step 30
check resume "${CHECK[@]}" resume "$OUT/demo.exp" "$OUT/straight.exp"
# 4. The export the finished run wrote, and generation from it.
check export "${CHECK[@]}" export "$OUT/demo.exp"
check generate bash -c "$PY examples/generate.py $OUT/demo.exp/hf 'The lighthouse keeper' --max-new-tokens 20 |
    tail -n 1 | cut -c 1-60 | sed 's/^/= /'"
# 2 and 5. The demo ran in the auto dtype; the other dtype runs the same command for 20 steps. The fp32 run takes sdpa:
# flash-attention has no fp32 kernel (and auto picks it on CUDA whatever --dtype says).
# bf16 on a CPU runs at a fifth of fp32's speed: quick mode compares there at step 10.
# --stop-at-step, not --max-steps: --max-steps would make the LR schedule span those steps (not the demo's epochs),
# and the losses would part for that reason alone after the warmup.
if [ "$CUDA" = 1 ]; then
    check fp32 train fp32 --stop-at-step 20 --dtype fp32 --attn-implementation sdpa
    BF16=demo FP32=fp32
else
    check bf16 train bf16 --stop-at-step "$( [ "$QUICK" = 1 ] && echo 10 || echo 20 )" --dtype bf16
    BF16=bf16 FP32=demo
fi
check step1-loss "${CHECK[@]}" step1-loss "$OUT/$FP32.exp"
check bf16-vs-fp32 "${CHECK[@]}" dtypes "$OUT/$BF16.exp" "$OUT/$FP32.exp"
# torch.compile of each block: the demo command with --compile on, 10 steps, against the demo's first 10.
check compile train compile --stop-at-step 10 --compile on
check compile-vs-eager "${CHECK[@]}" same-losses "$OUT/compile.exp" "$OUT/demo.exp" --bound compile
# 7. Options whose CUDA paths (pinned copies, streams, offload) a CPU host never takes, and a mixture with validation
# (its per-source tally on the device): each the demo command for 10 steps with the option on, against the demo's
# first 10 (in-backward: against plain steps without clipping, which it requires).
check async train async --stop-at-step 10 --ckpt-freq 5 --async-checkpoint on
check async-vs-demo "${CHECK[@]}" same-losses "$OUT/async.exp" "$OUT/demo.exp" --bound options
check activation-offload train actoff --stop-at-step 10 --activation-offload on
check activation-offload-vs-demo "${CHECK[@]}" same-losses "$OUT/actoff.exp" "$OUT/demo.exp" --bound options
check cpu-offload train cpuoff --stop-at-step 10 --cpu-offload on
check cpu-offload-vs-demo "${CHECK[@]}" same-losses "$OUT/cpuoff.exp" "$OUT/demo.exp" --bound options
check no-clip train noclip --stop-at-step 10 --max-norm 0
check in-backward train inback --stop-at-step 10 --max-norm 0 --optimizer-in-backward on
check in-backward-vs-steps "${CHECK[@]}" same-losses "$OUT/inback.exp" "$OUT/noclip.exp" --bound options
check mixture train mixture --stop-at-step 10 -d "$OUT/dataset" --val-split 0.1 --eval-freq 5
# 6. A Llama-shaped ~1B model (TinyLlama's shape: h2048, 22 layers, 32 heads, 4 KV heads, vocab 32000), random
# weights in bf16, 4 x 4096 tokens a step, with each attention implementation; figures of steps 11-20 (quick: a
# 2-layer h256 model at 4 x 256, steps 6-10).
if [ "$QUICK" = 1 ]; then SHAPE="hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2"; SEQ=256; STEPS=10
else SHAPE="hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4"; SEQ=4096; STEPS=20; fi
check build-1b "$PY" - "$OUT" <<EOF
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
out = sys.argv[1]
config = LlamaConfig(vocab_size=32000, $SHAPE, max_position_embeddings=4096)
model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(f"{out}/llama-1b")
AutoTokenizer.from_pretrained(f"{out}/tiny").save_pretrained(f"{out}/llama-1b")
print(f"= {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params")
EOF
for attn in "${ATTNS[@]}"; do
    why=$(missing "$attn")
    if [ -n "$why" ]; then na "throughput-$attn" "$why"; continue; fi
    check "throughput-$attn" bash -c "${TORCHRUN[*]} fsdp_train.py -e throughput-$attn.exp --save-dir $OUT \
        -d $OUT/dataset -m $OUT/llama-1b -s $SEQ -b 4 --lr 1e-4 --max-steps $STEPS --log-freq $((STEPS / 2)) --ckpt-freq 0 \
        --num-epochs 100 --attn-implementation $attn --packing isolated && ${CHECK[*]} metrics $OUT/throughput-$attn.exp"
    rm -rf "$OUT/throughput-$attn.exp/checkpoints" "$OUT/throughput-$attn.exp/hf"  # ~15 GB each at the 1B shape
done

echo
echo "GPU check $(date -u +%Y-%m-%d) | $ENV"
printf '%-28s %-5s %6s  %s\n' check state time figures
printf '%s\n' "${ROWS[@]}"
exit $FAILED
