import itertools

import pytest
import torch
from torchvision.ops import box_convert, generalized_box_iou

from modules.matcher import HungarianMatcher


def random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    """Valid normalised cxcywh boxes."""
    cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    return torch.cat([cxcy, wh], 1)


def brute_force_cost(logits, boxes, labels, tgt_boxes, wc=1.0, wb=5.0, wg=2.0, dtype=torch.float32):
    prob = logits.softmax(-1)
    q, n = len(boxes), len(labels)
    cost = torch.zeros(q, n, dtype=dtype)
    for i in range(q):
        for j in range(n):
            giou = generalized_box_iou(
                box_convert(boxes[i : i + 1], "cxcywh", "xyxy"), box_convert(tgt_boxes[j : j + 1], "cxcywh", "xyxy")
            )[0, 0]
            cost[i, j] = -wc * prob[i, labels[j]] + wb * (boxes[i] - tgt_boxes[j]).abs().sum() - wg * giou
    best = None
    for perm in itertools.permutations(range(q), n):  # query perm[j] takes target j
        total = sum(cost[perm[j], j].item() for j in range(n))
        if best is None or total < best[0] - 1e-13:
            best = (total, perm)
    return best[0], cost


@pytest.mark.parametrize("seed,q,n", [(0, 4, 2), (1, 5, 3), (2, 3, 3), (3, 6, 1), (4, 5, 4)])
def test_matcher_is_optimal_vs_brute_force(seed, q, n):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, q, 4, generator=g)
    boxes = random_boxes(q, g)[None]
    labels = torch.randint(0, 3, (n,), generator=g)
    tgt = random_boxes(n, g)
    (rows, cols), = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, [{"labels": labels, "boxes": tgt}])
    best, cost = brute_force_cost(logits[0], boxes[0], labels, tgt)
    assert len(rows) == n and sorted(cols.tolist()) == list(range(n))
    assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-4)


def test_float64_costs_are_float64():
    """A float64 call is matched on float64 costs: equal to the float64 brute-force cost to 1e-12
    (a float32 down-cast is ~1e-7 off, enough to flip DETR's near-ties), and the assignment optimal
    to 1e-12. Half types are computed in float32."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 5, 4, generator=g, dtype=torch.float64)
    boxes = random_boxes(5, g).double()[None]
    labels = torch.randint(0, 3, (4,), generator=g)
    tgt = random_boxes(4, g).double()
    matcher = HungarianMatcher()
    cost = matcher.cost_matrices(logits, boxes, [{"labels": labels, "boxes": tgt}], 4)[0]
    best, want = brute_force_cost(logits[0], boxes[0], labels, tgt, dtype=torch.float64)
    assert cost.dtype == torch.float64
    torch.testing.assert_close(cost, want, rtol=0, atol=1e-12)
    (rows, cols), = matcher({"pred_logits": logits, "pred_boxes": boxes}, [{"labels": labels, "boxes": tgt}])
    assert want[rows, cols].sum().item() == pytest.approx(best, abs=1e-12)
    half = {"pred_logits": logits.bfloat16(), "pred_boxes": boxes.bfloat16()}
    assert matcher(half, [{"labels": labels, "boxes": tgt.float()}])[0][0].numel() == 4  # float32 inside


def test_matcher_per_image_and_empty_targets():
    g = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(3, 5, 3, generator=g), "pred_boxes": random_boxes(15, g).view(3, 5, 4)}
    targets = [
        {"labels": torch.tensor([0, 1]), "boxes": random_boxes(2, g)},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
        {"labels": torch.tensor([1]), "boxes": random_boxes(1, g)},
    ]
    idx = HungarianMatcher()(outputs, targets)
    assert [len(r) for r, _ in idx] == [2, 0, 1]
    # matching an image alone gives the same assignment as in the batch
    alone = HungarianMatcher()({k: v[2:] for k, v in outputs.items()}, targets[2:])
    assert torch.equal(alone[0][0], idx[2][0])


def test_matcher_prefers_exact_box_and_class():
    tgt = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.1, 0.3]])
    boxes = torch.tensor([[[0.7, 0.7, 0.1, 0.3], [0.5, 0.5, 0.5, 0.5], [0.3, 0.3, 0.2, 0.2]]])
    logits = torch.zeros(1, 3, 3)
    rows, cols = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes},
                                    [{"labels": torch.tensor([0, 1]), "boxes": tgt}])[0]
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 2, 1: 0}


def test_matcher_rejects_nan_predictions():
    outputs = {"pred_logits": torch.full((1, 2, 3), float("nan")), "pred_boxes": torch.rand(1, 2, 4)}
    with pytest.raises(FloatingPointError, match="NaN"):
        HungarianMatcher()(outputs, [{"labels": torch.tensor([0]), "boxes": torch.rand(1, 4)}])
