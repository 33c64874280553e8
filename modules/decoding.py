"""Decoding strategies for token-to-token models: greedy, beam search, sampling, non-autoregressive.

Plain PyTorch, no Lightning. Every function works on any model with ``TranslationModel``'s interface:

- ``model.encode(src, src_padding_mask) -> memory [B, S, D]``
- ``model.init_cache() -> cache`` (a list of per-layer dicts of tensors, batch first; entries under
  a ``"cross"`` key depend on the source only)
- ``model.target_log_probs(tgt, memory, memory_padding_mask, src, tgt_padding_mask=None, cache=None, offset=0,
  causal=True, need_attn=False) -> (log_probs [B, T, V], attn)``; optionally with ``output="logits"``
  returning scores with the same argmax and softmax as the log-probabilities, which greedy decoding
  and sampling use when no ``logits_processor`` is given
- ``model.predict_length_logits(memory, memory_padding_mask) -> [B, max_length + 1]`` (NAT only)
- optionally ``model.positions`` (the position table; its length caps the output length).

Conventions shared by the autoregressive strategies (greedy, beam, sample):

- The decoder is fed BOS first. With ``use_cache=True`` (default) step ``t`` feeds only the newest
  token at ``offset=t`` and the per-layer key/value cache holds the rest; the encoder keys/values for
  cross-attention are computed once, by the cache's first step. ``use_cache=False`` re-runs the
  whole prefix every step (same tokens; for tests and benchmarks).
- Output length: ``max_len = floor(max_len_a * src_len + max_len_b)`` per sentence, where
  ``src_len`` counts the sentence's non-pad source tokens. ``max_len`` counts output tokens
  **including EOS**; it is at least 1 and capped by ``max_len_cap`` and by the model's position
  table. If a hypothesis reaches ``max_len`` without EOS, EOS is forced as its last token, so every
  output ends with EOS.
- ``min_len`` (fairseq's ``--min-len``, HF's ``min_new_tokens``): EOS is not generated while fewer
  than ``min_len`` tokens have been; the forced EOS at ``max_len`` still ends an output there.
- The pad token is never generated (its log-prob is set to -inf), unless ``pad_id == eos_id``.
- ``logits_processor(tokens, log_probs) -> log_probs``: ``tokens`` ``[N, t]`` are the tokens
  generated so far by each of the N live rows (sentences still running; sentences x beams in beam
  search), BOS excluded (``[N, 0]`` at the first step); ``log_probs`` ``[N, V]`` are the model's
  next-token log-probabilities (pad already at -inf). It runs before the selection; return a new
  tensor or modify this one in place. Masking with ``-inf`` is the intended use (e.g. labels
  already emitted); the result is not renormalised and beam scores add it up as is. A forced EOS
  (at ``max_len``) overrides it and keeps the model's own EOS log-prob.
- Decoding runs under ``torch.no_grad()`` and does not change the model's mode: call ``model.eval()``
  first (dropout would make every step random).
- Rows whose sentence has finished are dropped from the batch (``reorder_cache``), and the loop
  stops when every sentence has finished.
- Beam search keeps one copy of each sentence's source state: ``model.target_log_probs`` gets ``memory``,
  its mask and ``src`` with ``B`` rows and ``tgt`` with ``B * K`` rows (a sentence's K beams
  consecutive), as ``Seq2SeqTransformer``'s cross-attention accepts; reordering beams moves only
  the cache entries that are not under ``"cross"``.

Outputs of ``greedy_decode``, ``sample_decode``, ``nat_decode`` and ``generate``: ``[B, T]`` token ids
without BOS, each row ``w1 .. wn EOS pad ..``, ``T`` the longest row.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .dtypes import at_least_float32
from .packed import packed_linears

LogitsProcessor = Callable[[Tensor, Tensor], Tensor]
Hypothesis = tuple[Tensor, float]

__all__ = [
    "LogitsProcessor",
    "beam_search",
    "generate",
    "greedy_decode",
    "max_lengths",
    "nat_decode",
    "pad_hypotheses",
    "reorder_cache",
    "sample_decode",
    "top_k_top_p_filter",
]


# helpers ------------------------------------------------------------------------------------------
def _inference(fn: Callable) -> Callable:
    """Run a decoding function under ``torch.inference_mode`` with pre-packed CPU weights
    (``modules.packed``: packed once per model and weight version, reused by every step and call)."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with torch.inference_mode(), packed_linears(owner=model):
            return fn(model, *args, **kwargs)

    return wrapper


def reorder_cache(cache: Any, index: Tensor) -> Any:
    """``index_select`` every tensor in ``cache`` (nested lists / tuples / dicts) along dim 0, the batch.

    Dicts and lists are updated in place (the model keeps writing into the same objects) and the
    cache is returned. Used by beam search (row ``i`` continues beam ``index[i]``) and to drop
    finished sentences.
    """
    if isinstance(cache, Tensor):
        return cache.index_select(0, index)
    if isinstance(cache, dict):
        for key, value in cache.items():
            cache[key] = reorder_cache(value, index)
        return cache
    if isinstance(cache, list):
        for i, value in enumerate(cache):
            cache[i] = reorder_cache(value, index)
        return cache
    if isinstance(cache, tuple):
        return tuple(reorder_cache(value, index) for value in cache)
    return cache


def _position_limit(model: Any) -> int | None:
    positions = getattr(model, "positions", None)
    return int(positions.shape[0]) if isinstance(positions, Tensor) else None


def max_lengths(
    model: Any,
    src: Tensor,
    src_padding_mask: Tensor | None,
    *,
    max_len_a: float,
    max_len_b: float,
    max_len_cap: int | None = None,
) -> Tensor:
    """Per-sentence output limits ``[B]`` (long, EOS included): ``floor(a * src_len + b)``, at least 1,
    at most ``max_len_cap`` and the model's position table (a 1e-9 slack absorbs float error, so
    ``1.1 * 10 + 0`` gives 11)."""
    if src_padding_mask is None:
        src_len = torch.full((src.shape[0],), src.shape[1], dtype=torch.float64, device=src.device)
    else:
        src_len = (~src_padding_mask).sum(1).to(torch.float64)
    lengths = torch.floor(max_len_a * src_len + max_len_b + 1e-9).long().clamp_min(1)
    for cap in (max_len_cap, _position_limit(model)):
        if cap is not None:
            lengths = lengths.clamp_max(max(int(cap), 1))
    return lengths


class _NextTokenScorer:
    """Next-token log-probabilities (or, with ``raw``, logits) for a batch of prefixes, with or
    without the KV cache."""

    def __init__(self, model: Any, memory: Tensor, memory_padding_mask: Tensor | None, src: Tensor, *,
                 use_cache: bool, raw: bool = False) -> None:
        self.model, self.memory, self.mask, self.src = model, memory, memory_padding_mask, src
        self.cache = model.init_cache() if use_cache else None
        # raw scores (argmax and softmax of the log-probs, without the log-softmax) where the model offers them
        self.options = {"output": "logits"} if raw and "output" in inspect.signature(model.target_log_probs).parameters else {}

    def __call__(self, prefix: Tensor) -> Tensor:  # prefix [N, t+1] (BOS first) -> [N, V] float32
        if self.cache is not None:
            step = prefix.shape[1] - 1
            log_probs, _ = self.model.target_log_probs(
                prefix[:, -1:], self.memory, self.mask, self.src, cache=self.cache, offset=step, causal=True,
                **self.options,
            )
        else:
            log_probs, _ = self.model.target_log_probs(prefix, self.memory, self.mask, self.src, causal=True, **self.options)
        return at_least_float32(log_probs[:, -1])

    def select(self, rows: Tensor, sources: Tensor | None) -> None:
        """Keep decoder rows ``rows`` (in that order: the self-attention caches follow them) and, when
        given, source rows ``sources`` (encoder output, source ids, mask and the ``"cross"`` caches,
        which beam search keeps once per sentence, shared by its beams)."""
        if sources is not None:
            self.memory = self.memory.index_select(0, sources)
            self.src = self.src.index_select(0, sources)
            if self.mask is not None:
                self.mask = self.mask.index_select(0, sources)
        if self.cache is not None:
            for layer in self.cache:
                if not isinstance(layer, dict):
                    reorder_cache(layer, rows)
                    continue
                for key, part in layer.items():
                    if key != "cross":
                        reorder_cache(part, rows)
                    elif sources is not None:
                        reorder_cache(part, sources)


def _constrain_log_probs(
    log_probs: Tensor,
    prefix: Tensor,
    force_eos: Tensor,
    eos_id: int,
    pad_id: int,
    logits_processor: LogitsProcessor | None,
    ban_eos: bool = False,
) -> Tensor:
    """Block pad, run the user's processor, then block EOS while ``ban_eos`` (shorter than
    ``min_len``) and force EOS on the rows that reached their limit.

    A forced EOS keeps the model's own EOS log-prob (taken before the processor, which may have
    banned EOS), so it is always chosen and beam scores stay the model's."""
    if pad_id != eos_id and 0 <= pad_id < log_probs.shape[-1]:
        log_probs[:, pad_id] = float("-inf")
    forcing = bool(force_eos.any())
    eos = log_probs[:, eos_id].clone() if forcing else None
    if logits_processor is not None:
        log_probs = logits_processor(prefix[:, 1:], log_probs)
    if ban_eos:  # after the processor: it cannot bring EOS back before min_len
        log_probs[:, eos_id] = float("-inf")
    if forcing:
        log_probs = log_probs.masked_fill(force_eos[:, None], float("-inf"))
        log_probs[:, eos_id] = torch.where(force_eos, eos, log_probs[:, eos_id])
    return log_probs


def top_k_top_p_filter(logits: Tensor, *, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to -inf every logit outside the ``top_k`` largest (0 = no limit) and outside the nucleus:
    the smallest set of most likely tokens whose probability reaches ``top_p``. The most likely
    token is always kept. ``logits`` ``[N, V]``; returns a new tensor."""
    logits = logits.clone()
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pad_hypotheses(tokens: list[Tensor], pad_id: int, device: torch.device | None = None) -> Tensor:
    """Stack 1-D token tensors into ``[B, T]`` padded with ``pad_id`` (T = the longest, at least 1)."""
    width = max([t.numel() for t in tokens] + [1])
    if device is None:
        device = tokens[0].device if tokens else torch.device("cpu")
    out = torch.full((len(tokens), width), pad_id, dtype=torch.long, device=device)
    for i, t in enumerate(tokens):
        out[i, : t.numel()] = t
    return out


# greedy and sampling ------------------------------------------------------------------------------
def _autoregressive(
    model: Any,
    src: Tensor,
    src_padding_mask: Tensor | None,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_len_a: float,
    max_len_b: float,
    max_len_cap: int | None,
    use_cache: bool,
    logits_processor: LogitsProcessor | None,
    choose: Callable[[Tensor], Tensor],  # [N, V] log-probs -> [N] token ids
    min_len: int = 0,
) -> Tensor:
    batch, device = src.shape[0], src.device
    limits = max_lengths(model, src, src_padding_mask, max_len_a=max_len_a, max_len_b=max_len_b, max_len_cap=max_len_cap)
    longest = int(limits.max()) if batch else 0
    out = torch.full((batch, max(longest, 1)), pad_id, dtype=torch.long, device=device)
    if batch == 0:
        return out[:, :0]
    memory = model.encode(src, src_padding_mask)
    # without a user processor only the argmax / softmax of the scores matter: raw logits serve
    stepper = _NextTokenScorer(model, memory, src_padding_mask, src, use_cache=use_cache, raw=logits_processor is None)
    active = torch.arange(batch, device=device)  # original row of each live row
    prefix = torch.full((batch, 1), bos_id, dtype=torch.long, device=device)
    used = 0
    for step in range(longest):
        log_probs = stepper(prefix)
        force = limits[active] <= step + 1
        log_probs = _constrain_log_probs(log_probs, prefix, force, eos_id, pad_id, logits_processor, step < min_len)
        tokens = choose(log_probs)
        out[active, step] = tokens
        used = step + 1
        done = tokens == eos_id
        if bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            active, prefix, tokens = active[keep], prefix[keep], tokens[keep]
            stepper.select(keep, keep)
        prefix = torch.cat([prefix, tokens[:, None]], 1)
    return out[:, :used]


@_inference
def greedy_decode(
    model: Any,
    src: Tensor,
    src_padding_mask: Tensor | None,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    max_len_a: float = 1.2,
    max_len_b: float = 10,
    max_len_cap: int | None = None,
    use_cache: bool = True,
    logits_processor: LogitsProcessor | None = None,
    min_len: int = 0,
) -> Tensor:
    """Argmax at every step. Returns ``[B, T]`` (no BOS; EOS then pad)."""
    return _autoregressive(
        model, src, src_padding_mask, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, max_len_a=max_len_a,
        max_len_b=max_len_b, max_len_cap=max_len_cap, use_cache=use_cache, logits_processor=logits_processor,
        choose=lambda lp: lp.argmax(-1), min_len=min_len,
    )


@_inference
def sample_decode(
    model: Any,
    src: Tensor,
    src_padding_mask: Tensor | None,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    max_len_a: float = 1.2,
    max_len_b: float = 10,
    max_len_cap: int | None = None,
    use_cache: bool = True,
    logits_processor: LogitsProcessor | None = None,
    min_len: int = 0,
) -> Tensor:
    """Ancestral sampling from ``softmax(log_probs / temperature)`` after top-k and nucleus (top-p)
    filtering (the most likely token always survives). ``temperature=0`` is the argmax; ``top_k=1``
    or a tiny ``top_p`` give greedy decoding. ``generator`` (on ``src``'s device) makes runs
    repeatable. Returns ``[B, T]`` (no BOS; EOS then pad)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")

    def choose(log_probs: Tensor) -> Tensor:
        if temperature == 0:
            return log_probs.argmax(-1)
        logits = top_k_top_p_filter(log_probs / temperature, top_k=top_k, top_p=top_p)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)

    return _autoregressive(
        model, src, src_padding_mask, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, max_len_a=max_len_a,
        max_len_b=max_len_b, max_len_cap=max_len_cap, use_cache=use_cache, logits_processor=logits_processor,
        choose=choose, min_len=min_len,
    )


def _length_normalised(total: float, length: int, length_penalty: float) -> float:
    """The beam-search score of a hypothesis with summed log-prob ``total`` and ``length`` tokens."""
    return total / math.pow(length, length_penalty)


# beam search --------------------------------------------------------------------------------------
@_inference
def beam_search(
    model: Any, src: Tensor, src_padding_mask: Tensor | None, *, bos_id: int, eos_id: int, pad_id: int,
    beam_size: int = 5, length_penalty: float = 1.0, n_best: int = 1, early_stopping: bool = True,
    max_len_a: float = 1.2, max_len_b: float = 10, max_len_cap: int | None = None, min_len: int = 0,
    use_cache: bool = True, logits_processor: LogitsProcessor | None = None,
) -> list[list[Hypothesis]]:
    """Batched beam search (``B * beam_size`` decoder rows).

    Scoring (fairseq style): a finished hypothesis of ``n`` output tokens (EOS included) scores
    ``sum(log_probs) / n ** length_penalty``; live beams are ranked by their raw sum. Each step takes
    the ``2K`` best (beam, token) extensions of each sentence (K = ``beam_size``); an extension ending
    in EOS is a finished hypothesis if it ranks among the first K, and the first K extensions not
    ending in EOS are the next beams. At ``max_len`` EOS is forced, which finishes every live beam.
    When a sentence stops: :meth:`_BeamRules.sentence_done` (``early_stopping=False`` gives the exact
    n-best of what the beam explores).

    Returns, per sentence, up to ``n_best`` ``(tokens, score)`` pairs, best first; ``tokens`` is 1-D
    (no BOS, ending with EOS).
    """
    if beam_size < 1 or not 1 <= n_best <= beam_size:
        raise ValueError(f"need beam_size >= 1 and 1 <= n_best <= beam_size, got {beam_size}, {n_best}")
    batch, k = src.shape[0], beam_size
    if batch == 0:
        return []
    limits = max_lengths(model, src, src_padding_mask, max_len_a=max_len_a, max_len_b=max_len_b,
                         max_len_cap=max_len_cap)
    rules = _BeamRules(k=k, n_best=n_best, eos_id=eos_id, length_penalty=length_penalty,
                       early_stopping=early_stopping, limits=limits.tolist())
    # one copy of the encoder output (and cross-attention cache) per sentence: the decoder's
    # cross-attention reads it for the sentence's K beams at once (modules.transformer), and a
    # reordering of beams moves only the self-attention caches
    scorer = _NextTokenScorer(model, model.encode(src, src_padding_mask), src_padding_mask, src, use_cache=use_cache)
    beams = _Beams.start(batch, k, bos_id, src.device)
    finished: list[list[tuple[float, Tensor]]] = [[] for _ in range(batch)]
    for step in range(int(limits.max())):
        log_probs = scorer(beams.prefix)
        force = (limits[beams.sentences] <= step + 1).repeat_interleave(k)
        log_probs = _constrain_log_probs(log_probs, beams.prefix, force, eos_id, pad_id, logits_processor, step < min_len)
        top = _top_extensions(beams.scores, log_probs, k)
        rules.collect_finished(finished, beams, top)
        next_beam, next_token, next_score = rules.next_beams(top)
        best_live = next_score[:, 0].tolist()
        done = [rules.sentence_done(finished[sent], best_live[i], sent, step)
                for i, sent in enumerate(beams.sentences.tolist())]
        if all(done):
            break
        beams = beams.advance(scorer, next_beam, next_token, next_score, done)
    return [rules.n_best_of(hyps) for hyps in finished]


@dataclass
class _Beams:
    """The live beams: K rows per live sentence, sentence-major."""

    prefix: Tensor  # [N * K, t + 1] tokens so far, BOS first
    scores: Tensor  # [N, K] summed log-probs
    sentences: Tensor  # [N] original index of each live sentence

    @classmethod
    def start(cls, batch: int, k: int, bos_id: int, device: torch.device) -> _Beams:
        scores = torch.full((batch, k), float("-inf"), device=device)
        scores[:, 0] = 0.0  # one live beam at the start: the others would only duplicate it
        prefix = torch.full((batch * k, 1), bos_id, dtype=torch.long, device=device)
        return cls(prefix, scores, torch.arange(batch, device=device))

    def advance(self, scorer: _NextTokenScorer, next_beam: Tensor, next_token: Tensor, next_score: Tensor,
                done: list[bool]) -> _Beams:
        """Extend beam ``next_beam`` by ``next_token`` (``[N, K]`` each) in the sentences not ``done``."""
        live, k = next_beam.shape
        device = next_beam.device
        keep = ~torch.tensor(done, dtype=torch.bool, device=device)
        select = (torch.arange(live, device=device)[:, None] * k + next_beam)[keep].view(-1)
        prefix = torch.cat([self.prefix.index_select(0, select), next_token[keep].view(-1, 1)], 1)
        scorer.select(select, keep.nonzero().squeeze(1) if any(done) else None)
        return _Beams(prefix, next_score[keep], self.sentences[keep])


def _top_extensions(scores: Tensor, log_probs: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``2K`` best (beam, token) extensions of each live sentence, best first: their summed
    log-probs, beams and tokens, ``[N, 2K]`` each. ``scores`` ``[N, K]``, ``log_probs`` ``[N * K, V]``."""
    live, vocab = scores.shape[0], log_probs.shape[-1]
    candidates = (scores[:, :, None] + log_probs.view(live, k, vocab)).view(live, k * vocab)
    top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=1)  # sorted, best first
    return top_scores, top_index // vocab, top_index % vocab


@dataclass(kw_only=True)
class _BeamRules:
    """Beam search's settings and its rules for finished hypotheses, next beams and stopping."""

    k: int
    n_best: int
    eos_id: int
    length_penalty: float
    early_stopping: bool
    limits: list[int]  # max_len of each sentence (original index)

    def collect_finished(self, finished: list[list[tuple[float, Tensor]]], beams: _Beams,
                         top: tuple[Tensor, Tensor, Tensor]) -> None:
        """EOS extensions among the first K become finished hypotheses (length-normalised score)."""
        top_scores, top_beam, top_token = (t[:, : self.k] for t in top)
        first = ((top_token == self.eos_id) & torch.isfinite(top_scores)).nonzero().tolist()
        if not first:
            return
        sentences, first_beam, first_score = beams.sentences.tolist(), top_beam.tolist(), top_scores.tolist()
        eos = beams.prefix.new_tensor([self.eos_id])
        for i, j in first:  # one transfer to the host for all of them
            tokens = torch.cat([beams.prefix[i * self.k + first_beam[i][j], 1:], eos])
            score = _length_normalised(first_score[i][j], tokens.numel(), self.length_penalty)
            finished[sentences[i]].append((score, tokens))

    def next_beams(self, top: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """The first K extensions that do not end in EOS: beams, tokens, scores ``[N, K]``."""
        top_scores, top_beam, top_token = top
        width = top_scores.shape[1]
        rank = (top_token == self.eos_id).long() * width + torch.arange(width, device=top_scores.device)
        order = rank.argsort(dim=1)[:, : self.k]
        return top_beam.gather(1, order), top_token.gather(1, order), top_scores.gather(1, order)

    def sentence_done(self, hyps: list[tuple[float, Tensor]], best_live: float, sentence: int, step: int) -> bool:
        """Whether a sentence stops after ``step``: when any of

        - it reached ``max_len`` (every beam is finished) or no live beam has a finite score;
        - ``early_stopping`` and it has K finished hypotheses (fairseq's rule; it makes
          ``beam_size=1`` identical to greedy decoding);
        - it has ``n_best`` finished hypotheses and no live beam can beat the ``n_best``-th of them:
          future log-probs are <= 0, so a live beam with sum ``c`` can at best score ``c / L **
          length_penalty`` with L its largest possible length (``max_len``) when ``length_penalty >
          0``, its smallest otherwise (this assumes the processor keeps log-probs <= 0).
        """
        limit = self.limits[sentence]
        if step + 1 >= limit or best_live == float("-inf") or (self.early_stopping and len(hyps) >= self.k):
            return True
        if len(hyps) < self.n_best:
            return False
        nth = sorted((s for s, _ in hyps), reverse=True)[self.n_best - 1]
        length = limit if self.length_penalty > 0 else step + 2
        return nth >= _length_normalised(best_live, length, self.length_penalty)

    def n_best_of(self, hyps: list[tuple[float, Tensor]]) -> list[Hypothesis]:
        best = sorted(hyps, key=lambda h: h[0], reverse=True)[: self.n_best]
        return [(tokens, score) for score, tokens in best]


# non-autoregressive -------------------------------------------------------------------------------
@_inference
def nat_decode(
    model: Any, src: Tensor, src_padding_mask: Tensor | None, *, mask_id: int, eos_id: int, pad_id: int,
    iterations: int = 1, length_beam: int = 1, append_eos: bool = True, return_scores: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Non-autoregressive decoding with mask-predict refinement (Ghazvininejad et al., 2019).

    The length head (``model.predict_length_logits``) gives the number ``L`` (at least 1) of decoder
    positions: its ``length_beam`` most likely lengths are all decoded and the candidate with the
    best mean token log-probability wins. The decoder reads ``L`` copies of ``mask_id`` (longer rows
    of the batch padded and hidden by ``tgt_padding_mask``) without a causal mask and every position
    takes its argmax (pad and the mask token are never predicted). For ``iterations = T > 1``,
    iteration ``i = 1 .. T-1`` re-masks the ``n = floor(L * (T - i) / T)`` least confident tokens,
    re-predicts them in one parallel pass and updates their tokens and probabilities (the others
    keep theirs).

    Either target convention works: ``L`` counting the target's final EOS (the model predicts
    ``w1 .. EOS``) or not (``w1 .. wL``). With ``append_eos`` (default) each row keeps its tokens up
    to its first EOS and gets EOS appended if it has none, so rows read ``w1 .. wn EOS pad ..`` like
    the autoregressive outputs; without it the ``L`` raw predictions are returned, then pad.

    Returns ``[B, T]`` tokens; with ``return_scores`` also the mean log-probability ``[B]`` of each
    candidate's ``L`` tokens (the confidence that mask-predict tracks and that picks the length).
    """
    if iterations < 1 or length_beam < 1:
        raise ValueError(f"need iterations >= 1 and length_beam >= 1, got {iterations}, {length_beam}")
    batch = src.shape[0]
    memory = model.encode(src, src_padding_mask)
    lengths = _length_candidates(model, memory, src_padding_mask, length_beam)  # [B * beam]
    beam = lengths.numel() // batch if batch else 1
    predict = _MaskPredictor(model, memory, src_padding_mask, src, lengths=lengths, beam=beam, mask_id=mask_id,
                             eos_id=eos_id, pad_id=pad_id)
    tokens, confidence = predict(predict.all_masked())
    for i in range(1, iterations):
        remask = predict.least_confident(confidence, iterations - i, iterations)
        if remask is None:
            break
        new_tokens, new_confidence = predict(tokens.masked_fill(remask, mask_id))
        tokens = torch.where(remask, new_tokens, tokens)
        confidence = torch.where(remask, new_confidence, confidence)
    tokens = tokens.masked_fill(predict.padding, pad_id)
    score = confidence.masked_fill(predict.padding, 0.0).sum(1) / lengths.float()  # mean log-prob [N]
    pick = torch.arange(batch, device=src.device) * beam + score.view(batch, beam).argmax(1)
    tokens, lengths, score = tokens[pick], lengths[pick], score[pick]
    if batch == 0:
        out = tokens[:, :0]
    elif append_eos:
        out = _end_with_eos(tokens, lengths, eos_id, pad_id)
    else:
        out = tokens[:, : int(lengths.max())]
    return (out, score) if return_scores else out


def _length_candidates(model: Any, memory: Tensor, memory_padding_mask: Tensor | None, length_beam: int) -> Tensor:
    """The ``length_beam`` most likely target lengths (1 .. the position table) of each sentence,
    ``[B * beam]``, a sentence's candidates consecutive."""
    length_logits = model.predict_length_logits(memory, memory_padding_mask)[:, 1:]  # lengths 1..M
    limit = _position_limit(model)
    if limit is not None:
        length_logits = length_logits[:, :limit]
    beam = min(length_beam, length_logits.shape[1])
    return (length_logits.topk(beam, dim=1).indices + 1).view(-1)


class _MaskPredictor:
    """One parallel decoder pass over ``N`` candidate rows (a sentence's length candidates share its
    source): every position's most likely token and its log-prob, pad and the mask token banned."""

    def __init__(self, model: Any, memory: Tensor, memory_padding_mask: Tensor | None, src: Tensor, *,
                 lengths: Tensor, beam: int, mask_id: int, eos_id: int, pad_id: int) -> None:
        rows = torch.arange(src.shape[0], device=src.device).repeat_interleave(beam)
        self.model, self.memory, self.src = model, memory.index_select(0, rows), src.index_select(0, rows)
        self.mask = None if memory_padding_mask is None else memory_padding_mask.index_select(0, rows)
        self.lengths, self.mask_id, self.pad_id = lengths, mask_id, pad_id
        self.banned = sorted({pad_id, mask_id} - {eos_id})
        width = int(lengths.max()) if lengths.numel() else 1
        self.positions = torch.arange(width, device=src.device)[None, :]
        self.padding = self.positions >= lengths[:, None]  # [N, W]

    def all_masked(self) -> Tensor:
        """``[N, W]``: the mask token at every position of each candidate's length, pad after."""
        return torch.full(self.padding.shape, self.mask_id, dtype=torch.long, device=self.padding.device)

    def __call__(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder input ``[N, W]`` -> predicted tokens and their log-probs ``[N, W]``."""
        tokens = tokens.masked_fill(self.padding, self.pad_id)
        log_probs, _ = self.model.target_log_probs(tokens, self.memory, self.mask, self.src, tgt_padding_mask=self.padding,
                                         causal=False)
        log_probs = at_least_float32(log_probs).clone()
        for banned in self.banned:
            if 0 <= banned < log_probs.shape[-1]:
                log_probs[..., banned] = float("-inf")
        best, token = log_probs.max(-1)
        return token, best

    def least_confident(self, confidence: Tensor, remaining: int, iterations: int) -> Tensor | None:
        """Bool ``[N, W]``: each row's ``floor(L * remaining / iterations)`` least confident tokens
        (None when that is 0 for every row)."""
        n = torch.div(self.lengths * remaining, iterations, rounding_mode="floor")  # [N]
        if not bool((n > 0).any()):
            return None
        ranked = confidence.masked_fill(self.padding, float("inf")).argsort(dim=1)  # least confident first
        return torch.zeros_like(self.padding).scatter(1, ranked, self.positions < n[:, None])


def _end_with_eos(tokens: Tensor, lengths: Tensor, eos_id: int, pad_id: int) -> Tensor:
    """Rows ``w1 .. wn EOS pad ..``: each row's tokens up to its first EOS within its length ``L``,
    EOS appended after ``L`` tokens when it has none. ``tokens`` ``[B, W]``, ``lengths`` ``[B]``."""
    batch, device = tokens.shape[0], tokens.device
    out = torch.full((batch, int(lengths.max()) + 1), pad_id, dtype=torch.long, device=device)
    out[:, : out.shape[1] - 1] = tokens[:, : out.shape[1] - 1]
    position = torch.arange(out.shape[1], device=device)[None, :]
    is_eos = (out == eos_id) & (position < lengths[:, None])
    end = torch.where(is_eos.any(1), is_eos.long().argmax(1), lengths)  # first EOS, else after L
    out[torch.arange(batch, device=device), end] = eos_id
    return out.masked_fill(position > end[:, None], pad_id)[:, : int(end.max()) + 1]


# dispatcher ---------------------------------------------------------------------------------------
STRATEGIES: dict[str, Callable[..., Any]] = {
    "greedy": greedy_decode,
    "beam": beam_search,
    "sample": sample_decode,
    "nat": nat_decode,
}
_FIXED = {"model", "src", "src_padding_mask", "bos_id", "eos_id", "pad_id", "mask_id"}


def _settings_of(fn: Callable[..., Any]) -> set[str]:
    return set(inspect.signature(fn).parameters) - _FIXED


def check_settings(settings: Mapping[str, Any], where: str = "decoding settings") -> None:
    """Raise ``ValueError`` for an unknown ``strategy`` or a key no strategy takes (a typo), so a
    config can be checked before training rather than when the first generation runs."""
    strategy = settings.get("strategy", "greedy")
    if strategy not in STRATEGIES:
        raise ValueError(f"{where}: unknown decoding strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    known = set().union(*(_settings_of(fn) for fn in STRATEGIES.values()))
    unknown = sorted(set(settings) - known - {"strategy"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


def generate(
    model: Any,
    strategy: str | Tensor,
    src: Tensor | None = None,
    src_padding_mask: Tensor | None = None,
    /,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    mask_id: int | None = None,
    settings: Mapping[str, Any] | None = None,
    **options: Any,
) -> Tensor:
    """Run a strategy (greedy | beam | sample | nat) from plain settings; returns ``[B, T]`` tokens.

    Two call forms:

    - ``generate(model, "beam", src, src_padding_mask, bos_id=.., eos_id=.., pad_id=..,
      settings={"beam_size": 4})``
    - ``generate(model, src, src_padding_mask, bos_id=.., eos_id=.., pad_id=.., mask_id=..,
      **config)`` with ``config = {"strategy": "beam", "beam_size": 4, ...}`` (as ``TranslationTask``
      calls it; ``strategy`` defaults to greedy).

    ``settings`` and the extra keyword ``options`` (which win) are the strategy's keyword arguments.
    A config may keep the knobs of every strategy in one dict: keys that belong to another strategy
    are ignored, unknown keys raise ``ValueError`` (typos), and a ``strategy`` key must agree with a
    positional strategy. Output: no BOS, each row ``w1 .. wn EOS pad ..``; beam search gives each
    sentence's best hypothesis; ``nat`` needs ``mask_id``.
    """
    merged = {**dict(settings or {}), **options}
    if isinstance(strategy, Tensor):  # second form: generate(model, src, src_padding_mask, ...)
        strategy, src, src_padding_mask = merged.pop("strategy", "greedy"), strategy, src
    elif merged.get("strategy", strategy) != strategy:
        raise ValueError(f"settings name strategy {merged['strategy']!r} but {strategy!r} was asked for")
    merged.pop("strategy", None)
    if src is None:
        raise TypeError("generate() needs the source tokens")
    check_settings({"strategy": strategy, **merged})
    fn = STRATEGIES[strategy]
    kwargs = {key: value for key, value in merged.items() if key in _settings_of(fn)}
    if strategy == "nat":
        if mask_id is None:
            raise ValueError("strategy 'nat' needs mask_id")
        kwargs.pop("return_scores", None)
        return nat_decode(model, src, src_padding_mask, mask_id=mask_id, eos_id=eos_id, pad_id=pad_id, **kwargs)
    out = fn(model, src, src_padding_mask, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, **kwargs)
    if strategy == "beam":
        best = [hyps[0][0] if hyps else torch.tensor([eos_id], device=src.device) for hyps in out]
        return pad_hypotheses(best, pad_id, src.device)
    return out
