import pytest
import torch
import torch.nn.functional as F

from modules.criterion import SetCriterion, weighted_loss
from modules.matcher import HungarianMatcher


def make_outputs(b=2, q=6, c=3, seed=0, aux=2):
    g = torch.Generator().manual_seed(seed)

    def one():
        return {"pred_logits": torch.randn(b, q, c + 1, generator=g),
                "pred_boxes": torch.rand(b, q, 4, generator=g) * 0.4 + 0.1}

    out = one()
    out["aux_outputs"] = [one() for _ in range(aux)]
    return out


TARGETS = [
    {"labels": torch.tensor([0, 2, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.2], [0.5, 0.5, 0.1, 0.1]])},
    {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.6, 0.2, 0.4]])},
]


def test_loss_terms_names_and_aux():
    losses = SetCriterion(num_classes=3, matcher=HungarianMatcher())(make_outputs(), TARGETS)
    assert set(losses) == {f"{k}{s}" for k in ("loss_ce", "loss_bbox", "loss_giou") for s in ("", "_0", "_1")}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())


def test_loss_invariant_to_permuting_predictions():
    out = make_outputs(aux=0)
    crit = SetCriterion(num_classes=3, matcher=HungarianMatcher())
    base = crit(out, TARGETS)
    perm = torch.randperm(out["pred_logits"].shape[1], generator=torch.Generator().manual_seed(1))
    permuted = {"pred_logits": out["pred_logits"][:, perm], "pred_boxes": out["pred_boxes"][:, perm]}
    for k, v in crit(permuted, TARGETS).items():
        assert v.item() == pytest.approx(base[k].item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["float32", "float64"])
def test_loss_semantics_match_hand_computation(dtype, rel):
    """CE is the eos-weighted mean over all queries; box terms are sums over matches / number of boxes.
    A float64 call is computed in float64 (agrees with the float64 hand computation to 1e-12, where
    a float32 down-cast would be ~1e-7 off); float32 to float32 rounding (1e-5)."""
    out = {k: v.to(dtype) for k, v in make_outputs(aux=0).items() if k != "aux_outputs"}
    targets = [{"labels": t["labels"], "boxes": t["boxes"].to(dtype)} for t in TARGETS]
    matcher = HungarianMatcher()
    crit = SetCriterion(num_classes=3, matcher=matcher, eos_coef=0.1)
    losses = crit(out, targets)
    assert {v.dtype for v in losses.values()} == {dtype}
    idx = matcher(out, targets)
    target_classes = torch.full((2, 6), 3)
    num_boxes = 4
    l1, giou = 0.0, 0.0
    from torchvision.ops import box_convert, generalized_box_iou

    for b, (src, tgt) in enumerate(idx):
        target_classes[b, src] = targets[b]["labels"][tgt]
        pb, tb = out["pred_boxes"][b, src], targets[b]["boxes"][tgt]
        l1 += (pb - tb).abs().sum().item()
        giou += (1 - torch.diag(generalized_box_iou(box_convert(pb, "cxcywh", "xyxy"),
                                                    box_convert(tb, "cxcywh", "xyxy")))).sum().item()
    w = torch.tensor([1.0, 1.0, 1.0, 0.1], dtype=dtype)
    logp = F.log_softmax(out["pred_logits"], -1)
    nll = -logp.gather(-1, target_classes[..., None])[..., 0]
    ce = (w[target_classes] * nll).sum() / w[target_classes].sum()
    assert losses["loss_ce"].item() == pytest.approx(ce.item(), rel=rel)
    assert losses["loss_bbox"].item() == pytest.approx(l1 / num_boxes, rel=rel)
    assert losses["loss_giou"].item() == pytest.approx(giou / num_boxes, rel=rel)


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_half_types_are_computed_in_float32_and_float64_stays(class_loss):
    c = 3 if class_loss == "focal" else 4
    for dtype, want in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float64, torch.float64)):
        out = {k: v[..., :c].to(dtype) if k == "pred_logits" else v.to(dtype)
               for k, v in make_outputs(aux=0).items() if k != "aux_outputs"}
        crit = SetCriterion(num_classes=3, matcher=HungarianMatcher(class_loss=class_loss), class_loss=class_loss)
        assert {v.dtype for v in crit(out, TARGETS).values()} == {want}, dtype


def test_empty_targets_give_finite_loss_and_gradient():
    out = make_outputs()
    for d in [out, *out["aux_outputs"]]:
        d["pred_logits"].requires_grad_(True)
        d["pred_boxes"].requires_grad_(True)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    losses = SetCriterion(num_classes=3, matcher=HungarianMatcher())(out, empty)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    total = weighted_loss(losses, {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2})
    total.backward()
    # all queries are pushed towards "no object"
    assert out["pred_logits"].grad[..., -1].lt(0).all()


def test_weighted_loss_applies_base_weights_to_aux_terms():
    losses = {"loss_ce": torch.tensor(1.0), "loss_ce_0": torch.tensor(2.0), "loss_bbox": torch.tensor(3.0)}
    assert weighted_loss(losses, {"loss_ce": 2.0, "loss_bbox": 5.0}).item() == pytest.approx(2 + 4 + 15)


def test_evaluation_loss_runs_no_collective(monkeypatch):
    """Under DDP the training loss all-reduces the box count (once per call); ``across_processes=False``
    (evaluation, where ranks may run different numbers of batches) must not, and normalises locally."""
    import torch.distributed as dist

    calls = []

    def all_reduce(tensor, *args, **kwargs):  # a 2-process group in which the other rank holds 2 boxes
        calls.append(tensor.clone())
        tensor += 2.0

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    crit, out = SetCriterion(num_classes=3, matcher=HungarianMatcher()), make_outputs(aux=0)
    synced = crit(out, TARGETS)
    assert len(calls) == 1 and calls[0].item() == 4.0
    local = crit(out, TARGETS, across_processes=False)
    assert len(calls) == 1  # no collective
    # normaliser 4 (this rank's boxes) instead of (4 + 2) / 2 = 3
    assert local["loss_bbox"].item() == pytest.approx(synced["loss_bbox"].item() * 3 / 4, rel=1e-6)


def test_one_to_many_encoder_matching_supervises_k_proposals_per_box():
    """``enc_matches=k``: each box is matched to k encoder proposals (the decoder stays one-to-one)."""
    target = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    far = [0.2, 0.2, 0.1, 0.1]
    proposals = {"pred_logits": torch.zeros(1, 4, 2),  # sigmoid head: 2 classes, no no-object column
                 "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2], far, far]])}
    outputs = {"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": torch.full((1, 3, 4), 0.5),
               "enc_outputs": proposals}

    def losses(k):
        return SetCriterion(num_classes=2, matcher=HungarianMatcher(class_loss="focal"), class_loss="focal",
                            enc_matches=k)(outputs, target)

    one, two, three = losses(1), losses(2), losses(3)
    assert one["loss_bbox_enc"] == 0 and two["loss_bbox_enc"] == 0  # the two exact proposals are the matches
    # three matches: the two exact ones and one far one, L1 |0.3|+|0.3|+|0.1|+|0.1| over 3 matches
    assert three["loss_bbox_enc"].item() == pytest.approx(0.8 / 3, rel=1e-5)
    # focal loss: two positives instead of one, over twice the boxes: the positive term is the same
    # per box and the negatives' term halves, so the total differs from one-to-one
    assert two["loss_ce_enc"].item() != pytest.approx(one["loss_ce_enc"].item(), rel=1e-3)
    assert two["loss_ce"] == one["loss_ce"] and two["loss_bbox"] == one["loss_bbox"]  # decoder: one-to-one
    with pytest.raises(ValueError, match="enc_matches"):
        SetCriterion(num_classes=2, matcher=HungarianMatcher(), enc_matches=0)


def test_iou_aware_classification_targets_the_matched_boxes_iou():
    """iou_aware (varifocal): one query whose box has IoU 1/2 with its target box; its class loss is the
    IoU-weighted binary cross entropy towards 1/2 (zero gradient at p = 1/2), the other class and the
    other query are focal-weighted negatives; the plain focal loss pushes the same logit up."""
    from modules.criterion import paired_iou

    target = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    boxes = torch.tensor([[[0.4, 0.5, 0.4, 0.4], [0.1, 0.1, 0.05, 0.05]]])  # overlap 0.3 x 0.4 -> IoU 0.12/0.2
    assert paired_iou(boxes[0, :1], target[0]["boxes"]).item() == pytest.approx(0.6)
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.2], [0.1, 0.1, 0.05, 0.05]]])  # inside, half the area -> 0.5
    iou = paired_iou(boxes[0, :1], target[0]["boxes"]).item()
    assert iou == pytest.approx(0.5)
    logits = torch.tensor([[[0.3, 0.0], [-1.0, -2.0]]], requires_grad=True)
    matcher = HungarianMatcher(class_loss="focal")
    crit = SetCriterion(num_classes=2, matcher=matcher, class_loss="focal", iou_aware=True)
    loss = crit({"pred_logits": logits, "pred_boxes": boxes}, target, across_processes=False)["loss_ce"]
    p = logits.detach().sigmoid()
    negatives = [(0, 0, 0), (0, 1, 0), (0, 1, 1)]
    expected = iou * F.binary_cross_entropy_with_logits(torch.tensor(0.0), torch.tensor(iou))
    for b, q, c in negatives:
        expected += 0.25 * p[b, q, c] ** 2 * F.binary_cross_entropy_with_logits(logits[b, q, c].detach(), torch.tensor(0.0))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert abs(logits.grad[0, 0, 1].item()) < 1e-7  # p = IoU: nothing to learn
    focal = SetCriterion(num_classes=2, matcher=matcher, class_loss="focal")
    logits.grad = None
    focal({"pred_logits": logits, "pred_boxes": boxes}, target, across_processes=False)["loss_ce"].backward()
    assert logits.grad[0, 0, 1].item() < -1e-3  # plain focal: the target is 1
    with pytest.raises(ValueError, match="needs the sigmoid head"):
        SetCriterion(num_classes=2, matcher=matcher, class_loss="ce", iou_aware=True)
