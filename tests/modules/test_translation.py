import pytest
import torch
import torch.nn.functional as F

from modules.translation import (
    TranslationModel,
    guided_attention_loss,
    label_smoothed_nll,
    linear_label_smoothed_cross_entropy,
    shift_right,
)

PAD, BOS, EOS = 0, 1, 2
VOCAB = 20


def tiny_model(copy=False, seed=0, norm_first=True):
    torch.manual_seed(seed)
    return TranslationModel(
        vocab_size=VOCAB, pad_id=PAD, d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
        dropout=0.0, norm_first=norm_first, copy=copy, max_length=32,
    ).eval()


def batch(seed=0):
    """Two right-padded sources (lengths 6 and 4) and teacher-forcing inputs (lengths 5 and 3)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (2, 6), generator=g)
    src_mask = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    tgt = torch.randint(3, VOCAB, (2, 5), generator=g)
    tgt_mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    return src.masked_fill(src_mask, PAD), src_mask, tgt.masked_fill(tgt_mask, PAD), tgt_mask


# copy mechanism -----------------------------------------------------------------------------------
@pytest.mark.parametrize("copy", [False, True], ids=["plain", "copy"])
def test_log_probs_are_normalised(copy):
    src, src_mask, tgt, tgt_mask = batch()
    log_probs = tiny_model(copy).forward(src, src_mask, tgt, tgt_mask)["log_probs"]
    assert log_probs.shape == (2, 5, VOCAB) and log_probs.dtype == torch.float32
    torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)


@torch.no_grad()
def test_copy_gate_closed_gives_the_attention_scattered_onto_source_ids():
    model = tiny_model(copy=True)
    with torch.no_grad():
        model.copy_gate.weight.zero_()
        model.copy_gate.bias.fill_(-1e4)  # p_gen = 0: copy only
    src = torch.tensor([[5, 7, 5, 9, 0, 0], [11, 12, 13, 14, 15, 16]])  # id 5 twice, padding in row 0
    src_mask = src == PAD
    tgt = torch.tensor([[BOS, 4, 6], [BOS, 3, 3]])
    out = model(src, src_mask, tgt, need_attn=True)
    probs, attn = out["log_probs"].exp(), out["cross_attn"]
    expected = torch.zeros(2, 3, VOCAB).scatter_add_(-1, src[:, None, :].expand(-1, 3, -1), attn)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)
    # a repeated source word collects both attention weights; ids absent from the source get nothing
    torch.testing.assert_close(probs[0, :, 5], attn[0, :, 0] + attn[0, :, 2])
    absent = [v for v in range(VOCAB) if v not in src[0].tolist()]
    assert float(probs[0][:, absent].max()) < 1e-9  # PAD included: attention never reaches padding
    assert float(probs[0, :, PAD].max()) < 1e-9


def test_copy_gate_open_equals_the_plain_softmax():
    model = tiny_model(copy=True)
    with torch.no_grad():
        model.copy_gate.weight.zero_()
        model.copy_gate.bias.fill_(1e4)  # p_gen = 1: generate only
    plain = TranslationModel(
        vocab_size=VOCAB, pad_id=PAD, d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
        dropout=0.0, copy=False, max_length=32,
    ).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and sorted(unexpected) == ["copy_gate.bias", "copy_gate.weight"]
    src, src_mask, tgt, tgt_mask = batch(1)
    torch.testing.assert_close(model(src, src_mask, tgt, tgt_mask)["log_probs"],
                               plain(src, src_mask, tgt, tgt_mask)["log_probs"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("copy", [False, True], ids=["plain", "copy"])
def test_step_by_step_decoding_with_cache_matches_teacher_forcing(copy):
    model = tiny_model(copy, seed=3)
    src, src_mask, tgt, _ = batch(3)
    with torch.no_grad():
        full = model(src, src_mask, tgt, need_attn=True)
        memory = model.encode(src, src_mask)
        cache = model.init_cache()
        steps = [model.target_log_probs(tgt[:, t : t + 1], memory, src_mask, src, cache=cache, offset=t, need_attn=True)
                 for t in range(tgt.shape[1])]
    torch.testing.assert_close(torch.cat([lp for lp, _ in steps], 1), full["log_probs"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([a for _, a in steps], 1), full["cross_attn"], atol=1e-6, rtol=1e-4)


# cross-attention weights --------------------------------------------------------------------------
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
@torch.no_grad()
def test_cross_attention_sums_to_one_over_real_source_and_is_zero_on_padding(norm_first):
    model = tiny_model(norm_first=norm_first)
    src, src_mask, tgt, tgt_mask = batch(2)
    memory = model.encode(src, src_mask)
    log_probs, attn = model.target_log_probs(tgt, memory, src_mask, src, tgt_mask, need_attn=True)
    assert attn.shape == (2, 5, 6)
    assert bool((attn >= 0).all())
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 5))
    assert float(attn.masked_select(src_mask[:, None, :].expand_as(attn)).abs().max()) == 0.0
    _, none = model.target_log_probs(tgt, memory, src_mask, src, tgt_mask)
    assert none is None  # only computed when asked (or with copy)


# guided attention ---------------------------------------------------------------------------------
def test_guided_attention_prefers_the_diagonal():
    eye = torch.eye(6)[None]
    anti = eye.flip(-1)
    uniform = torch.full((1, 6, 6), 1 / 6)
    diag, off, flat = (guided_attention_loss(a, None, None) for a in (eye, anti, uniform))
    assert float(diag) == pytest.approx(0.0, abs=1e-7)  # s/S == t/T exactly on the diagonal
    assert float(diag) < float(flat) < float(off)
    assert float(off) > 0.5


def test_guided_attention_is_zero_ish_on_a_scaled_diagonal_even_with_small_sigma():
    t, s = 5, 10
    attn = torch.zeros(1, t, s)
    attn[0, torch.arange(t), 2 * torch.arange(t)] = 1.0  # source twice as long: s = 2t
    for sigma in (0.2, 0.05):
        assert float(guided_attention_loss(attn, None, None, sigma=sigma)) == pytest.approx(0.0, abs=1e-7)
    # a nearest-position diagonal for lengths that do not divide: small, and much smaller than uniform
    t, s = 7, 10
    near = torch.zeros(1, t, s)
    near[0, torch.arange(t), (torch.arange(t) * s / t).round().long()] = 1.0
    uniform = torch.full((1, t, s), 1 / s)
    assert float(guided_attention_loss(near, None, None, sigma=0.2)) < 0.05
    assert float(guided_attention_loss(near, None, None, sigma=0.2)) < 0.1 * float(
        guided_attention_loss(uniform, None, None, sigma=0.2))


def test_guided_attention_ignores_padding():
    g = torch.Generator().manual_seed(0)
    alone = torch.rand(1, 4, 5, generator=g).softmax(-1)  # 4 target positions over 5 source tokens
    other = torch.rand(1, 6, 7, generator=g).softmax(-1)
    padded = torch.zeros(2, 6, 7)
    padded[0, :4, :5] = alone[0]
    padded[0, 4:] = torch.rand(2, 7, generator=g)  # garbage on padded target rows
    padded[1] = other[0]
    tgt_mask = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    src_mask = torch.tensor([[False] * 5 + [True] * 2, [False] * 7])
    loss = guided_attention_loss(padded, tgt_mask, src_mask)
    # the mean over the 4 + 6 real target positions of each sentence's own (unpadded) penalties
    per_row_a = guided_attention_loss(alone, None, None) * 4
    per_row_b = guided_attention_loss(other, None, None) * 6
    assert float(loss) == pytest.approx(float((per_row_a + per_row_b) / 10), rel=1e-5)
    padded[0, 4:] = 1.0  # changing padded rows changes nothing
    assert float(guided_attention_loss(padded, tgt_mask, src_mask)) == pytest.approx(float(loss), rel=1e-6)


# label-smoothed NLL -------------------------------------------------------------------------------
def test_label_smoothed_nll_without_smoothing_is_nll_loss():
    g = torch.Generator().manual_seed(0)
    log_probs = torch.randn(3, 4, 7, generator=g).log_softmax(-1)
    target = torch.randint(1, 7, (3, 4), generator=g)
    target[0, 3] = target[2, 1:] = PAD
    loss, nll = label_smoothed_nll(log_probs, target, 0.0, PAD)
    expected = F.nll_loss(log_probs.reshape(-1, 7), target.reshape(-1), ignore_index=PAD)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(nll, expected)


def test_label_smoothed_nll_ignores_pad_and_smooths_towards_uniform():
    g = torch.Generator().manual_seed(1)
    log_probs = torch.randn(2, 5, 7, generator=g).log_softmax(-1)
    target = torch.randint(1, 7, (2, 5), generator=g)
    target[1, 2:] = PAD
    eps = 0.1
    loss, nll = label_smoothed_nll(log_probs, target, eps, PAD)
    changed = log_probs.clone()
    changed[1, 2:] = torch.randn(3, 7, generator=g).log_softmax(-1)  # pad positions: no effect
    torch.testing.assert_close(label_smoothed_nll(changed, target, eps, PAD)[0], loss)
    keep = target != PAD
    lp = log_probs[keep]
    true = -lp.gather(-1, target[keep][:, None]).squeeze(-1)
    torch.testing.assert_close(loss, ((1 - eps) * true + eps * -lp.mean(-1)).mean())
    torch.testing.assert_close(nll, true.mean())  # the plain NLL does not depend on epsilon
    uniform = torch.full((2, 5, 7), -torch.log(torch.tensor(7.0)))
    assert float(label_smoothed_nll(uniform, target, 0.3, PAD)[0]) == pytest.approx(float(torch.log(torch.tensor(7.0))))


# fused projection + loss ----------------------------------------------------------------------------
def _unfused(h, weight, target, eps):
    return label_smoothed_nll((h @ weight.t()).double().log_softmax(-1), target, eps, PAD)


@pytest.mark.parametrize("chunk", [1, 3, 4, None], ids=["chunk1", "chunk3", "chunk4", "default"])
@pytest.mark.parametrize("nll_weight", [0.0, 0.3], ids=["loss", "loss+nll"])
def test_linear_cross_entropy_equals_projection_then_label_smoothed_nll(chunk, nll_weight):
    g = torch.Generator().manual_seed(2)
    h = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(1, 9, (10,), generator=g)
    target[[2, 7]] = PAD  # ignored rows
    loss, nll = linear_label_smoothed_cross_entropy(h, weight, target, 0.1, PAD, chunk)
    ref_loss, ref_nll = _unfused(h, weight, target, 0.1)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(nll, ref_nll)
    grads = torch.autograd.grad(loss + nll_weight * nll, (h, weight))
    ref_grads = torch.autograd.grad(ref_loss + nll_weight * ref_nll, (h, weight))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    assert grads[0][[2, 7]].abs().max() == 0  # ignored rows get no gradient


def test_linear_cross_entropy_gradcheck_and_bf16_autocast():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, 0, 3, 6, 2])
    assert torch.autograd.gradcheck(lambda a, b: linear_label_smoothed_cross_entropy(a, b, target, 0.2, PAD, 2), (h, weight))
    # under bf16 autocast: the matmuls in bf16, the result as the unfused bf16 computation's
    h32 = torch.randn(64, 16, generator=g, requires_grad=True)
    w32 = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(1, 50, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, _ = linear_label_smoothed_cross_entropy(h32, w32, t, 0.1, PAD)
        ref, _ = label_smoothed_nll((h32 @ w32.t()).float().log_softmax(-1), t, 0.1, PAD)
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)
    got, want = torch.autograd.grad(fused, (h32, w32)), torch.autograd.grad(ref, (h32, w32))
    assert got[1].dtype == torch.float32  # the parameter's gradient in the parameter's dtype
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=2e-2)
    with torch.no_grad():  # evaluation: loss only
        torch.testing.assert_close(linear_label_smoothed_cross_entropy(h32, w32, t, 0.1, PAD)[0],
                                   _unfused(h32, w32, t, 0.1)[0].float(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="target"):
        linear_label_smoothed_cross_entropy(h32, w32, t[:-1], 0.1, PAD)


@pytest.mark.parametrize("copy", [False, True], ids=["plain", "copy"])
def test_model_sequence_loss_from_hidden_equals_loss_from_log_probs(copy):
    model = tiny_model(copy)
    src, src_mask, tgt, tgt_mask = batch()
    tgt_in, labels = shift_right(tgt)
    keep = ~tgt_mask[:, 1:]
    fast = model(src, src_mask, tgt_in, None, select=keep, output="hidden")
    assert ("hidden" in fast) != copy  # the copy mechanism has no logits to fuse
    slow = model(src, src_mask, tgt_in, None, select=keep)
    loss, nll = model.sequence_loss(fast, labels[keep], 0.1, PAD)
    ref_loss, ref_nll = label_smoothed_nll(slow["log_probs"], labels[keep], 0.1, PAD)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(nll, ref_nll)
    got = torch.autograd.grad(loss, model.embed.weight)[0]  # tied: through the embedding and the output
    want = torch.autograd.grad(ref_loss, model.embed.weight)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_shift_right():
    tgt = torch.tensor([[BOS, 5, 6, EOS, PAD]])
    tgt_in, labels = shift_right(tgt)
    assert tgt_in.tolist() == [[BOS, 5, 6, EOS]] and labels.tolist() == [[5, 6, EOS, PAD]]


def test_fused_loss_with_a_logits_bias_equals_the_unfused_one():
    """Marian's fixed ``final_logits_bias`` in the fused projection + loss: values and gradients."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    bias = torch.randn(11, generator=g)
    target = torch.tensor([1, 2, 0, 5, 10, 3, 0])
    loss, nll = linear_label_smoothed_cross_entropy(h, weight, target, 0.1, 0, chunk=3, bias=bias)
    ref_loss, ref_nll = label_smoothed_nll((h @ weight.T + bias).log_softmax(-1), target, 0.1, 0)
    torch.testing.assert_close((loss, nll), (ref_loss, ref_nll))
    grads = torch.autograd.grad(loss + 0.5 * nll, (h, weight))
    torch.testing.assert_close(grads, torch.autograd.grad(ref_loss + 0.5 * ref_nll, (h, weight)))
    with pytest.raises(ValueError, match="bias"):
        linear_label_smoothed_cross_entropy(h, weight, target, 0.1, 0, bias=bias[:5])
