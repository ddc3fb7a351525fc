"""skcdf_add_cpu_config: a small configuration that reuses the 3d_fullres data and builds a real network."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import DATASET_ID, run_cli
from nnunetv2_skcdf.experiment_planning.cpu_configuration import add_cpu_configuration, default_patch_size
from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError


def test_default_patch_is_shrunk_by_halving_the_largest_axis():
    # physical extents (240, 346, 346) mm -> halve y, then x, then z (now the longest): 24*48*48 = 55k voxels
    assert default_patch_size([48, 96, 96], [5.0, 3.6, 3.6], 80_000) == [24, 48, 48]
    assert default_patch_size([20, 20, 20], [1, 1, 1], 80_000) == [20, 20, 20]
    assert default_patch_size([128, 128, 128], [1, 1, 1], 80_000) == [32, 32, 64]
    assert default_patch_size([8, 8, 8], [1, 1, 1], 10) == [8, 8, 8]  # never below 2x the bottleneck edge


def test_added_configuration_inherits_data_and_builds_network(phantom_workspace):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    config = add_cpu_configuration(DATASET_ID, patch_size=[16, 32, 32], n_stages=3)
    plans_file = phantom_workspace["preprocessed"] / "nnUNetPlans.json"
    pm = PlansManager(json.loads(plans_file.read_text()))
    cm = pm.get_configuration("3d_cpu")
    assert cm.data_identifier == pm.get_configuration("3d_fullres").data_identifier  # no re-preprocessing
    assert cm.patch_size == [16, 32, 32] and cm.batch_size == 2 and config["inherits_from"] == "3d_fullres"
    kw = cm.network_arch_init_kwargs
    assert kw["n_stages"] == 3 and kw["features_per_stage"] == [16, 32, 64]
    assert len(kw["strides"]) == len(kw["kernel_sizes"]) == len(kw["n_conv_per_stage"]) == 3
    assert len(kw["n_conv_per_stage_decoder"]) == 2
    # the patch must be divisible by the total stride on every axis
    total = np.prod(np.array(kw["strides"]), axis=0)
    assert all(p % t == 0 for p, t in zip(cm.patch_size, total))

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    net = nnUNetTrainer.build_network_architecture(pm, cm, 1, 14, enable_deep_supervision=False)
    with torch.no_grad():
        out = net(torch.zeros(1, 1, *cm.patch_size))
    assert tuple(out.shape) == (1, 14, *cm.patch_size)


def test_refuses_existing_name_without_overwrite_and_unknown_base(phantom_workspace):
    add_cpu_configuration(DATASET_ID)
    with pytest.raises(SKCDFInputError, match=r"'3d_cpu' already exists.*--overwrite"):
        add_cpu_configuration(DATASET_ID)
    add_cpu_configuration(DATASET_ID, overwrite=True, batch_size=3)
    with pytest.raises(SKCDFInputError, match=r"Base configuration '3d_nope' not found"):
        add_cpu_configuration(DATASET_ID, base_configuration="3d_nope", name="x")


def test_never_breaks_the_plans_own_configurations_and_resolves_an_inherited_base(phantom_workspace):
    """--overwrite replaces configurations this tool adds, never one of the plans' own (3d_fullres, 2d: they own
    preprocessed data), never the base itself or a configuration the base inherits from (circular); an inherited
    base (3d_cpu) is resolved like nnU-Net resolves it."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_file = phantom_workspace["preprocessed"] / "nnUNetPlans.json"
    original = json.loads(plans_file.read_text())
    for kw, match in ((dict(name="3d_fullres"), r"--name '3d_fullres' is the base configuration"),
                      (dict(name="2d"), r"'2d' .* is one of the plans' own .*not replaced even with --overwrite")):
        with pytest.raises(SKCDFInputError, match=match):
            add_cpu_configuration(DATASET_ID, overwrite=True, **kw)
    assert json.loads(plans_file.read_text()) == original  # nothing written
    add_cpu_configuration(DATASET_ID)  # 3d_cpu inherits 3d_fullres
    small = add_cpu_configuration(DATASET_ID, base_configuration="3d_cpu", name="3d_cpu_small", n_stages=3)
    pm = PlansManager(json.loads(plans_file.read_text()))
    assert small["inherits_from"] == "3d_cpu"
    assert pm.get_configuration("3d_cpu_small").spacing == pm.get_configuration("3d_fullres").spacing
    with pytest.raises(SKCDFInputError, match=r"'3d_cpu_small' inherits from '3d_cpu'.*circular"):
        add_cpu_configuration(DATASET_ID, base_configuration="3d_cpu_small", name="3d_cpu", overwrite=True)
    with pytest.raises(SKCDFInputError, match=r"Configurations 3d_cpu_small of .* inherit from '3d_cpu': replacing it"):
        add_cpu_configuration(DATASET_ID, name="3d_cpu", overwrite=True)
    broken = json.loads(plans_file.read_text())
    broken["configurations"]["3d_cpu"]["inherits_from"] = "3d_gone"
    plans_file.write_text(json.dumps(broken))
    with pytest.raises(SKCDFInputError,
                       match=r"3d_cpu_small -> 3d_cpu -> 3d_gone is broken \('3d_gone' does not exist\)"):
        add_cpu_configuration(DATASET_ID, base_configuration="3d_cpu_small", name="x")


def test_console_script(phantom_workspace):
    out = run_cli(["skcdf_add_cpu_config", "-d", str(DATASET_ID), "--patch", "16", "32", "32"], phantom_workspace["env"])
    assert "added configuration '3d_cpu'" in out.stdout
    bad = run_cli(["skcdf_add_cpu_config", "-d", str(DATASET_ID)], phantom_workspace["env"], check=False)
    assert bad.returncode == 2 and "already exists" in bad.stderr
