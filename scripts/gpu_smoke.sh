#!/usr/bin/env bash
# Real-size smoke run of the trainer on one GPU (issue 10): the SD1.5 architecture with random weights
# (tests/support/sd15_full.py), 512x512, a full fine-tune with gradient checkpointing on, both stages,
# once in fp16 and once in bf16 autocast; each run is stopped after a few steps and resumed. Prints each
# stage's median step time and peak GPU memory (torch.cuda.max_memory_allocated) from the runs' summaries.
#
#   scripts/gpu_smoke.sh              # on a machine with CUDA (python3 with torch; ComfyUI in .host/ComfyUI
#                                     # or $COMFYUI_PATH)
#   scripts/gpu_smoke.sh --dry-run    # the same script on the CPU: the tiny SD1.5-shaped checkpoint (a full
#                                     # SD1.5 fine-tune needs ~14 GB in fp32 with AdamW), 64x64, fewer steps
# Environment: PYTHON (default python3, or .venv/bin/python when present), WORK (default /tmp/dm_gpu_smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WORK=${WORK:-/tmp/dm_gpu_smoke}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ $DRY = 1 ]; then
  DEVICE=cpu; RES=64; PRECISIONS="no"; UNET_STEPS=3; HEAD_STEPS=2; STOP=2; THREADS=2
  MODEL=(--set model.tiny=true --set "loss.green_factors=[1]")   # the tiny UNet has one level
else
  DEVICE=cuda; RES=512; PRECISIONS="fp16 bf16"; UNET_STEPS=12; HEAD_STEPS=8; STOP=7; THREADS=0
  MODEL=(--checkpoint "$WORK/sd15_random.safetensors")
fi
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
if [ $DRY = 0 ] && [ ! -f "$WORK/sd15_random.safetensors" ]; then
  "$PY" tests/support/sd15_full.py "$WORK/sd15_random.safetensors" 2>&1 | grep -v "^WARNING"
fi

for MP in $PRECISIONS; do
  OUTDIR="$WORK/run_$MP"
  rm -rf "$OUTDIR"
  ARGS=("${MODEL[@]}" --out "$OUTDIR" --device "$DEVICE" --mode full --no-progress
        --unet-steps "$UNET_STEPS" --head-steps "$HEAD_STEPS" --batch-size 2
        --set run.mixed_precision="$MP" --set run.gradient_checkpointing=on --set run.threads="$THREADS"
        --set data.source=synthetic --set data.resolution="$RES" --set data.synthetic_count=16
        --set data.holdout=2 --set data.caption_dropout=0.1 --set run.checkpoint_every=4 --set run.log_every=1
        --set run.sample_count=1 --set run.sample_steps=4 --set unet.lr=1e-5)
  echo "== $MP: first session (--stop-after $STOP)"
  "$PY" train.py "${ARGS[@]}" --stop-after "$STOP" 2>&1 | grep -v "^WARNING"
  FIRST=$("$PY" -c "import json,sys; t=json.load(open(sys.argv[1]))['timing']; print(json.dumps(t))" "$OUTDIR/summary.json")
  echo "== $MP: resume"
  "$PY" train.py --out "$OUTDIR" --resume --no-progress 2>&1 | grep -v "^WARNING"
  "$PY" - "$OUTDIR" "$MP" "$FIRST" <<'EOF'
import json, sys
from pathlib import Path
out, mp, first = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
s = json.loads((out / "summary.json").read_text())
assert s["complete"], s
for stage in ("unet", "head"):
    for label, t in (("first session", first.get(stage)), ("resumed", s["timing"].get(stage))):
        if t:
            print(f"SMOKE {mp} {stage} {label}: {t['steps']} steps, median step {t['median_step_s']:.3f} s, "
                  f"peak {t['device']} memory {t['peak_mem_gib']:.2f} GiB")
print(f"SMOKE {mp} files: {sorted(Path(p).name for p in s['files'].values())}")
print(f"SMOKE {mp} final losses: {json.dumps(s['final_losses'])}")
EOF
done
echo "SMOKE done"
