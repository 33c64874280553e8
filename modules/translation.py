"""Token-to-token model on the shared Transformer: embeddings, tied output, copy mechanism, NAT length head.

The encoder reads source tokens, the decoder shifted target tokens under a causal mask (or, in the
non-autoregressive mode, a row of mask tokens without one). Positions are sinusoidal and added once
at the input (``pos_at_every_layer=False``). Every output is a log-probability over the vocabulary
so that the copy mechanism (a mixture of distributions) and plain softmax share one loss and one
decoding path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .position import sinusoidal_positions
from .transformer import LayerCache, Seq2SeqTransformer


class TranslationModel(nn.Module):
    """Encoder-decoder over one joint vocabulary.

    Args:
        vocab_size, pad_id: the tokenizer's vocabulary size and padding id.
        tie_embeddings: the output projection reuses the (shared source/target) embedding matrix.
        copy: pointer-generator: a learned gate ``p_gen`` mixes the vocabulary distribution with the
            last decoder layer's cross-attention over the source tokens, so source words (names,
            numbers) can be copied even when the decoder's softmax gives them little mass.
        max_length: the largest target length the NAT length head can predict (and the position table size).
        transformer: an existing Seq2SeqTransformer to share (multitask); built from the sizes otherwise.
    """

    def __init__(
        self,
        vocab_size: int,
        pad_id: int = 0,
        d_model: int = 256,
        nhead: int = 4,
        num_encoder_layers: int = 3,
        num_decoder_layers: int = 3,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        norm_first: bool = True,
        activation: str = "relu",
        tie_embeddings: bool = True,
        copy: bool = False,
        max_length: int = 256,
        transformer: Seq2SeqTransformer | None = None,
    ) -> None:
        super().__init__()
        self.transformer = transformer or Seq2SeqTransformer(
            d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, norm_first,
            activation, pos_at_every_layer=False,
        )
        d = self.transformer.d_model
        self.vocab_size, self.pad_id, self.d_model, self.max_length = vocab_size, pad_id, d, max_length
        self.embed = nn.Embedding(vocab_size, d, padding_idx=pad_id)
        nn.init.normal_(self.embed.weight, std=d**-0.5)
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()
        self.embed_scale = math.sqrt(d)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(d, vocab_size, bias=False)
        if tie_embeddings:
            self.output.weight = self.embed.weight
        self.copy_gate = nn.Linear(2 * d, 1) if copy else None
        self.length_head = nn.Linear(d, max_length + 1)  # NAT: target length from the encoder output
        self.register_buffer("positions", sinusoidal_positions(max(max_length, 1024) + 2, d), persistent=False)

    # pieces ---------------------------------------------------------------------------------------
    def embed_tokens(self, tokens: Tensor, offset: int = 0) -> Tensor:
        """``[B, T]`` ids -> ``[B, T, D]``: embedding x sqrt(d) + sinusoidal positions ``offset..``."""
        t = tokens.shape[1]
        if offset + t > self.positions.shape[0]:
            raise ValueError(
                f"sequence of {offset + t} tokens is longer than the model's position table "
                f"({self.positions.shape[0]}); raise model.max_length or cut the input"
            )
        x = self.embed(tokens) * self.embed_scale + self.positions[offset : offset + t].to(self.embed.weight.dtype)
        return self.dropout(x)

    def encode(self, src: Tensor, src_padding_mask: Tensor | None = None) -> Tensor:
        """``src`` [B, S] -> memory [B, S, D]."""
        return self.transformer.encode(self.embed_tokens(src), None, src_padding_mask)

    def init_cache(self) -> list[LayerCache]:
        return self.transformer.init_cache()

    def decode(
        self,
        tgt: Tensor,  # [B, T] token ids (decoder input)
        memory: Tensor,  # [B, S, D]
        memory_padding_mask: Tensor | None,  # [B, S]
        src: Tensor,  # [B, S] source ids (for the copy mechanism)
        tgt_padding_mask: Tensor | None = None,
        cache: list[LayerCache] | None = None,
        offset: int = 0,
        causal: bool = True,
        need_attn: bool = False,
        select: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Log-probabilities ``[B, T, V]`` and (when asked, or with copy) cross-attention ``[B, T, S]``.

        ``select`` (bool ``[B, T]``): return log-probabilities ``[N, V]`` of the selected positions only
        (training: the non-pad targets), so the largest matmul, the vocabulary projection, skips padding.
        """
        want_attn = need_attn or self.copy_gate is not None
        out = self.transformer.decode(
            self.embed_tokens(tgt, offset), memory, memory_padding_mask=memory_padding_mask,
            tgt_padding_mask=tgt_padding_mask, cache=cache, is_causal=causal,
            return_intermediate=False, return_cross_attn=want_attn,
        )
        h, attn = out if want_attn else (out, None)
        h = h[0]
        if select is not None and self.copy_gate is None:
            return self.output(h[select]).float().log_softmax(-1), attn
        log_probs = self.log_probs(h, attn, memory, src)
        return (log_probs[select] if select is not None else log_probs), attn

    def log_probs(self, h: Tensor, attn: Tensor | None, memory: Tensor, src: Tensor) -> Tensor:
        logits = self.output(h).float()
        if self.copy_gate is None:
            return logits.log_softmax(-1)
        context = attn @ memory  # [B, T, D]
        p_gen = torch.sigmoid(self.copy_gate(torch.cat([h, context.to(h.dtype)], -1))).float()  # [B, T, 1]
        vocab = logits.softmax(-1) * p_gen
        copy = torch.zeros_like(vocab).scatter_add_(
            -1, src[:, None, :].expand(-1, h.shape[1], -1), attn.float() * (1 - p_gen)
        )
        return (vocab + copy).clamp_min(1e-12).log()

    def predict_length_logits(self, memory: Tensor, memory_padding_mask: Tensor | None) -> Tensor:
        """NAT length head: ``[B, max_length + 1]`` logits from the mean of the unpadded encoder states."""
        if memory_padding_mask is None:
            pooled = memory.mean(1)
        else:
            keep = (~memory_padding_mask).unsqueeze(-1).to(memory.dtype)
            pooled = (memory * keep).sum(1) / keep.sum(1).clamp_min(1)
        return self.length_head(pooled).float()

    def forward(
        self,
        src: Tensor,
        src_padding_mask: Tensor | None,
        tgt_in: Tensor,
        tgt_padding_mask: Tensor | None = None,
        causal: bool = True,
        need_attn: bool = False,
        select: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Teacher-forced pass: ``log_probs`` [B, T, V] (or [N, V] for the ``select``ed positions),
        ``cross_attn`` [B, T, S] (if asked), ``memory``."""
        memory = self.encode(src, src_padding_mask)
        log_probs, attn = self.decode(
            tgt_in, memory, src_padding_mask, src, tgt_padding_mask, causal=causal, need_attn=need_attn,
            select=select,
        )
        out = {"log_probs": log_probs, "memory": memory}
        if attn is not None:
            out["cross_attn"] = attn
        return out


def label_smoothed_nll(log_probs: Tensor, target: Tensor, epsilon: float, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Label-smoothed negative log-likelihood, averaged over non-pad target tokens.

    ``log_probs`` [B, T, V], ``target`` [B, T]. Returns (smoothed loss, plain NLL) — the second is
    what perplexity is computed from.
    """
    lp = log_probs.reshape(-1, log_probs.shape[-1])
    tgt = target.reshape(-1)
    keep = tgt != ignore_index
    lp, tgt = lp[keep], tgt[keep]
    nll = -lp.gather(-1, tgt[:, None]).squeeze(-1)
    smooth = -lp.mean(-1)
    loss = (1 - epsilon) * nll + epsilon * smooth
    n = max(int(keep.sum()), 1)
    return loss.sum() / n, nll.sum() / n


def guided_attention_loss(
    attn: Tensor, tgt_padding_mask: Tensor | None, src_padding_mask: Tensor | None, sigma: float = 0.2
) -> Tensor:
    """Penalty on cross-attention mass far from the diagonal (a monotonic alignment).

    ``attn`` [B, T, S]; weight ``1 - exp(-(s/S - t/T)^2 / (2 sigma^2))`` with each sentence's own
    lengths, averaged over real (non-pad) target positions.
    """
    b, t, s = attn.shape
    device = attn.device
    tl = (t - tgt_padding_mask.sum(1)) if tgt_padding_mask is not None else torch.full((b,), t, device=device)
    sl = (s - src_padding_mask.sum(1)) if src_padding_mask is not None else torch.full((b,), s, device=device)
    ti = torch.arange(t, device=device)[None, :, None] / tl.clamp_min(1)[:, None, None].float()
    si = torch.arange(s, device=device)[None, None, :] / sl.clamp_min(1)[:, None, None].float()
    w = 1 - torch.exp(-((si - ti) ** 2) / (2 * sigma**2))
    penalty = (attn.float() * w).sum(-1)  # [B, T]
    if tgt_padding_mask is not None:
        penalty = penalty.masked_fill(tgt_padding_mask, 0.0)
        return penalty.sum() / (~tgt_padding_mask).sum().clamp_min(1)
    return penalty.mean()


def shift_right(tgt: Tensor) -> tuple[Tensor, Tensor]:
    """``tgt`` [B, T] = BOS w1 .. wn EOS (padded) -> decoder input (without the last column) and labels."""
    return tgt[:, :-1], tgt[:, 1:]



