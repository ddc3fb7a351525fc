"""A small, CPU-friendly configuration added to existing plans (no re-preprocessing).

nnU-Net's default ``3d_fullres`` plan targets a GPU: on a 2-core CPU one iteration takes 20-30 s.
``skcdf_add_cpu_config`` adds a configuration (default name ``3d_cpu``) that ``inherits_from`` the base
configuration -- same ``data_identifier``, so it trains on the already preprocessed data -- and overrides
patch size, batch size and a complete ``architecture`` block (nnU-Net's inheritance is a shallow dict
update, so a partial architecture block would not work). The topology (pooling per axis, kernel sizes)
comes from nnU-Net's own ``get_pool_and_conv_props`` for the base configuration's spacing, so anisotropic
data keeps nnU-Net's anisotropic pooling.
"""
from __future__ import annotations

import argparse
import copy
import os
from typing import List, Optional, Sequence

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import join, load_json

from nnunetv2_skcdf.utilities.dataset_files import (
    SKCDFInputError,
    dataset_name,
    exit_on_input_error,
    preprocessed_dataset_folder,
)
from nnunetv2_skcdf.utilities.io import atomic_save_json

DEFAULT_NAME = "3d_cpu"
#: voxels per patch the default patch is shrunk to (32x48x48 ~ 74k measured at ~0.4 s/iteration on 2 cores)
DEFAULT_MAX_PATCH_VOXELS = 80_000
MIN_FEATURE_MAP_EDGE = 4  # nnU-Net's UNet_featuremap_min_edge_length


def default_patch_size(base_patch: Sequence[int], spacing: Sequence[float],
                       max_voxels: int = DEFAULT_MAX_PATCH_VOXELS) -> List[int]:
    """Halve the physically longest axis (voxels x mm) of the base patch until it has <= ``max_voxels`` voxels.

    Halving by physical extent keeps the field of view as isotropic as nnU-Net's planner makes it.
    """
    patch = [int(p) for p in base_patch]
    while np.prod(patch) > max_voxels:
        extents = [p * s if p >= 4 * MIN_FEATURE_MAP_EDGE else -1 for p, s in zip(patch, spacing)]
        axis = int(np.argmax(extents))
        if extents[axis] < 0:  # nothing left that can be halved without losing the bottleneck
            break
        patch[axis] //= 2
    return patch


def cpu_architecture(base_architecture: dict, spacing: Sequence[float], patch_size: Sequence[int],
                     n_stages: int, base_features: int, max_features: int) -> tuple[dict, List[int]]:
    """Complete architecture block for ``patch_size`` -> (architecture, patch size padded to divisibility)."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, strides, kernels, patch, _ = get_pool_and_conv_props(spacing, patch_size, MIN_FEATURE_MAP_EDGE, n_stages - 1)
    stages = len(strides)
    arch = copy.deepcopy(base_architecture)
    kwargs = arch["arch_kwargs"]
    kwargs.update({
        "n_stages": stages,
        "features_per_stage": [min(max_features, base_features * 2 ** i) for i in range(stages)],
        "kernel_sizes": [list(k) for k in kernels],
        "strides": [list(s) for s in strides],
        "n_conv_per_stage_decoder": _fit(kwargs["n_conv_per_stage_decoder"], stages - 1),
    })
    # PlainConvUNet has n_conv_per_stage, ResidualEncoderUNet n_blocks_per_stage
    for key in ("n_conv_per_stage", "n_blocks_per_stage"):
        if key in kwargs:
            kwargs[key] = _fit(kwargs[key], stages)
    return arch, [int(p) for p in patch]


def _fit(per_stage: Sequence[int], n: int) -> List[int]:
    """First ``n`` entries of a per-stage list, repeating the last entry if it is too short."""
    return (list(per_stage) + [per_stage[-1]] * n)[:n]


def add_cpu_configuration(dataset, plans_identifier: str = "nnUNetPlans", base_configuration: str = "3d_fullres",
                          name: str = DEFAULT_NAME, patch_size: Optional[Sequence[int]] = None, batch_size: int = 2,
                          n_stages: int = 4, base_features: int = 16, max_features: int = 128,
                          overwrite: bool = False) -> dict:
    """Add the configuration ``name`` to the plans file and return it."""
    plans_file = join(preprocessed_dataset_folder(dataset), plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise SKCDFInputError(f"Plans file {plans_file} not found. Run 'nnUNetv2_plan_and_preprocess -d {dataset}' "
                              f"first (or pass the right -p).")
    plans = load_json(plans_file)
    configs = plans["configurations"]
    base = _resolved_base(plans, base_configuration, plans_file)
    if name == base_configuration:
        raise SKCDFInputError(f"--name {name!r} is the base configuration: a configuration cannot inherit from itself. "
                              f"Pick another --name (default {DEFAULT_NAME}).")
    if name in configs:
        if not overwrite:
            raise SKCDFInputError(f"Configuration {name!r} already exists in {plans_file}; pass --overwrite to replace "
                                  f"it.")
        if "inherits_from" not in configs[name]:
            raise SKCDFInputError(f"Configuration {name!r} in {plans_file} is one of the plans' own (it has its own "
                                  f"preprocessed data, {configs[name].get('data_identifier')!r}, and others may "
                                  f"inherit from it): not replaced even with --overwrite. Pick another --name.")
        if name in _inheritance_chain(configs, base_configuration):
            raise SKCDFInputError(f"{base_configuration!r} inherits from {name!r} in {plans_file}: replacing {name!r} "
                                  f"by a configuration that inherits from {base_configuration!r} would be circular. "
                                  f"Pick another --name or --base.")
        heirs = sorted(c for c in configs if c != name and name in _inheritance_chain(configs, c))
        if heirs:
            raise SKCDFInputError(f"Configurations {', '.join(heirs)} of {plans_file} inherit from {name!r}: replacing it "
                                  f"would change them too (models trained on them would no longer match their plans). "
                                  f"Pick another --name.")
    patch = list(patch_size) if patch_size else default_patch_size(base["patch_size"], base["spacing"])
    if len(patch) != len(base["patch_size"]):
        raise SKCDFInputError(f"--patch has {len(patch)} axes, {base_configuration} has {len(base['patch_size'])}.")
    architecture, patch = cpu_architecture(base["architecture"], base["spacing"], patch, n_stages, base_features,
                                           max_features)
    configs[name] = {"inherits_from": base_configuration, "patch_size": patch, "batch_size": int(batch_size),
                     "architecture": architecture}
    atomic_save_json(plans, plans_file)
    return configs[name]


def _inheritance_chain(configs: dict, name: str) -> List[str]:
    """``name`` and the configurations it inherits from, nearest first (stops at a repeat)."""
    chain = []
    while name in configs and name not in chain:
        chain.append(name)
        name = configs[name].get("inherits_from")
    return chain


def resolved_configuration(plans: dict, name: str, plans_file: str) -> dict:
    """Configuration ``name`` of ``plans`` with what it ``inherits_from`` filled in, as nnU-Net's PlansManager
    resolves it (a shallow update of the parent by the child, recursively); a circular or dangling chain is named."""
    configs = plans.get("configurations", {})
    chain = _inheritance_chain(configs, name)
    if not chain:
        raise SKCDFInputError(f"Configuration {name!r} not found in {plans_file} (available: {', '.join(configs)}).")
    parent = configs[chain[-1]].get("inherits_from")
    if parent is not None:
        why = "circular" if parent in chain else f"broken ({parent!r} does not exist)"
        raise SKCDFInputError(f"Configuration {name!r} of {plans_file} cannot be resolved: its inheritance "
                              f"{' -> '.join(chain + [parent])} is {why}. Repair the plans file (or plan again).")
    resolved: dict = {}
    for link in reversed(chain):
        resolved.update(copy.deepcopy(configs[link]))
    return resolved


def _resolved_base(plans: dict, base_configuration: str, plans_file: str) -> dict:
    """The base configuration with what it inherits resolved, checked to hold the spacing, patch and architecture
    the new configuration is derived from."""
    if base_configuration not in plans["configurations"]:
        raise SKCDFInputError(f"Base configuration {base_configuration!r} not found in {plans_file} (available: "
                              f"{', '.join(plans['configurations'])}).")
    base = resolved_configuration(plans, base_configuration, plans_file)
    missing = [k for k in ("spacing", "patch_size", "architecture") if k not in base]
    if missing:
        raise SKCDFInputError(f"Base configuration {base_configuration!r} of {plans_file} has no "
                              f"{', '.join(missing)} (plans of an older nnU-Net?). Plan the dataset again with "
                              f"nnU-Net >= 2.5, or pick another --base.")
    return base


def add_cpu_config_entry(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="skcdf_add_cpu_config",
        description="Add a small CPU-friendly configuration to a dataset's plans. It inherits the base "
                    "configuration's preprocessed data (no re-preprocessing) and uses a smaller patch and network. "
                    "Train with e.g. 'nnUNetv2_train D 3d_cpu 0 -device cpu'.",
        epilog="Example: skcdf_add_cpu_config -d 950   (adds 3d_cpu: patch <= 80k voxels, batch 2, 4 stages, "
               "16..128 features)")
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("--base", default="3d_fullres", help="configuration to inherit from (default: 3d_fullres)")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"new configuration name (default: {DEFAULT_NAME})")
    parser.add_argument("--patch", type=int, nargs="+", help="patch size (default: base patch halved to <= 80k voxels)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default: 2)")
    parser.add_argument("--stages", type=int, default=4, help="maximum number of resolution stages (default: 4)")
    parser.add_argument("--features", type=int, nargs=2, default=(16, 128), metavar=("BASE", "MAX"),
                        help="features of the first stage and cap (default: 16 128)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing configuration of that name")
    args = parser.parse_args(argv)
    with exit_on_input_error():
        config = add_cpu_configuration(args.dataset, args.plans, args.base, args.name, args.patch, args.batch,
                                       args.stages, args.features[0], args.features[1], args.overwrite)
    kw = config["architecture"]["arch_kwargs"]
    print(f"{dataset_name(args.dataset)}: added configuration {args.name!r} (inherits {args.base}): patch "
          f"{config['patch_size']}, batch {config['batch_size']}, {kw['n_stages']} stages, features "
          f"{kw['features_per_stage']}")
