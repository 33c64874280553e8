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

from .dropout import Dropout
from .dtypes import at_least_float32
from .packed import linear
from .position import sinusoidal_positions
from .transformer import LayerCache, Seq2SeqTransformer

OUTPUTS = ("log_probs", "logits", "hidden")  # what TranslationModel.target_log_probs can return


ARCHITECTURE = (  # the TranslationModel settings a pretrained source states (modules.marian)
    "vocab_size", "pad_id", "d_model", "nhead", "num_encoder_layers", "num_decoder_layers", "dim_feedforward",
    "norm_first", "activation", "tie_embeddings", "tgt_vocab_size", "scale_embedding", "position_layout",
    "final_norm", "logits_bias",
)


class TranslationModel(nn.Module):
    """Encoder-decoder over one joint vocabulary (or, with ``tgt_vocab_size``, one per side).

    Args:
        vocab_size, pad_id: the tokenizer's vocabulary size and padding id.
        tie_embeddings: the output projection reuses the (target) embedding matrix.
        copy: pointer-generator: a learned gate ``p_gen`` mixes the vocabulary distribution with the
            last decoder layer's cross-attention over the source tokens, so source words (names,
            numbers) can be copied even when the decoder's softmax gives them little mass.
        max_length: the largest target length the NAT length head can predict (and the position table size).
        transformer: an existing Seq2SeqTransformer to share (multitask); built from the sizes otherwise.
        tgt_vocab_size: a separate target vocabulary (its own embedding, tied to the output); None:
            source and target share ``vocab_size`` ids and one embedding.
        scale_embedding: token embeddings x sqrt(d_model) (the Transformer paper's; opus-mt's too).
        position_layout: of the sinusoidal positions, ``"interleaved"`` or ``"halves"`` (Marian's,
            :func:`modules.position.sinusoidal_positions`).
        final_norm: a LayerNorm after the decoder (and, pre-norm, the encoder); Marian has none.
        logits_bias: a fixed (not trained) bias added to the output logits, Marian's
            ``final_logits_bias``; zeros unless loaded.
        init_from: a pretrained translation model to start from: a HuggingFace ``MarianMTModel``
            folder (opus-mt) or ``hf:REPO[@revision]`` (:mod:`modules.marian`). Its ``config.json``
            states the architecture: those settings replace the ones given here (each replaced value
            is printed), then its weights are loaded. ``vocab_size``/``pad_id`` must be the source
            tokenizer's (``data.tokenizer``), or it is an error.
        init_strict: with ``init_from``, a tensor of the source that has no place here, or a shape
            that differs, is an error (False: reported and skipped).
    ``settings``: the architecture as built (with ``init_from``: the source's), enough to rebuild
    the model without the source.
    """

    def __init__(
        self,
        *,
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
        tgt_vocab_size: int | None = None,
        scale_embedding: bool = True,
        position_layout: str = "interleaved",
        final_norm: bool = True,
        logits_bias: bool = False,
        init_from: str | None = None,
        init_strict: bool = True,
    ) -> None:
        super().__init__()
        given = {k: v for k, v in locals().items() if k in ARCHITECTURE}
        source = None
        if init_from is not None:
            if transformer is not None:
                raise ValueError("init_from builds its own Transformer from the source; it cannot share one")
            from .marian import MarianSource  # only when asked: reads files, may need huggingface_hub

            source = MarianSource.open(init_from)
            given = source.architecture(given)
        self.settings = dict(given)
        self._build(dropout=dropout, copy=copy, max_length=max_length, transformer=transformer, **given)
        if source is not None:
            source.load_into(self, strict=init_strict)

    def _build(
        self, *, vocab_size: int, pad_id: int, d_model: int, nhead: int, num_encoder_layers: int,
        num_decoder_layers: int, dim_feedforward: int, dropout: float, norm_first: bool, activation: str,
        tie_embeddings: bool, copy: bool, max_length: int, transformer: Seq2SeqTransformer | None,
        tgt_vocab_size: int | None, scale_embedding: bool, position_layout: str, final_norm: bool,
        logits_bias: bool,
    ) -> None:
        self.transformer = transformer or Seq2SeqTransformer(
            d_model=d_model, nhead=nhead, num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers, dim_feedforward=dim_feedforward, dropout=dropout,
            norm_first=norm_first, activation=activation, pos_at_every_layer=False, final_norm=final_norm,
        )
        d = self.transformer.d_model
        if copy and tgt_vocab_size is not None:
            raise ValueError("the copy mechanism needs one vocabulary for source and target (tgt_vocab_size=None)")
        self.pad_id, self.d_model, self.max_length = pad_id, d, max_length
        self.vocab_size = vocab_size if tgt_vocab_size is None else tgt_vocab_size  # of the output
        self.embed = self._embedding(vocab_size, d, pad_id)
        self.tgt_embed = None if tgt_vocab_size is None else self._embedding(tgt_vocab_size, d, pad_id)
        self.embed_scale = math.sqrt(d) if scale_embedding else 1.0
        self.dropout = Dropout(dropout)
        self.output = nn.Linear(d, self.vocab_size, bias=False)
        if tie_embeddings:
            self.output.weight = self.target_embed.weight
        self.register_buffer("output_bias", torch.zeros(self.vocab_size) if logits_bias else None)
        self.copy_gate = nn.Linear(2 * d, 1) if copy else None
        self.length_head = nn.Linear(d, max_length + 1)  # NAT: target length from the encoder output
        positions = sinusoidal_positions(max(max_length, 1024) + 2, d, layout=position_layout)
        self.register_buffer("positions", positions, persistent=False)

    @staticmethod
    def _embedding(vocab_size: int, d: int, pad_id: int) -> nn.Embedding:
        embed = nn.Embedding(vocab_size, d, padding_idx=pad_id)
        nn.init.normal_(embed.weight, std=d**-0.5)
        with torch.no_grad():
            embed.weight[pad_id].zero_()
        return embed

    @property
    def target_embed(self) -> nn.Embedding:
        """The decoder's embedding: the shared one, or the target vocabulary's."""
        return self.embed if self.tgt_embed is None else self.tgt_embed

    # pieces ---------------------------------------------------------------------------------------
    def embed_tokens(self, tokens: Tensor, offset: int = 0, target: bool = False) -> Tensor:
        """``[B, T]`` ids -> ``[B, T, D]``: embedding x ``embed_scale`` + sinusoidal positions
        ``offset..``; ``target``: the decoder's embedding."""
        t = tokens.shape[1]
        if offset + t > self.positions.shape[0]:
            raise ValueError(
                f"sequence of {offset + t} tokens is longer than the model's position table "
                f"({self.positions.shape[0]}); raise model.max_length or cut the input"
            )
        embed = self.target_embed if target else self.embed
        x = embed(tokens) * self.embed_scale + self.positions[offset : offset + t].to(embed.weight.dtype)
        return self.dropout(x)

    def encode(self, src: Tensor, src_padding_mask: Tensor | None = None, pack: bool = True) -> Tensor:
        """``src`` [B, S] -> memory [B, S, D]; ``pack``: in inference, the encoder's per-token layers
        run on the real tokens only (``Seq2SeqTransformer.encode``)."""
        return self.transformer.encode(self.embed_tokens(src), None, src_padding_mask, pack=pack)

    def init_cache(self) -> list[LayerCache]:
        return self.transformer.init_cache()

    def target_log_probs(
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
        output: str = "log_probs",
    ) -> tuple[Tensor, Tensor | None]:
        """Scores ``[B, T, ...]`` and (when asked, or with copy) cross-attention ``[B, T, S]``.

        ``output``: ``"log_probs"`` (``[B, T, V]``); ``"logits"`` (float32, the same argmax and softmax
        without the log-softmax: what greedy decoding and sampling read); ``"hidden"`` (the last
        decoder states ``[B, T, D]``, for :meth:`sequence_loss`, which fuses the vocabulary projection
        with the loss). With the copy mechanism the output is a mixture of distributions and
        log-probabilities are returned whatever is asked (:meth:`output_kind`).
        ``select`` (bool ``[B, T]``): only the selected positions, ``[N, ...]`` (training: the non-pad
        targets), so the largest matmul, the vocabulary projection, skips padding.
        """
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        want_attn = need_attn or self.copy_gate is not None
        out = self.transformer.decode_states(
            self.embed_tokens(tgt, offset, target=True), memory, memory_padding_mask=memory_padding_mask,
            tgt_padding_mask=tgt_padding_mask, cache=cache, is_causal=causal,
            return_intermediate=False, return_cross_attn=want_attn,
        )
        h, attn = out if want_attn else (out, None)
        h = h[0]
        if self.copy_gate is not None:  # the mixture needs every position's attention and memory
            log_probs = self.log_probs(h, attn, memory, src)
            return (log_probs[select] if select is not None else log_probs), attn
        h = h[select] if select is not None else h
        if output == "hidden":
            return h, attn
        logits = self.logits(h)
        return (logits if output == "logits" else logits.log_softmax(-1)), attn

    def logits(self, h: Tensor) -> Tensor:
        """Decoder states ``[..., D]`` -> float32 vocabulary logits ``[..., V]`` (plus the logits bias)."""
        return at_least_float32(linear(h, self.output.weight, self.output_bias))

    def output_kind(self, output: str) -> str:
        """What :meth:`target_log_probs` returns when ``output`` is asked: log-probabilities with the copy mechanism."""
        return output if self.copy_gate is None else "log_probs"

    def log_probs(self, h: Tensor, attn: Tensor | None, memory: Tensor, src: Tensor) -> Tensor:
        logits = self.logits(h)
        if self.copy_gate is None:
            return logits.log_softmax(-1)
        if memory.shape[0] != h.shape[0]:  # one encoder output per sentence, shared by its beams
            group = h.shape[0] // memory.shape[0]
            memory, src = memory.repeat_interleave(group, 0), src.repeat_interleave(group, 0)
        context = attn @ memory  # [B, T, D]
        p_gen = at_least_float32(torch.sigmoid(self.copy_gate(torch.cat([h, context.to(h.dtype)], -1))))  # [B, T, 1]
        vocab = logits.softmax(-1) * p_gen
        copy = torch.zeros_like(vocab).scatter_add_(
            -1, src[:, None, :].expand(-1, h.shape[1], -1), at_least_float32(attn) * (1 - p_gen)
        )
        return (vocab + copy).clamp_min(1e-12).log()

    def predict_length_logits(self, memory: Tensor, memory_padding_mask: Tensor | None) -> Tensor:
        """NAT length head: ``[B, max_length + 1]`` logits from the mean of the unpadded encoder states."""
        if memory_padding_mask is None:
            pooled = memory.mean(1)
        else:
            keep = (~memory_padding_mask).unsqueeze(-1).to(memory.dtype)
            pooled = (memory * keep).sum(1) / keep.sum(1).clamp_min(1)
        return at_least_float32(self.length_head(pooled))

    def forward(
        self,
        src: Tensor,
        src_padding_mask: Tensor | None,
        tgt_in: Tensor,
        tgt_padding_mask: Tensor | None = None,
        causal: bool = True,
        need_attn: bool = False,
        select: Tensor | None = None,
        output: str = "log_probs",
    ) -> dict[str, Tensor]:
        """Teacher-forced pass: the :meth:`target_log_probs` scores under the key of their kind (``log_probs``
        [B, T, V], or [N, V] for the ``select``ed positions; ``hidden`` with ``output="hidden"`` and
        no copy mechanism), ``cross_attn`` [B, T, S] (if asked), ``memory``. :meth:`sequence_loss`
        takes ``log_probs`` or ``hidden``."""
        memory = self.encode(src, src_padding_mask)
        scores, attn = self.target_log_probs(
            tgt_in, memory, src_padding_mask, src, tgt_padding_mask, causal=causal, need_attn=need_attn,
            select=select, output=output,
        )
        out = {self.output_kind(output): scores, "memory": memory}
        if attn is not None:
            out["cross_attn"] = attn
        return out

    def sequence_loss(self, out: dict[str, Tensor], target: Tensor, epsilon: float, ignore_index: int) -> tuple[Tensor, Tensor]:
        """(label-smoothed loss, NLL) of a :meth:`forward` output: from its ``hidden`` states through
        the vocabulary projection (:func:`linear_label_smoothed_cross_entropy`, fused), or from its
        ``log_probs`` (:func:`label_smoothed_nll`)."""
        if "hidden" in out:
            h = out["hidden"]
            return linear_label_smoothed_cross_entropy(
                h.reshape(-1, h.shape[-1]), self.output.weight, target.reshape(-1), epsilon, ignore_index,
                bias=self.output_bias,
            )
        return label_smoothed_nll(out["log_probs"], target, epsilon, ignore_index)


def label_smoothed_nll(log_probs: Tensor, target: Tensor, epsilon: float, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Label-smoothed negative log-likelihood, averaged over non-pad target tokens.

    ``log_probs`` [..., V], ``target`` [...]. Returns (smoothed loss, plain NLL) — the second is
    what perplexity is computed from. Ignored positions are masked, not indexed out, so the
    ``[N, V]`` log-probabilities are never copied (and nothing waits on the device).
    """
    lp = log_probs.reshape(-1, log_probs.shape[-1])
    tgt = target.reshape(-1)
    keep = tgt != ignore_index
    nll = -lp.gather(-1, tgt.masked_fill(~keep, 0)[:, None]).squeeze(-1)
    smooth = -lp.mean(-1)
    n = keep.sum().clamp_min(1)
    loss = ((1 - epsilon) * nll + epsilon * smooth).masked_fill(~keep, 0.0)
    return loss.sum() / n, nll.masked_fill(~keep, 0.0).sum() / n


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in here: autocast's, when it is on for ``x``'s device."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _LinearSmoothedCrossEntropy(torch.autograd.Function):
    """Vocabulary projection + label-smoothed cross entropy in row chunks, gradients included.

    Forward, per chunk of rows: logits in the compute dtype, then in float32 the log-sum-exp, the
    target's logit and the mean logit (the loss) and, when a gradient is needed, the logits' gradient
    ``(softmax - (1 - eps) * onehot - eps / V) / n`` in place; the chunk stays in cache and is written
    once, in the compute dtype, into an ``[N, V]`` buffer that two matmuls turn into the gradients of
    the states and of the weight. Backward only scales them. No float32 ``[N, V]`` tensor is kept.
    The gradient of the returned NLL (used for perplexity, normally detached) is the loss's minus
    ``eps * (onehot - 1/V) / n`` through the projection, added only when asked.
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, target: Tensor, epsilon: float, ignore_index: int, chunk: int,
                bias: Tensor | None):
        dtype = _compute_dtype(h)
        acc = torch.promote_types(dtype, torch.float32)
        keep = target != ignore_index
        tgt = target.masked_fill(~keep, 0)
        row_w = keep.to(acc) / keep.sum().clamp_min(1)  # 1/n on kept rows, 0 on ignored ones
        hc, wc = h.to(dtype), weight.to(dtype)
        grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        n_rows, vocab = h.shape[0], weight.shape[0]
        g = torch.empty(n_rows, vocab, dtype=dtype, device=h.device) if grad else None
        loss = h.new_zeros((), dtype=acc)
        nll_sum = h.new_zeros((), dtype=acc)
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, n_rows, chunk):
                rows = slice(i, i + chunk)
                t, w = tgt[rows, None], row_w[rows]
                x = (hc[rows] @ wc.t()).to(acc)
                if bias is not None:
                    x += bias.to(acc)
                target_logit, mean_logit = x.gather(-1, t).squeeze(-1), x.mean(-1)
                top = x.amax(-1, keepdim=True)
                total = x.sub_(top).exp_().sum(-1)  # x is exp(logits - max) from here on
                lse = top.squeeze(-1) + total.log()
                nll = lse - target_logit
                loss += (((1 - epsilon) * nll + epsilon * (lse - mean_logit)) * w).sum()
                nll_sum += (nll * w).sum()
                if grad:
                    x.mul_((w / total)[:, None])  # softmax / n
                    x.scatter_add_(-1, t, -((1 - epsilon) * w)[:, None]).sub_((epsilon / vocab * w)[:, None])
                    g[rows] = x
            grad_h = (g @ wc).to(h.dtype) if ctx.needs_input_grad[0] else None
            grad_w = (g.t() @ hc).to(weight.dtype) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(grad_h, grad_w, hc, wc, tgt, row_w)
        ctx.epsilon = epsilon
        ctx.set_materialize_grads(False)  # an unused NLL gets no gradient work
        return loss, nll_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor | None, grad_nll: Tensor | None):
        grad_h, grad_w, hc, wc, tgt, row_w = ctx.saved_tensors
        # d/d logits of (gl * loss + gn * nll) = (gl + gn) * d loss - gn * eps * (onehot - 1/V) * row_w
        if grad_loss is None and grad_nll is None:
            return None, None, None, None, None, None, None
        scale = sum(g for g in (grad_loss, grad_nll) if g is not None)
        gh = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w * scale.to(grad_w.dtype) if grad_w is not None else None
        if grad_nll is not None:
            c = grad_nll.to(row_w.dtype) * ctx.epsilon * row_w  # [N]
            w32, h32 = wc.to(c.dtype), hc.to(c.dtype)
            if gh is not None:
                gh = gh - (c[:, None] * (w32[tgt] - w32.mean(0))).to(gh.dtype)
            if gw is not None:
                ch = c[:, None] * h32
                onehot_part = torch.zeros_like(w32).index_add_(0, tgt, ch)
                gw = gw - (onehot_part - ch.sum(0) / w32.shape[0]).to(gw.dtype)
        return gh, gw, None, None, None, None, None


def linear_label_smoothed_cross_entropy(
    h: Tensor, weight: Tensor, target: Tensor, epsilon: float, ignore_index: int, chunk: int | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`label_smoothed_nll` of ``log_softmax(h @ weight.T)``, without materialising the logits.

    ``h`` [N, D], ``weight`` [V, D] (the output projection), ``target`` [N]; ``bias`` [V], a constant
    added to the logits (Marian's ``final_logits_bias``; no gradient flows to it). The matmuls run in
    the compute dtype (autocast's when on), the softmax arithmetic in float32. ``chunk`` rows are
    processed at a time (default: about 8 MB of float32 logits). Values and gradients equal the
    unfused computation's (tests).
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or target.shape != h.shape[:1]:
        raise ValueError(f"h must be [N, D], weight [V, D] and target [N], got {tuple(h.shape)}, "
                         f"{tuple(weight.shape)} and {tuple(target.shape)}")
    chunk = chunk or max(1, (1 << 21) // weight.shape[0])
    if bias is not None and (bias.shape != weight.shape[:1] or bias.requires_grad):
        raise ValueError(f"bias must be a constant [V] = [{weight.shape[0]}] tensor, got {tuple(bias.shape)}"
                         f"{' requiring a gradient' if bias.requires_grad else ''}")
    return _LinearSmoothedCrossEntropy.apply(h, weight, target, epsilon, ignore_index, chunk, bias)


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
    penalty = (at_least_float32(attn) * w).sum(-1)  # [B, T]
    if tgt_padding_mask is not None:
        penalty = penalty.masked_fill(tgt_padding_mask, 0.0)
        return penalty.sum() / (~tgt_padding_mask).sum().clamp_min(1)
    return penalty.mean()


def shift_right(tgt: Tensor) -> tuple[Tensor, Tensor]:
    """``tgt`` [B, T] = BOS w1 .. wn EOS (padded) -> decoder input (without the last column) and labels."""
    return tgt[:, :-1], tgt[:, 1:]



