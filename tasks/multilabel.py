"""Multi-label image classification on the shared Transformer: label queries or label sequences; mAP, CF1, OF1."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MultilabelAveragePrecision

from modules.backbone import IMAGENET_MEAN, IMAGENET_STD
from modules.decoding import check_settings
from modules.dtypes import at_least_float32
from modules.multilabel import (
    PAD_ID,
    AsymmetricLoss,
    LabelSequenceModel,
    build_multilabel,
    multilabel_f1,
    sequence_to_multi_hot,
)

from .base import BaseTask


class MultilabelScores(Metric):
    """mAP, CP/CR/CF1 and OP/OR/OF1 over a split (states summed / gathered across processes).

    - ``mAP``: macro average precision (torchmetrics ``MultilabelAveragePrecision`` per class) over
      the classes with at least one positive image in the split; AP is undefined without positives.
    - ``CP, CR, CF1, OP, OR, OF1``: :func:`modules.multilabel.multilabel_f1` on the predicted sets
      (per-class averages over the same classes; overall numbers over all).
    """

    full_state_update = False

    def __init__(self, num_labels: int) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.ap = MultilabelAveragePrecision(num_labels=num_labels, average="none")
        for name in ("tp", "fp", "fn", "positives"):
            self.add_state(name, default=torch.zeros(num_labels, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: Tensor, predicted: Tensor, target: Tensor) -> None:
        """``scores`` ``[B, C]`` in [0, 1], ``predicted`` bool ``[B, C]``, ``target`` multi-hot ``[B, C]``."""
        target = target > 0.5
        predicted = predicted.bool()
        self.ap.update(at_least_float32(scores), target.long())
        self.tp += (predicted & target).sum(0)
        self.fp += (predicted & ~target).sum(0)
        self.fn += (~predicted & target).sum(0)
        self.positives += target.sum(0)

    def compute(self) -> dict[str, Tensor]:
        present = self.positives > 0
        with warnings.catch_warnings():  # classes without positives: AP undefined, left out below
            warnings.filterwarnings("ignore", message="No positive samples found in target")
            ap = self.ap.compute()
        m_ap = at_least_float32(ap[present]).mean() if bool(present.any()) else ap.new_zeros(())
        return {"mAP": m_ap, **multilabel_f1(self.tp, self.fp, self.fn, present)}

    def reset(self) -> None:
        super().reset()
        self.ap.reset()


class MultiLabelTask(BaseTask):
    """Multi-label classification on the image adapter and the shared Transformer.

    Args:
        model: keyword arguments of :func:`modules.multilabel.build_multilabel` (the ``model`` config
            group): ``decoder`` "parallel" (label queries, one logit per class) or "sequence" (labels
            as tokens, most frequent training class first).
        data_info: ``num_classes``, ``class_names`` and ``label_counts`` (training frequency per class;
            it fixes the sequence order) from the data module.
        loss: "asl" (asymmetric loss) or "bce", for the parallel decoder; the sequence decoder is
            trained with cross entropy on the next label token.
        gamma_neg, gamma_pos, clip: asymmetric-loss settings (Ridnik et al.; 0, 0, 0 is BCE).
        threshold: score at which the parallel decoder predicts a label (for CP/CR/CF1/OP/OR/OF1).
            The sequence decoder predicts the labels it emits.
        num_samples: validation images logged to W&B each epoch (image, true and predicted labels).
        decoding: the ``decoding`` config group: settings of :func:`modules.decoding.generate` for the
            sequence decoder (strategy greedy|beam|sample, beam_size, use_cache).
        transformer: an existing transformer for the model to use instead of building its own (the
            multitask run passes its view of the shared one; the model config's transformer sizes are
            then not used).
        **optim: optimizer / schedule settings of :class:`tasks.base.BaseTask`.
    """

    task_name = "multilabel"
    positions_at_every_layer = True  # DETR-style positions in every layer (else once at the input)

    def __init__(
        self,
        *,
        model: dict,
        data_info: dict,
        transformer: nn.Module | None = None,
        decoding: dict | None = None,
        loss: str = "asl",
        gamma_neg: float = 4.0,
        gamma_pos: float = 0.0,
        clip: float = 0.05,
        threshold: float = 0.5,
        num_samples: int = 8,
        **optim,
    ) -> None:
        super().__init__(**optim)
        self.save_hyperparameters(ignore=["transformer"])
        model = dict(model)
        self.decoding = dict(decoding or {})
        check_settings(self.decoding, "decoding")
        self.data_info = data_info
        num_classes = int(data_info["num_classes"])
        self.class_names = list(data_info.get("class_names") or [str(i) for i in range(num_classes)])
        order = None
        if model.get("decoder", "parallel") == "sequence":
            counts = data_info.get("label_counts") or [0] * num_classes
            order = sorted(range(num_classes), key=lambda c: (-counts[c], c))  # most frequent first
        self.model = build_multilabel(num_classes=num_classes, label_order=order, transformer=transformer, **model)
        self.is_sequence = isinstance(self.model, LabelSequenceModel)
        if loss not in ("asl", "bce"):
            raise ValueError(f"task.loss must be 'asl' or 'bce', got {loss!r}")
        self.criterion = AsymmetricLoss(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip) if loss == "asl" \
            else AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)
        self.threshold, self.num_samples = threshold, num_samples
        self.val_scores, self.test_scores = MultilabelScores(num_classes), MultilabelScores(num_classes)
        self._samples: list = []

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.adapter.body.parameters()

    # training -------------------------------------------------------------------------------------
    def _loss(self, batch: dict) -> Tensor:
        images, pixel_mask, labels = batch["images"], batch["pixel_mask"], batch["labels"]
        if self.is_sequence:
            tokens = self.model.targets(labels)
            log_probs = self.model(images, pixel_mask, tokens)
            return F.nll_loss(log_probs.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=PAD_ID)
        return self.criterion(self.model(images, pixel_mask), labels)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    # prediction -----------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: Tensor, pixel_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Scores ``[B, C]`` in [0, 1] (for ranking / mAP) and the predicted label sets, bool ``[B, C]``.

        Parallel decoder: sigmoid of the logits, predicted where >= ``threshold``. Sequence decoder:
        the decoded labels, and per class the largest probability its token got at any decoding step
        (``LabelSequenceModel.generate``). Runs in the module's current mode: call ``eval()`` first.
        """
        if self.is_sequence:
            tokens, scores = self.model.generate(images, pixel_mask, **self.decoding)
            return scores, sequence_to_multi_hot(tokens, self.model.num_classes) > 0
        scores = torch.sigmoid(at_least_float32(self.model(images, pixel_mask)))
        return scores, scores >= self.threshold

    def label_names(self, predicted: Tensor) -> list[list[str]]:
        return [[self.class_names[c] for c in row.nonzero().flatten().tolist()] for row in predicted]

    # evaluation -----------------------------------------------------------------------------------
    def _eval_step(self, batch: dict, metric: MultilabelScores, prefix: str) -> None:
        labels = batch["labels"]
        self.log(f"{prefix}/loss", self._loss(batch), batch_size=labels.shape[0], sync_dist=True)
        scores, predicted = self.predict(batch["images"], batch["pixel_mask"])
        metric.update(scores, predicted, labels)
        if prefix == "val" and len(self._samples) < self.num_samples:
            n = self.num_samples - len(self._samples)
            truth, guess = self.label_names(labels[:n] > 0.5), self.label_names(predicted[:n])
            for img, mask, t, g in zip(batch["images"][:n], batch["pixel_mask"][:n], truth, guess):
                self._samples.append((img.detach().float().cpu(), mask.cpu(), t, g))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_scores, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_scores, "test")

    def _log_scores(self, metric: MultilabelScores, prefix: str) -> None:
        result = metric.compute()
        metric.reset()
        for name, value in result.items():
            self.log(f"{prefix}/{name}", value, prog_bar=name in ("mAP", "CF1", "OF1"), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_scores(self.val_scores, "val")
        if self._samples:
            self.log_samples_table("val/samples", ["image", "labels", "predicted"], self._sample_rows)
        self._samples = []

    def on_test_epoch_end(self) -> None:
        self._log_scores(self.test_scores, "test")

    def _sample_rows(self) -> list[list]:
        import wandb

        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        rows = []
        for img, mask, truth, guess in self._samples:
            h, w = int((~mask).any(1).sum()), int((~mask).any(0).sum())
            pixels = (img[:, :h, :w] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
            rows.append([wandb.Image(pixels), ", ".join(truth), ", ".join(guess)])
        return rows
