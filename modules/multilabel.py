"""Multi-label image classification on the shared Transformer: label queries (Query2Label) or label sequences.

Two decoders over the same image adapter and ``Seq2SeqTransformer`` encoder:

- ``Query2Label`` (the default, Liu et al. 2021): one learned query per class, all decoded in parallel
  (one pass, no causal mask); the last decoder layer's output for query ``c`` goes through class
  ``c``'s own linear map (``GroupFC``) to one logit. Trained with BCE or the asymmetric loss.
- ``LabelSequenceModel``: the labels of an image are emitted as tokens, autoregressively, in a fixed
  order (most frequent training class first), ending with EOS; trained with teacher forcing under a
  causal mask, decoded with ``modules.decoding`` (greedy / beam, incremental cache). Labels already
  emitted are masked out, in training and decoding alike, so the output is a set.

Both take an adapter and a transformer instance, so a multitask model can pass a shared transformer.
Plain PyTorch: no Lightning, no Hydra.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import decoding
from .backbone import ImageAdapter
from .dtypes import at_least_float32
from .position import sinusoidal_positions
from .transformer import LayerCache, Seq2SeqTransformer

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
NUM_SPECIAL = 3  # class c is token c + NUM_SPECIAL

__all__ = [
    "AsymmetricLoss",
    "GroupFC",
    "LabelSequenceModel",
    "Query2Label",
    "build_multilabel",
    "emitted_mask",
    "label_scores_from_steps",
    "labels_to_sequence",
    "multilabel_f1",
    "no_repeat_processor",
    "sequence_to_multi_hot",
]


# losses -----------------------------------------------------------------------------------------
class AsymmetricLoss(nn.Module):
    """Asymmetric loss for multi-label classification (Ridnik et al., ICCV 2021), on logits.

    With ``p = sigmoid(x)`` and the shifted negative probability ``p_m = max(p - clip, 0)``:
    ``L = -[ y (1 - p)^gamma_pos log p + (1 - y) p_m^gamma_neg log(1 - p_m) ]``.
    ``gamma_neg > gamma_pos`` down-weights the many easy negatives; ``clip`` discards very easy
    negatives (p < clip) altogether. ``gamma_neg = gamma_pos = clip = 0`` is binary cross entropy.

    Args:
        reduction: "mean" (over every image x class entry, like ``F.binary_cross_entropy_with_logits``),
            "sum", or "none" (``[B, C]``).
    """

    def __init__(self, *, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8,
                 reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
        if gamma_neg < 0 or gamma_pos < 0 or not 0 <= clip < 1:
            raise ValueError(f"need gamma_neg, gamma_pos >= 0 and 0 <= clip < 1, got {gamma_neg}, {gamma_pos}, {clip}")
        self.gamma_neg, self.gamma_pos, self.clip, self.eps, self.reduction = gamma_neg, gamma_pos, clip, eps, reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits = at_least_float32(logits)
        y = targets.to(logits.dtype)
        p = torch.sigmoid(logits)
        log_p = F.logsigmoid(logits)
        if self.clip > 0:
            p_neg = (1 - p + self.clip).clamp(max=1)  # 1 - p_m
            log_p_neg = p_neg.clamp(min=self.eps).log()
        else:
            p_neg, log_p_neg = 1 - p, F.logsigmoid(-logits)  # exact log(1 - p), no eps
        loss = y * log_p + (1 - y) * log_p_neg
        if self.gamma_neg > 0 or self.gamma_pos > 0:
            pt = y * p + (1 - y) * p_neg  # probability of the true outcome
            gamma = y * self.gamma_pos + (1 - y) * self.gamma_neg
            loss = loss * torch.pow(1 - pt, gamma)
        loss = -loss
        if self.reduction == "mean":
            return loss.mean()
        return loss.sum() if self.reduction == "sum" else loss


# metrics ----------------------------------------------------------------------------------------
def multilabel_f1(tp: Tensor, fp: Tensor, fn: Tensor, present: Tensor | None = None) -> dict[str, Tensor]:
    """Per-class and overall precision / recall / F1 from per-class counts ``[C]``, as in the multi-label
    literature (ML-GCN, ASL, Query2Label):

    - ``CP = mean_c TP_c / (TP_c + FP_c)``, ``CR = mean_c TP_c / (TP_c + FN_c)``, ``CF1 = 2 CP CR / (CP + CR)``
      (the F1 of the averaged precision and recall, not the average of per-class F1s);
    - ``OP = sum TP / sum (TP + FP)``, ``OR = sum TP / sum (TP + FN)``, ``OF1 = 2 OP OR / (OP + OR)``.

    A ratio 0/0 counts as 0. The per-class averages run over ``present`` (bool ``[C]``: classes with at
    least one positive in the ground truth; default: all classes), because recall is undefined for a
    class that never occurs; the overall numbers count every class.
    """
    tp, fp, fn = tp.double(), fp.double(), fn.double()

    def ratio(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(b > 0, a / b.clamp(min=1), torch.zeros_like(a))

    def f1(p: Tensor, r: Tensor) -> Tensor:
        return torch.where(p + r > 0, 2 * p * r / (p + r).clamp(min=1e-12), torch.zeros_like(p))

    keep = torch.ones_like(tp, dtype=torch.bool) if present is None else present.bool()
    n = keep.sum().clamp(min=1)
    cp = ratio(tp, tp + fp)[keep].sum() / n
    cr = ratio(tp, tp + fn)[keep].sum() / n
    op, orr = ratio(tp.sum(), (tp + fp).sum()), ratio(tp.sum(), (tp + fn).sum())
    out = {"CP": cp, "CR": cr, "CF1": f1(cp, cr), "OP": op, "OR": orr, "OF1": f1(op, orr)}
    return {k: at_least_float32(v) for k, v in out.items()}


# label queries (Query2Label) --------------------------------------------------------------------
class GroupFC(nn.Module):
    """One linear map per class: ``logit_c = <h_c, W_c> + b_c`` for hidden states ``[.., C, D]``."""

    def __init__(self, *, num_classes: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, d_model))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.normal_(self.weight, std=d_model**-0.5)

    def forward(self, hs: Tensor) -> Tensor:
        return (hs * self.weight).sum(-1) + self.bias


class Query2Label(nn.Module):
    """Label queries decoded in parallel: one learned query per class, one logit each.

    The queries enter the decoder as its positional input (DETR style: zero content, the query
    embedding added to queries/keys), cross-attend to the encoded image tokens, and class ``c``'s
    output goes through its own linear map (``GroupFC``), in float32 even under bf16 autocast.
    """

    def __init__(self, *, adapter: ImageAdapter, transformer: Seq2SeqTransformer, num_classes: int) -> None:
        super().__init__()
        if adapter.d_model != transformer.d_model:
            raise ValueError(f"adapter width {adapter.d_model} != transformer width {transformer.d_model}")
        self.adapter, self.transformer, self.num_classes = adapter, transformer, num_classes
        self.query_embed = nn.Embedding(num_classes, transformer.d_model)
        self.head = GroupFC(num_classes=num_classes, d_model=transformer.d_model)

    def forward(self, images: Tensor, pixel_mask: Tensor) -> Tensor:
        """``images`` ``[B, 3, H, W]``, ``pixel_mask`` ``[B, H, W]`` (True = padding) -> logits ``[B, C]``."""
        memory, pos, _, mask, _ = self.adapter.encode(images, pixel_mask, self.transformer)
        queries = self.query_embed.weight.unsqueeze(0).expand(images.shape[0], -1, -1)
        hs = self.transformer.decode_states(torch.zeros_like(queries), memory, queries, pos, mask,
                                     return_intermediate=False)[0]  # [B, C, D]
        with torch.autocast(hs.device.type, enabled=False):
            return self.head(at_least_float32(hs))


# label sequences --------------------------------------------------------------------------------
def labels_to_sequence(labels: Tensor, rank: Tensor) -> Tensor:
    """Multi-hot ``[B, C]`` -> token rows ``[B, 2 + max labels]``: BOS, the present classes in order of
    ``rank`` (``rank[c]`` = position of class c in the target order), EOS, then PAD."""
    b, c = labels.shape
    rank = rank.to(labels.device)
    present = labels > 0.5
    count = present.sum(1)
    key = torch.where(present, rank[None, :].expand(b, -1), torch.full_like(rank, c)[None, :])
    order = key.argsort(dim=1, stable=True)  # present classes first, in target order
    width = int(count.max()) if b else 0
    out = torch.full((b, width + 2), PAD_ID, dtype=torch.long, device=labels.device)
    out[:, 0] = BOS_ID
    position = torch.arange(width, device=labels.device)[None, :]
    body = torch.where(position < count[:, None], order[:, :width] + NUM_SPECIAL, PAD_ID)
    out[:, 1 : width + 1] = body
    out[torch.arange(b, device=labels.device), count + 1] = EOS_ID
    return out


def sequence_to_multi_hot(tokens: Tensor, num_classes: int) -> Tensor:
    """Decoded rows ``[B, T]`` (no BOS; labels, EOS, pad) -> multi-hot ``[B, C]`` of the labels before EOS."""
    b = tokens.shape[0]
    before_eos = (tokens == EOS_ID).long().cumsum(1) == 0
    is_class = (tokens >= NUM_SPECIAL) & before_eos
    out = torch.zeros(b, num_classes + NUM_SPECIAL, device=tokens.device)
    out.scatter_(1, torch.where(is_class, tokens, 0), 1.0)
    return out[:, NUM_SPECIAL:]


def emitted_mask(tgt_in: Tensor, vocab_size: int) -> Tensor:
    """Tokens that may not come next: bool ``[B, T, V]``, True at position t for every class token in
    ``tgt_in[:, 1..t]`` (already emitted; BOS at position 0 is no label), and always for BOS and PAD."""
    b, t = tgt_in.shape
    one_hot = torch.zeros(b, t, vocab_size, dtype=torch.bool, device=tgt_in.device)
    one_hot.scatter_(2, tgt_in.unsqueeze(-1), True)
    one_hot[..., :NUM_SPECIAL] = False
    mask = one_hot.cumsum(1) > 0
    mask[..., BOS_ID] = True
    mask[..., PAD_ID] = True
    return mask


def no_repeat_processor(tokens: Tensor, log_probs: Tensor) -> Tensor:
    """``logits_processor`` for ``modules.decoding``: -inf for labels already emitted (``tokens``
    ``[N, t]``, BOS excluded) and for BOS, so every decoded sequence is a set of labels."""
    log_probs[:, BOS_ID] = float("-inf")
    if tokens.shape[1]:
        log_probs.scatter_(1, tokens, float("-inf"))
    return log_probs


def label_scores_from_steps(log_probs: Tensor, tokens: Tensor, num_classes: int) -> Tensor:
    """Per-class scores ``[B, C]`` for a decoded sequence: the largest probability each class token
    received over the steps that were decoded (up to and including the step that emitted EOS).

    ``log_probs`` ``[B, T, V]``: the step distributions along the decoded path (already-emitted labels
    at -inf, so a label's probability counts only until it is emitted); ``tokens`` ``[B, T]``: the
    decoded tokens (no BOS). An emitted label scores at least the probability it was chosen with.
    """
    done_before = (tokens == EOS_ID).long().cumsum(1) - (tokens == EOS_ID).long()  # EOS steps before t
    valid = done_before == 0
    probs = at_least_float32(log_probs).exp().masked_fill(~valid[..., None], 0.0)
    return probs.amax(1)[:, NUM_SPECIAL : NUM_SPECIAL + num_classes]


class LabelSequenceModel(nn.Module):
    """Labels as a token sequence: ``BOS l1 l2 .. EOS`` with l1 the most frequent training class.

    Token ids: 0 = PAD, 1 = BOS, 2 = EOS, class ``c`` = ``c + 3``. Label tokens get a learned embedding
    plus sinusoidal positions; the decoder cross-attends to the encoded image tokens; a linear layer
    gives next-token logits over the ``C + 3`` tokens.

    Decoding goes through ``modules.decoding`` (greedy, beam, with the incremental cache), which expects
    ``encode(src, src_padding_mask)`` / ``target_log_probs(...)`` / ``init_cache()``. Its ``src`` is the encoded
    image packed with its positions (``pack_memory``), so cross-attention keys get the image
    positions, and the decoder's row reordering (finished rows dropped, beams) moves both together.

    Args:
        label_order: class indices in target order (default: 0..C-1); the task passes training
            frequencies, most frequent first.
    """

    def __init__(self, *, adapter: ImageAdapter, transformer: Seq2SeqTransformer, num_classes: int,
                 label_order: list[int] | None = None) -> None:
        super().__init__()
        if adapter.d_model != transformer.d_model:
            raise ValueError(f"adapter width {adapter.d_model} != transformer width {transformer.d_model}")
        order = list(range(num_classes)) if label_order is None else [int(c) for c in label_order]
        if sorted(order) != list(range(num_classes)):
            raise ValueError(f"label_order must be a permutation of 0..{num_classes - 1}, got {order}")
        self.adapter, self.transformer, self.num_classes = adapter, transformer, num_classes
        d = transformer.d_model
        self.d_model, self.vocab_size = d, num_classes + NUM_SPECIAL
        self.embed = nn.Embedding(self.vocab_size, d)
        nn.init.normal_(self.embed.weight, std=d**-0.5)
        self.output = nn.Linear(d, self.vocab_size)
        rank = torch.empty(num_classes, dtype=torch.long)
        rank[torch.tensor(order, dtype=torch.long)] = torch.arange(num_classes)
        self.register_buffer("rank", rank, persistent=False)
        # BOS + every label + EOS; decoding.py reads this table's length as the output cap
        self.register_buffer("positions", sinusoidal_positions(num_classes + 2, d), persistent=False)

    # decoding interface (modules.decoding) ----------------------------------------------------------
    def pack_memory(self, images: Tensor, pixel_mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """Encode images: ``[B, S, 2D]`` (memory and positions side by side) and the padding mask."""
        memory, pos, _, mask, _ = self.adapter.encode(images, pixel_mask, self.transformer)
        return torch.cat([memory, pos.to(memory.dtype).expand_as(memory)], -1), mask

    def encode(self, src: Tensor, src_padding_mask: Tensor | None = None) -> Tensor:
        return src  # already encoded by pack_memory

    def init_cache(self) -> list[LayerCache]:
        return self.transformer.init_cache()

    def target_log_probs(
        self,
        tgt: Tensor,  # [B, T] token ids
        memory: Tensor,  # [B, S, 2D] from pack_memory
        memory_padding_mask: Tensor | None,
        src: Tensor | None = None,  # unused (decoding.py passes the packed memory again)
        tgt_padding_mask: Tensor | None = None,
        cache: list[LayerCache] | None = None,
        offset: int = 0,
        causal: bool = True,
        need_attn: bool = False,
    ) -> tuple[Tensor, None]:
        """The model's next-token log-probabilities ``[B, T, V]`` (float32, nothing masked); with a
        cache, ``tgt`` holds only the new tokens, at positions ``offset..``."""
        t = tgt.shape[1]
        mem, pos = memory.split(self.d_model, dim=-1)
        x = self.embed(tgt) * self.d_model**0.5
        hs = self.transformer.decode_states(
            x, mem, self.positions[offset : offset + t].to(x.dtype), pos, memory_padding_mask,
            cache=cache, tgt_padding_mask=tgt_padding_mask, is_causal=causal, return_intermediate=False,
        )[0]
        return at_least_float32(self.output(hs)).log_softmax(-1), None

    # training -------------------------------------------------------------------------------------
    def targets(self, labels: Tensor) -> Tensor:
        """Multi-hot ``[B, C]`` -> ``BOS l1 .. EOS PAD..`` in this model's label order."""
        return labels_to_sequence(labels, self.rank)

    def step_log_probs(self, packed: Tensor, mask: Tensor | None, tgt_in: Tensor) -> Tensor:
        """Teacher-forced step distributions ``[B, T, V]`` for decoder input ``tgt_in`` (BOS first), under
        a causal mask, with already-emitted labels, BOS and PAD excluded and the rest renormalised."""
        log_probs = self.target_log_probs(tgt_in, packed, mask, causal=True)[0]
        return log_probs.masked_fill(emitted_mask(tgt_in, self.vocab_size), float("-inf")).log_softmax(-1)

    def forward(self, images: Tensor, pixel_mask: Tensor, tokens: Tensor) -> Tensor:
        """Teacher forcing: ``tokens`` = ``targets(labels)``; returns log-probs ``[B, T-1, V]`` for
        ``tokens[:, 1:]`` given ``tokens[:, :-1]``."""
        packed, mask = self.pack_memory(images, pixel_mask)
        return self.step_log_probs(packed, mask, tokens[:, :-1])

    @torch.no_grad()
    def generate(self, images: Tensor, pixel_mask: Tensor, **strategy) -> tuple[Tensor, Tensor]:
        """Decode label sequences and score every class.

        ``strategy``: settings of :func:`modules.decoding.generate` (``strategy`` greedy | beam | sample,
        ``beam_size``, ``use_cache``, ...). The output length is capped at ``C + 1`` (every label, then
        EOS); ``no_repeat_processor`` masks labels already emitted. Returns the decoded tokens ``[B, T]``
        (no BOS; labels, EOS, pad) and scores ``[B, C]``: the largest probability each class token got
        along the decoded path (one teacher-forced pass over it; see ``label_scores_from_steps``).
        Call ``eval()`` first.
        """
        settings = {"max_len_a": 0.0, "max_len_b": self.num_classes + 1, **strategy}
        if settings.get("strategy", "greedy") == "nat":
            raise ValueError("label sequences decode autoregressively: strategy greedy, beam or sample")
        packed, mask = self.pack_memory(images, pixel_mask)
        tokens = decoding.generate(self, packed, mask, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
                                   logits_processor=no_repeat_processor, **settings)
        bos = torch.full_like(tokens[:, :1], BOS_ID)
        log_probs = self.step_log_probs(packed, mask, torch.cat([bos, tokens[:, :-1]], 1))
        return tokens, label_scores_from_steps(log_probs, tokens, self.num_classes)


def build_multilabel(
    *,
    num_classes: int,
    decoder: str = "parallel",
    label_order: list[int] | None = None,
    backbone: str = "resnet18",
    pretrained_backbone: str | None = None,
    frozen_bn: bool = False,
    trainable_layers: int = 5,
    stride: int = 32,
    encoder_stride: int | None = None,
    fuse_frozen_bn: bool = True,
    channels_last: bool = True,
    d_model: int = 128,
    nhead: int = 4,
    num_encoder_layers: int = 1,
    num_decoder_layers: int = 2,
    dim_feedforward: int = 256,
    dropout: float = 0.1,
    norm_first: bool = False,
    activation: str = "relu",
    transformer: Seq2SeqTransformer | None = None,
) -> Query2Label | LabelSequenceModel:
    """A multi-label model from plain settings (the ``model`` config group). ``decoder``: "parallel"
    (label queries, Query2Label) or "sequence" (labels as tokens). ``transformer``: an existing one to
    share (multitask); otherwise built from the sizes."""
    if decoder not in ("parallel", "sequence"):
        raise ValueError(f"model.decoder must be 'parallel' or 'sequence', got {decoder!r}")
    adapter = ImageAdapter(
        backbone=backbone, d_model=d_model, pretrained_backbone=pretrained_backbone, frozen_bn=frozen_bn,
        trainable_layers=trainable_layers, stride=stride, fuse_frozen_bn=fuse_frozen_bn, channels_last=channels_last,
        encoder_stride=encoder_stride,
    )
    if transformer is None:
        transformer = Seq2SeqTransformer(
            d_model=d_model, nhead=nhead, num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers, dim_feedforward=dim_feedforward, dropout=dropout,
            norm_first=norm_first, activation=activation,
        )
    if decoder == "parallel":
        return Query2Label(adapter=adapter, transformer=transformer, num_classes=num_classes)
    return LabelSequenceModel(adapter=adapter, transformer=transformer, num_classes=num_classes, label_order=label_order)
