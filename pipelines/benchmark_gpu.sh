#!/usr/bin/env bash
# GPU benchmark suite (not a test): IQA ensemble throughput, tiled 2048-px restoration and the
# quality-control study on the demo data, on one CUDA device. Logs and tables go to $1.
#   bash pipelines/benchmark_gpu.sh outputs/gpu_suite [QC_SECONDS]
set -u
out=${1:-outputs/gpu_suite}
qc_seconds=${2:-330}
work=${WORK:-$out/work}  # checkpoints and demo data of the study
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log="$out/gpu_suite.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$log"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" 2>&1 | tee -a "$log"
echo "== IQA ensemble (offline, dehaze), 32 x 256 px" | tee -a "$log"
timeout 90 python pipelines/benchmark_iqa.py --preset offline --task dehaze --batch 32 --size 256 --repeats 3 2>&1 \
  | grep -v -i warn | tee -a "$log"
echo "== tiled restoration, 2048 x 2048" | tee -a "$log"
for preset in base tiny; do
  timeout 45 python pipelines/benchmark_restore.py --size 2048 --preset "$preset" --tile 96 --tiles-per-batch 64 2>&1 \
    | tail -1 | tee -a "$log"
done
timeout 45 python pipelines/benchmark_restore.py --size 2048 --student unet --preset tiny --tile 96 --tiles-per-batch 64 2>&1 \
  | tail -1 | tee -a "$log"
echo "== quality-control study (stage 3 from the demo warm-up; ${qc_seconds} s budget)" | tee -a "$log"
timeout "$qc_seconds" python pipelines/study_quality_control.py --out "$work/qc" --accelerator gpu \
  --students unet iqpir --settings pair all_pairs --seeds 0 1 2 --steps 300 2>&1 \
  | grep -E '^\||^\[study\]|Error|error' | tee -a "$log"
for s in unet iqpir; do
  cp "$work/qc/$s/study_runs.csv" "$out/qc_${s}_runs.csv" 2>/dev/null
  cp "$work/qc/$s/study_summary.md" "$out/qc_${s}_summary.md" 2>/dev/null
done
echo "== done" | tee -a "$log"
