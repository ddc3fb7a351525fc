#!/usr/bin/env bash
# Set up (if needed) and run the main job on the built-in synthetic abdominal CT dataset (CPU, no GPU): a small
# phantom (32 x 64 x 64 voxels of 7.5 x 5.4 x 5.4 mm, the 8 organs of the common Synapse protocol labelled),
# planned and preprocessed by nnU-Net (2d), a split with 3 labelled training cases (the others' labels hidden) plus
# 16 extra unlabelled images, then three arms on the same split, configuration and budget: the labelled-only
# nnU-Net, one round of the pseudo-labelling recipe (skcdf_pseudolabel with the labelled-only model as teacher, then
# a stock nnU-Net student), and SKCDF. Two lanes run side by side, one core each: the labelled-only model and then
# the recipe (which needs it), and SKCDF. Each arm is evaluated on the 8 test cases with nnU-Net's evaluation;
# scripts/demo_report.py prints per-organ Dice, wall times, the labelled-only model's plateau check and the
# converged benchmark's (generated) table.
# `bash run_demo.sh --long` trains twice as many iterations (does a longer budget change the result?);
# `bash run_demo.sh --prepare` stops after the data, plans and split (benchmarks/demo_plateau.py trains on them).
# Data goes to ./skcdf_data unless nnUNet_* are set. The configuration below is what README.md describes
# (tests/test_demo_config.py checks it).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
t_start=$(date +%s)
SUFFIX=""
PREPARE_ONLY=""
case "${1:-}" in
  "") ;;
  --long) SUFFIX="Long" ;;
  --prepare) PREPARE_ONLY=1 ;;
  *) echo "usage: bash run_demo.sh [--long | --prepare]  (unknown argument: $1)" >&2; exit 2 ;;
esac

# --- the demo task (README.md, documentation/getting_started.md) ---
SHAPE="32 64 64"            # voxels z y x
SPACING="7.5 5.4 5.4"       # mm
ORGANS="synapse8"           # skcdf_make_phantom --organs: Sp RK LK Ga Li St Ao Pa labelled, the other 5 background
NUM_TRAIN=20
NUM_TEST=8
NUM_UNLABELED=16            # extra images in imagesUnlabeled
VAL=4                       # validation cases (labelled, never trained on)
LABELED=3                   # labelled training cases; the other NUM_TRAIN - VAL - LABELED have their labels hidden
CONFIG=2d_demo              # nnU-Net 2d plans, a smaller network: patch 64 x 64, batch 4, 5 stages, 16-128 features
PATCH="64 64"
BATCH=4
STAGES=5
FEATURES="16 128"
PSEUDO_KEEP=0.5             # skcdf_pseudolabel --keep: the fraction of unlabelled cases kept (best agreement first)

source "$repo/scripts/setup_env.sh"
export nnUNet_raw="${nnUNet_raw:-$repo/skcdf_data/nnUNet_raw}"
export nnUNet_preprocessed="${nnUNet_preprocessed:-$repo/skcdf_data/nnUNet_preprocessed}"
export nnUNet_results="${nnUNet_results:-$repo/skcdf_data/nnUNet_results}"
export nnUNet_def_n_proc="${nnUNet_def_n_proc:-2}"
export nnUNet_extTrainer="$(skcdf_trainer_path)"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
D="${SKCDF_DEMO_DATASET:-950}"
D_PL="${SKCDF_DEMO_PSEUDO_DATASET:-951}"
NP="${SKCDF_NUM_PROCESSES:-2}"
NAME="Dataset${D}_SKCDFPhantom"
TRN="nnUNetTrainer_demo${SUFFIX}"
TRS="SKCDFTrainer_demo${SUFFIX}"
read -r EPOCHS PLATEAU_EPOCHS LR < <(python -c "from nnunetv2_skcdf.training.nnUNetTrainer.variants.demo.demo_trainers \
import $TRN as T, plateau_epoch, DEMO_LR; print(T.demo_epochs, plateau_epoch(T.demo_epochs), f'{DEMO_LR:g}')")
OUT="${SKCDF_DEMO_OUT:-$repo/skcdf_data/demo${SUFFIX}}"  # the demo's tables, logs and predictions (emptied first)
rm -rf "$OUT" && mkdir -p "$OUT"
echo -e "setup\t$(( $(date +%s) - t_start ))" >> "$OUT/times.tsv"

train() {  # 0 augmentation workers, 1 torch thread: the two lanes share the 2 cores (never set for planning)
  nnUNet_n_proc_DA=0 SKCDF_DEMO_THREADS=1 nnUNetv2_train "$@" -device cpu
}
predict_and_evaluate() {  # <dataset> <trainer> <arm folder> [extra nnUNetv2_predict arguments]
  local dataset="$1" trainer="$2" arm="$3"; shift 3
  nnUNetv2_predict -i "$nnUNet_raw/$NAME/imagesTs" -o "$OUT/$arm" -d "$dataset" -c "$CONFIG" -tr "$trainer" -f 0 \
    -device cpu --disable_tta -npp 1 -nps 1 "$@"
  nnUNetv2_evaluate_folder "$nnUNet_raw/$NAME/labelsTs" "$OUT/$arm" -djfile "$nnUNet_preprocessed/$NAME/dataset.json" \
    -pfile "$nnUNet_preprocessed/$NAME/nnUNetPlans.json" -np "$NP"
}
timed() {  # <arm> <command...>: runs it and appends its wall time to times.tsv
  local arm="$1" t0; shift; t0=$(date +%s)
  "$@"
  echo -e "$arm\t$(( $(date +%s) - t0 ))" >> "$OUT/times.tsv"
}
arm_nnunet() {
  train "$D" "$CONFIG" 0 -tr "$TRN"
  predict_and_evaluate "$D" "$TRN" nnunet
}
arm_pseudolabel() {
  # one teacher: its 4 in-plane mirror variants vote; the better-agreeing half of the unlabelled cases is kept
  skcdf_pseudolabel -d "$D" -m "$nnUNet_results/$NAME/${TRN}__nnUNetPlans__$CONFIG" -f 0 --out-dataset "$D_PL" \
    --keep "$PSEUDO_KEEP" --student-folds 1 -np "$NP" --overwrite -device cpu
  train "$D_PL" "$CONFIG" 0 -tr "$TRN"
  predict_and_evaluate "$D_PL" "$TRN" pseudolabel
}
arm_skcdf() {
  train "$D" "$CONFIG" 0 -tr "$TRS"
  predict_and_evaluate "$D" "$TRS" skcdf
}
lane_nnunet() {  # the labelled-only model, its snapshot at 3/4 of the budget (how much did the last quarter add?),
  # then the pseudo-labelling round it teaches
  timed nnunet arm_nnunet
  predict_and_evaluate "$D" "$TRN" nnunet_plateau -chk checkpoint_plateau.pth
  timed pseudolabel arm_pseudolabel
}
lane_skcdf() {
  timed skcdf arm_skcdf
}
lane_status() {  # the lane's training epoch (of $EPOCHS), or the last thing it printed
  local log="$OUT/lane_$1.log" epoch
  epoch=$(grep -ao 'Epoch [0-9][0-9]*$' "$log" | tail -n 1 || true)
  if [ -n "$epoch" ] && [ "$(tail -n 3 "$log" | grep -c 'Epoch\|learning rate\|loss\|dice' || true)" != 0 ]; then
    echo "training, $epoch of $EPOCHS"
  else
    tail -n 1 "$log" | tr '\r' '\n' | grep -v '^$' | tail -n 1 | cut -c1-70
  fi
}
stop_lanes() {  # the lanes' subshells and the commands they run (pids: run_lanes's)
  local p
  for p in "${pids[@]}"; do pkill -TERM -P "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
  wait || true
}
run_lanes() {  # each lane in the background with its own log; the first failure (or Ctrl-C) stops both lanes
  local pids=() names=(nnunet skcdf) running=(1 1) i failed="" tick=0
  # background jobs of a script ignore Ctrl-C, and so would their trainings: stop them explicitly
  trap 'echo "Interrupted: stopping both lanes." >&2; stop_lanes; exit 130' INT TERM
  for i in 0 1; do
    ( set -euo pipefail; export PYTHONUNBUFFERED=1; "lane_${names[$i]}" ) > "$OUT/lane_${names[$i]}.log" 2>&1 &
    pids+=($!)
  done
  echo "Two lanes side by side, one core each (logs: $OUT/lane_nnunet.log, $OUT/lane_skcdf.log):"
  while [ -z "$failed" ] && [ "${running[*]}" != "0 0" ]; do
    sleep 1; tick=$(( tick + 1 ))
    for i in 0 1; do
      if [ "${running[$i]}" = 1 ] && ! kill -0 "${pids[$i]}" 2>/dev/null; then
        running[$i]=0
        wait "${pids[$i]}" || failed="${names[$i]}"
      fi
    done
    if [ $(( tick % 60 )) = 0 ]; then  # progress: the last line each lane wrote
      echo "  $(( tick / 60 )) min: nnunet lane: $(lane_status nnunet) | skcdf lane: $(lane_status skcdf)"
    fi
  done
  trap - INT TERM
  if [ -n "$failed" ]; then
    stop_lanes
    for i in 0 1; do echo "--- end of $OUT/lane_${names[$i]}.log:"; tail -n 25 "$OUT/lane_${names[$i]}.log"; done
    echo "ERROR: the demo's $failed lane failed (the ends of both logs above)." >&2
    return 1
  fi
}

set -x
timed data skcdf_make_phantom -d "$D" --shape $SHAPE --spacing $SPACING --organs $ORGANS --num-train "$NUM_TRAIN" \
  --num-test "$NUM_TEST" --num-unlabeled "$NUM_UNLABELED" -np "$NP" --overwrite --no-progress
timed plan nnUNetv2_plan_and_preprocess -d "$D" -c 2d -np "$NP" -npfp "$NP" --verify_dataset_integrity
skcdf_split -d "$D" --val "$VAL" --labeled "$LABELED" --add-unlabeled-images --folds 1 --overwrite
timed unlabeled skcdf_preprocess_unlabeled -d "$D" -c 2d -np "$NP" --overwrite
skcdf_add_cpu_config -d "$D" --base 2d --name "$CONFIG" --patch $PATCH --batch "$BATCH" --stages "$STAGES" \
  --features $FEATURES --overwrite
set +x
if [ -n "$PREPARE_ONLY" ]; then echo "Prepared: dataset $D ($CONFIG) in $nnUNet_preprocessed"; exit 0; fi
timed lanes run_lanes
echo -e "total\t$(( $(date +%s) - t_start ))" >> "$OUT/times.tsv"
echo
python "$repo/scripts/demo_report.py" --out "$OUT" --dataset-json "$nnUNet_preprocessed/$NAME/dataset.json" \
  --labelled "$LABELED" --hidden $(( NUM_TRAIN - VAL - LABELED )) --extra-unlabelled "$NUM_UNLABELED" \
  --test-cases "$NUM_TEST" --iterations $(( EPOCHS * 50 )) --plateau-iterations $(( PLATEAU_EPOCHS * 50 )) \
  --task "phantom with the $ORGANS organs labelled, ${SPACING// / x } mm, nnU-Net 2d ($CONFIG), Adam $LR for every arm"
