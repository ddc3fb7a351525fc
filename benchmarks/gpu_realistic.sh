#!/usr/bin/env bash
# Issue 12: SKCDF vs nnU-Net at a realistic abdominal-CT patch size on the lent GPU, in ONE device call.
# Called by benchmarks/gpu_checks.sh (GPU_CHECKS=realistic), which installs the wheels of .whl/ first.
#
# What it does (each stage under `timeout`, capped by what is left of SKCDF_GPU_BUDGET_S, and skipped when less
# than half its cap is left, so that device time is not spent on a run bound to time out; wall time printed):
#   phantom   skcdf_make_phantom, Synapse-like geometry: 96x512x512 voxels at 3x0.78x0.78 mm, 8 training + 2 test
#             + 4 unlabelled cases, one process per core. Default nnU-Net planner's 3d_fullres plan for it (checked on the
#             CPU with one case): patch [40, 224, 192], batch 2 (1.72 M voxels per patch, 3.9x the phantom's
#             48x96x96), 6 stages. nnU-Net's 8 GB memory target bounds patch voxels, so more slices would change
#             the patch's shape (towards 64x160x160), not its size.
#   plan      nnUNetv2_extract_fingerprint + nnUNetv2_plan_experiment (stock nnU-Net, default planner)
#   prep      nnUNetv2_preprocess -c 3d_fullres, and at the same time skcdf_split (50 % labelled, 25 % val,
#             + imagesUnlabeled) and skcdf_preprocess_unlabeled
#   step      train_step_speed.py, AMP, nnUNet_compile=false, 2 interleaved processes per trainer x 15 steps
#   profile   profile_train_step.py, 8 profiled steps per trainer: kernel-time ratio vs wall ratio
#   predict   predict_speed.py --untrained on the 2 test cases (96x512x512) x 2 repeats
#   compile   train_step_speed.py, AMP, nnUNet_compile=true, 1 process per trainer x 15 steps
#   resenc    (time permitting) ResEnc M preset: plan, preprocess (+ unlabelled), train_step_speed AMP no compile
# REALISTIC_STAGES picks and orders them (default "step profile predict compile resenc"; the data stages run
# first when the data is missing, and are reused when a warm machine already has it, e.g. a second call with
# REALISTIC_STAGES=resenc right after the first).
#
# Estimated device-machine time (from the CPU figures here: phantom case 18 s and plan+preprocess of one case
# 49 s on 1 core; the H200 figures of BENCHMARKS.md: 24 / 73 ms per iteration at 0.44 M voxels, kernels 17 / 41
# ms; predict 0.07 s per 48x96x96 case). Assumed at 1.72 M voxels: ~3-4x the kernel time, i.e. ~0.08 s
# (nnU-Net) and ~0.2 s (SKCDF) per iteration, ~15 s start-up per trainer process (imports, 12 DA workers):
#   wheels install ~15 s | phantom ~25 s | plan ~25 s | prep ~40 s            -> data ready at ~105 s
#   step ~80 s (4 processes) | profile ~55 s | predict ~50 s (80 windows/case) -> ~290 s
#   compile ~150-200 s (compilation of both networks dominates)                -> ~470 s
#   resenc ~110 s (plan 10 + prep 40 + step 60): runs only if the budget has room, else in a second call
# Machine start: 1-2 min, on top. Total for the session: ~10-11 min of the 15 min device budget.
#
# Output, all in $OUT (<= 8 files): realistic.log (every stage's output), stages.json (stage times and exit
# codes, card, both plans' 3d_fullres settings, DA workers), BENCHMARKS_gpu.md (the new BENCHMARKS.md sections,
# to paste), train_step_speed_cuda_realistic_amp.json, train_step_speed_cuda_realistic_amp_compile.json,
# profile_train_step_cuda_realistic.txt, predict_speed_cuda_realistic.json,
# train_step_speed_cuda_realistic_resencM_amp.json. The output's tail is a summary table of all ratios.
#
# SKCDF_GPU_DRYRUN=1 proves the plumbing on a CPU machine (tiny 16x64x64 phantom, 1-2 steps, --device cpu,
# files named *_cpu_*): its numbers are no figures and must never go into BENCHMARKS.md.
set -uo pipefail
T0=$SECONDS
DRY="${SKCDF_GPU_DRYRUN:-0}"
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
LOG="$OUT/realistic.log"; : > "$LOG"
BUDGET="${SKCDF_GPU_BUDGET_S:-570}"   # wall seconds for this script (the run's timeout_s is 600; installs came before)
RESERVE=10                            # kept for the summary at the end
WORK="${SKCDF_GPU_WORK:-/tmp/skcdf_realistic}"; mkdir -p "$WORK"
STAGES_TSV="$WORK/stages.tsv"; : > "$STAGES_TSV"   # not in $OUT: every file there counts (8 at most)
D=972; NAME=SynapseLike
if [ "$DRY" = 1 ]; then
  DEVICE=cpu; SHAPE="16 64 64"; SPACING="6 6 6"; NTR=8; NTS=2; NUN=4; NP=2
  STEP_ARGS="--repeats 1 --steps 2 --warmup 1"; COMPILE_ARGS="$STEP_ARGS"; PROF_ARGS="--steps 2 --warmup 1 --rows 10"
  PRED_ARGS="--repeats 1"; RESENC_ARGS="--repeats 1 --steps 1 --warmup 0"  # ResEnc M plans batch 8 here
else
  DEVICE=cuda; SHAPE="96 512 512"; SPACING="3 0.78 0.78"; NTR=8; NTS=2; NUN=4; NP="$(nproc)"
  STEP_ARGS="--repeats 2 --steps 15 --warmup 3"; COMPILE_ARGS="--repeats 1 --steps 15 --warmup 3"
  PROF_ARGS="--steps 8 --warmup 3 --rows 30"; PRED_ARGS="--repeats 2"; RESENC_ARGS="$STEP_ARGS"
fi
export SKCDF_RESULTS_DIR="$OUT" SKCDF_BENCHMARKS_MD="$OUT/BENCHMARKS_gpu.md" PYTHONUNBUFFERED=1
export nnUNet_raw="$WORK/raw" nnUNet_preprocessed="$WORK/pre" nnUNet_results="$WORK/res" nnUNet_def_n_proc="$NP"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
nnUNet_extTrainer="$(skcdf_trainer_path)" || exit 1; export nnUNet_extTrainer
PRE="$nnUNet_preprocessed/Dataset${D}_$NAME"

say() { echo "$@" | tee -a "$LOG"; }
# stage NAME CAP_S COMMAND...: run COMMAND (output to the log) under timeout min(CAP_S, budget left), or skip it
# when less than CAP_S / 2 is left; record it
stage() {
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET - (SECONDS - T0) - RESERVE))
  if (( left < cap / 2 )); then say "== $name: skipped, ${left} s of the budget left"; printf '%s\tskipped\t0\n' "$name" >> "$STAGES_TSV"; return 1; fi
  (( cap > left )) && cap=$left
  say "== $name: start at $((SECONDS - T0)) s, cap ${cap} s"
  local t=$SECONDS rc
  echo "\$ $*" >> "$LOG"
  timeout -k 10 "$cap" "$@" >> "$LOG" 2>&1; rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t))" >> "$STAGES_TSV"
  say "== $name: exit $rc after $((SECONDS - t)) s$([ "$rc" = 124 ] && echo ' (TIMED OUT)')"
  [ "$rc" = 0 ] || tail -25 "$LOG" | grep -v "^==" | sed 's/^/   | /'
  write_stages
  return "$rc"
}
write_stages() {  # json only (no torch import): a second per stage
  python3 - "$STAGES_TSV" "$OUT/stages.json" "$PRE" "$WORK/env.json" "$DRY" "$((SECONDS - T0))" <<'EOF' >> "$LOG" 2>&1
import json, os, sys
tsv, out, pre, env, dry, elapsed = sys.argv[1:]
stages = [dict(zip(("stage", "exit", "seconds"), l.split("\t"))) for l in open(tsv).read().splitlines() if l]
info = {"dry_run": dry == "1", "elapsed_s": int(elapsed), "stages": stages}
if os.path.isfile(env):
    info.update(json.load(open(env)))
for plans in ("nnUNetPlans", "nnUNetResEncUNetMPlans"):
    f = os.path.join(pre, plans + ".json")
    if os.path.isfile(f):
        c = json.load(open(f))["configurations"]["3d_fullres"]
        info[plans + "_3d_fullres"] = {k: c.get(k) for k in ("patch_size", "batch_size", "spacing",
                                                               "median_image_size_in_voxels")} | {
            "n_stages": c["architecture"]["arch_kwargs"]["n_stages"], "network": c["architecture"]["network_class_name"]}
json.dump(info, open(out, "w"), indent=1)
EOF
}

say "# gpu_realistic.sh $(date -u +%FT%TZ) dry_run=$DRY device=$DEVICE budget=${BUDGET}s work=$WORK"
if [ "$DEVICE" = cuda ]; then nvidia-smi -L 2>&1 | tee -a "$LOG"; fi
# the machine, once: card, torch, cores, nnU-Net's data-augmentation workers per loader, clocks and load
python3 - "$WORK/env.json" "$DEVICE" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, subprocess, sys
import torch
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
out, device = sys.argv[1:]
env = {"device": device, "card": torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)",
       "torch": torch.__version__, "nproc": os.cpu_count(), "DA_workers_per_loader": get_allowed_n_proc_DA(),
       "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "unset (nnU-Net default)")}
if device == "cuda":
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,"
                                        "temperature.gpu,power.draw,memory.used", "--format=csv"],
                                       capture_output=True, text=True).stdout.strip()
json.dump(env, open(out, "w"), indent=1)
print(env)
EOF

# ---- data: made once per machine (a second call on the still-warm machine reuses it)
if [ -f "$WORK/data_ready" ]; then
  say "== data: reused from $WORK"
else
  rm -rf "$WORK"/{raw,pre,res}/*
  stage phantom 150 skcdf_make_phantom -d $D -n $NAME --shape $SHAPE --spacing $SPACING --num-train $NTR \
    --num-test $NTS --num-unlabeled $NUN -np "$NP" --no-progress || exit 1
  stage plan 120 bash -c "nnUNetv2_extract_fingerprint -d $D -np $NP && nnUNetv2_plan_experiment -d $D" || exit 1
  # nnU-Net's preprocessing and ours read the same plans and write different folders: run them side by side
  stage prep 180 bash -c "nnUNetv2_preprocess -d $D -c 3d_fullres -np $NP & p=\$!;
    skcdf_split -d $D --labeled 0.5 --val 0.25 --add-unlabeled-images &&
    skcdf_preprocess_unlabeled -d $D -c 3d_fullres -np $NUN --quiet; u=\$?; wait \$p && exit \$u" || exit 1
  touch "$WORK/data_ready"
fi

# ---- measurements, in order of priority (what is left of the budget caps each one)
STEP="python3 benchmarks/train_step_speed.py -d $D -c 3d_fullres --device $DEVICE"
for s in ${REALISTIC_STAGES:-step profile predict compile resenc}; do
  case $s in
    step) stage step 200 env nnUNet_compile=false $STEP $STEP_ARGS --tag _realistic_amp ;;
    profile) stage profile 150 python3 benchmarks/profile_train_step.py -d $D -c 3d_fullres --device $DEVICE \
        $PROF_ARGS --tag _realistic ;;
    predict) stage predict 150 python3 benchmarks/predict_speed.py --untrained -d $D -c 3d_fullres --device $DEVICE \
        $PRED_ARGS --tag _realistic --images "$nnUNet_raw/Dataset${D}_$NAME/imagesTs" ;;
    compile) stage compile 300 env nnUNet_compile=true $STEP $COMPILE_ARGS --tag _realistic_amp_compile ;;
    resenc)
      if [ ! -f "$WORK/resenc_ready" ]; then
        stage resenc_prep 150 bash -c "nnUNetv2_plan_experiment -d $D -pl nnUNetPlannerResEncM &&
          { nnUNetv2_preprocess -d $D -plans_name nnUNetResEncUNetMPlans -c 3d_fullres -np $NP & p=\$!;
            skcdf_preprocess_unlabeled -d $D -c 3d_fullres -p nnUNetResEncUNetMPlans -np $NUN --quiet; u=\$?;
            wait \$p && exit \$u; }" && touch "$WORK/resenc_ready"
      fi
      [ -f "$WORK/resenc_ready" ] && stage resenc_step 200 env nnUNet_compile=false $STEP -p nnUNetResEncUNetMPlans \
        $RESENC_ARGS --tag _realistic_resencM_amp ;;
    *) say "unknown stage $s" ;;
  esac
done

# ---- summary (the last lines of the output)
write_stages
python3 - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import glob, json, os, sys
out = sys.argv[1]
info = json.load(open(os.path.join(out, "stages.json")))
print(f"\n#### summary ({'DRY RUN, not figures' if info['dry_run'] else info.get('card')}; {info['elapsed_s']} s)")
print("stages: " + ", ".join(f"{s['stage']} {s['seconds']} s" + ("" if s["exit"] == "0" else f" [{s['exit']}]")
                             for s in info["stages"]))
for k in ("nnUNetPlans_3d_fullres", "nnUNetResEncUNetMPlans_3d_fullres"):
    if k in info:
        print(f"{k}: patch {info[k]['patch_size']}, batch {info[k]['batch_size']}, {info[k]['n_stages']} stages")
for f in sorted(glob.glob(os.path.join(out, "train_step_speed_*.json"))):
    r = json.load(open(f)); s = r["summary"]
    print(f"{os.path.basename(f)}: nnU-Net {s['nnUNetTrainer']['median_s']:.3f} s, SKCDF "
          f"{s['SKCDFTrainer']['median_s']:.3f} s -> {r['time_ratio']:.2f}x time, {r['memory_ratio']:.2f}x memory "
          f"(compile {r['compile']}, patch {r['patch_size']})")
for f in sorted(glob.glob(os.path.join(out, "predict_speed_*.json"))):
    r = json.load(open(f))
    print(f"{os.path.basename(f)}: " + ", ".join(f"{k} {v['median_s']:.3f} s" for k, v in r["summary"].items())
          + f" -> {r['ratio']:.3f}x (image {r['image_shape']})")
for f in sorted(glob.glob(os.path.join(out, "profile_train_step_*.txt"))):
    for line in open(f):
        if line.startswith("SUMMARY"):
            print(f"{os.path.basename(f)}: {line[8:].strip()}")
print("files in OUT: " + ", ".join(sorted(os.listdir(out))))
EOF
