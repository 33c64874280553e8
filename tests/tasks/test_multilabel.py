"""MultiLabelTask: metrics against hand-computed values, fast_dev_run of both decoders through train.py's
config, and a checkpoint round trip that reproduces the logged test scores."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from tasks.multilabel import MultilabelScores, MultiLabelTask
from train import train

TINY = [
    "task=multilabel",
    "model.d_model=32",
    "model.nhead=4",
    "model.num_encoder_layers=1",
    "model.num_decoder_layers=1",
    "model.dim_feedforward=64",
    "data.num_train=8",
    "data.num_val=4",
    "data.num_test=4",
    "data.image_size=32",
    "data.train_scales=[32]",
    "data.val_scale=32",
    "data.max_size=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "trainer.precision=32-true",
]


def test_scores_hand_computed():
    """4 images, 4 classes (the last never present), fed in two batches."""
    target = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]).float()
    scores = torch.tensor([[0.9, 0.5, 0.1, 0.1], [0.8, 0.6, 0.9, 0.1], [0.7, 0.3, 0.2, 0.6], [0.1, 0.4, 0.3, 0.1]])
    metric = MultilabelScores(4)
    for rows in (slice(0, 3), slice(3, 4)):
        metric.update(scores[rows], scores[rows] >= 0.5, target[rows])
    out = {k: v.item() for k, v in metric.compute().items()}
    # AP per present class: class 0 ranks +,-,+,- -> (1 + 2/3)/2; class 1 ranks +,-,-,+ -> (1 + 2/4)/2;
    # class 2 ranks its only positive last -> 1/4; class 3 has no positive and is left out
    assert out["mAP"] == pytest.approx((5 / 6 + 3 / 4 + 1 / 4) / 3, abs=1e-6)
    # at 0.5: class 0 TP 2 FP 1; class 1 TP 1 FP 1 FN 1; class 2 FP 1 FN 1; class 3 FP 1
    assert out["CP"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3, abs=1e-6)
    assert out["CR"] == pytest.approx((1 + 1 / 2 + 0) / 3, abs=1e-6)
    assert out["CF1"] == pytest.approx(7 / 16, abs=1e-6)
    assert out["OP"] == pytest.approx(3 / 7, abs=1e-6) and out["OR"] == pytest.approx(3 / 5, abs=1e-6)
    assert out["OF1"] == pytest.approx(1 / 2, abs=1e-6)
    metric.reset()
    metric.update(target, target > 0, target)
    assert all(v.item() == pytest.approx(1.0) for v in metric.compute().values())


@pytest.mark.slow
def test_fast_dev_run_query2label(make_cfg):
    metrics = train(make_cfg(*TINY, "trainer.fast_dev_run=true", "logger=csv", "task.loss=bce", tiny=False))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    expected = {f"{p}/{m}" for p in ("val", "test") for m in ("mAP", "CF1", "OF1", "CP", "CR", "OP", "OR")}
    assert expected <= set(metrics)


@pytest.mark.slow
def test_fast_dev_run_label_sequence(make_cfg):
    metrics = train(make_cfg(*TINY, "model.decoder=sequence", "decoding.strategy=beam",
                             "decoding.beam_size=2", "trainer.fast_dev_run=true", "logger=none", tiny=False))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert {"val/mAP", "val/CF1", "val/OF1", "test/mAP", "test/OF1"} <= set(metrics)


@pytest.mark.slow
def test_checkpoint_round_trip_reproduces_the_test_scores(make_cfg, tmp_path):
    """A checkpoint of the sequence model loads with weights_only=True and, on its own (label order
    from the stored data_info), gives the test scores that the run logged."""
    cfg = make_cfg(*TINY, "model.decoder=sequence", "logger=none", "trainer.max_epochs=1", tiny=False)
    metrics = train(cfg)
    path = tmp_path / "outputs" / "detection" / "run1" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["mtdetr"]["task"] == "multilabel"
    counts = ckpt["hyper_parameters"]["data_info"]["label_counts"]
    task = MultiLabelTask.load_from_checkpoint(path, weights_only=True).eval()
    order = sorted(range(3), key=lambda c: (-counts[c], c))
    assert task.model.rank[torch.tensor(order)].tolist() == [0, 1, 2]  # most frequent class first
    dm = instantiate(cfg.data)
    dm.setup("test")
    metric = MultilabelScores(3)
    for batch in dm.test_dataloader():
        scores, predicted = task.predict(batch["images"], batch["pixel_mask"])
        metric.update(scores, predicted, batch["labels"])
    got = metric.compute()
    for name in ("mAP", "CF1", "OF1"):  # one epoch: best = last
        assert got[name].item() == pytest.approx(metrics[f"test/{name}"], abs=1e-5)
    names = task.label_names(torch.tensor([[True, False, True]]))
    assert names == [["circle", "triangle"]]
