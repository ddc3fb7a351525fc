"""Ablation trainers: each is registered, builds, runs two training iterations on CPU, and differs from
SKCDFTrainer in exactly the intended part (architecture keys, switches, hyperparameters)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunetv2_skcdf.network.architectures.skcdf_unet import PlainBottleneck
from nnunetv2_skcdf.training.nnUNetTrainer.SKCDFTrainer import SKCDFTrainer
from nnunetv2_skcdf.training.nnUNetTrainer.variants.ablation import SKCDFTrainer_ablations as A

# variant -> the settings (see _settings) that must differ from the full trainer, with their values
EXPECTED = {
    "SKCDFTrainer_noSKC": {"skc_enabled": False},
    "SKCDFTrainer_selfAttention": {"labelled_attention_mode": "self"},
    "SKCDFTrainer_globalLocal": {"skc_order": "global_local"},
    "SKCDFTrainer_parallelSKC": {"skc_order": "parallel"},
    "SKCDFTrainer_attnDropout": {"skc_attention_dropout": 0.1},
    "SKCDFTrainer_perHeadSelf": {"skc_self_heads": "per_head"},
    "SKCDFTrainer_divisorWindow": {"skc_window": "divisor"},
    "SKCDFTrainer_noABC": {"balanced_heads": False},
    "SKCDFTrainer_multiplyMask": {},  # the default since 0.4.0, pinned under the name its benchmark runs used
    "SKCDFTrainer_excludeMask": {"masking": "exclude"},  # the default up to 0.3
    "SKCDFTrainer_noDecoupling": {"decoupled": False},
    "SKCDFTrainer_noEMA": {"ema_couple_decoders": False},
    "SKCDFTrainer_cw0": {"consistency_weight": 0.0},
    "SKCDFTrainer_cw1": {"consistency_weight": 1.0},
    "SKCDFTrainer_cw5": {"consistency_weight": 5.0},
    "SKCDFTrainer_cw20": {"consistency_weight": 20.0},
    "SKCDFTrainer_noRampup": {"rampup_epochs": 0},
    "SKCDFTrainer_rampup50": {"rampup_epochs": 50},
    "SKCDFTrainer_ema09": {"ema_momentum": 0.9},
    "SKCDFTrainer_ema0999": {"ema_momentum": 0.999},
    "SKCDFTrainer_constantHeadEMA": {"head_ema": "constant"},
    "SKCDFTrainer_lrScaledHeadEMA": {},  # the default since 0.3.0, pinned under the name its benchmark runs used
    "SKCDFTrainer_noHeadEMA": {"head_ema": "off"},
    "SKCDFTrainer_strongView": {"unlabelled_view": "strong_intensity"},
    "SKCDFTrainer_crossWholeBatch": {"skc_cross_group": None},
    "SKCDFTrainer_histMatch": {"appearance_transfer": 0.5},
    "SKCDFTrainer_copyPaste": {"copy_paste": 1.0},
    "SKCDFTrainer_confidence": {"pseudo_label_threshold": 0.95},
}
SWITCHES = ("skc_enabled", "labelled_attention_mode", "skc_order", "skc_attention_dropout", "skc_self_heads",
            "skc_heads", "skc_window", "skc_dropout", "balanced_heads", "decoupled", "masking", "ema_couple_decoders",
            "consistency_weight", "rampup_epochs", "ema_momentum", "head_ema", "num_epochs", "unlabeled_batch_size",
            "unlabelled_view", "ema_buffers", "keep_rate_source", "skc_cross_group", "appearance_transfer",
            "copy_paste", "copy_paste_size", "pseudo_label_threshold")


def _settings(trainer) -> dict:
    return {k: getattr(trainer, k) for k in SWITCHES}


def _parameter_groups(net) -> dict:
    """Unique parameters per top-level part of the network, by prefix of their first name."""
    groups = {}
    for name, _ in net.named_parameters():  # shared modules are listed once
        part = name.split(".")[0] + (".balanced" if "balanced_seg_layers" in name else "")
        groups[part] = groups.get(part, 0) + 1
    return groups


def test_every_variant_is_listed_and_registered(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_skcdf.training.nnUNetTrainer.trainer_path import trainer_folder

    defined = {n for n, c in vars(A).items() if isinstance(c, type) and issubclass(c, SKCDFTrainer)
               and c is not SKCDFTrainer}
    assert defined == set(EXPECTED)
    monkeypatch.setenv("nnUNet_extTrainer", trainer_folder())
    for name in EXPECTED:
        cls = recursive_find_trainer_class_by_name(name)
        assert cls.__name__ == name and "__" not in name and cls.__doc__


def test_design_card_name_and_old_names_resolve(monkeypatch, trainer_factory):
    """``-tr SKCDFTrainer`` (the documented name) finds the trainer itself; every pre-0.2 name
    ``nnUNetTrainerSKCDF[_variant]`` finds a class with the old ``__name__`` (model folders and checkpoints of old
    runs are looked up by it): the new variant ahead of ``SKCDFTrainer_v01``, i.e. release 0.1's rules plus the
    variant's change (test_legacy_names.py checks every setting)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_skcdf.training.nnUNetTrainer.trainer_path import trainer_folder
    from nnunetv2_skcdf.training.nnUNetTrainer.variants.legacy_names import LEGACY_TRAINERS

    monkeypatch.setenv("nnUNet_extTrainer", trainer_folder())
    # nnU-Net imports the extension folder under its own module names: classes compare by name
    found = recursive_find_trainer_class_by_name("SKCDFTrainer")
    assert found.__name__ == "SKCDFTrainer" and [c.__name__ for c in found.__mro__[1:3]] == ["UnlabelledStream",
                                                                                            "nnUNetTrainer"]
    added_since = {"SKCDFTrainer_perHeadSelf", "SKCDFTrainer_divisorWindow", "SKCDFTrainer_lrScaledHeadEMA",
                   "SKCDFTrainer_noHeadEMA", "SKCDFTrainer_constantHeadEMA", "SKCDFTrainer_cw0",
                   "SKCDFTrainer_strongView", "SKCDFTrainer_excludeMask",
                   "SKCDFTrainer_crossWholeBatch", "SKCDFTrainer_histMatch",
                   "SKCDFTrainer_copyPaste", "SKCDFTrainer_confidence"}  # never had an old name
    expected_old = {"nnUNetTrainerSKCDF", "nnUNetTrainerSKCDF_cpuTest", "nnUNetTrainerSKCDF_demo8epochs",
                    "nnUNetTrainerSKCDF_demo40epochs", "nnUNetTrainerSKCDF_5epochs", "nnUNetTrainerSKCDF_20epochs",
                    "nnUNetTrainerSKCDF_100epochs"} | \
        {n.replace("SKCDFTrainer", "nnUNetTrainerSKCDF") for n in set(EXPECTED) - added_since}
    assert set(LEGACY_TRAINERS) == expected_old
    for old in sorted(expected_old):
        cls = recursive_find_trainer_class_by_name(old)
        new = old.replace("nnUNetTrainerSKCDF", "SKCDFTrainer")
        bases = [b.__name__ for b in cls.__bases__]
        assert cls.__name__ == old and "__" not in old
        assert bases == (["SKCDFTrainer_v01"] if old == "nnUNetTrainerSKCDF" else [new, "SKCDFTrainer_v01"])
    old_trainer = trainer_factory(LEGACY_TRAINERS["nnUNetTrainerSKCDF_noEMA"])
    new_trainer = trainer_factory(A.SKCDFTrainer_noEMA)
    assert old_trainer.ema_couple_decoders is False and (old_trainer.masking, new_trainer.masking) == \
        ("exclude", "multiply")  # 0.1's masking, not today's
    assert old_trainer.output_folder.replace("nnUNetTrainerSKCDF", "SKCDFTrainer") == new_trainer.output_folder


def test_hyperparameter_variants_compose_as_mixins_in_either_order(trainer_factory):
    """A variant ahead of another in the bases keeps the other's setting as well (the benchmark's arm trainers
    pin the masking this way), and nnU-Net's init kwargs (rebuilt from the signature) stay the base's five."""
    for bases in ((A.SKCDFTrainer_excludeMask, A.SKCDFTrainer_cw1), (A.SKCDFTrainer_cw1, A.SKCDFTrainer_excludeMask),
                  (A.SKCDFTrainer_noEMA, A.SKCDFTrainer_excludeMask, A.SKCDFTrainer_ema09)):
        trainer = trainer_factory(type("Composed", bases, {}))
        expected = {}
        for base in bases:
            expected.update(EXPECTED[base.__name__])
        full = _settings(trainer_factory())
        assert {k: v for k, v in _settings(trainer).items() if full[k] != v} == expected, bases
        assert set(trainer.my_init_kwargs) == {"plans", "configuration", "fold", "dataset_json", "device"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_variant_differs_in_exactly_the_intended_part_and_trains(name, trainer_factory):
    full, variant = trainer_factory(), trainer_factory(getattr(A, name))
    full_settings, settings = _settings(full), _settings(variant)
    assert {k: v for k, v in settings.items() if full_settings[k] != v} == EXPECTED[name]

    full.initialize()
    variant.on_train_start()
    try:
        _check_network(name, full._net(), variant._net())
        variant.on_train_epoch_start()
        for _ in range(2):
            out = variant.train_step(next(variant.dataloader_train))
            assert np.isfinite(out["loss"]) and np.isfinite(out["l_u"]) and out["pseudo_histogram"].sum() > 0
        assert variant.nonfinite_in_a_row == 0
    finally:
        variant.on_train_end()


def _check_network(name, full, net):
    full_keys, keys = set(full.state_dict()), set(net.state_dict())
    if name == "SKCDFTrainer_noSKC":
        assert isinstance(net.skc, PlainBottleneck) and not list(net.skc.parameters())
        assert full_keys - keys == {k for k in full_keys if k.startswith("skc.")} and not keys - full_keys
    elif name == "SKCDFTrainer_noABC":
        removed = {k for k in full_keys if ".balanced_seg_layers." in k}
        assert removed and full_keys - keys == removed and not keys - full_keys
        assert not net.decoder_l.has_balanced_heads and not net.decoder_u.has_balanced_heads
    elif name == "SKCDFTrainer_noDecoupling":
        assert net.decoder_u is net.decoder_l and not net.decoupled and keys == full_keys
        groups, full_groups = _parameter_groups(net), _parameter_groups(full)
        assert "decoder_u" not in groups and full_groups.pop("decoder_u") and \
            full_groups.pop("decoder_u.balanced") and groups == full_groups
    else:
        assert keys == full_keys  # same architecture; the difference is a switch
        for key, value in full.state_dict().items():
            if key != "_extra_state":  # the settings record (its length varies with the settings)
                assert value.shape == net.state_dict()[key].shape, key
    if name == "SKCDFTrainer_selfAttention":
        assert net.labelled_attention_mode == "self"
    if name in ("SKCDFTrainer_globalLocal", "SKCDFTrainer_parallelSKC"):
        assert net.skc.order == EXPECTED[name]["skc_order"]
    if name == "SKCDFTrainer_attnDropout":
        assert net.skc.local_block.attention.attention_dropout == 0.1
    if name == "SKCDFTrainer_perHeadSelf":  # the reference's grouping per block (channel_attention docstring)
        local, glob = net.skc.local_block.attention, net.skc.global_block.attention
        assert (local.self_heads, local.head_grouping, glob.self_heads, glob.head_grouping) == \
            ("per_head", "strided", "per_head", "blocked")
        assert full.skc.local_block.attention.self_heads == "joint"


def test_self_attention_variant_keeps_labelled_outputs_independent_of_unlabelled(trainer_factory):
    """Cross mode lets the labelled logits depend on the unlabelled samples; self mode must not."""
    results = {}
    for cls in (SKCDFTrainer, A.SKCDFTrainer_selfAttention):
        trainer = trainer_factory(cls)
        trainer.initialize()
        net = trainer._net().eval()
        torch.manual_seed(0)
        x_l, x_u = torch.randn(2, 1, *trainer.configuration_manager.patch_size), torch.randn(2, 1, 8, 32, 32)
        with torch.no_grad():
            a, b = net(x_l, x_u).main[0], net(x_l, 3 * x_u + 1).main[0]
        results[cls.__name__] = (a - b).abs().max().item()
    assert results["SKCDFTrainer"] > 1e-4
    assert results["SKCDFTrainer_selfAttention"] < 1e-5


def test_no_ema_variant_moves_heads_but_not_decoder_u(trainer_factory):
    trainer = trainer_factory(A.SKCDFTrainer_noEMA)
    trainer.initialize()
    net = trainer._net()
    stage_u, head_u = net.decoder_u.stages[0].convs[0].conv.weight, net.decoder_u.seg_layers[0].weight
    before_stage, before_head = stage_u.detach().clone(), head_u.detach().clone()
    net.ema_update(trainer.ema_momentum, trainer.ema_couple_decoders)
    assert torch.equal(stage_u, before_stage)  # no D_u <- D_l
    assert not torch.equal(head_u, before_head)  # H_u <- H_u_b still
    net.ema_update(trainer.ema_momentum, True)
    assert not torch.equal(stage_u, before_stage)


def test_cw0_variant_leaves_decoder_u_without_gradient(trainer_factory):
    """w = 0: D_u learns nothing from the pseudo labels (zero gradient; it follows D_l by its EMA only), while the
    labelled path trains as in SKCDFTrainer, whose D_u does get a gradient at the first epoch's ramp weight."""
    grads = {}
    for cls in (SKCDFTrainer, A.SKCDFTrainer_cw0):
        trainer = trainer_factory(cls)
        trainer.on_train_start()
        try:
            trainer.on_train_epoch_start()
            out = trainer.train_step(next(trainer.dataloader_train))  # gradients stay after the optimiser step
            net = trainer._net()
            norm = lambda module: sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)
            grads[cls.__name__] = (norm(net.decoder_u), norm(net.decoder_l), float(out["l_u"]))
        finally:
            trainer.on_train_end()
    assert grads["SKCDFTrainer"][0] > 0 and grads["SKCDFTrainer"][1] > 0
    assert grads["SKCDFTrainer_cw0"][0] == 0.0  # no gradient reaches D_u
    assert grads["SKCDFTrainer_cw0"][1] > 0 and grads["SKCDFTrainer_cw0"][2] > 0  # L_u still computed and logged


def test_head_ema_modes_move_only_the_heads_by_the_stated_step(trainer_factory):
    """lr_scaled (default): the step (1-m) times lr / initial lr; constant: H <- m H + (1-m) H_b; off: the heads
    stay. D_u <- D_l keeps the constant m in every mode."""
    results = {}
    for cls in (SKCDFTrainer, A.SKCDFTrainer_lrScaledHeadEMA, A.SKCDFTrainer_constantHeadEMA, A.SKCDFTrainer_noHeadEMA):
        trainer = trainer_factory(cls)
        trainer.initialize()
        torch.manual_seed(0)
        net = trainer._net()
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p))
        trainer.optimizer.param_groups[0]["lr"] = trainer.initial_lr / 4  # as after some annealing
        m_head = trainer._head_ema_momentum()
        head_l, head_lb = net.decoder_l.seg_layers[-1].weight, net.decoder_l.balanced_seg_layers[-1].weight
        stage_u, stage_l = net.decoder_u.stages[0].convs[0].conv.weight, net.decoder_l.stages[0].convs[0].conv.weight
        expected_head = head_l.detach() + (1 - m_head) * (head_lb.detach() - head_l.detach())
        expected_stage = stage_u.detach() + (1 - trainer.ema_momentum) * (stage_l.detach() - stage_u.detach())
        net.ema_update(trainer.ema_momentum, trainer.ema_couple_decoders, m_head)
        torch.testing.assert_close(head_l.detach(), expected_head)
        torch.testing.assert_close(stage_u.detach(), expected_stage)
        results[cls.__name__] = m_head
    assert results["SKCDFTrainer"] == results["SKCDFTrainer_lrScaledHeadEMA"] == pytest.approx(1 - 0.01 / 4)
    assert results["SKCDFTrainer_constantHeadEMA"] == pytest.approx(0.99)
    assert results["SKCDFTrainer_noHeadEMA"] == 1.0


def test_unknown_head_ema_mode_is_refused(trainer_factory):
    trainer = trainer_factory(SKCDFTrainer)
    trainer.initialize()
    trainer.head_ema = "cosine"
    with pytest.raises(ValueError,
                       match=r"SKCDFTrainer.head_ema = 'cosine': use one of 'lr_scaled', 'constant', 'off'"):
        trainer._head_ema_momentum()


@pytest.mark.parametrize("name, value, message", [
    ("masking", "multiplied", r"masking = 'multiplied': use one of 'exclude', 'multiply' \(set in the trainer's"),
    ("head_ema", "lr-scaled", r"head_ema = 'lr-scaled': use one of 'lr_scaled', 'constant', 'off'"),
    ("unlabelled_view", "strong", r"unlabelled_view = 'strong': use one of 'same', 'strong_intensity'"),
    ("ema_momentum", 1.5, r"ema_momentum = 1.5 is out of range \(ema_momentum, appearance_transfer and copy_paste in "
                          r"\[0, 1\]"),
    ("appearance_transfer", 1.5, r"appearance_transfer = 1.5 is out of range"),
    ("copy_paste", 1.5, r"copy_paste = 1.5 is out of range"),
    ("copy_paste_size", 0.0, r"copy_paste_size = 0.0 is out of range"),
    ("pseudo_label_threshold", 1.0, r"pseudo_label_threshold = 1.0 is out of range"),
    ("consistency_weight", -1.0, r"consistency_weight = -1.0 is out of range"),
    ("rampup_epochs", -5, r"rampup_epochs = -5 is out of range"),
    ("unlabeled_batch_size", 0, r"unlabeled_batch_size = 0 is out of range"),
    ("skc_cross_group", 0, r"skc_cross_group = 0 is out of range"),
    ("skc_cross_group", 2.5, r"skc_cross_group = 2.5 is out of range"),
    ("skc_cross_group", True, r"skc_cross_group = True is out of range"),
])
def test_unknown_training_switch_is_refused_at_initialize(trainer_factory, name, value, message):
    """A misspelt switch fails before the network is built or any worker starts (unchecked, a misspelt
    masking trained silently with 'exclude')."""
    trainer = trainer_factory(SKCDFTrainer)
    setattr(trainer, name, value)
    with pytest.raises(ValueError, match=message):
        trainer.initialize()
    assert not trainer.was_initialized and trainer.network is None and trainer.dataloader_unlabeled is None
