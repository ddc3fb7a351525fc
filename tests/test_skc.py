"""SKC module: shapes (2D/3D, odd sizes, all orders), windows, the attention formula, cross-mode semantics
(complementarity, detached unlabelled half), per-sample independence, dropout, gradients."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from nnunetv2_skcdf.network.building_blocks.channel_attention import (
    ChannelAttention,
    channel_attention,
    channel_attention_weights,
    score_norm_scale,
)
from nnunetv2_skcdf.network.building_blocks.skc import (
    ORDERS,
    SKCBlock,
    SKCModule,
    TokenInverse,
    TokenLearner,
    choose_window,
    divisor_window,
    padded_size,
    real_token_mask,
    resolve_window,
)

K = 6  # channels: small, and != any window or token count so that layout mix-ups fail loudly
SIZES = [(5, 6, 6), (3, 5), (4, 8, 8), (1, 4, 4), (4, 6)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors here are tiny: intra-op threads only add contention (seconds per test on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(size, order="local_global", **kwargs) -> SKCModule:
    return SKCModule(K, size, order=order, **kwargs).eval()


def inputs(n, size, **kwargs) -> torch.Tensor:
    return torch.randn(n, K, *size, **kwargs)


# --------------------------------------------------------------------------------------------------
# reference formula, written out per sample and per group (deliberately loop-based and independent)
# --------------------------------------------------------------------------------------------------
def reference_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (C, L), k (M, L) -> softmax_rows((S - mean S) / sqrt(var S + 1e-5)), S = q k^T, biased variance."""
    s = q @ k.T
    s = (s - s.mean()) / torch.sqrt(((s - s.mean()) ** 2).mean() + 1e-5)
    return torch.exp(s) / torch.exp(s).sum(dim=1, keepdim=True)


def head_rows(att: ChannelAttention, g: int) -> list:
    """Projected channels of head g in per-head self mode, in channel order c: the reference's local block reads
    the projection as '(c heads)' (j = c h + g), its global block as '(heads c)' (j = g K + c)."""
    h, k = att.heads, att.channels
    return [c * h + g for c in range(k)] if att.head_grouping == "strided" else [g * k + c for c in range(k)]


def reference_mix(att: ChannelAttention, x: torch.Tensor, sources: list, mode: str) -> torch.Tensor:
    """One sample and group: x (L, K) queries' tokens, sources [(L, K)] keys'/values' tokens -> (L, K)."""
    wq, wk, wv, wo = att.q.weight, att.k.weight, att.v.weight, att.out.weight
    if mode == "self" and att.self_heads == "per_head":
        (src,) = sources
        merged = torch.empty(att.heads * att.channels, x.shape[0])
        for g in range(att.heads):
            rows = head_rows(att, g)
            q, key, value = wq[rows] @ x.T, wk[rows] @ src.T, wv[rows] @ src.T  # (K, L) each
            mixed = reference_weights(q, key) @ value  # one K x K matrix per head, normalised on its own
            for c in range(att.channels):
                merged[c * att.heads + g] = mixed[c]  # the reference's write-back, both groupings
        return (wo @ merged).T
    q = wq @ x.T  # (hK, L)
    keys = torch.cat([wk @ src.T for src in sources])  # (len(sources) * hK, L)
    values = torch.cat([wv @ src.T for src in sources])
    return (wo @ (reference_weights(q, keys) @ values)).T


def reference_attention(att: ChannelAttention, tokens: torch.Tensor, mode: str, n_labelled=None,
                        cross_group=None) -> torch.Tensor:
    """tokens (N, T, L, K) -> (N, T, L, K), explicit loops over samples and groups; cross mode splits at
    ``n_labelled`` (default N / 2) and, with ``cross_group`` g, cuts each half into ceil(min(B_l, B_u) / g)
    near-equal consecutive chunks (np.array_split), labelled chunk j reading unlabelled chunk j and back."""
    n, t = tokens.shape[:2]
    b = n // 2 if n_labelled is None else n_labelled
    n_groups = 1 if cross_group is None else -(-min(b, n - b) // cross_group)
    lab = [list(c) for c in np.array_split(np.arange(b), n_groups)]
    unl = [list(c) for c in np.array_split(np.arange(b, n), n_groups)]
    out = torch.empty_like(tokens)
    for i in range(n):
        if mode == "self":
            sources = [i]
        else:
            j = next(j for j, chunk in enumerate(lab + unl) if i in chunk) % n_groups
            sources = unl[j] if i < b else lab[j]
        for g in range(t):
            out[i, g] = reference_mix(att, tokens[i, g], [tokens[j, g] for j in sources], mode)
    return out


def test_attention_weights_are_instance_normalised_scores():
    q = torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]])  # C=2, L=3
    k = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 4.0, -2.0]])  # M=3
    s = torch.tensor([[2.0, 3.0, 8.0], [3.0, 2.0, -10.0]])  # q k^T by hand
    mean, std = s.mean(), torch.sqrt(s.var(unbiased=False) + 1e-5)
    expected = torch.softmax((s - mean) / std, dim=1)
    got = channel_attention_weights(q, k)
    torch.testing.assert_close(got, expected)
    # a 1/sqrt(d) scale instead of the instance norm would give something else
    assert not torch.allclose(got, torch.softmax(s / 3 ** 0.5, dim=1), atol=1e-3)
    # batched: every matrix normalised on its own (scaling one sample's scores changes nothing for the other)
    batch = channel_attention_weights(torch.stack([q, 10 * q]), torch.stack([k, k]))
    torch.testing.assert_close(batch[0], expected)
    torch.testing.assert_close(batch[1], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode,n,n_labelled", [("self", 3, None), ("cross", 4, None), ("cross", 2, None),
                                               ("cross", 5, 2), ("cross", 5, 3), ("cross", 4, 1)])
def test_channel_attention_matches_explicit_formula(mode, n, n_labelled):
    att = ChannelAttention(K, heads=2, dropout=0.1).eval()
    tokens = torch.randn(n, 3, 5, K)  # N, T groups, L tokens, K channels
    torch.testing.assert_close(att(tokens, mode, n_labelled), reference_attention(att, tokens, mode, n_labelled),
                               atol=1e-5, rtol=1e-4)


def _values_and_grads(fn, tokens, params, weight):
    x = tokens.clone().requires_grad_()
    out = fn(x)
    grads = torch.autograd.grad((out * weight).sum(), (x, *params))
    return out.detach(), grads


@pytest.mark.parametrize("grouping", ["strided", "blocked"])
@pytest.mark.parametrize("heads", [2, 3])
def test_per_head_self_mode_matches_explicit_per_head_formulation(grouping, heads):
    """Per-head self mode (fused, heads as a batch dim) == h separate K x K matrices written out per sample,
    group and head with the reference's grouping and write-back: values and gradients."""
    att = ChannelAttention(K, heads=heads, self_heads="per_head", head_grouping=grouping).eval()
    tokens, weight = torch.randn(3, 2, 5, K), torch.randn(3, 2, 5, K)
    params = list(att.parameters())
    fused, g_fused = _values_and_grads(lambda x: att(x, "self"), tokens, params, weight)
    explicit, g_explicit = _values_and_grads(lambda x: reference_attention(att, x, "self"), tokens, params, weight)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-4)
    for a, b in zip(g_fused, g_explicit):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    # a real switch: the joint matrix gives something else; cross mode is joint whatever self_heads says
    joint = ChannelAttention(K, heads=heads).eval()
    joint.load_state_dict(att.state_dict())
    with torch.no_grad():
        assert (joint(tokens, "self") - fused).abs().max() > 1e-3
        torch.testing.assert_close(att(tokens[:2], "cross"), joint(tokens[:2], "cross"), atol=0, rtol=0)


def test_per_head_groupings_differ_only_by_a_permutation_of_projected_channels():
    """The reference's global grouping (j div K) on weights W equals its local grouping (j mod h) on W with the
    rows of q, k, v permuted j = gK + c -> ch + g: the two blocks' self modes are one formula, relabelled."""
    blocked = ChannelAttention(K, heads=2, self_heads="per_head", head_grouping="blocked").eval()
    strided = ChannelAttention(K, heads=2, self_heads="per_head", head_grouping="strided").eval()
    perm = torch.tensor([g * K + c for c in range(K) for g in range(2)])  # strided row c*2+g <- blocked row g*K+c
    with torch.no_grad():
        for name in ("q", "k", "v"):
            getattr(strided, name).weight.copy_(getattr(blocked, name).weight[perm])
        strided.out.weight.copy_(blocked.out.weight)
        tokens = torch.randn(2, 3, 5, K)
        torch.testing.assert_close(strided(tokens, "self"), blocked(tokens, "self"), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n,n_labelled", [(5, 2), (5, 3), (4, 2)])
def test_cross_mode_unequal_halves_values_gradients_and_isolation(n, n_labelled):
    """B_l != B_u: each half equals the explicit formulation (labelled queries read all B_u unlabelled samples,
    unlabelled queries all B_l labelled ones), gradients too; no gradient reaches the unlabelled tokens."""
    att = ChannelAttention(K, heads=2).eval()
    tokens, weight = torch.randn(n, 2, 4, K), torch.randn(n, 2, 4, K)
    params = list(att.parameters())
    fused, g_fused = _values_and_grads(lambda x: att(x, "cross", n_labelled), tokens, params, weight)

    def explicit(x):
        x = torch.cat((x[:n_labelled], x[n_labelled:].detach()))  # the specification's detach
        return reference_attention(att, x, "cross", n_labelled)

    expected, g_expected = _values_and_grads(explicit, tokens, params, weight)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-4)
    for a, b in zip(g_fused, g_expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    assert torch.all(g_fused[0][n_labelled:] == 0) and torch.all(g_fused[0][:n_labelled].abs().sum((1, 2, 3)) > 0)


@pytest.mark.parametrize("n,n_labelled,group", [(8, None, 2), (8, None, 1), (8, None, 3), (6, None, 2),
                                                (7, 3, 2), (7, 4, 2), (8, None, 4), (4, None, 2)])
def test_cross_groups_match_explicit_formula_values_and_gradients(n, n_labelled, group):
    """Cross mode in groups of ``group`` samples per half (the trainer's skc_cross_group): each labelled query
    reads only the unlabelled samples of its group and back -- fused (equal halves the group divides) and
    per-group (uneven chunks, unequal halves) paths, values and gradients; no gradient to the unlabelled half."""
    att = ChannelAttention(K, heads=2).eval()
    tokens, weight = torch.randn(n, 2, 4, K), torch.randn(n, 2, 4, K)
    params = list(att.parameters())
    b = n // 2 if n_labelled is None else n_labelled
    got, g_got = _values_and_grads(lambda x: att(x, "cross", n_labelled, cross_group=group), tokens, params, weight)

    def explicit(x):
        x = torch.cat((x[:b], x[b:].detach()))
        return reference_attention(att, x, "cross", n_labelled, group)

    expected, g_expected = _values_and_grads(explicit, tokens, params, weight)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    for a, c in zip(g_got, g_expected):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-3)
    assert torch.all(g_got[0][b:] == 0)
    with torch.no_grad():
        whole = att(tokens, "cross", n_labelled)
        if group >= min(b, n - b):  # one group: the whole other half, exactly
            torch.testing.assert_close(got, whole, atol=0, rtol=0)
        else:  # a real switch: the whole other half gives something else
            assert (got - whole).abs().max() > 1e-3


def test_cross_group_must_be_positive():
    att = ChannelAttention(K)
    with pytest.raises(ValueError, match="cross-attention group"):
        att(torch.randn(4, 1, 2, K), "cross", cross_group=0)


def test_cross_split_is_checked():
    att = ChannelAttention(K)
    for n, n_labelled in ((3, None), (4, 0), (4, 4), (1, None)):
        with pytest.raises(ValueError, match="cross mode"):
            att(torch.randn(n, 1, 2, K), "cross", n_labelled)


def test_token_mask_leaves_masked_tokens_out_of_the_scores():
    """With a token mask, the real tokens' outputs are those of the attention over the real tokens alone
    (scores, InstanceNorm statistics and softmax), whatever the masked tokens hold."""
    att = ChannelAttention(K, heads=2).eval()
    real = torch.tensor([[True, False, True, True, False], [True, True, True, True, True]])  # (T, L)
    tokens = torch.randn(4, 2, 5, K)
    garbage = torch.where(real[None, :, :, None], tokens, 100 * torch.randn_like(tokens))
    at_real = real[None].expand(4, -1, -1)  # (N, T, L)
    with torch.no_grad():
        for mode, n_labelled in (("self", None), ("cross", 1)):
            out = att(tokens, mode, n_labelled, token_mask=real)
            torch.testing.assert_close(att(garbage, mode, n_labelled, token_mask=real)[at_real], out[at_real])
            for g in range(2):
                keep = real[g]
                expected = reference_attention(att, tokens[:, g:g + 1, keep], mode, n_labelled)
                torch.testing.assert_close(out[:, g:g + 1, keep], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_fused_attention_equals_explicit_values_and_gradients(offset):
    """softmax(InstanceNorm(q k^T)) v via the closed-form scale + fused kernel == the explicit formula, in
    self layout and in the broadcast cross layout; ``offset`` gives scores with a large common mean (where a
    naive E[S^2] - E[S]^2 variance would cancel)."""
    for q_shape, kv_shape in (((3, 2, 12, 5), (3, 2, 12, 5)), ((2, 2, 3, 12, 5), (2, 1, 3, 24, 5))):
        q = (torch.randn(q_shape, dtype=torch.float64) + offset).float().requires_grad_()
        k = (torch.randn(kv_shape, dtype=torch.float64) + offset).float().requires_grad_()
        v = torch.randn(kv_shape, requires_grad=True)
        weight = torch.randn(torch.broadcast_shapes(q_shape[:-2], kv_shape[:-2]) + q_shape[-2:])
        fused = channel_attention(q, k, v)
        explicit = channel_attention_weights(q, k) @ v
        torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-4)
        g_fused = torch.autograd.grad((fused * weight).sum(), (q, k, v))
        g_explicit = torch.autograd.grad((explicit * weight).sum(), (q, k, v))
        for a, b in zip(g_fused, g_explicit):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_score_norm_scale_is_the_inverse_std_of_the_score_matrix():
    q, k = torch.randn(4, 7, 3, dtype=torch.float64), torch.randn(4, 9, 3, dtype=torch.float64) + 2
    scores = q @ k.transpose(-1, -2)
    expected = 1 / torch.sqrt(scores.var(dim=(-2, -1), unbiased=False) + 1e-5)
    torch.testing.assert_close(score_norm_scale(q, k)[..., 0, 0].double(), expected, rtol=1e-5, atol=0)


def test_attention_dropout_is_separate_and_train_only():
    tokens = torch.randn(2, 3, 5, K)
    plain = ChannelAttention(K, dropout=0.0, attention_dropout=0.0).train()
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens), plain(tokens), atol=0, rtol=0)
        dropping = ChannelAttention(K, dropout=0.0, attention_dropout=0.5)
        dropping.load_state_dict(plain.state_dict())
        assert (dropping.train()(tokens) - plain(tokens)).abs().max() > 1e-3
        torch.testing.assert_close(dropping.eval()(tokens), plain.eval()(tokens), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="attention_dropout"):
        ChannelAttention(K, attention_dropout=1.0)


def test_channel_attention_cross_gradient_stops_at_unlabelled_tokens():
    att = ChannelAttention(K, heads=2).train()
    tokens = torch.randn(4, 2, 3, K, requires_grad=True)
    (att(tokens, "cross") * torch.randn(4, 2, 3, K)).sum().backward()
    assert torch.all(tokens.grad[2:] == 0)
    assert torch.all(tokens.grad[:2].abs().sum(dim=(1, 2, 3)) > 0)


# --------------------------------------------------------------------------------------------------
# windows and token maps
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,preferred,expected", [
    ((4, 8, 8), 2, (2, 2, 2)), ((5, 7, 6), 2, (2, 2, 2)), ((3, 5), 2, (2, 2)), ((1, 4, 4), 2, (1, 2, 2)),
    ((1, 5, 1), 2, (1, 2, 1)), ((6, 9), 3, (3, 3)), ((8, 10), 4, (4, 4)), ((4, 8, 8), (1, 4, 2), (1, 4, 2)),
])
def test_choose_window_is_the_reference_window(size, preferred, expected):
    assert choose_window(size, preferred) == expected


@pytest.mark.parametrize("size,expected", [((4, 8, 8), (2, 2, 2)), ((5, 7, 6), (1, 1, 2)), ((4, 6, 5), (2, 2, 1)),
                                           ((3, 5), (1, 1)), ((4, 4), (2, 2))])
def test_divisor_window_is_the_old_rule(size, expected):
    assert divisor_window(size) == expected


def test_explicit_window():
    assert resolve_window((4, 8, 8), None) == (2, 2, 2)
    assert resolve_window((5, 7, 6), None) == (2, 2, 2)
    assert resolve_window((4, 8, 8), 4) == (4, 4, 4)
    assert resolve_window((4, 8, 8), [1, 2, 4]) == (1, 2, 4)
    assert resolve_window((5, 6, 6), 2) == (2, 2, 2)  # padded, no longer refused
    with pytest.raises(ValueError, match="axis 0"):
        SKCModule(K, (1, 6, 6), window=2)
    with pytest.raises(ValueError, match="axis 1"):
        SKCBlock(K, (4, 3, 8), window=(2, 4, 2))
    with pytest.raises(ValueError, match="2 positive ints"):
        resolve_window((4, 8), (2, 2, 2))
    with pytest.raises(ValueError):
        SKCModule(K, (4, 8, 8, 8))
    with pytest.raises(ValueError, match="order"):
        SKCModule(K, (4, 8), order="sideways")


def test_padding_geometry():
    assert padded_size((5, 7, 6), (2, 2, 2)) == (6, 8, 6) and padded_size((4, 8, 8), (2, 2, 2)) == (4, 8, 8)
    assert real_token_mask((4, 8, 8), (2, 2, 2)) is None
    mask = real_token_mask((3, 5), (2, 2))  # padded 4 x 6: windows (2 x 3 grid) x 4 positions
    assert mask.shape == (6, 4)
    # window (0, 0) is fully inside; window (1, 2) holds (2, 4) only; window (1, 0) holds (2, 0), (2, 1)
    assert mask[0].all() and mask[5].tolist() == [True, False, False, False]
    assert mask[3].tolist() == [True, True, False, False]
    assert int(mask.sum()) == 15


@pytest.mark.parametrize("size,window", [((4, 6), (2, 3)), ((4, 8, 8), (2, 2, 2)), ((3, 4, 6), (3, 1, 2)),
                                         ((3, 5), (3, 5))])
@pytest.mark.parametrize("learned", [True, False])
def test_identity_token_learner_and_inverse_round_trip(size, window, learned):
    """An identity-weighted token learner is a pure space-to-depth; the inverse (learned one at init, or the
    fixed one) must put every entry back where it came from."""
    learner, inverse = TokenLearner(window), TokenInverse(window, size, learned=learned)
    p = learner.proj.weight.shape[0]
    with torch.no_grad():
        learner.proj.weight.copy_(torch.eye(p).reshape(learner.proj.weight.shape))
    z = inputs(2, size)
    tokens = learner(z)
    assert tokens.shape == (2, z[0, 0].numel() // p, p, K)
    torch.testing.assert_close(inverse(tokens), z)
    # one window = the first window along every axis, all its entries, channel 1, sample 1
    first = z[1, 1][tuple(slice(0, w) for w in window)].reshape(-1)
    torch.testing.assert_close(tokens[1, 0, :, 1], first)


# --------------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("size", SIZES)
def test_shapes(size, order):
    skc = make(size, order)
    for n in (1, 2, 3, 4):
        z = inputs(n, size)
        out = skc(z, "self")
        assert out.shape == z.shape and torch.isfinite(out).all()
    for n in (2, 4):
        assert skc(inputs(n, size), "cross").shape == (n, K, *size)


def test_window_of_blocks():
    skc = make((5, 6, 6))
    assert skc.local_block.window == (2, 2, 2) and skc.local_block.padded_size == (6, 6, 6)
    assert skc.global_block.window == (5, 6, 6) and skc.global_block.token_mask is None  # whole unpadded map
    assert make((4, 8, 8), window=(1, 4, 2)).local_block.window == (1, 4, 2)
    no_padding = make((5, 6, 6), window=divisor_window((5, 6, 6))).local_block
    assert no_padding.window == (1, 2, 2) and no_padding.token_mask is None
    # the padding mask is no parameter: state dicts keep their keys, padded or not
    assert skc.state_dict().keys() == make((4, 6, 6)).state_dict().keys()


def test_wrong_input_size_and_mode():
    skc = make((4, 8, 8))
    with pytest.raises(ValueError, match="built for"):
        skc(inputs(2, (4, 8, 6)))
    with pytest.raises(ValueError, match="mode"):
        skc(inputs(2, (4, 8, 8)), "labeled")


@pytest.mark.parametrize("n", [1, 3, 5])
def test_cross_mode_needs_even_batch(n):
    with pytest.raises(ValueError, match="even"):
        make((4, 8, 8))(inputs(n, (4, 8, 8)), "cross")


@pytest.mark.parametrize("order", ORDERS)
def test_cross_differs_from_self(order):
    skc, z = make((4, 6, 6), order), inputs(4, (4, 6, 6))
    self_out, cross_out = skc(z, "self"), skc(z, "cross")
    for half in (slice(0, 2), slice(2, 4)):
        assert (self_out[half] - cross_out[half]).abs().max() > 1e-3


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("size", [(4, 6, 6), (3, 5)])
def test_cross_complementarity_and_gradient_isolation(size, order):
    skc = make(size, order).train()
    b = 2
    z = inputs(2 * b, size)
    z_other = z.clone()
    z_other[b:] = torch.randn_like(z_other[b:])
    with torch.no_grad():
        skc.eval()
        out, out_other = skc(z, "cross"), skc(z_other, "cross")
        skc.train()
    # labelled outputs read the unlabelled samples (and vice versa)
    assert (out[:b] - out_other[:b]).abs().max() > 1e-3
    # a loss on the WHOLE output: no gradient reaches the unlabelled inputs, all labelled ones get some
    x = z.clone().requires_grad_()
    (skc(x, "cross") * torch.randn(2 * b, K, *size)).sum().backward()
    assert torch.all(x.grad[b:] == 0)
    assert torch.all(x.grad[:b].flatten(1).abs().sum(1) > 0)


@pytest.mark.parametrize("order", ORDERS)
def test_self_mode_gradient_reaches_inputs_and_all_parameters(order):
    size = (4, 6, 6)
    skc = make(size, order).train()
    x = inputs(3, size, requires_grad=True)
    (skc(x, "self") * torch.randn(3, K, *size)).sum().backward()
    assert torch.all(x.grad.flatten(1).abs().sum(1) > 0)
    for name, p in skc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("size", [(4, 6, 6), (3, 5)])
def test_self_mode_sample_independent_of_batch(size, order):
    skc, z = make(size, order), inputs(4, size)
    with torch.no_grad():
        together = skc(z, "self")
        alone = torch.cat([skc(z[i:i + 1], "self") for i in range(4)])
        shuffled = skc(z[[2, 0, 3, 1]], "self")
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(shuffled, together[[2, 0, 3, 1]], atol=1e-5, rtol=1e-4)


def test_dropout_only_in_train_mode():
    size = (4, 6, 6)
    skc, z = make(size, dropout=0.1), inputs(4, size)
    with torch.no_grad():
        for mode in ("self", "cross"):
            torch.testing.assert_close(skc(z, mode), skc(z, mode), atol=0, rtol=0)
        skc.train()
        for mode in ("self", "cross"):
            assert (skc(z, mode) - skc(z, mode)).abs().max() > 1e-4
        no_dropout = make(size, dropout=0.0).train()
        torch.testing.assert_close(no_dropout(z), no_dropout(z), atol=0, rtol=0)


@pytest.mark.parametrize("size,window", [((4, 6, 6), (2, 3, 2)), ((4, 6, 6), (4, 6, 6)), ((6, 4), (3, 2))])
def test_token_maps_equal_their_convolutions(size, window):
    """TokenLearner / TokenInverse compute their kernel = stride = w (transposed) convolutions as matmuls:
    values and weight gradients must equal the convolution modules they hold."""
    import torch.nn.functional as F

    conv, conv_t = (F.conv2d, F.conv_transpose2d) if len(size) == 2 else (F.conv3d, F.conv_transpose3d)
    learner, inverse = TokenLearner(window), TokenInverse(window, size)
    torch.nn.init.normal_(inverse.proj.weight)  # not the identity, so that a layout mix-up shows
    z = torch.randn(3, K, *size)
    tokens = learner(z)
    n_windows, p = tokens.shape[1], tokens.shape[2]
    expected = conv(z.reshape(3 * K, 1, *size), learner.proj.weight, stride=window)  # (3K, P, *G)
    torch.testing.assert_close(tokens, expected.reshape(3, K, p, n_windows).permute(0, 3, 2, 1))
    back = inverse(tokens)
    grid_input = tokens.permute(0, 3, 2, 1).reshape(3 * K, p, *expected.shape[2:])
    expected_back = conv_t(grid_input, inverse.proj.weight, stride=window).reshape(3, K, *size)
    torch.testing.assert_close(back, expected_back)
    weight = torch.randn_like(back)
    grads = torch.autograd.grad((back * weight).sum(), (learner.proj.weight, inverse.proj.weight))
    expected_out = conv_t(conv(z.reshape(3 * K, 1, *size), learner.proj.weight, stride=window),
                          inverse.proj.weight, stride=window).reshape(3, K, *size)
    expected_grads = torch.autograd.grad((expected_out * weight).sum(), (learner.proj.weight, inverse.proj.weight))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_learned_inverse_starts_as_fixed_inverse():
    size = (4, 6, 6)
    learned, fixed = make(size, learned_inverse=True), make(size, learned_inverse=False)
    fixed.load_state_dict({k: v for k, v in learned.state_dict().items() if "token_inverse" not in k})
    z = inputs(4, size)
    for mode in ("self", "cross"):
        torch.testing.assert_close(learned(z, mode), fixed(z, mode))


def test_reset_parameters_restores_identity_inverse():
    skc = make((4, 6))
    for p in skc.parameters():
        torch.nn.init.normal_(p)  # what a network-wide init could do
    skc.reset_parameters()
    w = skc.local_block.token_inverse.proj.weight
    torch.testing.assert_close(w.reshape(w.shape[0], -1), torch.eye(w.shape[0]))


# --------------------------------------------------------------------------------------------------
# the local block on a bottleneck that is not a multiple of the window: masked padding
# --------------------------------------------------------------------------------------------------
def window_positions(size, window):
    """[(window index t, [(position p in the window, coordinates)] of the real positions)], C order, from the
    geometry alone (independent of the module's window_blocks / masks)."""
    grid = [-(-s // w) for s, w in zip(size, window)]
    out = []
    for t, g in enumerate(itertools.product(*map(range, grid))):
        real = []
        for p, offset in enumerate(itertools.product(*map(range, window))):
            coords = tuple(gi * w + o for gi, w, o in zip(g, window, offset))
            if all(c < s for c, s in zip(coords, size)):
                real.append((p, coords))
        out.append((t, real))
    return out


def masked_block_reference(block: SKCBlock, z: torch.Tensor, mode: str, n_labelled=None) -> torch.Tensor:
    """The local block on every window restricted to its real positions R, written out per window: tokens
    W_learn[R, R] z_R, LayerNorms, attention over the R tokens, inverse W_inv[R, R], then the 1x1 conv."""
    n = z.shape[0]
    b = n // 2 if n_labelled is None else n_labelled
    p_all = math.prod(block.window)
    w_learn = block.token_learner.proj.weight.reshape(p_all, p_all)  # (token p, input position s)
    w_inv = block.token_inverse.proj.weight.reshape(p_all, p_all)  # (token p, output position s)
    out = torch.zeros_like(z)
    for _, real in window_positions(block.spatial_size, block.window):
        idx = [p for p, _ in real]
        z_r = torch.stack([z[(slice(None), slice(None), *c)] for _, c in real], -1)  # (N, K, r)
        tokens = (z_r @ w_learn[idx][:, idx].T).transpose(1, 2)  # (N, r, K)
        normed = block.attn_norm(tokens)
        if mode == "cross":  # the attention reads the unlabelled half detached (queries, keys and values)
            normed = torch.cat((normed[:b], normed[b:].detach()))
        mixed = []
        for i in range(n):
            sources = [i] if mode == "self" else (list(range(b, n)) if i < b else list(range(b)))
            mixed.append(reference_mix(block.attention, normed[i], [normed[j] for j in sources], mode))
        x = block.out_norm(tokens + torch.stack(mixed))  # (N, r, K)
        y = x.transpose(1, 2) @ w_inv[idx][:, idx]  # (N, K, r)
        for j, (_, c) in enumerate(real):
            out[(slice(None), slice(None), *c)] = y[..., j]
    return block.map_out(out)


@pytest.mark.parametrize("size,mode,n,n_labelled,self_heads", [
    ((3, 5, 4), "self", 2, None, "joint"), ((3, 5, 4), "cross", 5, 2, "joint"), ((3, 5), "cross", 4, None, "joint"),
    ((3, 5), "self", 2, None, "per_head"), ((5, 3, 2), "cross", 3, 1, "joint")])
def test_padded_local_block_equals_the_explicit_masked_formulation(size, mode, n, n_labelled, self_heads):
    """Values and gradients of the padded block == every window restricted to its real positions, with a
    learned (non-identity) inverse so that a padded token leaking onto a real position would show."""
    block = SKCBlock(K, size, kind="local", self_heads=self_heads).eval()
    assert block.token_mask is not None
    torch.nn.init.normal_(block.token_inverse.proj.weight)
    z, weight = inputs(n, size), torch.randn(n, K, *size)
    params = list(block.parameters())

    def explicit(x):
        if mode == "cross":  # the block's gradient rule: the unlabelled half enters detached
            b = n // 2 if n_labelled is None else n_labelled
            x = torch.cat((x[:b], x[b:].detach()))
        return masked_block_reference(block, x, mode, n_labelled)

    got, g_got = _values_and_grads(lambda x: block(x, mode, n_labelled), z, params, weight)
    expected, g_expected = _values_and_grads(explicit, z, params, weight)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    for a, b in zip(g_got, g_expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("mode", ["self", "cross"])
def test_padded_values_do_not_reach_real_positions(mode, monkeypatch):
    """Whatever the padding holds (NaN here, which any multiplication would spread), the block's output and
    gradients are unchanged: every step reads real positions only."""
    import torch.nn.functional as F

    block = SKCBlock(K, (3, 5, 5), kind="local").train()  # dropout on: same seed for both runs
    torch.nn.init.normal_(block.token_inverse.proj.weight)
    z = inputs(4, (3, 5, 5))

    def run():
        torch.manual_seed(3)
        x = z.clone().requires_grad_()
        out = block(x, mode)
        out.square().sum().backward()
        return out.detach(), x.grad

    out, grad = run()
    pads = [0, 1, 0, 1, 0, 1]
    monkeypatch.setattr(block, "_pad", lambda x: F.pad(x, pads, value=float("nan")))
    out_nan, grad_nan = run()
    assert torch.isfinite(out_nan).all() and torch.isfinite(grad_nan).all()
    assert torch.equal(out, out_nan) and torch.equal(grad, grad_nan)


@pytest.mark.parametrize("mode", ["self", "cross"])
def test_no_padding_runs_exactly_the_unpadded_operations(mode):
    """On the reference's 4 x 8 x 8 bottleneck nothing is padded or masked: the block's output and gradients
    are bit-identical to its operations written out without any padding step."""
    block = SKCBlock(K, (4, 8, 8), kind="local").train()
    assert block.token_mask is None and block.padded_size == (4, 8, 8) and block.window == (2, 2, 2)
    z = inputs(4, (4, 8, 8))

    def plain(x):
        if mode == "cross":
            x = torch.cat((x[:2], x[2:].detach()))
        tokens = block.token_learner(x)
        x = block.out_norm(tokens + block.attention(block.attn_norm(tokens), mode))
        return block.map_out(block.token_inverse(x))

    results = []
    for fn in (lambda x: block(x, mode), plain):
        torch.manual_seed(5)  # dropout
        results.append(_values_and_grads(fn, z, list(block.parameters()), torch.ones_like(z)))
    (a, ga), (b, gb) = results
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))
