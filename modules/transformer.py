"""The shared seq2seq Transformer: encoder, decoder with cross-attention, incremental key/value cache.

One class serves every task. Detection feeds image tokens to the encoder and learned object queries
to the decoder (all decoded in parallel); translation feeds source tokens and shifted target tokens
with a causal mask (decoded step by step with the cache). Attention runs through
``torch.nn.functional.scaled_dot_product_attention``, except where ``MultiheadAttention._attend``
says why two explicit matmuls serve better (decoding steps with the cache among them); where those
would hold more than ``ATTENTION_SCORE_BUDGET`` bytes of scores, :func:`attention_path` picks a
computation whose memory is linear in the sequence lengths.

Mask convention (everywhere in this package): a bool mask is True where attention is **blocked**
(padding, future positions), like ``pixel_mask`` and ``src_padding_mask`` in the data contracts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend
from torch.utils.checkpoint import checkpoint

from . import private_api
from .dropout import Dropout, dropout
from .packed import linear

LayerCache = dict[str, Any]


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


def _attention_mask(padding_mask: Tensor | None, mask: Tensor | None) -> Tensor | None:
    """Combine a key padding mask ``[B, S]`` and an attention mask ``[T, S]`` / ``[B, T, S]`` /
    ``[B, H, T, S]`` (True = blocked) into SDPA's convention (True = may attend), or None."""
    allowed: Tensor | None = None
    if padding_mask is not None:
        allowed = ~padding_mask[:, None, None, :]
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"attention masks must be bool (True = blocked), got {mask.dtype}")
        m = ~mask
        if m.dim() == 2:
            m = m[None, None]
        elif m.dim() == 3:
            m = m[:, None]
        allowed = m if allowed is None else allowed & m
    return allowed


def _decoder_self_mask(padding_mask: Tensor | None, mask: Tensor | None, is_causal: bool, t: int,
                       device: torch.device) -> Tensor | None:
    """:func:`_attention_mask` of the decoder's self-attention, with the causal mask folded in when
    there is a mask at all (SDPA takes either a mask or ``is_causal``)."""
    self_mask = _attention_mask(padding_mask, mask)
    if is_causal and self_mask is not None:
        self_mask = self_mask & torch.ones(t, t, dtype=torch.bool, device=device).tril()
    return self_mask


class PackedRows:
    """The real (non-padding) tokens of a ``[B, S]`` batch, to run per-token layers on them alone.

    ``index``: their positions in the flattened ``[B * S]`` batch. ``gather(x [B, S, ...])`` ->
    ``[N, ...]``; ``scatter(x [N, ...])`` -> ``[B, S, ...]`` with zeros at the padding."""

    def __init__(self, padding_mask: Tensor) -> None:  # [B, S] bool, True = padding
        self.batch, self.length = padding_mask.shape
        self.index = (~padding_mask).flatten().nonzero().squeeze(1)

    @classmethod
    def if_packing_pays(cls, padding_mask: Tensor | None, device: torch.device) -> PackedRows | None:
        """Packing pays for its gather/scatter once an eighth of the batch is padding (on CPU; on
        other devices the index would synchronise the stream on every call)."""
        if padding_mask is None or device.type != "cpu" or padding_mask.dim() != 2:
            return None
        if int(padding_mask.sum()) * 8 < padding_mask.numel():
            return None
        return cls(padding_mask)

    def gather(self, x: Tensor) -> Tensor:
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.index)

    def scatter(self, x: Tensor) -> Tensor:
        out = x.new_zeros(self.batch * self.length, *x.shape[1:]).index_copy_(0, self.index, x)
        return out.view(self.batch, self.length, *x.shape[1:])


def _append(cache: LayerCache, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Write new keys/values ``[B, H, t, Dh]`` after the cached ones; returns all of them (views).

    The self-attention cache keeps buffers with room to spare (``k``/``v``, ``[B, H, capacity, Dh]``,
    doubled when full) and the filled ``length``, so a decoding step writes its own keys in place
    instead of copying the whole history (``torch.cat``: quadratic in the output length). Head-major:
    each (row, head)'s keys are one contiguous block, which the step's two batched matmuls read
    without a copy. Reordering the cache (beam search, dropping finished rows) selects rows of the
    buffers as of any tensor."""
    n, t = cache.get("length", 0), k.shape[2]
    buf_k, buf_v = cache.get("k"), cache.get("v")
    if buf_k is None or n + t > buf_k.shape[2]:
        size = max(2 * n + t, 16)
        b, h, _, dh = k.shape
        new_k, new_v = k.new_empty(b, h, size, dh), v.new_empty(b, h, size, dh)
        if n:
            new_k[:, :, :n], new_v[:, :, :n] = buf_k[:, :, :n], buf_v[:, :, :n]
        buf_k, buf_v = cache["k"], cache["v"] = new_k, new_v
    buf_k[:, :, n : n + t], buf_v[:, :, n : n + t] = k, v
    cache["length"] = n + t
    return buf_k[:, :, : n + t], buf_v[:, :, : n + t]


def _cached_keys_values(cache: LayerCache, k: Tensor, v: Tensor, static_kv: bool) -> tuple[Tensor, Tensor]:
    """Store keys/values in ``cache`` and return what attention reads: cross-attention (``static_kv``)
    stores them once, as the decoding steps read them (keys transposed, both contiguous);
    self-attention appends this step's to the earlier ones."""
    if not static_kv:
        return _append(cache, k, v)
    k = cache["k_t"] = k.transpose(-2, -1).contiguous()
    v = cache["v"] = v.contiguous()
    return k, v


# Bytes the explicit attention path may allocate for one call's [B, H, T, S] scores and probabilities
# before it runs block by block over the queries instead (chunked_attention): enough that decoding
# steps, translation batches and 128 px detection never split, small next to a CPU's memory.
ATTENTION_SCORE_BUDGET = 16 * 2**20


def explicit_bytes(q: Tensor, s: int, dropout_p: float) -> int:
    """Bytes that :func:`explicit_attention` allocates for ``q`` ``[B, H, T, Dh]`` against ``s`` keys:
    the scores (q's dtype), their float32 softmax (after a float32 copy when q is reduced precision),
    the probabilities cast back, and with dropout its bool mask and the dropped probabilities."""
    e = q.element_size()
    per_score = e + 4 + (4 + e if e < 4 else 0) + (1 + e if dropout_p > 0 else 0)
    return q.shape[:-1].numel() * s * per_score


def sdpa_memory_efficient(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float,
                          is_causal: bool) -> bool:
    """Whether SDPA would run a fused kernel here (flash / memory-efficient / cuDNN: memory linear in
    the sequence lengths) rather than its math fallback, which materialises the ``[B, H, T, S]``
    scores (on CPU: with dropout; on CUDA: shapes or dtypes no fused kernel takes). Asked of torch's
    own dispatcher for this device, dtype, mask and dropout (``private_api.sdpa_backend_choice``);
    when torch cannot say, False: the caller then takes the chunked path, linear in memory anyway."""
    choice = private_api.sdpa_backend_choice(q, k, v, attn_mask, dropout_p, is_causal and attn_mask is None)
    return choice is not None and choice not in (SDPBackend.MATH.value, SDPBackend.ERROR.value)


def attention_path(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                   dropout_p: float, *, prefer_explicit: bool, keys_transposed: bool = False,
                   need_weights: bool = False) -> str:
    """``"explicit"``, ``"sdpa"`` or ``"chunked"``: the computation of one attention call, chosen by
    the bytes the explicit path would allocate. Within ``ATTENTION_SCORE_BUDGET``: the explicit path
    where it is preferred (``MultiheadAttention._attend`` says when), else SDPA. Beyond it: SDPA where
    torch runs a fused, memory-efficient kernel for this device, dtype, mask and dropout (on CPU:
    flash attention, fp32 or bf16, without dropout), else the explicit computation in blocks.
    Only ``need_weights`` keeps the full explicit path at any size: the weights are the result."""
    if need_weights:
        return "explicit"
    if explicit_bytes(q, v.shape[-2], dropout_p) <= ATTENTION_SCORE_BUDGET:
        reduced = q.dtype in (torch.bfloat16, torch.float16)
        cpu_explicit = q.device.type == "cpu" and (dropout_p > 0 or reduced)
        return "explicit" if prefer_explicit or keys_transposed or cpu_explicit else "sdpa"
    if not keys_transposed and sdpa_memory_efficient(q, k, v, attn_mask, dropout_p, is_causal):
        return "sdpa"
    return "chunked"


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float,
                       keys_transposed: bool = False) -> tuple[Tensor, Tensor]:
    """Two batched matmuls and a float32 softmax: (output ``[B, H, T, Dh]``, weights ``[B, H, T, S]``).

    ``k`` is ``[B, H, S, Dh]``, or ``[B, H, Dh, S]`` with ``keys_transposed``; ``attn_mask`` is bool
    (True = may attend), broadcastable to ``[B, H, T, S]``."""
    # q scaled first: the product is contiguous, which the batched matmul needs anyway (a step's q
    # is a strided slice of the fused projection), so the scaling costs no extra pass
    scores = (q * q.shape[-1] ** -0.5) @ (k if keys_transposed else k.transpose(-2, -1))
    if attn_mask is not None:
        scores = scores.masked_fill_(~attn_mask, float("-inf"))
    probs = scores.float().softmax(-1)
    return dropout(probs.to(v.dtype), dropout_p) @ v, probs


def _attention_block(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float,
                     keys_transposed: bool) -> Tensor:
    return explicit_attention(q, k, v, attn_mask, dropout_p, keys_transposed)[0]


def _score_blocks(b: int, h: int, t: int, pair_bytes: int, budget: int) -> list[tuple[slice, slice, slice]]:
    """(batch, head, query) slices covering ``[b, h, t]`` whose scores fit ``budget`` bytes (one
    (row, head) pair's scores being ``pair_bytes``): whole heads where they fit (batched matmuls run
    fastest with every query of a head), else one head's queries in row blocks."""
    everything = slice(None)
    if pair_bytes > budget:
        rows = max(1, budget * t // pair_bytes)
        return [(slice(i, i + 1), slice(j, j + 1), slice(r, r + rows))
                for i in range(b) for j in range(h) for r in range(0, t, rows)]
    pairs = budget // pair_bytes
    if pairs >= h:
        step = pairs // h
        return [(slice(i, i + step), everything, everything) for i in range(0, b, step)]
    return [(slice(i, i + 1), slice(j, j + pairs), everything) for i in range(b) for j in range(0, h, pairs)]


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float,
                      keys_transposed: bool = False, budget: int | None = None) -> Tensor:
    """:func:`explicit_attention`'s output ``[B, H, T, Dh]``, computed in blocks of (rows, heads,
    queries) whose scores fit ``budget`` bytes (default ``ATTENTION_SCORE_BUDGET``). Under autograd
    each block is checkpointed: backward recomputes its scores (replaying its dropout draws) instead
    of keeping them, so neither pass holds more than one block's scores."""
    b, h, t, _ = q.shape
    budget = ATTENTION_SCORE_BUDGET if budget is None else budget
    pair_bytes = max(1, explicit_bytes(q, v.shape[-2], dropout_p) // (b * h))
    mask = None if attn_mask is None else attn_mask[(None,) * (4 - attn_mask.dim())]
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])
    for rows, heads, queries in _score_blocks(b, h, t, pair_bytes, budget):
        m = None
        if mask is not None:  # slice only the dimensions the mask has (the others broadcast)
            m = mask[tuple(s if n > 1 else slice(None) for s, n in zip((rows, heads, queries), mask.shape))]
        args = (q[rows, heads, queries], k[rows, heads], v[rows, heads], m, dropout_p, keys_transposed)
        out[rows, heads, queries] = checkpoint(_attention_block, *args, use_reentrant=False) if grad \
            else _attention_block(*args)
    return out


class MultiheadAttention(nn.Module):
    """Multi-head attention over separate query / key / value inputs.

    The input projection is one ``[3D, D]`` matrix; when inputs coincide (self-attention without
    positions: q = k = v, or DETR's q = k = x + pos) the matching rows run as one matmul.
    """

    def __init__(self, *, d_model: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead}")
        self.d_model, self.nhead, self.dropout = d_model, nhead, dropout
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _project_kv(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        d, w, b = self.d_model, self.in_proj.weight, self.in_proj.bias
        if value is key:
            k, v = linear(key, w[d:], b[d:]).chunk(2, dim=-1)
        else:
            k = linear(key, w[d : 2 * d], b[d : 2 * d])
            v = linear(value, w[2 * d :], b[2 * d :])
        return self._heads(k), self._heads(v)

    def _project_qkv(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values ``[B, H, T or S, Dh]``; inputs that coincide share one matmul."""
        d, w, b = self.d_model, self.in_proj.weight, self.in_proj.bias
        if key is query and value is query:
            q, k, v = (self._heads(t) for t in linear(query, w, b).chunk(3, dim=-1))
            return q, k, v
        if key is query:
            q, k = (self._heads(t) for t in linear(query, w[: 2 * d], b[: 2 * d]).chunk(2, dim=-1))
            return q, k, self._heads(linear(value, w[2 * d :], b[2 * d :]))
        return (self._heads(linear(query, w[:d], b[:d])), *self._project_kv(key, value))

    def _heads(self, x: Tensor) -> Tensor:  # [B, T, D] -> [B, H, T, D/H]
        b, t, _ = x.shape
        return x.view(b, t, self.nhead, -1).transpose(1, 2)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                explicit: bool, keys_transposed: bool = False,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """softmax(q k^T / sqrt(Dh)) v over ``[B, H, T, Dh]`` heads (``k`` given ``[B, H, Dh, S]`` when
        ``keys_transposed``); returns the output and, with ``need_weights``, the weights ``[B, H, T, S]``.

        Which computation runs is :func:`attention_path`'s choice. The explicit one (two batched
        matmuls, float32 softmax) is preferred where ``explicit`` (the caller's: decoding with the
        cache, where a step's few queries per (row, head) make SDPA's fused CPU kernel pay its
        per-head overhead for little work, and the matmuls read the cache's contiguous keys/values as
        they are), on CPU for reduced precision, where SDPA's bf16 kernels (forward + backward) run
        slower than the two matmuls (measured in docs/results.md), and for attention dropout, which
        sends SDPA to its math path with a bernoulli_ mask (modules/dropout.py). It holds
        ``[B, H, T, S]`` scores, so beyond ``ATTENTION_SCORE_BUDGET`` bytes SDPA runs where its kernel
        is memory-efficient, else the explicit computation in blocks (:func:`attention_path`): memory
        linear in T and S."""
        drop = self.dropout if self.training else 0.0
        path = attention_path(q, k, v, attn_mask, is_causal, drop, prefer_explicit=explicit,
                              keys_transposed=keys_transposed, need_weights=need_weights)
        if path == "sdpa":
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=drop, is_causal=is_causal and attn_mask is None
            )
            return out, None
        if is_causal and attn_mask is None:
            t, s = q.shape[-2], v.shape[-2]
            attn_mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        if path == "chunked":
            return chunked_attention(q, k, v, attn_mask, drop, keys_transposed), None
        return explicit_attention(q, k, v, attn_mask, drop, keys_transposed)

    def forward_packed(self, query: Tensor, value: Tensor, attn_mask: Tensor | None, rows: PackedRows) -> Tensor:
        """Self-attention of a padded batch given only its real tokens: ``query`` / ``value`` ``[N, D]``
        are the rows ``rows.index`` of the flattened ``[B * S, D]`` batch (``query`` may carry positions;
        keys are the queries). The projections run on the N real rows; the attention on the padded
        layout (zeros at padding, which ``attn_mask`` hides as keys). Returns ``[N, D]``."""
        d, w, b = self.d_model, self.in_proj.weight, self.in_proj.bias
        if value is query:
            proj = linear(query, w, b)
        else:
            proj = torch.cat([linear(query, w[: 2 * d], b[: 2 * d]), linear(value, w[2 * d :], b[2 * d :])], -1)
        full = rows.scatter(proj)  # [B, S, 3D]
        q, k, v = (self._heads(t) for t in full.chunk(3, dim=-1))
        out, _ = self._attend(q, k, v, attn_mask, False, False)
        out = rows.gather(out.transpose(1, 2).reshape(rows.batch, rows.length, d))
        return linear(out, self.out_proj.weight, self.out_proj.bias)

    def forward(
        self,
        query: Tensor,  # [B, T, D]
        key: Tensor,  # [B, S, D]
        value: Tensor,  # [B, S, D]
        attn_mask: Tensor | None = None,  # bool, SDPA convention (True = may attend), broadcastable to [B,H,T,S]
        is_causal: bool = False,
        cache: LayerCache | None = None,
        static_kv: bool = False,
        need_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:  # [B, T, D] (and head-averaged weights [B, T, S])
        """Keys/values may have fewer rows than the queries (``B = g * B_kv``): each key/value row then
        serves ``g`` consecutive query rows (beam search: a sentence's beams read one copy of its
        encoder output), computed as ``g * T`` queries against it."""
        d, w, b = self.d_model, self.in_proj.weight, self.in_proj.bias
        cached = static_kv and cache is not None and "k_t" in cache
        rows, length = query.shape[:2]
        kv_rows = cache["v"].shape[0] if cached else key.shape[0]
        if kv_rows != rows:
            if key is query or not kv_rows or rows % kv_rows:
                raise ValueError(f"{rows} query rows cannot share {kv_rows} key/value rows (need a multiple)")
            query = query.reshape(kv_rows, rows // kv_rows * length, -1)
        transposed = static_kv and cache is not None  # cross-attention cache: keys kept as [B, H, Dh, S]
        if cached:
            # cross-attention while decoding step by step: encoder keys/values were computed once
            q = self._heads(linear(query, w[:d], b[:d]))
            k, v = cache["k_t"], cache["v"]
        else:
            q, k, v = self._project_qkv(query, key, value)
            if cache is not None:
                k, v = _cached_keys_values(cache, k, v, static_kv)
        out, probs = self._attend(q, k, v, attn_mask, is_causal, explicit=cache is not None or need_weights,
                                  keys_transposed=transposed, need_weights=need_weights)
        bsz, _, t, _ = out.shape
        out = linear(out.transpose(1, 2).reshape(bsz, t, d), self.out_proj.weight, self.out_proj.bias)
        out = out.view(rows, length, d)
        return (out, probs.mean(1).view(rows, length, -1)) if need_weights else out


class FeedForward(nn.Sequential):
    def __init__(self, *, d_model: int, dim_feedforward: int, dropout: float, activation: str) -> None:
        act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU()}.get(activation)
        if act is None:
            raise ValueError(f"activation must be 'relu', 'gelu' or 'silu' (swish, Marian's), got {activation!r}")
        super().__init__(
            nn.Linear(d_model, dim_feedforward), act, Dropout(dropout), nn.Linear(dim_feedforward, d_model)
        )
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:  # the layers of nn.Sequential, through modules.packed.linear
        first, _, drop, second = self
        hidden = linear(x, first.weight, first.bias, activation=self.activation)
        return linear(drop(hidden), second.weight, second.bias)


class EncoderLayer(nn.Module):
    def __init__(
        self, *, d_model: int, nhead: int, dim_feedforward: int, dropout: float, norm_first: bool, activation: str
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiheadAttention(d_model=d_model, nhead=nhead, dropout=dropout)
        self.ffn = FeedForward(d_model=d_model, dim_feedforward=dim_feedforward, dropout=dropout, activation=activation)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop1, self.drop2 = Dropout(dropout), Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor | None, attn_mask: Tensor | None,
                rows: PackedRows | None = None) -> Tensor:
        """``src`` / ``pos`` ``[B, S, D]``, or with ``rows`` the real tokens alone, ``[N, D]``."""
        def attend(qk: Tensor, v: Tensor) -> Tensor:
            if rows is None:
                return self.self_attn(qk, qk, v, attn_mask)
            return self.self_attn.forward_packed(qk, v, attn_mask, rows)

        if self.norm_first:
            x = self.norm1(src)
            src = src + self.drop1(attend(_with_pos(x, pos), x))
            return src + self.drop2(self.ffn(self.norm2(src)))
        src = self.norm1(src + self.drop1(attend(_with_pos(src, pos), src)))
        return self.norm2(src + self.drop2(self.ffn(src)))


class DecoderLayer(nn.Module):
    def __init__(
        self, *, d_model: int, nhead: int, dim_feedforward: int, dropout: float, norm_first: bool, activation: str
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiheadAttention(d_model=d_model, nhead=nhead, dropout=dropout)
        self.cross_attn = MultiheadAttention(d_model=d_model, nhead=nhead, dropout=dropout)
        self.ffn = FeedForward(d_model=d_model, dim_feedforward=dim_feedforward, dropout=dropout, activation=activation)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.drop1, self.drop2, self.drop3 = (Dropout(dropout) for _ in range(3))

    def forward(
        self,
        tgt: Tensor,
        memory_k: Tensor,  # memory (+ positions) used as cross-attention keys
        memory: Tensor,
        tgt_pos: Tensor | None,
        self_mask: Tensor | None,
        is_causal: bool,
        memory_mask: Tensor | None,
        cache: LayerCache | None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        self_cache = cross_cache = None
        if cache is not None:
            self_cache, cross_cache = cache.setdefault("self", {}), cache.setdefault("cross", {})
        x = self.norm1(tgt) if self.norm_first else tgt
        qk = _with_pos(x, tgt_pos)
        h = self.self_attn(qk, qk, x, self_mask, is_causal=is_causal, cache=self_cache)
        tgt = tgt + self.drop1(h) if self.norm_first else self.norm1(tgt + self.drop1(h))
        x = self.norm2(tgt) if self.norm_first else tgt
        h = self.cross_attn(
            _with_pos(x, tgt_pos), memory_k, memory, memory_mask, cache=cross_cache, static_kv=True,
            need_weights=need_weights,
        )
        weights = None
        if need_weights:
            h, weights = h
        tgt = tgt + self.drop2(h) if self.norm_first else self.norm2(tgt + self.drop2(h))
        x = self.norm3(tgt) if self.norm_first else tgt
        h = self.ffn(x)
        return (tgt + self.drop3(h) if self.norm_first else self.norm3(tgt + self.drop3(h))), weights


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer shared by all tasks.

    Args:
        pos_at_every_layer: True (DETR style) adds the given positions to queries and keys in every
            attention layer; False (NMT style) adds them once to the inputs of ``encode``/``decode_states``.
        norm_first: pre-norm layers (plus a final encoder norm) instead of post-norm.
        activation: of the feed-forward layers: "relu", "gelu" or "silu" (swish: Marian / opus-mt).
        final_norm: the decoder's final LayerNorm, applied to every layer's output (what DETR's
            auxiliary losses read). False: none after the decoder (nor the encoder) -- post-norm
            models whose every layer ends in a LayerNorm already (Marian / opus-mt, fairseq's
            post-norm Transformer).
    """

    def __init__(
        self,
        *,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        norm_first: bool = False,
        activation: str = "relu",
        pos_at_every_layer: bool = True,
        final_norm: bool = True,
    ) -> None:
        super().__init__()
        self.d_model, self.nhead = d_model, nhead
        self.pos_at_every_layer = pos_at_every_layer
        layer = {"d_model": d_model, "nhead": nhead, "dim_feedforward": dim_feedforward, "dropout": dropout,
                 "norm_first": norm_first, "activation": activation}
        self.encoder_layers = nn.ModuleList(EncoderLayer(**layer) for _ in range(num_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(**layer) for _ in range(num_decoder_layers))
        self.encoder_norm = nn.LayerNorm(d_model) if final_norm and norm_first and num_encoder_layers else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d_model) if final_norm else nn.Identity()
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    @property
    def num_decoder_layers(self) -> int:
        return len(self.decoder_layers)

    def encode(
        self,
        src: Tensor,  # [B, S, D]
        src_pos: Tensor | None = None,  # [B, S, D] or [S, D]
        src_padding_mask: Tensor | None = None,  # [B, S] bool, True = padding
        pos_at_every_layer: bool | None = None,  # this call's position convention (None: the instance's)
        pack: bool = False,  # inference: per-token layers on the real tokens only (CPU, >= 1/8 padding)
    ) -> Tensor:  # memory [B, S, D]
        """The encoder's output ``[B, S, D]``. With ``pack``, outside autograd (inference, as
        ``nn.TransformerEncoder``'s nested-tensor fast path), a CPU batch with at least an eighth of
        padding runs the projections, feed-forward layers and norms on its real tokens only; the
        output is then zero at the padding, which every consumer masks. Training batches, bucketed by
        length, have little padding, and their numerics stay those of the padded computation."""
        every = self.pos_at_every_layer if pos_at_every_layer is None else pos_at_every_layer
        if src_pos is not None and not every:
            src, src_pos = src + src_pos, None
        mask = _attention_mask(src_padding_mask, None)
        rows = PackedRows.if_packing_pays(src_padding_mask, src.device) if pack and not torch.is_grad_enabled() else None
        if rows is None:
            for layer in self.encoder_layers:
                src = layer(src, src_pos, mask)
            return self.encoder_norm(src)
        # per-token layers (projections, FFN, norms) on the real tokens only; padding comes out as zeros
        x = rows.gather(src)
        pos = None if src_pos is None else rows.gather(src_pos.expand_as(src))
        for layer in self.encoder_layers:
            x = layer(x, pos, mask, rows)
        return rows.scatter(self.encoder_norm(x))

    def init_cache(self) -> list[LayerCache]:
        """An empty incremental-decoding cache: pass the same list to every ``decode_states`` step."""
        return [{} for _ in self.decoder_layers]

    def decode_states(
        self,
        tgt: Tensor,  # [B, T, D] (only the new positions when decoding with a cache)
        memory: Tensor,  # [B, S, D]
        tgt_pos: Tensor | None = None,  # [B, T, D] or [T, D]
        memory_pos: Tensor | None = None,  # [B, S, D] or [S, D]
        memory_padding_mask: Tensor | None = None,  # [B, S] bool, True = padding
        tgt_mask: Tensor | None = None,  # [T, T] / [B, T, T] / [B, H, T, T] bool, True = blocked
        cache: list[LayerCache] | None = None,
        tgt_padding_mask: Tensor | None = None,  # [B, T] bool, True = padding
        is_causal: bool = False,
        return_intermediate: bool = True,
        return_cross_attn: bool = False,
        pos_update: Callable[[int, Tensor], Tensor] | None = None,
        pos_at_every_layer: bool | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Decoder hidden states ``[L, B, T, D]`` (L = number of decoder layers, or 1 without
        intermediates); with ``return_cross_attn`` also the last layer's head-averaged cross-attention
        weights ``[B, T, S]``.

        ``pos_update(i, hs_i)``, if given, is called after every layer but the last with that layer's
        normalised output ``[B, T, D]`` and returns the query positions of layer ``i + 1`` (iterative
        box refinement: each layer's predicted boxes become the next layer's anchors).

        ``pos_at_every_layer`` overrides the instance's position convention for this call (one instance
        shared by tasks with different conventions, ``modules.multitask.TaskTransformer``)."""
        every = self.pos_at_every_layer if pos_at_every_layer is None else pos_at_every_layer
        if pos_update is not None and not every:
            raise ValueError("pos_update needs pos_at_every_layer=True (positions added in every layer)")
        if tgt_pos is not None and not every:
            tgt, tgt_pos = tgt + tgt_pos, None
        memory_k = memory + memory_pos if every and memory_pos is not None else memory  # cross-attention keys
        self_mask = _decoder_self_mask(tgt_padding_mask, tgt_mask, is_causal, tgt.shape[1], tgt.device)
        memory_mask = _attention_mask(memory_padding_mask, None)
        if cache is not None and len(cache) != len(self.decoder_layers):
            raise ValueError("cache has a different number of layers: create it with init_cache()")
        causal_step = is_causal and not (cache is not None and cache[0].get("self", {}).get("length", 0))
        outputs, weights = [], None
        last = len(self.decoder_layers) - 1
        for i, layer in enumerate(self.decoder_layers):
            layer_cache = None if cache is None else cache[i]
            tgt, weights = layer(tgt, memory_k, memory, tgt_pos, self_mask, causal_step, memory_mask, layer_cache,
                                 need_weights=return_cross_attn and i == last)
            if return_intermediate or (pos_update is not None and i < last):
                outputs.append(self.decoder_norm(tgt))
            if pos_update is not None and i < last:
                tgt_pos = pos_update(i, outputs[-1])
        hs = torch.stack(outputs) if return_intermediate else self.decoder_norm(tgt).unsqueeze(0)
        return (hs, weights) if return_cross_attn else hs
