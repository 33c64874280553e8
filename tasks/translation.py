"""Machine translation on the shared Transformer: teacher forcing, label smoothing, BLEU, decoding suite."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.text import SacreBLEUScore

from modules.decoding import check_settings, generate
from modules.marian_vocab import MarianVocab
from modules.translation import TranslationModel, guided_attention_loss, label_smoothed_nll, shift_right

from .base import BaseTask


def tokenizer_from_json(text: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(text)


def tokenizer_from_info(data_info: dict):
    """The tokenizer a data module stored in ``data_info``: a pretrained model's (``tokenizer``, Marian
    SentencePiece) or our BPE (``tokenizer_json``); None without either."""
    if "tokenizer" in data_info:
        return MarianVocab.from_info(data_info["tokenizer"])
    return tokenizer_from_json(data_info["tokenizer_json"]) if "tokenizer_json" in data_info else None


def decoding_settings(decoding: dict | None, mode: str) -> tuple[dict, dict]:
    """``(settings, validation overrides)`` from the ``decoding`` config group, checked now (a typo
    fails when the task is built, not after training). ``mode=nat`` decodes with strategy ``nat``."""
    settings = dict(decoding or {"strategy": "greedy"})
    validation = dict(settings.pop("validation", None) or {})
    if mode == "nat":
        if settings.get("strategy", "nat") not in ("nat", "greedy") or validation.get("strategy", "nat") != "nat":
            raise ValueError("task.mode=nat decodes with decoding.strategy=nat; "
                             f"got {settings.get('strategy')!r} / validation {validation.get('strategy')!r}")
        settings["strategy"] = "nat"
    check_settings(settings, "decoding")
    check_settings({**settings, **validation}, "decoding.validation")
    return settings, validation


class TranslationTask(BaseTask):
    """Seq2seq translation.

    Args:
        model: the ``model`` config group: :class:`modules.translation.TranslationModel` arguments.
        data_info: from the data module: vocab_size (and ``tgt_vocab_size`` for separate vocabularies),
            special ids and the tokenizer (``tokenizer_json``, or ``tokenizer`` for a pretrained model's).
    With ``model.init_from`` (a pretrained model, :class:`modules.translation.TranslationModel`), the
    saved hyper-parameters get the architecture the source stated and no ``init_from``: a checkpoint
    rebuilds the model without the source.
        label_smoothing: epsilon of the label-smoothed cross entropy.
        scheduled_sampling_max_prob: scheduled sampling against exposure bias (two-pass variant): the
            probability of feeding the model's own prediction instead of the gold token rises
            linearly from 0 to this value over ``scheduled_sampling_ramp_steps`` (0 = off).
        guided_attention_weight, guided_attention_sigma: weight of the loss that pushes the last
            decoder layer's cross-attention toward a monotonic (diagonal) alignment (0 = off).
        nat_length_weight: weight of the target-length loss in the non-autoregressive mode.
        num_samples: source / reference / hypothesis rows logged each validation.
        mode: "autoregressive" or "nat" (non-autoregressive: the length predicted from the encoder,
            mask-predict decoding).
        decoding: the ``decoding`` config group: settings of :func:`modules.decoding.generate` (strategy
            greedy|beam|sample|nat, beam_size, ...) for the test split, ``eval.py`` and ``predict.py``,
            plus ``validation``: settings laid over them for validation during training (e.g.
            ``{strategy: greedy}`` under a beam-5 test).
        transformer: an existing transformer for the model to use instead of building its own (the
            multitask run passes its view of the shared one; the model config's transformer sizes are
            then not used).
    """

    task_name = "translation"
    positions_at_every_layer = False  # DETR-style positions in every layer (else once at the input)

    def __init__(
        self,
        *,
        model: dict,
        data_info: dict,
        transformer: nn.Module | None = None,
        mode: str = "autoregressive",
        decoding: dict | None = None,
        label_smoothing: float = 0.1,
        scheduled_sampling_max_prob: float = 0.0,
        scheduled_sampling_ramp_steps: int = 10000,
        guided_attention_weight: float = 0.0,
        guided_attention_sigma: float = 0.2,
        nat_length_weight: float = 0.1,
        num_samples: int = 8,
        **optim,
    ) -> None:
        super().__init__(**optim)
        self.save_hyperparameters(ignore=["transformer"])
        if mode not in ("autoregressive", "nat"):
            raise ValueError(f"task.mode must be 'autoregressive' or 'nat', got {mode!r}")
        self.mode = mode
        self.decoding, self.val_decoding = decoding_settings(decoding, mode)
        self.data_info = data_info
        self.pad_id, self.bos_id, self.eos_id = data_info["pad_id"], data_info["bos_id"], data_info["eos_id"]
        self.mask_id = data_info.get("mask_id", data_info.get("unk_id", 3))
        sizes = {"vocab_size": data_info["vocab_size"], "pad_id": self.pad_id}
        if data_info.get("tgt_vocab_size") is not None:
            sizes["tgt_vocab_size"] = data_info["tgt_vocab_size"]
        self.model = TranslationModel(**sizes, transformer=transformer, **model)
        if model.get("init_from") is not None:  # read once: the checkpoint keeps what the source stated
            settings = {k: v for k, v in self.model.settings.items() if k not in sizes}
            self.hparams["model"] = {**self.hparams["model"], **settings, "init_from": None}
            self.hparams["data_info"] = {**data_info, **{k: self.model.settings[k] for k in sizes}}
        self.tokenizer = tokenizer_from_info(data_info)
        self.label_smoothing = label_smoothing
        self.scheduled_sampling_max_prob = scheduled_sampling_max_prob
        self.scheduled_sampling_ramp_steps = scheduled_sampling_ramp_steps
        self.guided_attention_weight, self.guided_attention_sigma = guided_attention_weight, guided_attention_sigma
        self.nat_length_weight, self.num_samples = nat_length_weight, num_samples
        self.val_bleu, self.test_bleu = SacreBLEUScore(tokenize="13a"), SacreBLEUScore(tokenize="13a")
        self.val_nll, self.test_nll = MeanMetric(), MeanMetric()  # token-weighted: perplexity per target token
        self._samples: list[list[str]] = []

    # training -------------------------------------------------------------------------------------
    def scheduled_sampling_prob(self) -> float:
        if self.scheduled_sampling_max_prob <= 0:
            return 0.0
        return self.scheduled_sampling_max_prob * min(1.0, self.global_step / max(self.scheduled_sampling_ramp_steps, 1))

    def _mix_in_predictions(self, batch: dict, tgt_in: Tensor, prob: float) -> Tensor:
        """Two-pass scheduled sampling: a teacher-forced pass without gradient predicts every
        position; each gold decoder input (after BOS) is replaced by the prediction for that position
        with probability ``prob``."""
        with torch.no_grad():
            out = self.model(batch["src"], batch["src_padding_mask"], tgt_in, None)
            predicted = out["log_probs"].argmax(-1)  # prediction for position t+1 given gold prefix
        replace = torch.rand(tgt_in.shape, device=tgt_in.device) < prob
        replace[:, 0] = False  # keep BOS
        replace &= tgt_in != self.pad_id
        mixed = tgt_in.clone()
        mixed[:, 1:] = torch.where(replace[:, 1:], predicted[:, :-1], tgt_in[:, 1:])
        return mixed

    def _nat_inputs(self, labels: Tensor, label_pad: Tensor,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Conditional masked LM inputs: a random number (1..L) of target tokens replaced by <mask>.
        Returns the decoder input and the positions the loss is computed on (the masked ones: the
        others are visible in the input, and predicting them is copying)."""
        lengths = (~label_pad).sum(1)
        scores = torch.rand(labels.shape, device=labels.device, generator=generator).masked_fill(label_pad, 2.0)
        n_mask = (torch.rand(lengths.shape, device=labels.device, generator=generator) * lengths).long() + 1
        n_mask = torch.minimum(n_mask, lengths)
        order = scores.argsort(1).argsort(1)  # rank of each position's score
        masked = order < n_mask[:, None]
        inputs = labels.masked_fill(masked, self.mask_id).masked_fill(label_pad, self.pad_id)
        return inputs, masked

    def _losses(self, batch: dict, train: bool) -> dict[str, Tensor]:
        src, src_mask, tgt, tgt_mask = batch["src"], batch["src_padding_mask"], batch["tgt"], batch["tgt_padding_mask"]
        tgt_in, labels = shift_right(tgt)
        in_mask, label_pad = tgt_mask[:, :-1], tgt_mask[:, 1:]
        need_attn = self.guided_attention_weight > 0
        losses: dict[str, Tensor] = {}
        if self.mode == "nat":
            # evaluation masks with a fixed seed: the same positions every epoch, the global RNG untouched
            generator = None if train else torch.Generator(labels.device).manual_seed(0)
            nat_in, masked = self._nat_inputs(labels, label_pad, generator)
            memory = self.model.encode(src, src_mask)
            log_probs, attn = self.model.target_log_probs(nat_in, memory, src_mask, src, label_pad, causal=False,
                                                need_attn=need_attn)
            target = labels.masked_fill(~masked, self.pad_id)  # loss and perplexity: masked positions only
            loss, nll = label_smoothed_nll(log_probs, target, self.label_smoothing, self.pad_id)
            losses["scored_tokens"] = masked.sum()
            length_logits = self.model.predict_length_logits(memory, src_mask)
            lengths = (~label_pad).sum(1).clamp_max(self.model.max_length)
            losses["length"] = torch.nn.functional.cross_entropy(length_logits, lengths)
            loss = loss + self.nat_length_weight * losses["length"]
            attn_mask = label_pad
        else:
            prob = self.scheduled_sampling_prob() if train else 0.0
            if prob > 0:
                tgt_in = self._mix_in_predictions(batch, tgt_in, prob)
            # No target padding mask: under the causal mask a real position never sees the padding
            # after it, and padded positions are not scored (``select``), so SDPA's causal fast path
            # applies and the vocabulary projection runs on real tokens only.
            keep = ~label_pad
            out = self.model(src, src_mask, tgt_in, None, need_attn=need_attn, select=keep, output="hidden")
            attn = out.get("cross_attn")
            loss, nll = self.model.sequence_loss(out, labels[keep], self.label_smoothing, self.pad_id)
            attn_mask = in_mask
            losses["scored_tokens"] = keep.sum()
            if train and self.scheduled_sampling_max_prob > 0:
                losses["scheduled_sampling_prob"] = torch.tensor(prob)
        if need_attn:
            losses["guided_attention"] = guided_attention_loss(attn, attn_mask, src_mask, self.guided_attention_sigma)
            loss = loss + self.guided_attention_weight * losses["guided_attention"]
        losses["loss"], losses["nll"] = loss, nll
        return losses

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses = self._losses(batch, train=True)
        loss = losses["loss"]
        self.check_finite(loss)
        bs = batch["src"].shape[0]
        ntok = (~batch["tgt_padding_mask"][:, 1:]).sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/ppl", torch.exp(losses["nll"].detach().clamp_max(50)), batch_size=bs)
        self.log("train/tokens", ntok.float(), reduce_fx="sum", batch_size=bs)
        for k, v in losses.items():
            if k not in ("loss", "nll", "scored_tokens"):
                self.log(f"train/{k}", v, batch_size=bs)
        return loss

    # evaluation -----------------------------------------------------------------------------------
    def translate_ids(self, src: Tensor, src_padding_mask: Tensor, **overrides) -> list[list[int]]:
        """Decode a batch with the configured strategy; returns token ids without specials."""
        settings = {**self.decoding, **overrides}
        out = generate(
            self.model, src, src_padding_mask, bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id,
            mask_id=self.mask_id, **settings,
        )
        special = {self.pad_id, self.bos_id, self.eos_id}
        result = []
        for row in out:
            ids = []
            for t in row.tolist():
                if t == self.eos_id:
                    break
                if t not in special:
                    ids.append(t)
            result.append(ids)
        return result

    def translate(self, sentences: list[str], **overrides) -> list[str]:
        """Translate raw sentences with the tokenizer stored in the checkpoint."""
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer (data_info['tokenizer_json'])")
        # the tokenizer carries the data's whitespace/unicode normaliser, so raw text goes in as is
        ids = [self.source_ids(s) + [self.eos_id] for s in sentences]
        width = max(len(x) for x in ids)
        src = torch.full((len(ids), width), self.pad_id, dtype=torch.long, device=self.device)
        for i, x in enumerate(ids):
            src[i, : len(x)] = torch.tensor(x)
        self.eval()
        with torch.inference_mode():
            out = self.translate_ids(src, src == self.pad_id, **overrides)
        return [self.tokenizer.decode(x) for x in out]

    def source_ids(self, sentence: str) -> list[int]:
        """Token ids of a raw source sentence (the checkpoint's tokenizer; no EOS)."""
        if isinstance(self.tokenizer, MarianVocab):
            return self.tokenizer.encode_source(sentence)
        return self.tokenizer.encode(sentence, add_special_tokens=False).ids

    def split_decoding(self, split: str, overrides: dict | None = None) -> dict:
        """The decoding settings laid over ``self.decoding`` for ``split``: validation's own
        (``decoding.validation``) on "val", then ``overrides``."""
        return {**(self.val_decoding if split == "val" else {}), **(overrides or {})}

    def hypotheses(self, batch: dict, split: str = "val") -> list[str]:
        """Detokenised translations of a batch, decoded as ``split`` ("val" or "test") is."""
        out = self.translate_ids(batch["src"], batch["src_padding_mask"], **self.split_decoding(split))
        return [self.tokenizer.decode(x) if self.tokenizer else " ".join(map(str, x)) for x in out]

    def _eval_step(self, batch: dict, metric: SacreBLEUScore, prefix: str) -> None:
        losses = self._losses(batch, train=False)
        bs = batch["src"].shape[0]
        self.log(f"{prefix}/loss", losses["loss"], batch_size=bs, sync_dist=True)
        # perplexity per scored token (NAT: the masked ones)
        (self.val_nll if prefix == "val" else self.test_nll).update(losses["nll"].detach(), losses["scored_tokens"])
        hyps = self.hypotheses(batch, prefix)
        refs = list(batch["tgt_text"])
        metric.update(hyps, [[r] for r in refs])
        if prefix == "val" and len(self._samples) < self.num_samples:
            for s, r, h in zip(batch["src_text"], refs, hyps):
                if len(self._samples) < self.num_samples:
                    self._samples.append([s, r, h])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_bleu, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_bleu, "test")

    def _log_epoch(self, metric: SacreBLEUScore, nll: MeanMetric, prefix: str) -> None:
        self.log(f"{prefix}/BLEU", metric.compute() * 100, prog_bar=True)
        self.log(f"{prefix}/ppl", torch.exp(nll.compute().clamp_max(50)), prog_bar=True)
        metric.reset()
        nll.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch(self.val_bleu, self.val_nll, "val")
        if self._samples:
            samples = self._samples
            self.log_samples_table("val/samples", ["source", "reference", "hypothesis"], lambda: samples)
        self._samples = []

    def on_test_epoch_end(self) -> None:
        self._log_epoch(self.test_bleu, self.test_nll, "test")

