"""The convergence techniques of DETR's successors (modules/detr.py), each tested on its mechanism."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_convert

from modules.criterion import SetCriterion
from modules.detr import (
    build_detr,
    inverse_sigmoid,
    make_denoising_queries,
    postprocess,
    query_attention_mask,
)
from modules.matcher import HungarianMatcher

TINY = dict(backbone="resnet18", frozen_bn=True, trainable_layers=0, stride=16, d_model=32, nhead=4,
            num_encoder_layers=1, num_decoder_layers=3, dim_feedforward=64, dropout=0.0, num_queries=6)
C = 3
TARGETS = [
    {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
    {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
]


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 64, 64, generator=g)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, :, 48:] = True  # the second image is padded on the right
    return images, mask


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_detr(num_classes=C, **{**TINY, **kw})


# --- focal loss and focal matching cost ------------------------------------------------------------

def test_focal_matching_cost_is_focal_loss_of_the_class_minus_that_of_background():
    logits = torch.tensor([[[2.0, -1.0, 0.5], [-3.0, 4.0, 0.0]]])  # [B=1, Q=2, C=3]
    m = HungarianMatcher(cost_class=1.0, cost_bbox=0.0, cost_giou=0.0, class_loss="focal", focal_alpha=0.25, focal_gamma=2.0)
    p = logits.sigmoid()
    pos = 0.25 * (1 - p) ** 2 * -torch.log(p)
    neg = 0.75 * p**2 * -torch.log(1 - p)
    torch.testing.assert_close(-m.class_scores(logits), pos - neg)
    # and the assignment follows it: query 1 is the confident class-1 query
    idx = m({"pred_logits": logits, "pred_boxes": torch.full((1, 2, 4), 0.5)},
            [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}])
    assert idx[0][0].tolist() == [1]


def test_focal_classification_loss_matches_the_formula_and_ignores_easy_negatives():
    crit = SetCriterion(num_classes=C, matcher=HungarianMatcher(class_loss="focal"), class_loss="focal", focal_alpha=0.25, focal_gamma=2.0)
    logits = torch.tensor([[[3.0, -2.0, -1.0], [-6.0, -6.0, -6.0]]])
    target = torch.tensor([[0, C]])  # query 0 is class 0, query 1 background
    p = logits.sigmoid()
    t = torch.tensor([[[1.0, 0, 0], [0, 0, 0]]])
    expected = (torch.where(t == 1, 0.25 * (1 - p) ** 2 * -torch.log(p), 0.75 * p**2 * -torch.log(1 - p))).sum() / 1.0
    torch.testing.assert_close(crit.loss_labels(logits, target, 1.0), expected)
    # a confident background query costs (almost) nothing, unlike under cross entropy
    easy = crit.loss_labels(torch.full((1, 1, C), -6.0), torch.tensor([[C]]), 1.0)
    assert easy < 1e-5


def test_sigmoid_postprocess_ranks_query_class_pairs():
    logits = torch.tensor([[[4.0, 3.0, -9.0], [-9.0, -9.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.5, 0.5]]])
    out = postprocess({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]), top_k=3, class_loss="focal")[0]
    assert out["labels"].tolist() == [0, 1, 2]  # one query may give two detections of different classes
    torch.testing.assert_close(out["scores"], torch.tensor([4.0, 3.0, 0.0]).sigmoid())
    torch.testing.assert_close(out["boxes"][0], torch.tensor([80.0, 40.0, 120.0, 60.0]))
    torch.testing.assert_close(out["boxes"][2], torch.tensor([0.0, 0.0, 100.0, 50.0]))


# --- denoising queries ------------------------------------------------------------------------------

def test_denoising_noise_stays_within_its_bounds():
    g = torch.Generator().manual_seed(0)
    targets = [{"labels": torch.randint(0, C, (5,), generator=g), "boxes": torch.rand(5, 2, generator=g).mul(0.4).add(0.3)
                .repeat(1, 2) * torch.tensor([1, 1, 0.5, 0.5])} for _ in range(40)]
    dn = make_denoising_queries(targets, num_classes=C, groups=4, label_noise=0.5, box_noise=0.4, contrastive=True, generator=g)
    assert dn.labels.shape == (40, 4 * 2 * 5) and dn.boxes.shape == (40, 40, 4)
    gt = torch.stack([t["boxes"] for t in targets])[:, None, None]  # [B, 1, 1, n, 4]
    noised = dn.boxes.view(40, 4, 2, 5, 4)
    shift = (box_convert(noised, "cxcywh", "xyxy") - box_convert(gt, "cxcywh", "xyxy")).abs()
    half = gt[..., 2:].repeat(1, 1, 1, 1, 2) / 2
    assert (shift[:, :, 0] <= 0.4 * half[:, :, 0] + 1e-5).all()  # positives: at most box_noise x half size
    assert (shift[:, :, 1] >= 0.4 * half[:, :, 0] - 1e-5).all()  # negatives: at least that much
    gt_labels = torch.stack([t["labels"] for t in targets])[:, None, None].expand(40, 4, 2, 5)
    flipped = (dn.labels.view(40, 4, 2, 5) != gt_labels).float().mean().item()
    # replaced with probability 0.25, by a random class that is a different one 2/3 of the time
    assert 0.25 * 2 / 3 - 0.04 < flipped < 0.25 * 2 / 3 + 0.04


def test_denoising_pads_to_the_largest_image_and_marks_padding():
    dn = make_denoising_queries(TARGETS, num_classes=C, groups=2, label_noise=0.0, box_noise=0.0, contrastive=False)
    assert dn.n_max == 2 and dn.num_queries == 4
    assert dn.labels.tolist() == [[0, 2, 0, 2], [1, C, 1, C]]
    torch.testing.assert_close(dn.boxes[0, :2], TARGETS[0]["boxes"])
    assert make_denoising_queries([{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}],
                                  num_classes=C, groups=2, label_noise=0.5, box_noise=0.4, contrastive=True) is None


def test_attention_mask_hides_the_answers_and_separates_groups():
    m = query_attention_mask(num_dn=4, dn_groups=2, num_groups=2, num_queries=3)
    assert m.shape == (10, 10)
    assert m[4:, :4].all()  # matching queries never see denoising ones
    assert m[:2, 2:4].all() and m[2:4, :2].all()  # denoising groups do not see each other
    assert not m[:4, 4:].any()  # denoising queries may read the matching ones
    assert m[4:7, 7:].all() and m[7:, 4:7].all() and not m[4:7, 4:7].any()  # query groups are separate
    assert query_attention_mask(num_dn=0, dn_groups=0, num_groups=1, num_queries=5) is None


def test_matching_predictions_do_not_depend_on_denoising_queries():
    """The attention mask works: the set predictions are the same with and without the denoising
    queries in the decoder, so the model cannot read the noised ground truth at inference."""
    net = model(anchor_queries=True, box_refine=True, dn_groups=3).train()
    images, mask = batch()
    with_dn = net(images, mask, TARGETS)
    without = net(images, mask, None)
    assert "dn_outputs" in with_dn and "dn_outputs" not in without
    torch.testing.assert_close(with_dn["pred_boxes"], without["pred_boxes"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(with_dn["pred_logits"], without["pred_logits"], rtol=1e-4, atol=1e-5)
    assert with_dn["dn_outputs"]["pred_boxes"].shape == (2, 3 * 2 * 2, 4)


def test_denoising_loss_rewards_reconstruction_and_rejects_negatives():
    dn = make_denoising_queries(TARGETS, num_classes=C, groups=2, label_noise=0.5, box_noise=0.4, contrastive=True)
    crit = SetCriterion(num_classes=C, matcher=HungarianMatcher(), eos_coef=0.1)
    b, t = 2, dn.num_queries
    layout = torch.zeros(b, dn.groups, dn.copies, dn.n_max, dtype=torch.long)  # target class per slot
    boxes = torch.full((b, dn.groups, dn.copies, dn.n_max, 4), 0.5)
    for i, tg in enumerate(TARGETS):
        n = len(tg["labels"])
        layout[i, :, 0, :n] = tg["labels"]
        layout[i, :, 1, :n] = C  # negatives: no-object
        boxes[i, :, 0, :n] = tg["boxes"]
    good = torch.nn.functional.one_hot(layout.flatten(1), C + 1).float() * 20
    perfect = crit.denoising_losses({"pred_logits": good, "pred_boxes": boxes.flatten(1, 3), "dn": dn}, TARGETS, 3.0)
    assert perfect["loss_bbox"] < 1e-6 and perfect["loss_giou"] < 1e-5 and perfect["loss_ce"] < 1e-6
    # a negative that claims its object is penalised; padded slots (image 1, j=1) are not supervised
    wrong = good.view(b, dn.groups, dn.copies, dn.n_max, C + 1).clone()
    wrong[0, :, 1, 0] = wrong[0, :, 0, 0]
    assert crit.denoising_losses({"pred_logits": wrong.flatten(1, 3), "pred_boxes": boxes.flatten(1, 3), "dn": dn},
                                 TARGETS, 3.0)["loss_ce"] > 0.1
    padded = good.view(b, dn.groups, dn.copies, dn.n_max, C + 1).clone()
    padded[1, :, :, 1] = torch.randn(dn.groups, dn.copies, C + 1) * 5
    again = crit.denoising_losses({"pred_logits": padded.flatten(1, 3), "pred_boxes": boxes.flatten(1, 3), "dn": dn},
                                  TARGETS, 3.0)
    assert again["loss_ce"] < 1e-6
    assert t == 8


# --- anchor queries and box refinement --------------------------------------------------------------

@pytest.mark.parametrize("refine", [False, True])
def test_each_layer_refines_the_previous_layers_boxes(refine):
    """With a box branch that always predicts the offset d (in logit space), layer k's boxes are
    anchor + (k+1) d when layers refine each other's boxes, and anchor + d for every layer when not."""
    net = model(anchor_queries=True, box_refine=refine).eval()
    d = torch.tensor([0.1, -0.2, 0.05, 0.3])
    with torch.no_grad():
        net.head.bbox_embed[-1].weight.zero_()
        net.head.bbox_embed[-1].bias.copy_(d)
    out = net(*batch())
    layers = [a["pred_boxes"] for a in out["aux_outputs"]] + [out["pred_boxes"]]
    anchor = net.anchor_embed.weight.detach()
    for k, boxes in enumerate(layers):
        expected = (anchor + (k + 1 if refine else 1) * d).sigmoid().expand_as(boxes)
        torch.testing.assert_close(boxes, expected, rtol=1e-4, atol=1e-5)


def test_query_positions_follow_the_refined_boxes():
    """Refinement changes what later layers attend to (their positions come from the new boxes)."""
    images, mask = batch()
    outs = []
    for refine in (False, True):
        net = model(seed=1, anchor_queries=True, box_refine=refine).eval()
        with torch.no_grad():
            net.head.bbox_embed[-1].bias.copy_(torch.tensor([0.5, 0.5, 0.0, 0.0]))
        outs.append(net(images, mask))
    # layer 0 is identical (same anchors), later layers' features differ
    torch.testing.assert_close(outs[0]["aux_outputs"][0]["pred_logits"], outs[1]["aux_outputs"][0]["pred_logits"])
    assert not torch.allclose(outs[0]["pred_logits"], outs[1]["pred_logits"], atol=1e-4)


# --- Group DETR ---------------------------------------------------------------------------------------

def test_query_groups_are_independent_while_training_and_only_the_first_runs_at_inference():
    net = model(num_groups=3).train()
    images, mask = batch()
    out = net(images, mask, TARGETS)
    assert out["pred_logits"].shape == (2, 18, C + 1) and out["num_groups"] == 3
    net.num_groups = 1  # the same weights with the other groups removed
    alone = net(images, mask)
    torch.testing.assert_close(out["pred_logits"][:, :6], alone["pred_logits"], rtol=1e-4, atol=1e-5)
    net.num_groups = 3
    assert net.eval()(images, mask)["pred_logits"].shape == (2, 6, C + 1)


def test_each_group_is_matched_one_to_one_on_its_own():
    g = torch.Generator().manual_seed(0)
    one = {"pred_logits": torch.randn(2, 6, C + 1, generator=g), "pred_boxes": torch.rand(2, 6, 4, generator=g) * 0.5 + 0.2}
    crit = SetCriterion(num_classes=C, matcher=HungarianMatcher())
    single = crit(one, TARGETS)
    # three groups: identical copies -> the same (group-averaged) loss; one-to-one *per group*
    three = {k: v.repeat(1, 3, 1) for k, v in one.items()} | {"num_groups": 3}
    for k, v in crit(three, TARGETS).items():
        assert v.item() == pytest.approx(single[k].item(), rel=1e-5), k
    # without groups, the 18 queries would share one assignment and 12 copies would be background
    flat = crit({k: v.repeat(1, 3, 1) for k, v in one.items()}, TARGETS)
    assert flat["loss_bbox"].item() == pytest.approx(single["loss_bbox"].item(), rel=1e-5)
    assert flat["loss_ce"].item() != pytest.approx(single["loss_ce"].item(), rel=1e-3)


# --- two-stage ----------------------------------------------------------------------------------------

def test_two_stage_anchors_are_the_best_encoder_proposals():
    net = model(two_stage=True, class_loss="focal").eval()
    images, mask = batch()
    out = net(images, mask)
    enc = out["enc_outputs"]
    assert enc["pred_boxes"].shape == (2, 16, 4)  # one proposal per token of the 4x4 map
    score = enc["pred_logits"].sigmoid().max(-1).values.masked_fill(net.adapter(images, mask)[2], -1.0)
    top = score.topk(6, dim=1).indices
    chosen = enc["pred_boxes"].gather(1, top[..., None].expand(-1, -1, 4))
    # the decoder's box branch starts at zero offset, so its first layer's boxes are the anchors
    torch.testing.assert_close(out["aux_outputs"][0]["pred_boxes"], chosen, rtol=1e-4, atol=1e-5)
    # padded tokens (image 1's right quarter) are never chosen
    assert (box_convert(chosen[1], "cxcywh", "xyxy")[:, 0] < 0.99).all()


def test_two_stage_proposals_sit_on_their_token_cells():
    net = model(two_stage=True).eval()
    with torch.no_grad():
        net.enc_head.bbox_embed[-1].weight.zero_()
        net.enc_head.bbox_embed[-1].bias.zero_()
    images, mask = batch()
    boxes = net(images, mask)["enc_outputs"]["pred_boxes"]
    # image 0: a 4x4 grid of cells 1/4 wide; centres at (j + 0.5) / 4, size two cells
    centres = (torch.arange(4) + 0.5) / 4
    torch.testing.assert_close(boxes[0, :4, 0], centres, atol=1e-5, rtol=0)
    torch.testing.assert_close(boxes[0, 0, 2:], torch.tensor([0.5, 0.5]), atol=1e-5, rtol=0)
    # image 1 is 48 px wide of 64: 3 valid columns, centres relative to the image, not the padding
    torch.testing.assert_close(boxes[1, :3, 0], (torch.arange(3) + 0.5) / 3, atol=1e-5, rtol=0)


def test_inverse_sigmoid_round_trip():
    x = torch.tensor([0.01, 0.3, 0.5, 0.99])
    torch.testing.assert_close(inverse_sigmoid(x).sigmoid(), x)
    assert math.isfinite(inverse_sigmoid(torch.tensor([0.0, 1.0])).abs().max().item())


@pytest.mark.parametrize("kw", [dict(box_refine=True), dict(dn_groups=2), dict(num_groups=0)])
def test_inconsistent_switches_are_explained(kw):
    with pytest.raises(ValueError, match="anchor_queries|num_groups"):
        model(**kw)


def test_every_switch_trains_end_to_end():
    """All switches together: forward, loss (with every part's terms), backward reaching the backbone."""
    net = model(anchor_queries=True, box_refine=True, num_groups=2, two_stage=True, dn_groups=2,
                class_loss="focal", trainable_layers=5, frozen_bn=False).train()
    crit = SetCriterion(num_classes=C, matcher=HungarianMatcher(class_loss="focal"), class_loss="focal")
    losses = crit(net(*batch(), TARGETS), TARGETS)
    assert {"loss_ce_enc", "loss_bbox_dn", "loss_giou_dn_1", "loss_ce_1"} <= set(losses)
    sum(losses.values()).backward()
    assert net.adapter.body[0].weight.grad.abs().sum() > 0
    assert net.query_content.weight.grad.abs().sum() > 0 and net.label_embed.weight.grad.abs().sum() > 0


def test_class_loss_is_one_setting_from_task_to_postprocess():
    """task.class_loss reaches the matcher, the criterion, the model's heads and the postprocess under
    one name; a misspelt value fails at construction, naming the choices."""
    from tasks.detection import DetectionTask

    info = {"num_classes": 3, "class_names": ["a", "b", "c"], "category_ids": [1, 2, 3]}
    small = {"backbone": "resnet18", "d_model": 32, "nhead": 2, "num_encoder_layers": 1, "num_decoder_layers": 1,
             "dim_feedforward": 32, "num_queries": 4}
    for class_loss, logits in (("ce", 4), ("focal", 3)):
        task = DetectionTask(model=small, data_info=info, class_loss=class_loss)
        assert {task.criterion.class_loss, task.criterion.matcher.class_loss, task.model.class_loss,
                task.model.head.class_loss} == {class_loss}
        assert task.model.head.class_embed.out_features == logits
    with pytest.raises(ValueError, match="ce, focal"):
        DetectionTask(model=small, data_info=info, class_loss="sigmoid")
    with pytest.raises(ValueError, match="ce, focal"):
        postprocess({"pred_logits": torch.zeros(1, 2, 3), "pred_boxes": torch.rand(1, 2, 4)}, torch.tensor([[9, 9]]),
                    class_loss="softmax")
