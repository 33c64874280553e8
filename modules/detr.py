"""DETR: image adapter + shared Transformer + object queries + class/box head, and post-processing."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from .backbone import ImageAdapter
from .transformer import Seq2SeqTransformer


class MLP(nn.Sequential):
    """``num_layers`` linear layers with ReLU in between."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        layers: list[nn.Module] = []
        for i, d in enumerate(dims):
            layers.append(nn.Linear(d, dims[i + 1] if i + 1 < len(dims) else out_dim))
            if i + 1 < len(dims):
                layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class DETRHead(nn.Module):
    """Per-query class logits ``[.., C+1]`` (last = no-object) and boxes ``[.., 4]`` (sigmoid cxcywh)."""

    def __init__(self, d_model: int, num_classes: int) -> None:
        super().__init__()
        self.class_embed = nn.Linear(d_model, num_classes + 1)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)

    def forward(self, hs: Tensor) -> tuple[Tensor, Tensor]:
        # in float32 even under bf16 autocast: an 8-bit mantissa would quantise box coordinates
        # to ~1/256 of the image, which costs mAP at strict IoU thresholds
        with torch.autocast(hs.device.type, enabled=False):
            hs = hs.float()
            return self.class_embed(hs), self.bbox_embed(hs).sigmoid()


class DETR(nn.Module):
    """Set-prediction detector on the shared seq2seq Transformer.

    The encoder reads image tokens; ``num_queries`` learned object queries are decoded in parallel
    (one pass, no causal mask); every decoder layer's output goes through the same head, the last
    one as the prediction and the others as ``aux_outputs`` for the auxiliary losses.
    """

    def __init__(
        self,
        adapter: ImageAdapter,
        transformer: Seq2SeqTransformer,
        num_classes: int,
        num_queries: int = 100,
        aux_loss: bool = True,
    ) -> None:
        super().__init__()
        if adapter.d_model != transformer.d_model:
            raise ValueError(f"adapter width {adapter.d_model} != transformer width {transformer.d_model}")
        self.adapter, self.transformer = adapter, transformer
        self.num_classes, self.num_queries, self.aux_loss = num_classes, num_queries, aux_loss
        self.query_embed = nn.Embedding(num_queries, transformer.d_model)
        self.head = DETRHead(transformer.d_model, num_classes)

    def forward(self, images: Tensor, pixel_mask: Tensor) -> dict:
        """
        Args:
            images: ``[B, 3, H, W]`` normalised, zero-padded.
            pixel_mask: ``[B, H, W]`` bool, True on padding.
        Returns:
            ``pred_logits`` [B, Q, C+1], ``pred_boxes`` [B, Q, 4] normalised cxcywh, and (when
            ``aux_loss``) ``aux_outputs``: a list of L-1 such dicts, one per earlier decoder layer.
        """
        tokens, pos, mask, _ = self.adapter(images, pixel_mask)
        # padding masks only cost time when some image is actually padded
        mask_arg = mask if bool(mask.any()) else None
        memory = self.transformer.encode(tokens, pos, mask_arg)
        queries = self.query_embed.weight.unsqueeze(0).expand(images.shape[0], -1, -1)
        tgt = torch.zeros_like(queries)
        hs = self.transformer.decode(tgt, memory, queries, pos, mask_arg)  # [L, B, Q, D]
        if not self.aux_loss and not self.training:
            hs = hs[-1:]
        logits, boxes = self.head(hs)
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b} for c, b in zip(logits[:-1], boxes[:-1])]
        return out


def build_detr(
    num_classes: int,
    backbone: str = "resnet50",
    pretrained_backbone: str | None = None,
    frozen_bn: bool = True,
    trainable_layers: int = 3,
    stride: int = 32,
    fuse_frozen_bn: bool = True,
    channels_last: bool = True,
    d_model: int = 256,
    nhead: int = 8,
    num_encoder_layers: int = 6,
    num_decoder_layers: int = 6,
    dim_feedforward: int = 2048,
    dropout: float = 0.1,
    norm_first: bool = False,
    activation: str = "relu",
    num_queries: int = 100,
    aux_loss: bool = True,
) -> DETR:
    """DETR from plain settings (the ``model`` config group). Defaults are the DETR-R50 paper setting."""
    adapter = ImageAdapter(
        backbone, d_model, pretrained_backbone, frozen_bn, trainable_layers, stride, fuse_frozen_bn, channels_last
    )
    transformer = Seq2SeqTransformer(
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, norm_first, activation
    )
    return DETR(adapter, transformer, num_classes, num_queries, aux_loss)


@torch.no_grad()
def postprocess(outputs: dict, target_sizes: Tensor, top_k: int | None = None) -> list[dict[str, Tensor]]:
    """Turn raw outputs into detections in absolute pixels.

    Args:
        outputs: ``pred_logits`` [B, Q, C+1], ``pred_boxes`` [B, Q, 4] normalised cxcywh.
        target_sizes: ``[B, 2]`` (height, width) to scale to, usually the original image sizes.
        top_k: keep the k best-scoring queries per image (None = all).
    Returns:
        B dicts with ``scores`` [K], ``labels`` [K] (0..C-1) and ``boxes`` [K, 4] absolute xyxy.
    """
    prob = outputs["pred_logits"].float().softmax(-1)[..., :-1]
    scores, labels = prob.max(-1)
    boxes = box_convert(outputs["pred_boxes"].float(), "cxcywh", "xyxy")
    h, w = target_sizes.float().unbind(1)
    boxes = boxes * torch.stack((w, h, w, h), dim=1)[:, None, :]
    results = []
    for s, lab, b in zip(scores, labels, boxes):
        if top_k is not None and top_k < len(s):
            s, order = s.topk(top_k)
            lab, b = lab[order], b[order]
        results.append({"scores": s, "labels": lab, "boxes": b})
    return results
