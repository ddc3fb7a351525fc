"""The SKCDF U-Net built from real plans: outputs, deep supervision, checkpoints, gradient flow, EMA."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from nnunetv2_skcdf.network.architectures.skcdf_unet import SKCDFUNet, bottleneck_size

NUM_CLASSES = 14


@pytest.fixture(scope="module")
def tiny_plans(planned_phantom):
    """The phantom's real plans plus a tiny 3D configuration (fast on CPU), as skcdf_add_cpu_config makes it."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_skcdf.experiment_planning.cpu_configuration import cpu_architecture

    plans = json.loads((planned_phantom["preprocessed"] / "nnUNetPlans.json").read_text())
    base = plans["configurations"]["3d_fullres"]
    arch, patch = cpu_architecture(base["architecture"], base["spacing"], [16, 32, 32], 3, 8, 32)
    plans["configurations"]["3d_tiny"] = {"inherits_from": "3d_fullres", "patch_size": patch, "batch_size": 2,
                                          "architecture": arch}
    return PlansManager(plans)


def build(pm, configuration="3d_tiny", deep_supervision=True, trainer=None):
    from nnunetv2_skcdf.training.nnUNetTrainer.SKCDFTrainer import SKCDFTrainer

    cm = pm.get_configuration(configuration)
    torch.manual_seed(0)
    return (trainer or SKCDFTrainer).build_network_architecture(pm, cm, 1, NUM_CLASSES, deep_supervision), cm


def test_build_from_real_plans_and_output_shapes(tiny_plans):
    net, cm = build(tiny_plans)
    assert isinstance(net, SKCDFUNet)
    patch = tuple(cm.patch_size)
    x = torch.randn(2, 1, *patch)
    net.train()
    out = net.forward_labelled(x, x + 1)
    P, P_b = out.main, out.balanced
    assert isinstance(P, list) and len(P) == len(P_b) == len(cm.network_arch_init_kwargs["strides"]) - 1
    for logits in (out.main, out.balanced, out.main_u, out.balanced_u):
        assert tuple(logits[0].shape) == (2, NUM_CLASSES, *patch)
    assert P[0].requires_grad and not out.main_u[0].requires_grad and not out.balanced_u[0].requires_grad
    assert all(f.shape[0] == 2 for f in out.features_u)
    Q, Q_b = net.forward_unlabelled(out.features_u)
    assert tuple(Q[0].shape) == (2, NUM_CLASSES, *patch)
    net.eval()
    assert isinstance(net(x), list)  # online validation: deep supervision on
    net.set_deep_supervision(False)
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (2, NUM_CLASSES, *patch)


def test_decoders_do_not_own_the_encoder_and_have_balanced_heads(tiny_plans):
    net, _ = build(tiny_plans)
    enc = {id(p) for p in net.encoder.parameters()}
    for dec in (net.decoder_l, net.decoder_u):
        assert not enc & {id(p) for p in dec.parameters()}
        assert len(dec.balanced_seg_layers) == len(dec.seg_layers)
        assert not torch.equal(dec.balanced_seg_layers[0].weight, dec.seg_layers[0].weight)
    assert not torch.equal(net.decoder_l.stages[0].convs[0].conv.weight, net.decoder_u.stages[0].convs[0].conv.weight)
    assert any(k.startswith("skc.") for k in net.state_dict())
    assert "class_voxel_counts" in net.state_dict()


def test_checkpoint_loads_with_and_without_deep_supervision(tiny_plans):
    net_ds, _ = build(tiny_plans, deep_supervision=True)
    net_plain, _ = build(tiny_plans, deep_supervision=False)
    with torch.no_grad():  # both built from one seed: make the weights differ, so that loading has to copy them
        for q in net_ds.parameters():
            q.add_(0.1 * torch.randn_like(q))
    x = torch.randn(1, 1, *tiny_plans.get_configuration("3d_tiny").patch_size)
    net_ds.eval(), net_plain.eval()
    with torch.no_grad():
        assert not torch.allclose(net_ds(x)[0], net_plain(x))
    net_plain.load_state_dict(net_ds.state_dict())  # strict: same keys and shapes
    with torch.no_grad():
        torch.testing.assert_close(net_ds(x)[0], net_plain(x))
    net_ds.load_state_dict(net_plain.state_dict())  # and back


def test_residual_encoder_plans_are_supported(tiny_plans):
    cm = tiny_plans.get_configuration("3d_tiny")
    arch = copy.deepcopy(cm.configuration["architecture"])
    kw = arch["arch_kwargs"]
    kw["n_blocks_per_stage"] = [1] * kw["n_stages"]
    del kw["n_conv_per_stage"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    from nnunetv2_skcdf.network.architectures.skcdf_unet import build_skcdf_unet

    net = build_skcdf_unet(arch["network_class_name"], kw, arch["_kw_requires_import"], 1, NUM_CLASSES,
                           cm.patch_size, True)
    assert type(net.encoder).__name__ == "ResidualEncoder"
    x = torch.randn(1, 1, *cm.patch_size)
    out = net.forward_labelled(x, x)
    assert tuple(out.main[0].shape) == tuple(out.main_u[0].shape) == (1, NUM_CLASSES, *cm.patch_size)


def test_bottleneck_size():
    assert bottleneck_size([16, 32, 32], [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]) == [4, 4, 4]
    assert bottleneck_size([64, 64], [1, 2, 2]) == [16, 16]
    with pytest.raises(ValueError, match="not divisible"):
        bottleneck_size([15, 32, 32], [[1, 1, 1], [2, 2, 2]])


# ---------------------------------------------------------------------------------------- gradient flow
def _grads(module):
    return [p.grad for p in module.parameters()]


def _has_grad(module):
    return any(g is not None and g.abs().sum() > 0 for g in _grads(module))


def test_labelled_loss_reaches_neither_decoder_u_nor_unlabelled_inputs(tiny_plans):
    net, cm = build(tiny_plans)
    net.train()
    x_l = torch.randn(2, 1, *cm.patch_size, requires_grad=True)
    x_u = torch.randn(2, 1, *cm.patch_size, requires_grad=True)
    out = net.forward_labelled(x_l, x_u)
    l_sup = sum(p.square().mean() for p in out.main) + sum(p.square().mean() for p in out.balanced)
    l_sup.backward()
    assert not _has_grad(net.decoder_u)
    assert x_u.grad is None or x_u.grad.abs().sum() == 0
    assert x_l.grad.abs().sum() > 0 and _has_grad(net.decoder_l) and _has_grad(net.encoder) and _has_grad(net.skc)


def test_unlabelled_loss_reaches_encoder_skc_decoder_u_but_not_decoder_l(tiny_plans):
    net, cm = build(tiny_plans)
    net.train()
    x_l = torch.randn(2, 1, *cm.patch_size)
    x_u = torch.randn(2, 1, *cm.patch_size, requires_grad=True)
    Q, Q_b = net.forward_unlabelled(net.forward_labelled(x_l, x_u).features_u)
    l_u = sum(q.square().mean() for q in Q) + sum(q.square().mean() for q in Q_b)
    l_u.backward()
    assert not _has_grad(net.decoder_l)
    assert _has_grad(net.decoder_u) and _has_grad(net.encoder) and _has_grad(net.skc)
    assert x_u.grad.abs().sum() > 0


def test_reused_encoder_features_equal_a_second_encoder_pass(tiny_plans):
    """The cheaper variant of the method page: same forward values and the same gradients as recomputing."""
    net, cm = build(tiny_plans)
    net.eval()  # no dropout in the SKC, so the two computations are deterministic
    x_l, x_u = torch.randn(2, 1, *cm.patch_size), torch.randn(2, 1, *cm.patch_size)

    def grads_of(reuse: bool):
        net.zero_grad()
        feats = net.forward_labelled(x_l, x_u).features_u
        if not reuse:
            feats = net.encoder(x_u)
        Q, _ = net.forward_unlabelled(feats)
        Q[0].square().mean().backward()
        return Q[0].detach(), [p.grad.clone() for p in net.encoder.parameters()]

    q_reuse, g_reuse = grads_of(True)
    q_fresh, g_fresh = grads_of(False)
    torch.testing.assert_close(q_reuse, q_fresh, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_reuse, g_fresh):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_student_view_feeds_decoder_u_while_pseudo_labels_come_from_x_u(tiny_plans):
    """forward(x_l, x_u, x_u_view): D_l's outputs (pseudo-label source) are those of (x_l, x_u); D_u's are those of
    its own encoder pass on x_u_view, and L_u's gradient reaches x_u_view, not x_u."""
    net, cm = build(tiny_plans)
    net.eval()  # deterministic (no SKC dropout)
    x_l, x_u = torch.randn(2, 1, *cm.patch_size), torch.randn(2, 1, *cm.patch_size, requires_grad=True)
    x_v = (1.3 * x_u.detach() + 0.2).requires_grad_()
    out = net(x_l, x_u, x_v)
    plain = net(x_l, x_u)
    for a, b in zip(out.main_u, plain.main_u):
        torch.testing.assert_close(a, b)
    expected_q, _ = net.forward_unlabelled(net.encoder(x_v))
    torch.testing.assert_close(out.unlabelled_main[0], expected_q[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.unlabelled_main[0], plain.unlabelled_main[0], atol=1e-4)
    net.zero_grad()
    sum(q.square().mean() for q in out.unlabelled_main).backward()
    assert x_v.grad.abs().sum() > 0 and (x_u.grad is None or x_u.grad.abs().sum() == 0)
    assert not _has_grad(net.decoder_l) and _has_grad(net.decoder_u) and _has_grad(net.encoder)


# ---------------------------------------------------------------------------------------- EMA
def test_ema_update_in_spec_order(tiny_plans):
    net, _ = build(tiny_plans)
    m = 0.9
    before = copy.deepcopy(net)
    net.ema_update(m)
    h_l, h_lb = before.decoder_l.seg_layers[0].weight, before.decoder_l.balanced_seg_layers[0].weight
    h_u, h_ub = before.decoder_u.seg_layers[0].weight, before.decoder_u.balanced_seg_layers[0].weight
    # 1. H_l <- m H_l + (1-m) H_l_b
    new_h_l = m * h_l + (1 - m) * h_lb
    torch.testing.assert_close(net.decoder_l.seg_layers[0].weight, new_h_l)
    # 2. D_u <- m D_u + (1-m) D_l, with D_l's main head already updated by step 1
    w_u, w_l = before.decoder_u.stages[0].convs[0].conv.weight, before.decoder_l.stages[0].convs[0].conv.weight
    torch.testing.assert_close(net.decoder_u.stages[0].convs[0].conv.weight, m * w_u + (1 - m) * w_l)
    torch.testing.assert_close(net.decoder_u.balanced_seg_layers[0].weight, m * h_ub + (1 - m) * h_lb)
    # 3. H_u <- m H_u' + (1-m) H_u_b', both after step 2
    h_u2 = m * h_u + (1 - m) * new_h_l
    h_ub2 = m * h_ub + (1 - m) * h_lb
    torch.testing.assert_close(net.decoder_u.seg_layers[0].weight, m * h_u2 + (1 - m) * h_ub2)
    # D_l's trunk, the balanced head of D_l, the encoder and the SKC do not move
    torch.testing.assert_close(net.decoder_l.stages[0].convs[0].conv.weight, w_l)
    torch.testing.assert_close(net.decoder_l.balanced_seg_layers[0].weight, h_lb)
    for a, b in zip(net.encoder.parameters(), before.encoder.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(net.skc.parameters(), before.skc.parameters()):
        assert torch.equal(a, b)


def test_one_ema_step_moves_decoder_u_one_minus_m_of_the_way(tiny_plans):
    net, _ = build(tiny_plans)
    before = copy.deepcopy(net)
    net.ema_update(0.99)
    for (name, new), old, target in zip(net.decoder_u.stages.named_parameters(), before.decoder_u.stages.parameters(),
                                        before.decoder_l.stages.parameters()):
        torch.testing.assert_close(new - old, 0.01 * (target - old), rtol=1e-4, atol=1e-7, msg=name)


def test_split_decoder_pass_equals_one_joint_2b_pass(tiny_plans):
    """D_l runs the unlabelled half without graph: same logits and same gradients as the plain 2B pass."""
    net, cm = build(tiny_plans)
    net.eval()  # SKC dropout off: both computations deterministic
    x_l, x_u = torch.randn(2, 1, *cm.patch_size), torch.randn(2, 1, *cm.patch_size)

    def joint():
        skips = net.encoder(torch.cat((x_l, x_u), 0))
        main, balanced = net.decoder_l([*skips[:-1], net.skc(skips[-1], mode="cross")])
        return [m[:2] for m in main], [b[:2] for b in balanced], [m[2:] for m in main], [b[2:] for b in balanced]

    def loss_and_grads(outputs):
        net.zero_grad()
        main, balanced = outputs[0], outputs[1]
        (sum(m.square().mean() for m in main) + sum(b.abs().mean() for b in balanced)).backward()
        return [p.grad.clone() for p in net.parameters() if p.grad is not None]

    split = net.forward_labelled(x_l, x_u)
    reference = joint()
    for a, b in zip(split[:4], reference):
        for i, j in zip(a, b):
            torch.testing.assert_close(i, j.detach(), rtol=1e-5, atol=1e-5)
    g_split, g_ref = loss_and_grads(net.forward_labelled(x_l, x_u)), loss_and_grads(joint())
    assert len(g_split) == len(g_ref)
    for a, b in zip(g_split, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)  # summation order differs


# ---------------------------------------------------------------------------------------- unequal halves
def test_unequal_halves_split_at_the_labelled_batch_size(tiny_plans):
    """B_l = 2 labelled, B_u = 3 unlabelled: the SKC module and D_l split the batch at B_l. Outputs equal one joint
    5-sample pass with the split point given explicitly; labelled outputs read the unlabelled samples as a set
    (permuting them changes nothing for the labelled half and permutes the unlabelled half), which fails if any
    unlabelled sample were taken for a labelled one; shapes follow each half."""
    net, cm = build(tiny_plans)
    net.eval()
    x_l, x_u = torch.randn(2, 1, *cm.patch_size), torch.randn(3, 1, *cm.patch_size)
    with torch.no_grad():
        out = net.forward_labelled(x_l, x_u)
        skips = net.encoder(torch.cat((x_l, x_u), 0))
        main, balanced = net.decoder_l([*skips[:-1], net.skc(skips[-1], mode="cross", n_labelled=2)])
        permuted = net.forward_labelled(x_l, x_u[[2, 0, 1]])
        q, _ = net.forward_unlabelled(out.features_u)
    assert out.main[0].shape[0] == out.balanced[0].shape[0] == 2 and out.main_u[0].shape[0] == 3
    assert all(f.shape[0] == 3 for f in out.features_u) and q[0].shape[0] == 3
    for got, joint, half in ((out.main, main, slice(0, 2)), (out.balanced, balanced, slice(0, 2)),
                             (out.main_u, main, slice(2, 5)), (out.balanced_u, balanced, slice(2, 5))):
        for a, b in zip(got, joint):
            torch.testing.assert_close(a, b[half], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(permuted.main[0], out.main[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(permuted.main_u[0], out.main_u[0][[2, 0, 1]], rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the labelled half does read the unlabelled samples (cross mode)
        assert (net.forward_labelled(x_l, 2 * x_u + 1).main[0] - out.main[0]).abs().max() > 1e-4


def test_unequal_halves_gradients(tiny_plans):
    """B_l = 2, B_u = 3: L_sup reaches x_l and every labelled-path part, never x_u (the attention reads the
    unlabelled half detached) nor D_u; L_u reaches x_u, never D_l."""
    net, cm = build(tiny_plans)
    net.train()
    x_l = torch.randn(2, 1, *cm.patch_size, requires_grad=True)
    x_u = torch.randn(3, 1, *cm.patch_size, requires_grad=True)
    out = net(x_l, x_u)
    l_sup = sum(p.square().mean() for p in out.main) + sum(p.square().mean() for p in out.balanced)
    l_sup.backward(retain_graph=True)
    assert x_u.grad is None or x_u.grad.abs().sum() == 0
    assert all(x_l.grad[i].abs().sum() > 0 for i in range(2))
    assert not _has_grad(net.decoder_u) and _has_grad(net.decoder_l) and _has_grad(net.skc)
    net.zero_grad()
    x_l.grad = None
    (sum(q.square().mean() for q in out.unlabelled_main)).backward()
    assert all(x_u.grad[i].abs().sum() > 0 for i in range(3)) and not _has_grad(net.decoder_l)


# ---------------------------------------------------------------------------------------- window of old checkpoints
def test_checkpoint_with_the_old_window_rule_loads_into_a_rebuilt_local_block(tiny_plans):
    """Before commit f152b61 (release 0.1.0, and 0.2.0 until the padding landed) the local window divided the
    bottleneck ((1, 1, 2) on 3 x 5 x 6); today's network pads to (2, 2, 2). Loading such a checkpoint rebuilds the
    local block with its window: same outputs as the network it was trained in."""
    from nnunetv2_skcdf.network.architectures.skcdf_unet import build_skcdf_unet

    cm = tiny_plans.get_configuration("3d_tiny")
    arch = cm.configuration["architecture"]
    total = [int(x) for x in np.prod(np.array(arch["arch_kwargs"]["strides"]), axis=0)]
    patch = [b * t for b, t in zip((3, 5, 6), total)]

    def make(**kwargs):
        return build_skcdf_unet(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1,
                                NUM_CLASSES, patch, False, **kwargs).eval()

    old, new = make(skc_window="divisor"), make()
    assert old.skc.local_block.window == (1, 1, 2) and new.skc.local_block.window == (2, 2, 2)
    old_state = old.state_dict()
    old_state.pop("_extra_state", None)  # a checkpoint written before the settings record: the window is inferred
    with pytest.warns(UserWarning, match=r"(?s)divisor rule.*before commit f152b61.*rebuilt with the checkpoint's "
                                         r"window"):
        new.load_state_dict(old_state)
    assert new.skc.local_block.window == (1, 1, 2) and not new.skc.local_block.training
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        torch.testing.assert_close(new(x), old(x))


# ---------------------------------------------------------------------------------------- EMA list cache
def test_ema_lists_are_cached_and_follow_parameter_replacement(tiny_plans):
    """ema_update builds its tensor lists once; after optimiser steps it still equals the lists built afresh,
    and after .to() (new tensors), a deep copy, or load_state_dict(assign=True) it moves the network's current
    parameters, never stale ones."""
    from nnunetv2_skcdf.network.architectures.skcdf_unet import ema_pairs

    net, _ = build(tiny_plans)
    net.ema_update(0.9)
    steps = net._ema_steps(True)
    assert net._ema_steps(True) is steps and len(steps) == 3

    def moved_like_uncached(model, m=0.9):
        """one EMA step == the three lerps on freshly matched lists, applied to a copy"""
        expected = copy.deepcopy(model)
        for target, source in ((expected.decoder_l.seg_layers, expected.decoder_l.balanced_seg_layers),
                               (expected.decoder_u, expected.decoder_l),
                               (expected.decoder_u.seg_layers, expected.decoder_u.balanced_seg_layers)):
            with torch.no_grad():
                torch._foreach_lerp_(*ema_pairs(target, source), 1 - m)
        model.ema_update(m)
        for (name, a), b in zip(model.state_dict().items(), expected.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # in place: the cached lists see it
    moved_like_uncached(net)
    net.double()  # new tensors: the cache must be rebuilt
    assert not net._ema_cache
    moved_like_uncached(net)
    twin = copy.deepcopy(net)
    before = net.decoder_u.stages[0].convs[0].conv.weight.detach().clone()
    moved_like_uncached(twin)
    assert torch.equal(net.decoder_u.stages[0].convs[0].conv.weight, before)  # the copy moved its own tensors
    net.load_state_dict({k: v.clone() for k, v in net.state_dict().items()}, assign=True)
    moved_like_uncached(net)


def test_benchmark_decoder_views_run_d_u_and_d_l(tiny_plans):
    """benchmarks/diagnostics/teacher_student.py compares the two inference paths: D_u is the network's own
    forward, D_l the same encoder and SKC (self mode) into D_l's main head; a plain network has one path."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "diagnostics"))
    import teacher_student as T

    net, cm = build(tiny_plans, deep_supervision=False)
    net.eval()
    views = T.decoders(net)
    assert list(views) == ["D_u", "D_l"] and views["D_u"] is net
    x = torch.randn(1, 1, *cm.patch_size)
    with torch.no_grad():
        for p in net.decoder_u.parameters():  # D_u != D_l, so the two paths must differ
            p.add_(0.05 * torch.randn_like(p))
        skips = net.encoder(x)
        expected_l, _ = net.decoder_l([*skips[:-1], net.skc(skips[-1], mode="self")])
        expected_u, _ = net.decoder_u([*skips[:-1], net.skc(skips[-1], mode="self")])
        assert torch.allclose(views["D_l"](x), expected_l) and torch.allclose(views["D_u"](x), expected_u)
        assert not torch.allclose(expected_l, expected_u, atol=1e-3)
    plain = torch.nn.Conv3d(1, 2, 1)
    assert T.decoders(plain) == {"main": plain}
    assert T.parse_model("g=/r/SKCDFTrainer__nnUNetPlans__3d_cpu:0") == (
        "g", Path("/r/SKCDFTrainer__nnUNetPlans__3d_cpu"), 0)
    with pytest.raises(SystemExit, match=r"--model 'g=/r/model': expected KEY=MODEL_FOLDER:FOLD"):
        T.parse_model("g=/r/model")
    s = T.summarise({"1": 0.5, "2": float("nan"), "3": 0.9}, {"1": "LAG", "2": "Es", "3": "Li"}, ["LAG", "Es"])
    assert s["mean"] == pytest.approx(70.0) and s["small"] == pytest.approx(50.0) and s["per_organ"]["Li"] == 90.0
    old_file = {"date": "d0", "commit": "c0", "command": "python t.py --model g=...",
                "models": {"g": {"D_u": {"mean": 84.0}}, "i": {"date": "d1", "commit": "c1", "command": "x"}}}
    kept = T.kept_models(old_file)
    assert kept["g"] == {"date": "d0", "commit": "c0", "command": "python t.py --model g=...", "D_u": {"mean": 84.0}}
    assert kept["i"] == {"date": "d1", "commit": "c1", "command": "x"}  # its own provenance wins
    assert T.kept_models({}) == {}


def test_teacher_student_case_sets_test_or_the_split_s_hidden_label_cases(tmp_path):
    """benchmarks/diagnostics/teacher_student.py --cases hidden evaluates on the hidden-label training cases of
    the split (the pseudo-label diagnostics' cases): read from splits_final.json as convergence.py reads them,
    never mixed with test-set results in one file, and a clear error without the split."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "diagnostics"))
    import teacher_student as T

    raw, pre = tmp_path / "raw", tmp_path / "pre"
    for sub, ids in (("imagesTr", ["tr_0", "tr_1", "tr_2", "tr_3"]), ("labelsTs", ["ts_0", "ts_1"])):
        (raw / sub).mkdir(parents=True)
        for i in ids:
            (raw / sub / (f"{i}_0000.nii.gz" if sub == "imagesTr" else f"{i}.nii.gz")).write_bytes(b"")
    (raw / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "numTraining": 4}))
    assert T.case_ids("test", raw, None, ".nii.gz") == ["ts_0", "ts_1"]
    with pytest.raises(SystemExit, match="--cases hidden needs --preprocessed"):
        T.case_ids("hidden", raw, None, ".nii.gz")
    pre.mkdir()
    split = {"train": ["tr_0"], "val": ["tr_1"], "unlabeled": ["tr_3", "tr_2", "unl_0"]}  # unl_0: imagesUnlabeled
    (pre / "splits_final.json").write_text(json.dumps([split]))
    assert T.case_ids("hidden", raw, pre, ".nii.gz") == ["tr_2", "tr_3"]
    (pre / "splits_final.json").write_text(json.dumps([{**split, "unlabeled": ["unl_0"]}]))
    with pytest.raises(SystemExit, match="fold 0 has no hidden-label training case"):
        T.case_ids("hidden", raw, pre, ".nii.gz")
    T.same_case_set({}, "hidden", tmp_path / "o.json")
    T.same_case_set({"cases": "hidden", "models": {}}, "hidden", tmp_path / "o.json")
    with pytest.raises(SystemExit, match=r"o.json holds results on the test cases; write the --cases hidden"):
        T.same_case_set({"models": {"a": {}}}, "hidden", tmp_path / "o.json")  # a file from before --cases
    work = tmp_path / "convergence_2lab_8000"
    assert T.default_cache(work / "nnUNet_results" / "Dataset962_Convergence" / "nnUNetTrainer_conv__P__3d_cpu") == \
        (work / "curves" / "preprocessed_cache").resolve()
    with pytest.raises(SystemExit, match="model_a: not <work>/nnUNet_results/<dataset>/<trainer>; give --cache"):
        T.default_cache(tmp_path / "model_a")


# ---------------------------------------------------------------------------------------- small contracts
def test_a_student_view_without_an_unlabelled_batch_is_refused(tiny_plans):
    """forward(x, x_u_view=...) is no training pass (x_u is missing): refused, never silently an inference."""
    net, cm = build(tiny_plans)
    x = torch.randn(1, 1, *cm.patch_size)
    with pytest.raises(ValueError, match="x_u_view needs x_u"):
        net(x, x_u_view=x)
    with pytest.raises(ValueError, match="x_u_view needs x_u"):
        net(x, None, x)


def test_ema_averages_parameters_only_unless_buffers_are_asked_for():
    """The reference averages parameters only: a BatchNorm decoder's running statistics stay D_u's own.
    ``buffers=True`` (the rule up to 0.4) also averages floating buffers; integer buffers never."""
    from torch import nn

    from nnunetv2_skcdf.network.architectures.skcdf_unet import ema_pairs

    target, source = nn.BatchNorm3d(4), nn.BatchNorm3d(4)
    targets, sources = ema_pairs(target, source)
    assert [t is target.weight or t is target.bias for t in targets] == [True, True]
    assert len(sources) == 2
    targets, _ = ema_pairs(target, source, buffers=True)
    assert len(targets) == 4 and any(t is target.running_mean for t in targets)
    assert not any(t is target.num_batches_tracked for t in targets)


def test_ema_update_with_batch_norm_decoders_moves_buffers_only_when_asked(tiny_plans):
    net, _ = build(tiny_plans)
    with torch.no_grad():  # a BatchNorm-like floating buffer in both decoders, different values
        net.decoder_l.register_buffer("stat", torch.ones(3))
        net.decoder_u.register_buffer("stat", torch.zeros(3))
    net._ema_cache = {}
    net.ema_update(0.5)
    assert torch.equal(net.decoder_u.stat, torch.zeros(3))
    net.ema_update(0.5, buffers=True)
    assert torch.equal(net.decoder_u.stat, torch.full((3,), 0.5))


def test_labelled_pass_reads_the_cross_attention_group_the_trainer_sets(tiny_plans):
    """``cross_group`` (the trainer's skc_cross_group) reaches the SKC module in the labelled pass: with 4 + 4
    samples, groups of 2 change the labelled outputs (each sample reads 2 unlabelled samples, not 4) and groups of
    4 are the whole other half (identical outputs); the unlabelled pass (self mode) never depends on it."""
    net, cm = build(tiny_plans)
    net.eval()  # no dropout: the passes are comparable
    torch.manual_seed(1)
    x_l, x_u = torch.randn(4, 1, *cm.patch_size), torch.randn(4, 1, *cm.patch_size)
    outputs = {}
    with torch.no_grad():
        for group in (None, 2, 4):
            net.cross_group = group
            out = net.forward_labelled(x_l, x_u)
            outputs[group] = (out.main[0], out.main_u[0], net.forward_unlabelled(out.features_u)[0][0])
    for a, b in zip(outputs[None], outputs[4]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (outputs[None][0] - outputs[2][0]).abs().max() > 1e-4
    assert (outputs[None][1] - outputs[2][1]).abs().max() > 1e-4
    torch.testing.assert_close(outputs[None][2], outputs[2][2], atol=0, rtol=0)
