#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md, as run on a lent GPU machine (no network there): installs the wheels of
# .whl/ (scripts/build_gpu_wheels.sh builds them here), generates the built-in dataset, plans and preprocesses
# it with nnU-Net (3d_fullres), makes the 20 % split, preprocesses the unlabelled images, then runs
#   1. train_step_speed.py on 3d_fullres with AMP, without torch.compile (2 interleaved processes per trainer),
#   2. predict_speed.py (untrained networks, nnU-Net's predictor, 6 test cases x 2 repeats),
#   3. train_step_speed.py again with torch.compile (nnU-Net's default on CUDA), time permitting.
# GPU_CHECKS=step stops after 1; GPU_CHECKS=profile runs benchmarks/profile_train_step.py instead (where the iteration time goes).
# GPU_CHECKS=realistic runs benchmarks/gpu_realistic.sh instead (issue 12: Synapse-like patch size; its header
# has the stages and time estimates); SKCDF_GPU_DRYRUN=1 there is its CPU dry run (no wheels installed: run it
# with the venv's bin/ on PATH and the repo on PYTHONPATH).
# Results (JSON + BENCHMARKS.md with the new sections) go to $OUT (or ./gpu_out).
set -uo pipefail
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
if [ "${SKCDF_GPU_DRYRUN:-0}" != 1 ]; then
  t=$SECONDS
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
  echo "wheels installed: $((SECONDS - t)) s"
fi
export PYTHONUNBUFFERED=1
if [ "${GPU_CHECKS:-all}" = "realistic" ]; then
  # the budget of gpu_realistic.sh is what is left of the run's 600 s (SKCDF_GPU_BUDGET_S overrides)
  export SKCDF_GPU_BUDGET_S="${SKCDF_GPU_BUDGET_S:-$((580 - SECONDS))}"
  exec bash benchmarks/gpu_realistic.sh
fi
[ "${SKCDF_GPU_DRYRUN:-0}" != 1 ] || { echo "SKCDF_GPU_DRYRUN=1 exists for GPU_CHECKS=realistic only"; exit 1; }
export nnUNet_raw=/tmp/skcdf/raw nnUNet_preprocessed=/tmp/skcdf/pre nnUNet_results=/tmp/skcdf/res nnUNet_def_n_proc=8
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
export nnUNet_extTrainer="$(skcdf_trainer_path)"
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
{
  skcdf_make_phantom -d 950 -np 8 --no-progress &&
  nnUNetv2_plan_and_preprocess -d 950 -c 3d_fullres -np 8 -npfp 8 &&
  skcdf_split -d 950 --labeled 0.2 --val 0.2 --add-unlabeled-images --folds 3 &&
  skcdf_preprocess_unlabeled -d 950 -c 3d_fullres -np 8 --quiet
} > "$OUT/setup.log" 2>&1 || { tail -30 "$OUT/setup.log"; exit 1; }
echo "dataset ready: $SECONDS s"
if [ "${GPU_CHECKS:-all}" = "profile" ]; then  # diagnosis only: where the iteration time goes
  timeout 200 python3 benchmarks/profile_train_step.py -d 950 -c 3d_fullres --device cuda --steps 10 --rows 30 \
    2>&1 | grep -v Warning | tail -90
  cp benchmarks/results/profile_train_step_cuda.txt "$OUT/"; exit 0
fi
nnUNet_compile=false timeout 240 python3 benchmarks/train_step_speed.py -d 950 -c 3d_fullres --device cuda \
  --repeats 2 --steps 20 --tag _amp 2>&1 | grep -v Warning | tail -25
echo "train_step done: $SECONDS s"
if [ "${GPU_CHECKS:-all}" = "step" ]; then cp benchmarks/results/*cuda*.json BENCHMARKS.md "$OUT/"; exit 0; fi
timeout 150 python3 benchmarks/predict_speed.py --untrained -d 950 -c 3d_fullres --device cuda --repeats 2 \
  --images "$nnUNet_raw/Dataset950_SKCDFPhantom/imagesTs" 2>&1 | grep -v Warning | tail -25
echo "predict done: $SECONDS s"
nnUNet_compile=true timeout "${COMPILE_BUDGET_S:-200}" python3 benchmarks/train_step_speed.py -d 950 -c 3d_fullres \
  --device cuda --repeats 1 --steps 20 --tag _amp_compile 2>&1 | grep -v Warning | tail -25
echo "compile run done: $SECONDS s"
cp benchmarks/results/*cuda*.json BENCHMARKS.md "$OUT/" 2>/dev/null; ls -la "$OUT"
