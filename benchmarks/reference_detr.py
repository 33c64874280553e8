"""Timing baseline: the computation of the original DETR (facebookresearch/detr), re-implemented.

This is an independent re-implementation written for this project, not a copy of the original
code. It is used **only** as the baseline that ``benchmarks/detection_speed.py`` times side by side
with ``modules/``; nothing in the package imports it. It reproduces what decides the original's
speed and results:

- backbone: torchvision ResNet with frozen BatchNorm run as its own multiply/add ops after every
  convolution (``torchvision.ops.misc.FrozenBatchNorm2d``), stem + layer1 frozen and layer2-4
  trained, default NCHW memory format, features taken after layer4; the padding mask is shrunk to
  the feature map with ``F.interpolate``; 2-D sine positions normalised to ``[0, 2*pi]``;
- transformer: post-norm layers built from ``nn.MultiheadAttention`` (which also returns the
  head-averaged attention weights, its default), sequence-first ``[S, B, D]`` tensors, a key padding
  mask always passed, positions added to queries/keys in every layer (memory + pos recomputed in
  every decoder layer), decoder starting from zeros, every decoder layer's output normalised by the
  final LayerNorm;
- matcher: one cost matrix for all ``B*Q`` queries x all targets of the batch, copied to the CPU
  and split per image for ``scipy.optimize.linear_sum_assignment``;
- criterion: weighted cross entropy (no-object weight ``eos_coef``), L1 and GIoU (diagonal of the
  full pairwise GIoU matrix) over matched pairs divided by the number of boxes, the logging-only
  ``class_error`` and ``cardinality_error`` terms, every auxiliary layer matched on its own.

Shapes: ``B`` batch, ``Q`` queries, ``C`` classes (+1 = no-object), ``D`` width, ``S = h*w`` tokens.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

_TRUNK_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


# --------------------------------------------------------------------------------------------- boxes
def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (cx, cy, w, h) -> ``[..., 4]`` (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def pairwise_giou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalised IoU of every pair: ``[N, 4]`` x ``[M, 4]`` xyxy -> ``[N, M]``.

    Like the original, it first checks for degenerate boxes; on a GPU those checks wait for the device.
    """
    if not bool((boxes1[:, 2:] >= boxes1[:, :2]).all()) or not bool((boxes2[:, 2:] >= boxes2[:, :2]).all()):
        raise ValueError("degenerate boxes (x1 < x0 or y1 < y0): the predictions diverged")
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    inter_wh = (torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:]) - torch.max(boxes1[:, None, :2], boxes2[None, :, :2]))
    inter_wh = inter_wh.clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    iou = inter / union
    hull_wh = (torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:]) - torch.min(boxes1[:, None, :2], boxes2[None, :, :2]))
    hull_wh = hull_wh.clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return iou - (hull - union) / hull


# ------------------------------------------------------------------------------------------ backbone
class ReferenceBackbone(nn.Module):
    """ResNet trunk up to layer4 (``stride`` 32; 16: up to layer3, as ours) with unfused frozen
    BatchNorm; NCHW throughout."""

    def __init__(self, name: str, stride: int = 32) -> None:
        super().__init__()
        if name not in _TRUNK_CHANNELS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(_TRUNK_CHANNELS)}")
        trunk = getattr(torchvision.models, name)(weights=None, norm_layer=FrozenBatchNorm2d)
        for pname, p in trunk.named_parameters():
            if not any(stage in pname for stage in ("layer2", "layer3", "layer4")):
                p.requires_grad_(False)
        last = {32: "layer4", 16: "layer3"}[stride]
        # the trunk's children up to ``last``, under their own names (the original's parameter names)
        children = list(trunk.named_children())
        self.body = nn.Sequential(OrderedDict(children[: [n for n, _ in children].index(last) + 1]))
        self.num_channels = _TRUNK_CHANNELS[name] // (32 // stride)

    def forward(
        self,
        images: Tensor,  # [B, 3, H, W]
        pixel_mask: Tensor,  # [B, H, W] bool, True on padding
    ) -> tuple[Tensor, Tensor]:  # features [B, C_trunk, h, w], mask [B, h, w]
        feature = self.body(images)
        # the batch dimension is treated as channels here, as in the original
        mask = F.interpolate(pixel_mask[None].float(), size=feature.shape[-2:]).to(torch.bool)[0]
        return feature, mask


def sine_position_embedding(mask: Tensor, num_pos_feats: int, temperature: float = 10000.0) -> Tensor:
    """Normalised 2-D sine positions: ``[B, h, w]`` bool mask -> ``[B, 2*num_pos_feats, h, w]``.

    Rows and columns count un-padded cells and are scaled to ``[0, 2*pi]`` (no half-cell offset).
    """
    valid = ~mask
    y = valid.cumsum(1, dtype=torch.float32)
    x = valid.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + 1e-6) * (2 * math.pi)
    x = x / (x[:, :, -1:] + 1e-6) * (2 * math.pi)
    freq = torch.arange(num_pos_feats, dtype=torch.float32, device=mask.device)
    freq = temperature ** (2 * (freq // 2) / num_pos_feats)
    px, py = x[..., None] / freq, y[..., None] / freq
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------- transformer
class ReferenceEncoderLayer(nn.Module):
    """Post-norm encoder layer; inputs are sequence-first ``[S, B, D]``."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d_model, dim_feedforward), nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, src: Tensor, key_padding_mask: Tensor, pos: Tensor) -> Tensor:
        q = k = src + pos
        attended = self.self_attn(q, k, value=src, key_padding_mask=key_padding_mask)[0]
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class ReferenceDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention, cross-attention to the memory, FFN; ``[Q, B, D]``."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d_model, dim_feedforward), nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout, self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(4))

    def forward(
        self,
        tgt: Tensor,  # [Q, B, D]
        memory: Tensor,  # [S, B, D]
        memory_key_padding_mask: Tensor,  # [B, S]
        pos: Tensor,  # [S, B, D]
        query_pos: Tensor,  # [Q, B, D]
    ) -> Tensor:
        q = k = tgt + query_pos
        attended = self.self_attn(q, k, value=tgt)[0]
        tgt = self.norm1(tgt + self.dropout1(attended))
        attended = self.cross_attn(
            query=tgt + query_pos, key=memory + pos, value=memory, key_padding_mask=memory_key_padding_mask
        )[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))


class ReferenceTransformer(nn.Module):
    """Encoder-decoder returning every decoder layer's normalised output."""

    def __init__(
        self, d_model: int, nhead: int, num_encoder_layers: int, num_decoder_layers: int, dim_feedforward: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.encoder_layers = nn.ModuleList(
            ReferenceEncoderLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            ReferenceDecoderLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(d_model)
        self.d_model, self.nhead = d_model, nhead
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        src: Tensor,  # [B, D, h, w] projected features
        mask: Tensor,  # [B, h, w] bool, True on padding
        query_embed: Tensor,  # [Q, D]
        pos_embed: Tensor,  # [B, D, h, w]
    ) -> tuple[Tensor, Tensor]:  # hs [L, B, Q, D], memory [B, D, h, w]
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)  # [S, B, D]
        pos = pos_embed.flatten(2).permute(2, 0, 1)
        query_pos = query_embed.unsqueeze(1).repeat(1, bs, 1)  # [Q, B, D]
        mask = mask.flatten(1)
        memory = src
        for layer in self.encoder_layers:
            memory = layer(memory, mask, pos)
        tgt = torch.zeros_like(query_pos)
        intermediate = []
        for layer in self.decoder_layers:
            tgt = layer(tgt, memory, mask, pos, query_pos)
            intermediate.append(self.decoder_norm(tgt))
        # the original normalises the last output once more and swaps it in; same value, same work
        intermediate[-1] = self.decoder_norm(tgt)
        hs = torch.stack(intermediate)  # [L, Q, B, D]
        return hs.transpose(1, 2), memory.permute(1, 2, 0).view(bs, c, h, w)


# ------------------------------------------------------------------------------------------ detector
class ReferenceMLP(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class ReferenceDETR(nn.Module):
    """Backbone -> 1x1 projection -> transformer -> class / box heads, with auxiliary outputs.

    Same call convention as ``modules.detr.DETR``: ``forward(images [B,3,H,W], pixel_mask [B,H,W])``
    returns ``pred_logits`` [B, Q, C+1], ``pred_boxes`` [B, Q, 4] (sigmoid cxcywh) and ``aux_outputs``.
    """

    def __init__(
        self, backbone: ReferenceBackbone, transformer: ReferenceTransformer, num_classes: int, num_queries: int,
        aux_loss: bool = True,
    ) -> None:
        super().__init__()
        d = transformer.d_model
        self.backbone, self.transformer = backbone, transformer
        self.num_queries, self.aux_loss = num_queries, aux_loss
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.bbox_embed = ReferenceMLP(d, d, 4, 3)
        self.query_embed = nn.Embedding(num_queries, d)
        self.input_proj = nn.Conv2d(backbone.num_channels, d, kernel_size=1)

    def forward(self, images: Tensor, pixel_mask: Tensor) -> dict:
        feature, mask = self.backbone(images, pixel_mask)
        pos = sine_position_embedding(mask, self.transformer.d_model // 2).to(feature.dtype)
        hs = self.transformer(self.input_proj(feature), mask, self.query_embed.weight, pos)[0]
        logits = self.class_embed(hs)  # [L, B, Q, C+1]
        boxes = self.bbox_embed(hs).sigmoid()  # [L, B, Q, 4]
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b} for c, b in zip(logits[:-1], boxes[:-1])]
        return out


def build_reference_detr(
    num_classes: int,
    backbone: str = "resnet50",
    d_model: int = 256,
    nhead: int = 8,
    num_encoder_layers: int = 6,
    num_decoder_layers: int = 6,
    dim_feedforward: int = 2048,
    num_queries: int = 100,
    dropout: float = 0.1,
    stride: int = 32,
) -> ReferenceDETR:
    """The original DETR's architecture (random initialisation; pretrained weights do not change speed)."""
    transformer = ReferenceTransformer(
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout
    )
    return ReferenceDETR(ReferenceBackbone(backbone, stride), transformer, num_classes, num_queries, aux_loss=True)


def reference_param_groups(model: ReferenceDETR, lr: float = 1e-4, lr_backbone: float = 1e-5) -> list[dict]:
    """AdamW parameter groups split by name, as the original's training script does."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if "backbone" not in n], "lr": lr},
        {"params": [p for n, p in named if "backbone" in n], "lr": lr_backbone},
    ]


@torch.no_grad()
def reference_postprocess(outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
    """Scores, labels and absolute xyxy boxes for every query; ``target_sizes`` is ``[B, 2]`` (h, w)."""
    prob = F.softmax(outputs["pred_logits"], -1)
    scores, labels = prob[..., :-1].max(-1)
    boxes = cxcywh_to_xyxy(outputs["pred_boxes"])
    img_h, img_w = target_sizes.unbind(1)
    boxes = boxes * torch.stack((img_w, img_h, img_w, img_h), dim=1)[:, None, :]
    return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]


# ----------------------------------------------------------------------------------- matcher and loss
class ReferenceHungarianMatcher(nn.Module):
    """Bipartite matching from one batch-wide cost matrix ``[B*Q, sum(n_b)]``, split per image."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        bs, num_queries = outputs["pred_logits"].shape[:2]
        prob = outputs["pred_logits"].flatten(0, 1).softmax(-1)  # [B*Q, C+1]
        boxes = outputs["pred_boxes"].flatten(0, 1)  # [B*Q, 4]
        tgt_ids = torch.cat([t["labels"] for t in targets])  # [N]
        tgt_boxes = torch.cat([t["boxes"] for t in targets])  # [N, 4]
        cost = (
            self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
            - self.cost_class * prob[:, tgt_ids]
            - self.cost_giou * pairwise_giou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(tgt_boxes))
        )
        cost = cost.view(bs, num_queries, -1).cpu()  # [B, Q, N]
        sizes = [len(t["boxes"]) for t in targets]
        pairs = [linear_sum_assignment(block[b]) for b, block in enumerate(cost.split(sizes, -1))]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in pairs]


def reference_matcher(cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> ReferenceHungarianMatcher:
    return ReferenceHungarianMatcher(cost_class, cost_bbox, cost_giou)


class ReferenceCriterion(nn.Module):
    """Set loss with the original's terms; ``forward(outputs, targets)`` returns the unweighted terms.

    Keys: ``loss_ce``, ``loss_bbox``, ``loss_giou`` (plus ``_i`` for auxiliary layer ``i``) and the
    logging-only ``class_error`` / ``cardinality_error`` the original computes by default. Weight
    them with :func:`reference_total_loss`.
    """

    def __init__(
        self, num_classes: int, matcher: ReferenceHungarianMatcher, eos_coef: float = 0.1,
        losses: tuple[str, ...] = ("labels", "boxes", "cardinality"),
    ) -> None:
        super().__init__()
        self.num_classes, self.matcher, self.eos_coef, self.losses = num_classes, matcher, eos_coef, losses
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    @staticmethod
    def _src_index(indices: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        batch = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        return batch, torch.cat([src for src, _ in indices])

    def loss_labels(self, outputs: dict, targets: list[dict], indices: list, num_boxes: float, log: bool = True):
        logits = outputs["pred_logits"]  # [B, Q, C+1]
        idx = self._src_index(indices)
        matched_classes = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[idx] = matched_classes
        losses = {"loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)}
        if log:
            with torch.no_grad():
                matched = logits[idx]
                if matched_classes.numel() == 0:
                    accuracy = torch.zeros((), device=logits.device)
                else:
                    accuracy = (matched.argmax(-1) == matched_classes).float().sum() * (100.0 / len(matched_classes))
                losses["class_error"] = 100 - accuracy
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict, targets: list[dict], indices: list, num_boxes: float):
        logits = outputs["pred_logits"]
        lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(predicted.float(), lengths.float())}

    def loss_boxes(self, outputs: dict, targets: list[dict], indices: list, num_boxes: float):
        idx = self._src_index(indices)
        src = outputs["pred_boxes"][idx]  # [N, 4]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(pairwise_giou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt)))
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    def _layer(self, outputs: dict, targets: list[dict], indices: list, num_boxes: float, last: bool) -> dict:
        terms = {}
        for name in self.losses:
            if name == "labels":
                terms.update(self.loss_labels(outputs, targets, indices, num_boxes, log=last))
            elif name == "boxes":
                terms.update(self.loss_boxes(outputs, targets, indices, num_boxes))
            elif name == "cardinality":
                terms.update(self.loss_cardinality(outputs, targets, indices, num_boxes))
            else:
                raise ValueError(f"unknown loss {name!r}; choose among labels, boxes, cardinality")
        return terms

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        last = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.matcher(last, targets)
        device = outputs["pred_logits"].device
        n = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        num_boxes = torch.clamp(n, min=1).item()  # single process: the all-reduce is a no-op
        losses = self._layer(outputs, targets, indices, num_boxes, last=True)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_indices = self.matcher(aux, targets)
            terms = self._layer(aux, targets, aux_indices, num_boxes, last=False)
            losses.update({f"{k}_{i}": v for k, v in terms.items()})
        return losses


def reference_loss_weights(
    num_decoder_layers: int, loss_ce: float = 1.0, loss_bbox: float = 5.0, loss_giou: float = 2.0
) -> dict[str, float]:
    """The original's weight dict: one entry per term and per auxiliary layer."""
    base = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
    weights = dict(base)
    for i in range(num_decoder_layers - 1):
        weights.update({f"{k}_{i}": v for k, v in base.items()})
    return weights


def reference_total_loss(losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """Sum of the weighted terms that have a weight (logging-only terms have none)."""
    return sum(losses[k] * weights[k] for k in losses if k in weights)
