#!/usr/bin/env bash
# The one command of the GPU check on a device machine (nvidia-h100-x1 / nvidia-h200), run from the
# repository root with the wheels of tools/fetch_gpu_wheels.sh carried in .whl/:
#
#     bash tools/gpu_check.sh [extra gpu_check.py arguments]
#
# 1. installs the carried wheels (megatron-core, diffusers) into /tmp/site (GPU_CHECK_SITE), as the device README
#    says (no index, no deps: everything else is on the machine already);
# 2. runs tools/gpu_check.py with a time budget (GPU_CHECK_BUDGET_S, default 300 s) under a hard
#    limit (GPU_CHECK_TIMEOUT_S, default 420 s); it writes gpu_check.json, the log goes to
#    gpu_check.log (each step's files go into GPU_CHECK_RESULTS, default /tmp/gpu_check_results,
#    packed on exit into $OUT/gpu_check_all.tgz: the device tool brings back at most 8 files);
# 3. runs tests/test_te_spec.py (the TE parity tests run only where Transformer Engine imports)
#    into pytest_te_spec.log, under its own limit (GPU_CHECK_PYTEST_TIMEOUT_S, default 150 s);
# 4. runs `adm-megatron bench` (issue 14: our DiT vs diffusers' forward / forward+backward at the real
#    token count, each ADM phase and the whole iteration: seconds, TFLOP/s, MFU, peak memory) on
#    GPU_CHECK_BENCH_MODEL (default cogvideox-2b) cut to GPU_CHECK_BENCH_LAYERS blocks (default 4),
#    with GPU_CHECK_BENCH_ARGS (default: 3 repeats, 1 warm-up, 2 generator steps, a head on every
#    2nd block) and model.attention_backend=auto (the fastest SDPA kernel, timed; its choice is in
#    the JSON's "kernels"), and how long one checkpoint of that run stops training (synchronous and
#    in the background), and (--profile) each side's DiT forward+backward time by kernel kind
#    (attention, GEMM, normalisation, copies, other) and one iteration's (its kernel time against its
#    wall time), into bench.json and bench.log, under
#    GPU_CHECK_BENCH_TIMEOUT_S (default 150 s). GPU_CHECK_BENCH_TIMEOUT_S=0 skips it;
# 5. the same bench with model.compile=blocks (each of our blocks through torch.compile; diffusers'
#    model eager) into bench_compiled.json / bench_compiled.log, under GPU_CHECK_COMPILE_TIMEOUT_S
#    (default 240 s: compiling took over 120 s on an H200; 0 skips it);
#    and then with model.compile=blocks model.bf16_params=true as well (the trainable networks held in
#    bf16, fp32 main params in the optimizer: the elementwise work and autocast's casts in bf16) into
#    bench_compiled_bf16_params.json / .log, under GPU_CHECK_BF16_PARAMS_TIMEOUT_S (default 180 s; 0
#    skips it; the DiT section's graphs come from inductor's cache of the step before);
# 6. FP8, under GPU_CHECK_FP8_TIMEOUT_S (default 180 s; 0 skips it), into bench_fp8.json / .log, to set
#    beside the bf16 benches: where Transformer Engine imports, the bench with model.fp8=hybrid (TE
#    spec, delayed scaling); else, where torchao imports (carried in .whl/), with model.fp8=tensorwise
#    (torchao's FP8 GEMMs in the local spec's linears) and step 5's model.compile=blocks
#    model.bf16_params=true; else a line saying why not;
# 7. the memory-settings check (tools/gpu_memory_settings.py);
# 8. ADP's pixel branch under BF16 autocast on the GPU (tools/pixel_branch_memory.py --autocast bf16
#    --device cuda) into pixel_branch_bf16.json / .log, under GPU_CHECK_PIXEL_TIMEOUT_S (default
#    60 s; 0 skips it): the bf16 figures docs/PERFORMANCE.md could not measure on a CPU, each beside the
#    memory planner's count of the same run on CUDA fake tensors.
# Every step's limit is also cut to what is left of GPU_CHECK_TOTAL_S (default 570 s) since the start, so
# the whole script fits one 600 s device call; a step with under 20 s left is skipped and says so.
#
# Exit status: gpu_check.py's (0: every check passed and no section failed).
# See docs/gpu_check.md.
set -uo pipefail
cd "$(dirname "$0")/.."

TOTAL_S=${GPU_CHECK_TOTAL_S:-570}
# limit STEP_DEFAULT_S: the step's own limit, cut to the time left of TOTAL_S (0: no time left)
limit() {
    local left=$((TOTAL_S - SECONDS))
    if [ "$left" -lt 20 ]; then echo 0; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
# The device tool brings back at most 8 files from $OUT: every step writes into GPU_CHECK_RESULTS, and
# on exit the script packs that folder into $OUT/gpu_check_all.tgz beside copies of the main JSONs.
DEST=${OUT:-/tmp/gpu_check_out}
OUT=${GPU_CHECK_RESULTS:-/tmp/gpu_check_results}
mkdir -p "$OUT" "$DEST"
pack() {
    tar czf "$DEST/gpu_check_all.tgz" -C "$OUT" . && \
        for f in gpu_check.json bench.json gpu_check.log; do [ -f "$OUT/$f" ] && cp "$OUT/$f" "$DEST/"; done
    echo "== results: $DEST/gpu_check_all.tgz (every step's log and JSON)"
}
trap pack EXIT
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}

echo "== $(date -u +%FT%TZ) $(uname -m) $($PY --version 2>&1)"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: no GPU listed"

if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "no wheels in .whl/: run tools/fetch_gpu_wheels.sh here first and carry .whl" >&2
    exit 3
fi
ls -l .whl/
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 3; }
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

$PY - <<'EOF'
import importlib.metadata as md
for name in ("torch", "megatron-core", "diffusers", "transformers", "huggingface-hub", "safetensors", "numpy"):
    try:
        print(f"{name:16s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:16s} MISSING")
EOF

step_s=$(limit "${GPU_CHECK_TIMEOUT_S:-420}")
if [ "$step_s" = 0 ]; then
    echo "== gpu_check.py: skipped, no time left of GPU_CHECK_TOTAL_S=$TOTAL_S"
    status=4
else
    timeout -k 15 "$step_s" $PY tools/gpu_check.py \
        --out "$OUT/gpu_check.json" --budget-s "${GPU_CHECK_BUDGET_S:-300}" "$@" 2>&1 | tee "$OUT/gpu_check.log"
    status=${PIPESTATUS[0]}
    echo "== gpu_check.py exit status: $status"
fi

step_s=$(limit "${GPU_CHECK_PYTEST_TIMEOUT_S:-150}")
if [ "$step_s" = 0 ]; then
    echo "== tests/test_te_spec.py: skipped, no time left of GPU_CHECK_TOTAL_S=$TOTAL_S"
else
    timeout -k 10 "$step_s" $PY -m pytest -q -p no:cacheprovider -rs \
        tests/test_te_spec.py > "$OUT/pytest_te_spec.log" 2>&1
    echo "== tests/test_te_spec.py exit status: $? (log: $OUT/pytest_te_spec.log)"
    tail -n 5 "$OUT/pytest_te_spec.log"
fi

# bench NAME STEP_DEFAULT_S [extra overrides]: adm-megatron bench into $OUT/NAME.json / NAME.log
bench() {
    local name=$1 step_s checkpoints=0
    [ "$name" = bench ] && checkpoints=1  # the checkpoint pause once: the other benches change only kernels
    step_s=$(limit "$2")
    shift 2
    if [ "$step_s" = 0 ]; then
        echo "== $name: skipped, no time left of GPU_CHECK_TOTAL_S=$TOTAL_S"
        return 0
    fi
    # shellcheck disable=SC2086  # the extra arguments are meant to split
    timeout -k 10 "$step_s" $PY -m adm_megatron.cli bench \
        --model "${GPU_CHECK_BENCH_MODEL:-cogvideox-2b}" --layers "${GPU_CHECK_BENCH_LAYERS:-4}" \
        --out "$OUT/$name.json" --checkpoint-repeats "$checkpoints" --profile \
        ${GPU_CHECK_BENCH_ARGS:---repeats 3 --warmup 1 distill.generator_steps=2 distill.head_every=2} \
        model.attention_backend=auto "$@" > "$OUT/$name.log" 2>&1
    echo "== adm-megatron bench ($name) exit status: $? (log: $OUT/$name.log, JSON: $OUT/$name.json)"
    tail -n 45 "$OUT/$name.log"
}
if [ "${GPU_CHECK_BENCH_TIMEOUT_S:-150}" != 0 ]; then
    bench bench "${GPU_CHECK_BENCH_TIMEOUT_S:-150}"
fi
if [ "${GPU_CHECK_COMPILE_TIMEOUT_S:-240}" != 0 ]; then
    bench bench_compiled "${GPU_CHECK_COMPILE_TIMEOUT_S:-240}" model.compile=blocks
fi
if [ "${GPU_CHECK_BF16_PARAMS_TIMEOUT_S:-180}" != 0 ]; then
    bench bench_compiled_bf16_params "${GPU_CHECK_BF16_PARAMS_TIMEOUT_S:-180}" model.compile=blocks model.bf16_params=true
fi
if [ "${GPU_CHECK_FP8_TIMEOUT_S:-180}" != 0 ]; then
    if te_error=$($PY -c 'import transformer_engine.pytorch' 2>&1); then
        bench bench_fp8 "${GPU_CHECK_FP8_TIMEOUT_S:-180}" model.fp8=hybrid
    elif ao_error=$($PY -c 'import torchao.float8.float8_linear' 2>&1); then
        bench bench_fp8 "${GPU_CHECK_FP8_TIMEOUT_S:-180}" model.fp8=tensorwise model.compile=blocks \
            model.bf16_params=true
    else
        echo "== fp8 bench: skipped, neither Transformer Engine ($(echo "$te_error" | tail -n 1)) nor torchao" \
             "($(echo "$ao_error" | tail -n 1)) imports here"
    fi
fi

# ---- memory settings (issue #12; owner: the sharded-optimizer / offload work) -------------------
# Peak GPU memory of a medium ADM iteration with offload, sharding (needs 2 GPUs: DP = 2) and bf16
# params on vs off, and the losses' difference to the baseline (offload must not change them).
memory_settings_check() {
    local nproc rc
    nproc=$("$PY" -c 'import torch; print(min(2, torch.cuda.device_count()))' 2>/dev/null || echo 0)
    if [ "${nproc:-0}" -lt 1 ]; then
        echo "== memory settings: no GPU, skipped"
        return 0
    fi
    local step_s
    step_s=$(limit "${GPU_CHECK_MEMORY_TIMEOUT_S:-200}")
    if [ "$step_s" = 0 ]; then
        echo "== memory settings: skipped, no time left of GPU_CHECK_TOTAL_S=$TOTAL_S"
        return 0
    fi
    # each variant in its own torchrun of $nproc processes (the tool launches them)
    timeout -k 10 "$step_s" "$PY" tools/gpu_memory_settings.py --nproc "$nproc" \
        --out "$OUT/memory_settings.json" > "$OUT/memory_settings.log" 2>&1
    rc=$?
    echo "== tools/gpu_memory_settings.py exit status: $rc on $nproc GPU(s) (log: $OUT/memory_settings.log)"
    grep -E '^(baseline|offload|bf16|sharded|    )' "$OUT/memory_settings.log" | tail -n 16
    return 0
}
memory_settings_check
# ---- end of memory settings ---------------------------------------------------------------------

step_s=$(limit "${GPU_CHECK_PIXEL_TIMEOUT_S:-60}")
if [ "${GPU_CHECK_PIXEL_TIMEOUT_S:-60}" = 0 ] || [ "$step_s" = 0 ]; then
    echo "== pixel branch (bf16 autocast): skipped"
else
    timeout -k 10 "$step_s" $PY tools/pixel_branch_memory.py --device cuda --autocast bf16 \
        --out "$OUT/pixel_branch_bf16.json" > "$OUT/pixel_branch_bf16.log" 2>&1
    echo "== tools/pixel_branch_memory.py (bf16 autocast) exit status: $? (log: $OUT/pixel_branch_bf16.log)"
    grep '^|' "$OUT/pixel_branch_bf16.log"
fi

exit "$status"
