#!/usr/bin/env bash
# GPU benchmarks (not a test) on one CUDA device. Logs, tables and JSON go to OUT.
#   bash pipelines/benchmark_gpu.sh [OUT] [check|suite|all]        (default: outputs/gpu_check check)
#
# check (about 7 minutes, each part under its own timeout): the paper path at the paper size
#   (512 px, batch 8, bf16), everything on stand-in weights (timings only, scores meaningless)
#   1. benchmark_paper.py         seconds per batch and peak memory of every training stage
#   2. benchmark_stage3.py        one stage-3 step phase by phase: s/step, the graders' share, peak memory
#      gpu_summary.py stage3-flops   the FLOPs of that step (for MFU)
#   3. benchmark_restore.py       the paper architecture restoring 1- and 12-MP photos in 512-px tiles,
#                                 8 per batch, bf16: MP/s, peak memory, FLOP/s
#   -> OUT/gpu_check.json (gpu_summary.py combine): s/step, graders' share, peak memory and MFU
# suite: IQA ensemble throughput, tiled restoration of a 4-MP photo, the quality-control study
#   (QC_SECONDS, default 330 s; WORK holds its checkpoints and demo data)
set -u
out=${1:-outputs/gpu_check}
mode=${2:-check}
qc_seconds=${QC_SECONDS:-330}
work=${WORK:-$out/work}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 QUALITEACHER_OFFLINE=1
log="$out/gpu_suite.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$log"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" 2>&1 | tee -a "$log"
started=$SECONDS

if [ "$mode" = check ] || [ "$mode" = all ]; then
  echo "== paper path, 512 px, batch 8, bf16 (benchmark_paper.py)" | tee -a "$log"
  timeout 230 python "$here/benchmark_paper.py" --out "$out/paper" --size 512 --batch 8 --steps 8 --warmup 3 \
    --precision bf16-mixed > "$out/paper.log" 2>&1
  echo "   exit $?, $((SECONDS - started)) s" | tee -a "$log"
  tail -8 "$out/paper.log" | tee -a "$log"

  echo "== stage-3 step, paper preset, 512 px, batch 8, bf16 (benchmark_stage3.py)" | tee -a "$log"
  s3=(--preset paper --device cuda --iqa paper --precision bf16 --batch 8 --size 512 --no-released --steps 4 --warmup 2)
  timeout 90 python "$here/benchmark_stage3.py" "${s3[@]}" > "$out/stage3.log" 2>&1
  echo "   exit $?, $((SECONDS - started)) s" | tee -a "$log"
  grep '^{' "$out/stage3.log" | tail -1 > "$out/stage3.json"
  cat "$out/stage3.json" | tee -a "$log"
  timeout 50 python "$here/gpu_summary.py" stage3-flops "$out/stage3_flops.json" -- "${s3[@]}" \
    > "$out/stage3_flops.log" 2>&1
  echo "   FLOPs counted: exit $?, $((SECONDS - started)) s" | tee -a "$log"

  echo "== restoration, paper architecture, 512-px tiles, 8 per batch, bf16 (benchmark_restore.py)" | tee -a "$log"
  timeout 70 python "$here/benchmark_restore.py" --models paper --device cuda --sizes 1 12 --tile 512 \
    --tiles-per-batch 8 --bf16 --flops --json-out "$out/restore.json" > "$out/restore.log" 2>&1
  echo "   exit $?, $((SECONDS - started)) s" | tee -a "$log"
  grep '^|' "$out/restore.log" | tee -a "$log"

  timeout 20 python "$here/gpu_summary.py" combine "$out" > /dev/null 2>> "$log"
  echo "== $out/gpu_check.json ($((SECONDS - started)) s)" | tee -a "$log"
  cat "$out/gpu_check.json" 2>/dev/null | tee -a "$log"
fi

if [ "$mode" = suite ] || [ "$mode" = all ]; then
  echo "== IQA ensemble (offline, dehaze), 32 x 256 px" | tee -a "$log"
  timeout 90 python "$here/benchmark_iqa.py" --preset offline --task dehaze --batch 32 --size 256 --repeats 3 2>&1 \
    | grep -v -i warn | tee -a "$log"
  echo "== tiled restoration, 4-MP photo, demo and base architectures" | tee -a "$log"
  timeout 120 python "$here/benchmark_restore.py" --models demo base --device cuda --sizes 4 2>&1 \
    | grep '^|' | tee -a "$log"
  echo "== quality-control study (stage 3 from the demo warm-up; ${qc_seconds} s budget)" | tee -a "$log"
  timeout "$qc_seconds" python "$here/study_quality_control.py" --out "$work/qc" --accelerator gpu \
    --students unet iqpir --settings pair all_pairs --seeds 0 1 2 --steps 300 2>&1 \
    | grep -E '^\||^\[study\]|Error|error' | tee -a "$log"
  for s in unet iqpir; do
    cp "$work/qc/$s/study_runs.csv" "$out/qc_${s}_runs.csv" 2>/dev/null
    cp "$work/qc/$s/study_summary.md" "$out/qc_${s}_summary.md" 2>/dev/null
  done
fi
echo "== done ($((SECONDS - started)) s)" | tee -a "$log"
