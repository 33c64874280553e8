"""modules/multilabel.py: asymmetric loss, CF1/OF1, label sequences and their masking, decoding, learning."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from modules.decoding import generate
from modules.multilabel import (
    BOS_ID,
    EOS_ID,
    NUM_SPECIAL,
    PAD_ID,
    AsymmetricLoss,
    LabelSequenceModel,
    Query2Label,
    build_multilabel,
    emitted_mask,
    label_scores_from_steps,
    labels_to_sequence,
    multilabel_f1,
    no_repeat_processor,
    sequence_to_multi_hot,
)

TINY = dict(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64, dropout=0.0,
            stride=16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# asymmetric loss ----------------------------------------------------------------------------------
def test_asl_is_bce_without_focusing_and_clipping():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g) * 4
    logits[0, 0], logits[1, 1] = 30.0, -30.0  # saturated entries stay finite and exact
    targets = (torch.rand(6, 5, generator=g) > 0.5).float()
    loss = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)
    assert torch.allclose(loss(logits, targets), F.binary_cross_entropy_with_logits(logits, targets), atol=1e-6)
    per = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0, reduction="none")(logits, targets)
    assert torch.allclose(per, F.binary_cross_entropy_with_logits(logits, targets, reduction="none"), atol=1e-6)


def test_asl_hand_computed_values():
    x = torch.tensor([[0.0, 0.0, math.log(0.03 / 0.97)]])  # p = 0.5, 0.5, 0.03
    y = torch.tensor([[1.0, 0.0, 0.0]])
    out = AsymmetricLoss(gamma_neg=4, gamma_pos=1, clip=0.05, reduction="none")(x, y)[0]
    assert out[0].item() == pytest.approx(-(0.5**1) * math.log(0.5), rel=1e-5)  # positive: (1-p)^1 log p
    assert out[1].item() == pytest.approx(-(0.45**4) * math.log(0.55), rel=1e-5)  # p_m = p - clip
    assert out[2].item() == pytest.approx(0.0, abs=1e-7)  # p < clip: an easy negative is discarded
    assert AsymmetricLoss(gamma_neg=4, gamma_pos=1, clip=0.05, reduction="sum")(x, y).item() == pytest.approx(out.sum().item(), rel=1e-6)


def test_asl_down_weights_easy_negatives_more_than_bce():
    x, y = torch.full((1, 4), -2.0), torch.zeros(1, 4)
    assert AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05)(x, y) < 0.01 * AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)(x, y)


# metrics ------------------------------------------------------------------------------------------
def test_cf1_of1_hand_computed():
    target = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]]).bool()
    pred = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 0, 0], [1, 0, 0]]).bool()
    tp, fp, fn = (pred & target).sum(0), (pred & ~target).sum(0), (~pred & target).sum(0)
    # per class: P = 2/3, 1, 0 and R = 1, 1/2, 0
    m = multilabel_f1(tp, fp, fn)
    assert m["CP"].item() == pytest.approx(5 / 9)
    assert m["CR"].item() == pytest.approx(1 / 2)
    assert m["CF1"].item() == pytest.approx(10 / 19)  # 2 CP CR / (CP + CR), not the mean of per-class F1
    assert m["OP"].item() == pytest.approx(3 / 5) and m["OR"].item() == pytest.approx(3 / 5)
    assert m["OF1"].item() == pytest.approx(3 / 5)
    # a class without positives is left out of the per-class means, not of the overall counts
    m2 = multilabel_f1(torch.cat([tp, torch.tensor([0])]), torch.cat([fp, torch.tensor([2])]),
                       torch.cat([fn, torch.tensor([0])]), present=torch.tensor([True, True, True, False]))
    assert m2["CP"].item() == pytest.approx(5 / 9) and m2["CR"].item() == pytest.approx(1 / 2)
    assert m2["OP"].item() == pytest.approx(3 / 7)


# label sequences ----------------------------------------------------------------------------------
def test_label_sequence_follows_the_order_and_round_trips():
    labels = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0.0]])
    rank = torch.tensor([2, 0, 3, 1])  # target order: class 1, class 3, class 0, class 2
    seq = labels_to_sequence(labels, rank)
    c = NUM_SPECIAL
    assert seq.tolist() == [[BOS_ID, 3 + c, 0 + c, 2 + c, EOS_ID],
                            [BOS_ID, EOS_ID, PAD_ID, PAD_ID, PAD_ID],
                            [BOS_ID, 1 + c, EOS_ID, PAD_ID, PAD_ID]]
    assert torch.equal(sequence_to_multi_hot(seq[:, 1:], 4), labels)


def test_emitted_labels_are_masked():
    c = NUM_SPECIAL
    tgt_in = torch.tensor([[BOS_ID, 2 + c, 0 + c]])
    mask = emitted_mask(tgt_in, 4 + c)[0]
    blocked = [set(row.nonzero().flatten().tolist()) for row in mask]
    assert blocked == [{PAD_ID, BOS_ID}, {PAD_ID, BOS_ID, 2 + c}, {PAD_ID, BOS_ID, 2 + c, 0 + c}]
    log_probs = torch.zeros(2, 4 + c)
    out = no_repeat_processor(torch.tensor([[2 + c, 0 + c], [1 + c, 1 + c]]), log_probs)
    assert torch.isinf(out[0, [BOS_ID, 2 + c, 0 + c]]).all() and torch.isfinite(out[0, [EOS_ID, 1 + c, 3 + c]]).all()
    assert torch.isinf(out[1, 1 + c]) and torch.isfinite(out[1, [0 + c, 2 + c, 3 + c]]).all()


def sequence_model(num_classes=4, seed=0, order=None) -> LabelSequenceModel:
    torch.manual_seed(seed)
    return build_multilabel(num_classes=num_classes, decoder="sequence", label_order=order, **TINY).eval()


def test_decoding_never_repeats_a_label():
    """A model that always prefers class 0, then 1, 2, 3 (biased output layer) emits each label once
    and then EOS; without the processor it would repeat class 0 until the length cap."""
    model = sequence_model()
    with torch.no_grad():
        model.output.weight.zero_()
        model.output.bias.copy_(torch.tensor([0.0, 0.0, -5.0, 10.0, 9.0, 8.0, 7.0]))
    images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    tokens, scores = model.generate(images, mask)
    c = NUM_SPECIAL
    assert tokens.tolist() == [[c, 1 + c, 2 + c, 3 + c, EOS_ID]] * 2
    packed, pmask = model.pack_memory(images, mask)
    plain = generate(model, packed, pmask, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, max_len_a=0.0,
                         max_len_b=5)
    assert plain[0].tolist()[:4] == [c] * 4  # the mask is what makes it a set
    # scores: class 0 wins step 1 against the other three labels (EOS has e^-5 weight) ...
    step1 = torch.tensor([10.0, 9.0, 8.0, 7.0, -5.0]).softmax(0)
    assert scores[0, 0].item() == pytest.approx(step1[0].item(), rel=1e-4)
    # ... and class 3, alone with EOS at step 4, gets its largest probability there
    assert scores[0, 3].item() == pytest.approx(torch.tensor([7.0, -5.0]).softmax(0)[0].item(), rel=1e-4)


def test_generate_cached_equals_uncached_and_beam_one_equals_greedy():
    model = sequence_model(num_classes=5, seed=1)
    images, mask = torch.randn(3, 3, 64, 64), torch.zeros(3, 64, 64, dtype=torch.bool)
    mask[0, :, 48:] = True  # a padded image
    greedy, s1 = model.generate(images, mask)
    uncached, s2 = model.generate(images, mask, use_cache=False)
    beam1, _ = model.generate(images, mask, strategy="beam", beam_size=1)
    assert torch.equal(greedy, uncached) and torch.allclose(s1, s2, atol=1e-5)
    assert torch.equal(greedy, beam1)
    beam3, s3 = model.generate(images, mask, strategy="beam", beam_size=3)
    multi_hot = sequence_to_multi_hot(beam3, 5)
    for row in beam3.tolist():  # a set: no label twice
        labels = [t for t in row[: row.index(EOS_ID)]]
        assert len(labels) == len(set(labels))
    assert ((s3 > 0) | (multi_hot == 0)).all()  # every emitted label has a positive score


def test_scores_stop_at_eos():
    c = NUM_SPECIAL
    log_probs = torch.full((1, 3, 3 + c), -10.0)
    log_probs[0, 0, 0 + c], log_probs[0, 1, EOS_ID], log_probs[0, 2, 2 + c] = math.log(0.3), 0.0, math.log(0.9)
    tokens = torch.tensor([[0 + c, EOS_ID, PAD_ID]])
    scores = label_scores_from_steps(log_probs, tokens, 3)
    assert scores[0, 0].item() == pytest.approx(0.3) and scores[0, 2].item() < 1e-3  # step 3 came after EOS


# models ---------------------------------------------------------------------------------------------
def test_models_share_a_transformer_instance():
    q2l = build_multilabel(num_classes=3, decoder="parallel", **TINY)
    seq = build_multilabel(num_classes=3, decoder="sequence", transformer=q2l.transformer, **TINY)
    assert isinstance(q2l, Query2Label) and seq.transformer is q2l.transformer
    images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    assert q2l(images, mask).shape == (2, 3)
    with pytest.raises(ValueError, match="decoder"):
        build_multilabel(num_classes=3, decoder="recurrent", **TINY)


def easy_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class c (of 4) present <=> a bright square in quadrant c; noise elsewhere."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, 4, generator=g) < 0.4).float()
    images = torch.randn(n, 3, 32, 32, generator=g) * 0.3
    for c, (y, x) in enumerate([(0, 0), (0, 16), (16, 0), (16, 16)]):
        images[:, :, y + 4 : y + 12, x + 4 : x + 12] += 2.0 * labels[:, c, None, None, None]
    return images, torch.zeros(n, 32, 32, dtype=torch.bool), labels


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    from torchmetrics.functional.classification import multilabel_average_precision

    return float(multilabel_average_precision(scores, labels.long(), num_labels=labels.shape[1]))


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["parallel", "sequence"])
def test_tiny_model_learns_an_easy_multilabel_task(decoder):
    """Both decoders reach mAP >= 0.95 on held-out images within 150 steps (a few seconds)."""
    torch.manual_seed(0)
    model = build_multilabel(num_classes=4, decoder=decoder, label_order=[2, 0, 3, 1], **TINY)
    test_images, test_mask, test_labels = easy_batch(64, seed=99)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loss_fn = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            if decoder == "parallel":
                scores = torch.sigmoid(model(test_images, test_mask))
            else:
                scores = model.generate(test_images, test_mask)[1]
        return average_precision(scores, test_labels)

    start, before = time.time(), evaluate()
    for step in range(1, 151):
        images, mask, labels = easy_batch(16, seed=step)
        model.train()
        if decoder == "parallel":
            loss = loss_fn(model(images, mask), labels)
        else:
            tokens = model.targets(labels)
            loss = F.nll_loss(model(images, mask, tokens).flatten(0, 1), tokens[:, 1:].flatten(),
                              ignore_index=PAD_ID)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            result = evaluate()
            if result >= 0.95:
                break
    print(f"{decoder}: {step} steps, {time.time() - start:.1f}s, mAP {before:.3f} -> {result:.3f}")
    assert before < 0.8
    assert result >= 0.95


@pytest.mark.parametrize("decoder", ["parallel", "sequence"])
def test_both_decoders_read_the_hybrid_encoders_memory(decoder):
    """encoder_stride=32: the label decoders cross-attend to the fused stride-16 memory and train through
    the neck into layer4."""
    torch.manual_seed(0)
    model = build_multilabel(num_classes=3, decoder=decoder, **{**TINY, "stride": 16, "encoder_stride": 32})
    images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    memory, _, _, _, hw = model.adapter.encode(images, mask, model.transformer)
    assert model.adapter.hybrid and hw == (4, 4) and memory.shape[1] == 16
    if decoder == "parallel":
        loss = model(images, mask).sum()
    else:
        loss = model(images, mask, model.targets(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))).sum()
    loss.backward()
    assert model.adapter.neck.refine[0].weight.grad.abs().sum() > 0
    assert model.adapter.body[7][0].conv1.weight.grad.abs().sum() > 0
