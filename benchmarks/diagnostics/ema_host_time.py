"""Host time of SKCDFUNet.ema_update: tensor lists matched by name at every step (release 0.2) vs built
once and cached, side by side (A B A B ... in one process) on a network built from real plans.

Prints and writes ``benchmarks/results/ema_host_time_<device>.json`` and a section of ``BENCHMARKS_FINDINGS.md``:

    python benchmarks/diagnostics/ema_host_time.py -d 950 -c 3d_fullres [--device cpu] [--repeats 200]

Three figures per variant: the whole ``ema_update`` (on CPU it includes the lerp arithmetic itself, which both
variants share), and the list matching alone (the host work the cache removes).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

# this folder (the other diagnostics) and benchmarks/ (the shared modules: data_pipeline, convergence, ...)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from data_pipeline import FINDINGS_MD, REPO, device_name, machine, write_section  # noqa: E402


def uncached_lists(net):
    """The three steps' lists as ema_update matched them at every call before the cache (``.data`` views of
    the tensors of two name -> tensor dicts per step)."""
    from nnunetv2_skcdf.network.architectures.skcdf_unet import ema_pairs

    pairs = ((net.decoder_l.seg_layers, net.decoder_l.balanced_seg_layers), (net.decoder_u, net.decoder_l),
             (net.decoder_u.seg_layers, net.decoder_u.balanced_seg_layers))
    return [tuple([x.data for x in xs] for xs in ema_pairs(t, s)) for t, s in pairs]


def uncached_update(net, momentum: float) -> None:
    import torch

    with torch.no_grad():
        for targets, sources in uncached_lists(net):
            torch._foreach_lerp_(targets, sources, 1.0 - momentum)


def build_network(dataset: str, configuration: str, plans: str, device: str):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_skcdf.training.nnUNetTrainer.SKCDFTrainer import SKCDFTrainer

    folder = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(dataset))
    pm = PlansManager(join(folder, plans + ".json"))
    cm = pm.get_configuration(configuration)
    classes = len(load_json(join(folder, "dataset.json"))["labels"])
    net = SKCDFTrainer.build_network_architecture(pm, cm, 1, classes, True).to(torch.device(device))
    return net, list(cm.patch_size)


def measure(net, device: str, repeats: int) -> dict:
    import torch

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    variants = {"uncached": lambda: uncached_update(net, 0.99), "cached": lambda: net.ema_update(0.99),
                "uncached lists only": lambda: uncached_lists(net), "cached lists only": lambda: net._ema_steps(True)}
    for fn in variants.values():  # warm-up (and the cache's one-off build)
        for _ in range(5):
            fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--dataset-note", default="", help="how the dataset was made, for the section")
    args = parser.parse_args()
    import torch

    net, patch = build_network(args.dataset, args.configuration, args.plans, args.device)
    ms = measure(net, args.device, args.repeats)
    steps = net._ema_steps(True)
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "device": args.device,
               "device_name": device_name(args.device), "dataset": args.dataset,
               "configuration": args.configuration, "plans": args.plans, "patch_size": patch,
               "tensors_per_step": [len(t) for t, _ in steps],
               "decoder_parameters": sum(p.numel() for p in net.decoder_u.parameters()),
               "threads": torch.get_num_threads(), "repeats": args.repeats, "median_ms": ms,
               "host_saving_ms_per_step": ms["uncached lists only"] - ms["cached lists only"],
               "time_ratio": ms["cached"] / ms["uncached"]}
    print(json.dumps(results, indent=2))
    out = REPO / "benchmarks" / "results" / f"ema_host_time_{args.device}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    rows = "\n".join(f"| {name} | {value:.3f} |" for name, value in ms.items())
    write_section(f"ema_host_time_{args.device}", f"""## EMA update: cached tensor lists, {results['device_name']} (`benchmarks/diagnostics/ema_host_time.py`)

Command: `python benchmarks/diagnostics/{Path(__file__).name} {' '.join(sys.argv[1:])}` — {results['date']} — {results['machine']}

SKCDF network of dataset {args.dataset}{' (' + args.dataset_note + ')' if args.dataset_note else ''} `{args.configuration}` ({args.plans}, patch {patch}; {results['decoder_parameters']:,}
parameters per decoder; {results['tensors_per_step']} tensors in the three EMA steps), {args.repeats} interleaved
calls per variant, medians. "uncached" matches the tensors by name at every call (release 0.2), "cached" builds
the lists once; the "lists only" rows are that matching alone, the host work the cache removes.

| variant | median ms per step |
|---|---|
{rows}

Host time saved: {results['host_saving_ms_per_step']:.3f} ms per training step. The whole `ema_update` takes
{results['time_ratio']:.2f}x its uncached time here; on a CPU that figure is dominated by the lerp arithmetic over
both decoders, which the two variants share (and by the machine's load), so the list matching is the measured
saving.""", FINDINGS_MD)


if __name__ == "__main__":
    main()
