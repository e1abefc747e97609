#!/usr/bin/env bash
# The CPU figures of docs/PERFORMANCE.md in one command (run it on a quiet machine, from the
# repository root):
#
#     bash tools/bench_cpu.sh [OUT_DIR]        # default docs/bench
#
# 1. writes the CPU comparison model of issue 14 (a diffusers CogVideoX transformer, random
#    weights: 8 heads x 32, 4 blocks, 32 text tokens of width 64, 4 latent channels);
# 2. benchmarks it with this tree (OUT_DIR/cpu_after.json) and with the tree of commit $BEFORE,
#    the benchmark before the ADM iteration's avoidable work was removed (OUT_DIR/cpu_before.json),
#    both at batch 2, 4 x 16 x 16 latents, fp32, 2 threads, ADM with 2 generator steps and a head
#    on every 3rd block, medians of $REPEATS;
#    and this tree once more with model.compile=blocks (OUT_DIR/cpu_after_compiled.json: our blocks
#    through torch.compile, diffusers' model eager);
# 3. prints the tables and the before / after summary.
# PYTHON (default python3) must import torch, megatron-core and diffusers. Earlier figures are kept:
# an OUT_DIR that holds any of the three JSON files is refused before anything runs, unless
# OVERWRITE=1 (then all three are measured again).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/bench}
PY=${PYTHON:-python3}
BEFORE=${BEFORE:-d38e3f3}
REPEATS=${REPEATS:-15}
NAMES=(cpu_before.json cpu_after.json cpu_after_compiled.json)
if [[ ${OVERWRITE:-0} == 1 ]]; then
    rm -f "${NAMES[@]/#/$OUT/}"  # bench refuses an existing --out (the tree of $BEFORE has no --overwrite)
else
    for name in "${NAMES[@]}"; do
        if [[ -e $OUT/$name ]]; then
            echo "tools/bench_cpu.sh: $OUT/$name exists (an earlier measurement): give a new OUT_DIR, or OVERWRITE=1 to replace all three" >&2
            exit 2
        fi
    done
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

$PY - "$WORK/model" <<'PYEOF'
import sys, torch
from diffusers import CogVideoXTransformer3DModel
torch.manual_seed(0)
CogVideoXTransformer3DModel(num_attention_heads=8, attention_head_dim=32, in_channels=4, out_channels=4,
                            time_embed_dim=64, text_embed_dim=64, num_layers=4, sample_width=16,
                            sample_height=16, sample_frames=13, max_text_seq_length=32).save_pretrained(sys.argv[1])
PYEOF

ARGS=(--model "$WORK/model" --batch 2 --frames 4 --height 16 --width 16 --dtype fp32 --repeats "$REPEATS"
      --warmup 2 distill.generator_steps=2 distill.head_every=3)
git archive "$BEFORE" | tar -x -C "$WORK" --one-top-level=before
(cd "$WORK/before" && $PY -m adm_megatron.cli bench "${ARGS[@]}" --out "$OUT/cpu_before.json")
$PY -m adm_megatron.cli bench "${ARGS[@]}" --out "$OUT/cpu_after.json"
$PY -m adm_megatron.cli bench "${ARGS[@]}" model.compile=blocks --out "$OUT/cpu_after_compiled.json"

$PY - "$OUT/cpu_before.json" "$OUT/cpu_after.json" "$OUT/cpu_after_compiled.json" <<'PYEOF'
import json, sys
before, after, compiled = (json.load(open(p)) for p in sys.argv[1:])
def calls(r):
    return {p: {role: v["calls"] for role, v in roles.items()} for p, roles in r["adm"]["evaluations_per_iteration"].items()}
for name, r in (("before", before), ("after", after), ("after, model.compile=blocks", compiled)):
    it = r["adm"]["phases"]["iteration"]
    print(f"{name}: {r['environment']['device']}, {r['environment']['date_utc']}, "
          f"ours/diffusers fwd+bwd {r['dit']['ratio_ours_over_diffusers']['forward_backward']:.3f}, "
          f"iteration {it['median_s']:.3f} s, {sum(it['flops']) / len(it['flops']) / 1e9:.2f} GFLOP; evaluations {calls(r)}")
print(f"iteration time after / before: {after['adm']['phases']['iteration']['median_s'] / before['adm']['phases']['iteration']['median_s']:.3f}")
PYEOF
