"""Inference time per case: an SKCDF model vs an nnU-Net model of the same plans and settings, side by side.

Each case goes through nnU-Net's own predictor (``nnUNetPredictor.predict_single_npy_array``: preprocessing,
sliding-window inference with Gaussian weighting, resampling back, argmax), the two models alternating case
by case and repeat by repeat so that machine noise hits both alike; image reading is done once beforehand
(the same for both). Prints median seconds per case and the ratio, writes
``benchmarks/results/predict_speed_<device>.json`` and a ``BENCHMARKS.md`` section.

Trained models (what ``nnUNetv2_predict -d D -c C -tr T -f F`` uses):
    python benchmarks/predict_speed.py --model-folders RESULTS/T1__nnUNetPlans__C RESULTS/T2__nnUNetPlans__C \
        --fold 0 --images RAW/imagesTs [--device cpu] [--repeats 3]
Untrained networks (timing only, e.g. on a GPU machine without trained models):
    python benchmarks/predict_speed.py --untrained -d 950 -c 3d_fullres --trainers nnUNetTrainer \
        SKCDFTrainer --images RAW/imagesTs --device cuda
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import RESULTS, device_name, machine, write_section  # noqa: E402


def trained_predictor(folder: str, fold: int, device):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, device=device,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(folder, (fold,), "checkpoint_final.pth")
    return predictor


def untrained_predictor(dataset: str, configuration: str, trainer_name: str, device, plans: str = "nnUNetPlans"):
    """nnU-Net's predictor around a freshly initialised network of ``trainer_name`` (speed does not depend on
    the weights)."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.paths import nnUNet_preprocessed

    folder = Path(nnUNet_preprocessed) / maybe_convert_to_dataset_name(dataset)
    plans, dataset_json = load_json(str(folder / f"{plans}.json")), load_json(str(folder / "dataset.json"))
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    trainer = recursive_find_trainer_class_by_name(trainer_name)
    heads = pm.get_label_manager(dataset_json).num_segmentation_heads
    torch.manual_seed(0)
    network = trainer.build_network_architecture(pm, cm, determine_num_input_channels(pm, cm, dataset_json), heads,
                                                 False).to(device)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, device=device,
                                allow_tqdm=False)
    predictor.manual_initialization(network, pm, cm, [network.state_dict()], dataset_json, trainer_name, None)
    return predictor


def read_cases(images: str, predictor) -> list:
    files = sorted(p for p in Path(images).iterdir() if p.name.endswith("_0000" + predictor.dataset_json["file_ending"]))
    reader = predictor.plans_manager.image_reader_writer_class()
    return [(f.name, *reader.read_images([str(f)])) for f in files]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-folders", nargs=2)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--untrained", action="store_true")
    parser.add_argument("-d", "--dataset")
    parser.add_argument("-c", "--configuration")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (--untrained)")
    parser.add_argument("--trainers", nargs=2, default=["nnUNetTrainer", "SKCDFTrainer"])
    parser.add_argument("--images", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tag", default="", help="suffix of the result file / section (e.g. the card)")
    args = parser.parse_args()
    import torch

    device = torch.device(args.device)
    if args.untrained:
        names = args.trainers
        predictors = [untrained_predictor(args.dataset, args.configuration, t, device, args.plans) for t in names]
    else:
        names = [Path(f).name.split("__")[0] for f in args.model_folders]
        predictors = [trained_predictor(f, args.fold, device) for f in args.model_folders]
    cases = read_cases(args.images, predictors[0])
    times = {n: [] for n in names}
    for p in predictors:  # warm-up (cuDNN autotuning, allocator)
        p.predict_single_npy_array(cases[0][1], cases[0][2])
    for _ in range(args.repeats):
        for _, image, props in cases:
            for name, p in zip(names, predictors):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                p.predict_single_npy_array(image, props)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    summary = {n: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)} for n, t in times.items()}
    ratio = summary[names[1]]["median_s"] / summary[names[0]]["median_s"]
    card = device_name(device.type)
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "device": card,
               "mode": "untrained" if args.untrained else "trained", "cases": [c[0] for c in cases],
               "image_shape": list(cases[0][1].shape), "repeats": args.repeats, "times": times,
               "summary": summary, "ratio": ratio,
               "mirroring_axes": [list(p.allowed_mirroring_axes or []) for p in predictors]}
    print(json.dumps({k: v for k, v in results.items() if k != "times"}, indent=2))
    tag = f"{args.device}{args.tag}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"predict_speed_{tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = "\n".join(f"| {n} | {s['median_s']:.3f} | {s['min_s']:.3f}-{s['max_s']:.3f} |" for n, s in summary.items())
    write_section(f"predict_speed_{tag}", f"""## Inference time per case, {card} (`benchmarks/predict_speed.py`)

Command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}` — {results['date']} — {results['machine']}

{len(cases)} cases of shape {results['image_shape']} x {args.repeats} repeats, models alternating per case;
nnU-Net's predictor (preprocessing, sliding window, resampling, argmax; test-time mirroring as each model's
trainer allows: {results['mirroring_axes']}).

| model | median s/case | range |
|---|---|---|
{rows}

Ratio SKCDF / nnU-Net: **{ratio:.3f}x**.""")


if __name__ == "__main__":
    main()
