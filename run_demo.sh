#!/usr/bin/env bash
# Set up (if needed) and run the main job on the built-in synthetic abdominal CT dataset:
# generate it, plan + preprocess it with nnU-Net, make a 20 %-labelled semi-supervised split and
# preprocess the unlabelled images. Data goes to ./skcdf_data unless nnUNet_raw/_preprocessed/_results are set.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$repo/scripts/setup_env.sh"
export nnUNet_raw="${nnUNet_raw:-$repo/skcdf_data/nnUNet_raw}"
export nnUNet_preprocessed="${nnUNet_preprocessed:-$repo/skcdf_data/nnUNet_preprocessed}"
export nnUNet_results="${nnUNet_results:-$repo/skcdf_data/nnUNet_results}"
export nnUNet_def_n_proc="${nnUNet_def_n_proc:-2}"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
D="${SKCDF_DEMO_DATASET:-950}"
NP="${SKCDF_NUM_PROCESSES:-2}"
set -x
skcdf_make_phantom -d "$D" -np "$NP" --overwrite
nnUNetv2_plan_and_preprocess -d "$D" -c 3d_fullres -np "$NP" -npfp "$NP" --verify_dataset_integrity
skcdf_split -d "$D" --labeled 0.2 --val 0.2 --add-unlabeled-images --folds 3 --fold-mode repeat --overwrite
skcdf_preprocess_unlabeled -d "$D" -c 3d_fullres -np "$NP"
