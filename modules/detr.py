"""DETR: image adapter + shared Transformer + object queries + class/box head, and post-processing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from .backbone import ImageAdapter
from .dtypes import at_least_float32
from .matcher import check_class_loss
from .position import sine_embed_boxes
from .transformer import Seq2SeqTransformer
from .weights import WeightSource, load_detr_weights, read_weights


class MLP(nn.Sequential):
    """``num_layers`` linear layers with ReLU in between."""

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        layers: list[nn.Module] = []
        for i, d in enumerate(dims):
            layers.append(nn.Linear(d, dims[i + 1] if i + 1 < len(dims) else out_dim))
            if i + 1 < len(dims):
                layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x), with x clamped to [eps, 1 - eps]."""
    x = at_least_float32(x).clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


class DETRHead(nn.Module):
    """Per-query class logits and boxes ``[.., 4]`` (sigmoid cxcywh).

    Softmax head (``class_loss="ce"``, DETR): ``C + 1`` logits, the last one no-object. Sigmoid head
    (``class_loss="focal"``, Deformable DETR): ``C`` independent logits, biased to a 1 % prior. With ``anchors`` (box logits,
    i.e. inverse-sigmoid cxcywh) the box branch predicts an offset from the anchor.
    """

    def __init__(self, *, d_model: int, num_classes: int, class_loss: str = "ce") -> None:
        super().__init__()
        self.class_loss = check_class_loss(class_loss)
        self.class_embed = nn.Linear(d_model, num_classes + (1 if class_loss == "ce" else 0))
        self.bbox_embed = MLP(in_dim=d_model, hidden_dim=d_model, out_dim=4, num_layers=3)
        if class_loss == "focal":  # rare foreground at the start, as in RetinaNet / Deformable DETR
            nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))

    def boxes(self, hs: Tensor, anchors: Tensor | None = None) -> Tensor:
        # in float32 even under bf16 autocast: an 8-bit mantissa would quantise box coordinates
        # to ~1/256 of the image, which costs mAP at strict IoU thresholds
        with torch.autocast(hs.device.type, enabled=False):
            delta = self.bbox_embed(at_least_float32(hs))
            return (delta if anchors is None else delta + anchors).sigmoid()

    def forward(self, hs: Tensor, anchors: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with torch.autocast(hs.device.type, enabled=False):
            return self.class_embed(at_least_float32(hs)), self.boxes(hs, anchors)

    def class_probs(self, logits: Tensor) -> Tensor:
        """``[.., C]`` per-class probabilities of either head."""
        logits = at_least_float32(logits)
        return logits.sigmoid() if self.class_loss == "focal" else logits.softmax(-1)[..., :-1]


@dataclass(kw_only=True)
class Denoising:
    """Noised copies of the ground truth fed to the decoder (DN-DETR, DINO's contrastive variant).

    Layout of the ``groups * copies * n_max`` queries: group-major, then copy (0 = positive: small
    noise, reconstruct the box and label; 1 = negative: larger noise, predict no-object), then the
    target index ``j`` (padded to the batch's largest ``n_max``; padded slots are unsupervised).
    """

    labels: Tensor  # [B, T_dn] noised labels (num_classes = padding)
    boxes: Tensor  # [B, T_dn, 4] noised boxes, normalised cxcywh
    groups: int
    copies: int
    n_max: int

    @property
    def num_queries(self) -> int:
        return self.groups * self.copies * self.n_max


def make_denoising_queries(
    targets: list[dict[str, Tensor]],
    *,
    num_classes: int,
    groups: int,
    label_noise: float,
    box_noise: float,
    contrastive: bool,
    generator: torch.Generator | None = None,
) -> Denoising | None:
    """Noised ground truth for the denoising queries; None when the batch has no box.

    Labels are replaced by a random class with probability ``label_noise / 2`` (DINO's convention).
    Each box side moves by up to ``box_noise`` x half the box size (positives) or by between 1x and 2x
    that (negatives), in a random direction.
    """
    n_max = max((len(t["labels"]) for t in targets), default=0)
    if n_max == 0 or groups <= 0:
        return None
    copies = 2 if contrastive else 1
    labels, boxes = _padded_targets(targets, num_classes, n_max)
    shape = (len(targets), groups, copies, n_max)
    labels = labels[:, None, None, :].expand(shape).clone()
    boxes = boxes[:, None, None, :, :].expand(*shape, 4)

    def rand(*size: int) -> Tensor:
        return torch.rand(size, generator=generator, device=boxes.device)

    flip = rand(*shape) < label_noise * 0.5
    random_labels = (rand(*shape) * num_classes).long().clamp(max=num_classes - 1)
    labels = torch.where(flip & (labels != num_classes), random_labels, labels)  # padding stays padding
    magnitude = rand(*shape, 4)
    if contrastive:  # negatives: between 1x and 2x the noise
        magnitude[:, :, 1] += 1.0
    sign = rand(*shape, 4).round() * 2 - 1
    half = boxes[..., 2:].repeat(1, 1, 1, 1, 2) / 2
    xyxy = (box_convert(boxes, "cxcywh", "xyxy") + sign * magnitude * half * box_noise).clamp(0.0, 1.0)
    noised = box_convert(xyxy, "xyxy", "cxcywh")
    noised[..., 2:] = noised[..., 2:].clamp(min=1e-3)
    return Denoising(labels=labels.flatten(1), boxes=noised.flatten(1, 3), groups=groups, copies=copies, n_max=n_max)


def _padded_targets(targets: list[dict[str, Tensor]], num_classes: int, n_max: int) -> tuple[Tensor, Tensor]:
    """Labels ``[B, n_max]`` (``num_classes`` at padding) and boxes ``[B, n_max, 4]`` (a small
    central box at padding) of a batch's targets."""
    b, device = len(targets), targets[0]["boxes"].device
    labels = torch.full((b, n_max), num_classes, dtype=torch.int64, device=device)
    boxes = torch.tensor([0.5, 0.5, 0.1, 0.1], device=device).repeat(b, n_max, 1)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        labels[i, :n] = t["labels"]
        boxes[i, :n] = t["boxes"].float()
    return labels, boxes


@dataclass
class Queries:
    """The decoder's queries ``[B, T, D]`` (denoising queries first, then the matching ones)."""

    content: Tensor  # [B, T, D] the decoder input
    pos: Tensor  # [B, T, D] the query positions
    anchors: Tensor | None = None  # [B, T, 4] anchor box logits (inverse-sigmoid cxcywh)
    dn: Denoising | None = None
    proposals: dict[str, Tensor] | None = None  # two-stage: the encoder's token proposals

    @property
    def num_dn(self) -> int:
        return 0 if self.dn is None else self.dn.num_queries


def _check_switches(*, anchors: bool, box_refine: bool, dn_groups: int, num_groups: int) -> None:
    """The switches that need anchor boxes, and a positive group count."""
    if box_refine and not anchors:
        raise ValueError("box_refine refines anchor boxes: set anchor_queries=true (or two_stage=true)")
    if dn_groups and not anchors:
        raise ValueError("denoising queries are noised anchor boxes: set anchor_queries=true (or two_stage=true)")
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")


def query_attention_mask(
    *, num_dn: int, dn_groups: int, num_groups: int, num_queries: int, device: torch.device | None = None
) -> Tensor | None:
    """Decoder self-attention mask (True = blocked) for ``[denoising queries; matching queries]``.

    Matching queries never see denoising ones (they would read the answer); denoising groups do not
    see each other; with several matching groups (Group DETR) each group only sees itself.
    """
    total = num_dn + num_groups * num_queries
    if num_dn == 0 and num_groups == 1:
        return None
    group_id = torch.empty(total, dtype=torch.int64, device=device)
    if num_dn:
        group_id[:num_dn] = torch.arange(dn_groups, device=device).repeat_interleave(num_dn // dn_groups)
    group_id[num_dn:] = dn_groups + torch.arange(num_groups, device=device).repeat_interleave(num_queries)
    blocked = group_id[:, None] != group_id[None, :]
    if num_dn:  # denoising queries may read the matching queries (DN-DETR), not the other way round
        blocked[:num_dn, num_dn:] = False
    return blocked


class DETR(nn.Module):
    """Set-prediction detector on the shared seq2seq Transformer.

    The encoder reads image tokens; ``num_queries`` object queries are decoded in parallel (one pass,
    no causal mask); every decoder layer's output goes through the same head, the last one as the
    prediction and the others as ``aux_outputs`` for the auxiliary losses.

    The faster-converging variants of DETR's successors are switches (all off = the original DETR):

    * ``class_loss="focal"``: per-class sigmoid logits for the focal loss (Deformable DETR; ``"ce"``:
      DETR's softmax with a no-object class);
    * ``anchor_queries``: each query is a learned content vector plus a learned anchor box whose sine
      embedding (through a small MLP) is the query position; boxes are predicted as offsets from the
      anchor (DAB-DETR);
    * ``box_refine``: each decoder layer's boxes become the next layer's anchors (detached), so the
      query positions follow the boxes layer by layer (Deformable DETR / DAB-DETR);
    * ``num_groups``: extra query groups while training, each matched one-to-one on its own and
      blind to the others in self-attention (Group DETR); only the first group runs at inference;
    * ``two_stage``: anchors chosen from the encoder tokens: every token proposes a box and class,
      the ``num_queries`` best proposals become the anchors (DINO's mixed query selection; the
      proposals get their own set loss);
    * ``dn_groups``: denoising queries while training: noised ground-truth boxes (as anchors) and
      labels (as content) that the decoder must reconstruct, behind an attention mask (DN-DETR), with
      ``dn_contrastive`` negatives that must predict no-object (DINO).
    """

    def __init__(
        self,
        *,
        adapter: ImageAdapter,
        transformer: Seq2SeqTransformer,
        num_classes: int,
        num_queries: int = 100,
        aux_loss: bool = True,
        class_loss: str = "ce",
        anchor_queries: bool = False,
        box_refine: bool = False,
        num_groups: int = 1,
        two_stage: bool = False,
        dn_groups: int = 0,
        dn_label_noise: float = 0.5,
        dn_box_noise: float = 0.4,
        dn_contrastive: bool = True,
    ) -> None:
        super().__init__()
        if adapter.d_model != transformer.d_model:
            raise ValueError(f"adapter width {adapter.d_model} != transformer width {transformer.d_model}")
        anchors = anchor_queries or two_stage
        _check_switches(anchors=anchors, box_refine=box_refine, dn_groups=dn_groups, num_groups=num_groups)
        d = transformer.d_model
        self.adapter, self.transformer = adapter, transformer
        self.num_classes, self.num_queries, self.aux_loss = num_classes, num_queries, aux_loss
        self.class_loss, self.anchors, self.box_refine = class_loss, anchors, box_refine
        self.num_groups, self.two_stage = num_groups, two_stage
        self.dn_groups, self.dn_label_noise, self.dn_box_noise = dn_groups, dn_label_noise, dn_box_noise
        self.dn_contrastive = dn_contrastive
        self.head = DETRHead(d_model=d, num_classes=num_classes, class_loss=class_loss)
        self._build_queries(d, num_queries * num_groups)
        if two_stage:
            self.enc_proj = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
            self.enc_head = DETRHead(d_model=d, num_classes=num_classes, class_loss=class_loss)
        if dn_groups:
            self.label_embed = nn.Embedding(num_classes + 1, d)  # the last row: padding

    def _build_queries(self, d: int, total: int) -> None:
        """The learned queries: a position each (plain DETR), or a content vector and, unless the
        encoder proposes them (two-stage), an anchor box each."""
        if not self.anchors:
            self.query_embed = nn.Embedding(total, d)
            return
        self.query_content = nn.Embedding(total, d)
        self.pos_head = MLP(in_dim=2 * d, hidden_dim=d, out_dim=d, num_layers=2)
        nn.init.zeros_(self.head.bbox_embed[-1].weight)  # start exactly at the anchors
        nn.init.zeros_(self.head.bbox_embed[-1].bias)
        if not self.two_stage:
            self.anchor_embed = nn.Embedding(total, 4)
            with torch.no_grad():  # centres spread over the image, boxes a tenth of it
                init = torch.rand(total, 4)
                init[:, 2:] = 0.1
                self.anchor_embed.weight.copy_(inverse_sigmoid(init))

    def class_probs(self, logits: Tensor) -> Tensor:
        return self.head.class_probs(logits)

    def _query_pos(self, anchor_logits: Tensor) -> Tensor:
        return self.pos_head(sine_embed_boxes(anchor_logits.sigmoid(), self.transformer.d_model))

    def _token_proposals(self, memory: Tensor, mask: Tensor, hw: tuple[int, int]) -> dict[str, Tensor]:
        """Two-stage: every encoder token predicts a class and a box around its own cell."""
        b = memory.shape[0]
        not_pad = (~mask.view(b, *hw)).float()  # float counts: ONNX CumSum takes no bool
        ys = (not_pad.cumsum(1) - 0.5) / not_pad.sum(1, keepdim=True).clamp(min=1)
        xs = (not_pad.cumsum(2) - 0.5) / not_pad.sum(2, keepdim=True).clamp(min=1)
        box_h = 2.0 / not_pad.sum(1, keepdim=True).clamp(min=1).expand_as(ys)  # two cells high / wide
        box_w = 2.0 / not_pad.sum(2, keepdim=True).clamp(min=1).expand_as(xs)
        cells = torch.stack((xs, ys, box_w, box_h), dim=-1).flatten(1, 2).clamp(0.0, 1.0)
        logits, boxes = self.enc_head(self.enc_proj(memory), inverse_sigmoid(cells))
        return {"pred_logits": logits, "pred_boxes": boxes}

    def forward(self, images: Tensor, pixel_mask: Tensor, targets: list[dict[str, Tensor]] | None = None) -> dict:
        """
        Args:
            images: ``[B, 3, H, W]`` normalised, zero-padded.
            pixel_mask: ``[B, H, W]`` bool, True on padding.
            targets: ground truth (``labels``, normalised cxcywh ``boxes``); only read while training
                with denoising queries.
        Returns:
            ``pred_logits`` [B, Q', C+1 or C], ``pred_boxes`` [B, Q', 4] normalised cxcywh, where
            ``Q' = num_groups * num_queries`` while training and ``num_queries`` in eval mode;
            ``num_groups``; (with ``aux_loss``) ``aux_outputs``, one such dict per earlier decoder
            layer; (two-stage) ``enc_outputs``, the token proposals; (denoising) ``dn_outputs``, the
            same for the denoising queries plus ``dn`` (:class:`Denoising`).
        """
        memory, pos, mask, mask_arg, hw = self.adapter.encode(images, pixel_mask, self.transformer)
        groups = self.num_groups if self.training else 1
        queries = self._queries(memory, mask, hw, groups, targets)
        hs, layer_anchors = self._decode(queries, memory, pos, mask_arg, groups)
        logits, boxes = self.head(hs, layer_anchors)
        num_dn = queries.num_dn
        out: dict = {"num_groups": groups}
        if queries.proposals is not None:
            out["enc_outputs"] = queries.proposals
        out.update(self._outputs(logits[:, :, num_dn:], boxes[:, :, num_dn:]))
        if queries.dn is not None:
            out["dn_outputs"] = {**self._outputs(logits[:, :, :num_dn], boxes[:, :, :num_dn]), "dn": queries.dn}
        return out

    def _queries(self, memory: Tensor, mask: Tensor, hw: tuple[int, int], groups: int,
                 targets: list[dict[str, Tensor]] | None) -> Queries:
        """The decoder's input: ``groups`` groups of learned queries, after the denoising queries
        while training with them."""
        b, nq = memory.shape[0], self.num_queries * groups
        if not self.anchors:
            query_pos = self.query_embed.weight[:nq].unsqueeze(0).expand(b, -1, -1)
            return Queries(torch.zeros_like(query_pos), query_pos)
        content = self.query_content.weight[:nq].unsqueeze(0).expand(b, -1, -1)
        proposals = dn = None
        if self.two_stage:
            proposals = self._token_proposals(memory, mask, hw)
            anchors = self._proposal_anchors(proposals, mask).repeat(1, groups, 1)
        else:
            anchors = self.anchor_embed.weight[:nq].unsqueeze(0).expand(b, -1, -1)
        if self.training and self.dn_groups and targets is not None:
            dn = make_denoising_queries(
                targets, num_classes=self.num_classes, groups=self.dn_groups, label_noise=self.dn_label_noise,
                box_noise=self.dn_box_noise, contrastive=self.dn_contrastive,
            )
        if dn is not None:
            content = torch.cat((self.label_embed(dn.labels).to(content.dtype), content), dim=1)
            anchors = torch.cat((inverse_sigmoid(dn.boxes), anchors.float()), dim=1)
        return Queries(content, self._query_pos(anchors), anchors, dn, proposals)

    def _proposal_anchors(self, proposals: dict[str, Tensor], mask: Tensor) -> Tensor:
        """Two-stage: the boxes of the ``num_queries`` most confident token proposals (repeated when
        there are fewer tokens), as anchor box logits ``[B, num_queries, 4]``."""
        score = self.class_probs(proposals["pred_logits"]).max(-1).values.masked_fill(mask, -1.0)
        top = score.topk(min(self.num_queries, score.shape[1]), dim=1).indices
        chosen = proposals["pred_boxes"].detach().gather(1, top[..., None].expand(-1, -1, 4))
        if chosen.shape[1] < self.num_queries:
            chosen = chosen.repeat(1, -(-self.num_queries // chosen.shape[1]), 1)[:, : self.num_queries]
        return inverse_sigmoid(chosen)

    def _decode(self, queries: Queries, memory: Tensor, memory_pos: Tensor, memory_mask: Tensor | None,
                groups: int) -> tuple[Tensor, Tensor | None]:
        """Decoder states ``[L, B, T, D]`` and the anchor box logits each layer's boxes are offsets
        from (``[L, B, T, 4]`` with ``box_refine``, else ``[1, B, T, 4]``; None without anchors); only
        the last layer's when neither training nor computing the auxiliary outputs."""
        dn_groups = queries.dn.groups if queries.dn is not None else 0
        self_mask = query_attention_mask(num_dn=queries.num_dn, dn_groups=dn_groups, num_groups=groups,
                                         num_queries=self.num_queries, device=memory.device)
        layer_anchors = None if queries.anchors is None else [queries.anchors]

        def refine(i: int, hs_i: Tensor) -> Tensor:
            boxes = self.head.boxes(hs_i, layer_anchors[-1]).detach()
            layer_anchors.append(inverse_sigmoid(boxes))
            return self._query_pos(layer_anchors[-1])

        hs = self.transformer.decode_states(
            queries.content, memory, queries.pos, memory_pos, memory_mask, tgt_mask=self_mask,
            pos_update=refine if self.box_refine else None,
        )  # [L, B, T, D]
        if layer_anchors is not None:
            layer_anchors = torch.stack(layer_anchors) if self.box_refine else layer_anchors[0][None]
        if not self.aux_loss and not self.training:
            hs = hs[-1:]
            layer_anchors = None if layer_anchors is None else layer_anchors[-1:]
        return hs, layer_anchors

    def _outputs(self, logits: Tensor, boxes: Tensor) -> dict:
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b} for c, b in zip(logits[:-1], boxes[:-1])]
        return out


# the DETR-R50 paper setting: what build_detr builds for a setting that is None and the source does not state
DETR_R50 = {
    "backbone": "resnet50", "d_model": 256, "nhead": 8, "num_encoder_layers": 6, "num_decoder_layers": 6,
    "dim_feedforward": 2048, "norm_first": False, "activation": "relu", "num_queries": 100, "position_offset": 0.0,
    "trunk_width": 1.0, "encoder_stride": None,
}


def resolve_architecture(given: dict, source: WeightSource | None) -> dict:
    """The architecture settings to build: each given value (None = not given), else the source's,
    else DETR-R50's. A given value that contradicts the source is an error naming both."""
    resolved = {}
    for key, default in DETR_R50.items():
        value = given.get(key)
        stated = None if source is None else source.settings.get(key)
        if value is not None and stated is not None and value != stated:
            raise ValueError(
                f"model.{key}={value!r} contradicts {source.stated_by[key]} ({key}={stated!r}): set "
                f"model.{key}={stated!r}, or null to take it from the source"
            )
        resolved[key] = value if value is not None else stated if stated is not None else default
    return resolved


def _transformer(arch: dict[str, Any], dropout: float) -> Seq2SeqTransformer:
    """The shared Transformer of the resolved architecture ``arch``."""
    names = ("d_model", "nhead", "num_encoder_layers", "num_decoder_layers", "dim_feedforward", "norm_first",
             "activation")
    return Seq2SeqTransformer(**{k: arch[k] for k in names}, dropout=dropout)


def build_detr(
    *, num_classes: int,
    # the image adapter (ImageAdapter)
    backbone: str | None = None, pretrained_backbone: str | None = None, frozen_bn: bool = True,
    trainable_layers: int = 3, stride: int = 32, fuse_frozen_bn: bool = False, channels_last: bool = False,
    position_offset: float | None = None, trunk_width: float | None = None, encoder_stride: int | None = None,
    # the transformer (Seq2SeqTransformer)
    d_model: int | None = None, nhead: int | None = None, num_encoder_layers: int | None = None,
    num_decoder_layers: int | None = None, dim_feedforward: int | None = None, dropout: float = 0.1,
    norm_first: bool | None = None, activation: str | None = None,
    # the queries, heads and convergence switches (DETR)
    num_queries: int | None = None, aux_loss: bool = True, class_loss: str = "ce",
    anchor_queries: bool = False, box_refine: bool = False, num_groups: int = 1, two_stage: bool = False,
    dn_groups: int = 0, dn_label_noise: float = 0.5, dn_box_noise: float = 0.4, dn_contrastive: bool = True,
    # whole-model weights
    init_from: str | None = None, init_strict: bool = True,
    # an existing transformer to use instead of building one (a multitask run's view of its shared one)
    transformer: nn.Module | None = None,
) -> DETR:
    """DETR from plain settings (the ``model`` config group). Defaults are the DETR-R50 paper setting
    (every convergence switch off, DETR's sine positions: ``position_offset`` 0). ``init_from``: whole-model weights (:mod:`modules.weights`: an original facebookresearch/detr
    checkpoint, a Hugging Face DETR folder, ``hf:REPO_ID[@revision]`` or a detection ``.ckpt``), read
    once here. Architecture settings left None (those of :data:`DETR_R50`) come from the source when it
    states them. ``init_strict=False`` loads what fits instead of failing on missing/unused tensors.
    The settings built are in ``model.settings``, the load report in ``model.load_report``.

    ``fuse_frozen_bn`` and ``channels_last`` (the configs choose) equal the plain computation up to
    float rounding; off here, so that the Python defaults compute exactly as the original DETR."""
    if init_from and pretrained_backbone:
        raise ValueError("set model.init_from (whole model) or model.pretrained_backbone (trunk only), not both")
    source = read_weights(init_from) if init_from else None
    arch = resolve_architecture({k: v for k, v in locals().items() if k in DETR_R50}, source)
    adapter = ImageAdapter(
        backbone=arch["backbone"], d_model=arch["d_model"], pretrained_backbone=pretrained_backbone,
        frozen_bn=frozen_bn, trainable_layers=trainable_layers, stride=stride, fuse_frozen_bn=fuse_frozen_bn,
        channels_last=channels_last, position_offset=arch["position_offset"], trunk_width=arch["trunk_width"],
        encoder_stride=arch["encoder_stride"],
    )
    transformer = transformer or _transformer(arch, dropout)
    model = DETR(
        adapter=adapter, transformer=transformer, num_classes=num_classes, num_queries=arch["num_queries"],
        aux_loss=aux_loss, class_loss=class_loss, anchor_queries=anchor_queries, box_refine=box_refine,
        num_groups=num_groups, two_stage=two_stage, dn_groups=dn_groups, dn_label_noise=dn_label_noise,
        dn_box_noise=dn_box_noise, dn_contrastive=dn_contrastive,
    )
    model.settings, model.load_report = arch, None
    if source is not None:
        model.load_report = load_detr_weights(model, source, init_strict)
        print(model.load_report.summary())
    return model


@torch.no_grad()
def postprocess(
    outputs: dict, target_sizes: Tensor, *, top_k: int | None = None, class_loss: str = "ce"
) -> list[dict[str, Tensor]]:
    """Turn raw outputs into detections in absolute pixels.

    Args:
        outputs: ``pred_logits`` [B, Q, C+1] (``class_loss="ce"``: softmax head) or [B, Q, C]
            (``"focal"``: sigmoid head),
            ``pred_boxes`` [B, Q, 4] normalised cxcywh.
        target_sizes: ``[B, 2]`` (height, width) to scale to, usually the original image sizes.
        top_k: detections kept per image (None = all). The softmax head gives one detection per query
            (its best class); the sigmoid head one per (query, class) pair, as in Deformable DETR.
    Returns:
        B dicts with ``scores`` [K], ``labels`` [K] (0..C-1) and ``boxes`` [K, 4] absolute xyxy.
    """
    logits = at_least_float32(outputs["pred_logits"])
    boxes = box_convert(at_least_float32(outputs["pred_boxes"]), "cxcywh", "xyxy")
    h, w = target_sizes.to(boxes.dtype).unbind(1)
    boxes = boxes * torch.stack((w, h, w, h), dim=1)[:, None, :]
    if check_class_loss(class_loss) == "focal":
        c = logits.shape[-1]
        flat = logits.sigmoid().flatten(1)  # [B, Q*C]
        k = flat.shape[1] if top_k is None else min(top_k, flat.shape[1])
        scores, index = flat.topk(k, dim=1)
        labels = index % c
        boxes = boxes.gather(1, (index // c)[..., None].expand(-1, -1, 4))
        return [{"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, boxes)]
    scores, labels = logits.softmax(-1)[..., :-1].max(-1)
    results = []
    for s, lab, b in zip(scores, labels, boxes):
        if top_k is not None and top_k < len(s):
            s, order = s.topk(top_k)
            lab, b = lab[order], b[order]
        results.append({"scores": s, "labels": lab, "boxes": b})
    return results
