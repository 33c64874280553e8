"""Attention pictures read the model's own last-layer cross-attention (tasks.attention)."""

from __future__ import annotations

import torch

from modules.detr import build_detr
from tasks.attention import kept_queries, last_cross_attention, token_maps

SMALL = dict(backbone="resnet18", frozen_bn=False, trainable_layers=5, stride=32, d_model=32, nhead=4,
             num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64, dropout=0.0, num_queries=5)


def test_one_visible_token_gives_one_hot_maps_and_the_hook_changes_nothing():
    torch.manual_seed(0)
    model = build_detr(num_classes=3, **SMALL).eval()
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[0, 32:, :] = True  # image 0: only the top-left 32 x 32 pixels, one stride-32 token, are real
    mask[0, :, 32:] = True
    images[mask[:, None].expand_as(images)] = 0.0
    with torch.no_grad():
        plain = model(images, mask)
        with last_cross_attention(model.transformer) as seen:
            hooked = model(images, mask)
    for key in ("pred_logits", "pred_boxes"):  # the weights come from the explicit path: fp32 rounding only
        assert torch.allclose(plain[key], hooked[key], atol=1e-5, rtol=0)
    (weights,) = seen
    assert weights.shape == (2, 5, 6)  # [B, queries, 2 x 3 tokens]
    one_hot = torch.zeros(5, 6)
    one_hot[:, 0] = 1.0
    assert torch.allclose(weights[0], one_hot, atol=1e-6)  # every query can only read token 0
    assert torch.allclose(weights[1].sum(-1), torch.ones(5), atol=1e-5) and (weights[1].amax(-1) < 1.0).all()
    maps = token_maps(weights[0], mask[0], [0, 3])
    assert maps.shape == (2, 32, 32) and torch.allclose(maps.amax((1, 2)), torch.ones(2))
    full = token_maps(weights[1], mask[1], [1])
    assert full.shape == (1, 64, 96)
    peak = int(weights[1, 1].argmax())
    row, col = divmod(int(full[0].argmax()), 96)
    assert (row // 32, col // 32) == divmod(peak, 3)  # the brightest pixel lies in the most-read token


def test_kept_queries_are_the_best_above_the_threshold():
    model = build_detr(num_classes=3, **SMALL).eval()
    logits = torch.full((1, 5, 4), -5.0)
    logits[0, 2, 1] = 5.0  # query 2: class 1, sure
    logits[0, 4, 0] = 2.0  # query 4: class 0, less sure
    rows = kept_queries({"pred_logits": logits}, model, threshold=0.5, top_k=10)
    assert [(q, c) for q, c, _ in rows[0]] == [(2, 1), (4, 0)]
    assert kept_queries({"pred_logits": logits}, model, threshold=0.5, top_k=1)[0][0][0] == 2
