"""TranslationTask end to end on the shipped Multi30k (first few pairs), tiny model, CPU."""

from __future__ import annotations

import math

import pytest
import sacrebleu
import torch
from torchmetrics.text import SacreBLEUScore

from tasks.translation import TranslationTask
from train import train

TINY = [
    "task=translation",
    "model.d_model=32",
    "model.nhead=4",
    "model.num_encoder_layers=1",
    "model.num_decoder_layers=1",
    "model.dim_feedforward=64",
    "model.max_length=64",
    "data.vocab_size=400",
    "data.max_train_examples=48",
    "data.max_eval_examples=16",
    "data.max_tokens=512",
    "decoding.max_len_b=5",
    "decoding.max_len_a=0.5",
]


@pytest.mark.slow
def test_fast_dev_run_translation(make_cfg):
    metrics = train(make_cfg(*TINY, "trainer.fast_dev_run=true", "logger=csv", tiny=False))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert {"val/BLEU", "val/ppl", "test/BLEU", "test/ppl"} <= set(metrics)


@pytest.mark.slow
def test_translation_variants_run(make_cfg):
    """Each optional technique trains and evaluates: NAT + mask-predict, copy + guided attention +
    scheduled sampling, beam search, sampling."""
    for extra in (
        ["task.mode=nat", "decoding.iterations=2"],
        ["model.copy=true", "task.guided_attention_weight=0.5", "task.scheduled_sampling_max_prob=0.5",
         "task.scheduled_sampling_ramp_steps=1", "decoding.strategy=beam", "decoding.beam_size=3"],
        ["decoding.strategy=sample", "decoding.top_p=0.9", "decoding.top_k=5"],
    ):
        metrics = train(make_cfg(*TINY, *extra, "trainer.fast_dev_run=2", "logger=none", "test=false", tiny=False))
        assert torch.isfinite(torch.tensor(metrics["train/loss"])), extra


@pytest.mark.slow
def test_checkpoint_translates_without_the_data_module(make_cfg, tmp_path):
    cfg = make_cfg(*TINY, "logger=none", "trainer.max_epochs=1", "trainer.limit_val_batches=1", "test=false",
                   tiny=False)
    train(cfg)
    path = tmp_path / "outputs" / "detection" / "run1" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["mtdetr"]["task"] == "translation" and "tokenizer_json" in ckpt["hyper_parameters"]["data_info"]
    task = TranslationTask.load_from_checkpoint(path, weights_only=True)
    out = task.translate(["A man\u00a0in a  blue shirt.", "Two dogs play."])
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    beam = task.translate(["A man in a blue shirt."], strategy="beam", beam_size=2)
    assert len(beam) == 1


def test_scheduled_sampling_mixes_predictions_at_the_scheduled_rate(make_cfg):
    task = TranslationTask(
        model={"d_model": 16, "nhead": 2, "num_encoder_layers": 1, "num_decoder_layers": 1,
               "dim_feedforward": 32, "dropout": 0.0},
        data_info={"vocab_size": 50, "pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3, "mask_id": 4},
        scheduled_sampling_max_prob=0.5, scheduled_sampling_ramp_steps=100,
    )
    assert task.scheduled_sampling_prob() == 0.0  # global_step 0: pure teacher forcing
    g = torch.Generator().manual_seed(0)
    tgt = torch.randint(5, 50, (64, 12), generator=g)
    tgt[:, 0] = 1
    batch = {"src": torch.randint(5, 50, (64, 10), generator=g), "src_padding_mask": torch.zeros(64, 10, dtype=torch.bool),
             "tgt": tgt, "tgt_padding_mask": torch.zeros(64, 12, dtype=torch.bool)}
    tgt_in = tgt[:, :-1]
    torch.manual_seed(0)
    mixed = task._mix_in_predictions(batch, tgt_in, 0.5)
    assert torch.equal(mixed[:, 0], tgt_in[:, 0])
    changed = (mixed[:, 1:] != tgt_in[:, 1:]).float().mean().item()
    assert 0.3 < changed < 0.6  # about half replaced (a replacement may coincide with the gold token)
    assert torch.equal(task._mix_in_predictions(batch, tgt_in, 0.0), tgt_in)


def test_nat_validation_scores_only_the_masked_positions():
    """NAT validation loss and perplexity count the positions that were <mask> in the decoder input,
    not the visible ones (predicting those is copying). The model's answers at the visible positions
    are replaced by nonsense: the loss, the perplexity and their token count must not move."""
    info = {"vocab_size": 50, "pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3, "mask_id": 4}
    torch.manual_seed(0)
    task = TranslationTask(model={"d_model": 16, "nhead": 2, "num_encoder_layers": 1, "num_decoder_layers": 1,
                                  "dim_feedforward": 32, "dropout": 0.0}, data_info=info, mode="nat").eval()
    g = torch.Generator().manual_seed(1)
    tgt = torch.randint(5, 50, (6, 10), generator=g)
    tgt[:, 0], tgt_pad = 1, torch.arange(10)[None] >= torch.tensor([10, 9, 7, 10, 4, 8])[:, None]
    batch = {"src": torch.randint(5, 50, (6, 9), generator=g), "src_padding_mask": torch.zeros(6, 9, dtype=torch.bool),
             "tgt": tgt.masked_fill(tgt_pad, 0), "tgt_padding_mask": tgt_pad}
    decode, inputs = task.model.target_log_probs, []

    def recorded(perturb):
        def run(tgt_in, *args, **kwargs):
            log_probs, attn = decode(tgt_in, *args, **kwargs)
            inputs.append(tgt_in)
            visible = (tgt_in != info["mask_id"])[..., None] & perturb
            return log_probs.masked_fill(visible, math.log(1 / 50)), attn  # uniform where the token was visible
        return run

    with torch.no_grad():
        task.model.target_log_probs = recorded(False)
        honest = task._losses(batch, train=False)
        task.model.target_log_probs = recorded(True)
        perturbed = task._losses(batch, train=False)
    assert torch.equal(inputs[0], inputs[1])  # the same positions masked in both calls
    masked = inputs[0] == info["mask_id"]
    assert 0 < masked.sum() < (~tgt_pad[:, 1:]).sum()  # some visible tokens: the check can fail
    torch.testing.assert_close(perturbed["nll"], honest["nll"], rtol=1e-6, atol=0)
    torch.testing.assert_close(perturbed["loss"], honest["loss"], rtol=1e-6, atol=0)
    assert honest["scored_tokens"] == masked.sum() == perturbed["scored_tokens"]  # the perplexity's weight
    task.model.target_log_probs = decode
    with torch.no_grad():  # evaluation masks the same positions each time
        assert torch.equal(task._losses(batch, train=False)["nll"], honest["nll"])


def test_bleu_metric_matches_sacrebleu():
    hyps = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest."]
    refs = ["Ein Mann fährt ein Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest ein Buch."]
    metric = SacreBLEUScore(tokenize="13a")
    metric.update(hyps, [[r] for r in refs])
    expected = sacrebleu.corpus_bleu(hyps, [refs]).score
    assert abs(float(metric.compute()) * 100 - expected) < 1e-3


@pytest.mark.slow
def test_translation_resume_is_exact(make_cfg, tmp_path):
    """Token-bucket order, dropout RNG, AdamW and inverse-sqrt schedule survive a resume at an epoch end."""
    common = [*TINY, "model.dropout=0.1", "logger=none", "test=false", "trainer.limit_val_batches=1",
              "trainer.precision=32-true", "decoding.max_len_b=2", "decoding.max_len_a=0"]
    out = tmp_path / "outputs" / "detection"  # make_cfg's folder name; the task here is translation
    train(make_cfg(*common, "trainer.max_epochs=2", run="straight", tiny=False))
    train(make_cfg(*common, "trainer.max_epochs=1", run="half", tiny=False))
    train(make_cfg(*common, "trainer.max_epochs=2", f"ckpt_path={out / 'half/checkpoints/last.ckpt'}",
                   run="resumed", tiny=False))
    a = torch.load(out / "straight/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(out / "resumed/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] > 2
    diff = max((a["state_dict"][k].float() - b["state_dict"][k].float()).abs().max().item() for k in a["state_dict"])
    assert diff <= 1e-6


def test_validation_decoding_applies_to_validation_only():
    """``decoding`` is how the test split (and eval.py / predict.py) decodes; ``decoding.validation`` lays
    its settings over it for validation only. Bad settings fail when the task is built, not after training."""
    model = {"d_model": 16, "nhead": 2, "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 32,
             "dropout": 0.0}
    info = {"vocab_size": 50, "pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3, "mask_id": 4}
    decoding = {"strategy": "beam", "beam_size": 3, "max_len_a": 0.0, "max_len_b": 2,
                "validation": {"strategy": "greedy", "max_len_b": 6}}
    torch.manual_seed(0)
    task = TranslationTask(model=model, data_info=info, decoding=decoding)
    task.eval()
    src = torch.randint(5, 50, (4, 7))
    batch = {"src": src, "src_padding_mask": torch.zeros_like(src, dtype=torch.bool)}
    with torch.inference_mode():
        val, test = task.hypotheses(batch, "val"), task.hypotheses(batch, "test")
        greedy = task.translate_ids(src, batch["src_padding_mask"], strategy="greedy", max_len_b=6)
        beam = task.translate_ids(src, batch["src_padding_mask"])
    assert val == [" ".join(map(str, x)) for x in greedy]
    assert test == [" ".join(map(str, x)) for x in beam]
    assert max(len(x) for x in greedy) > 2 >= max(len(x) for x in beam)  # the two settings really differ
    for bad, match in (({"validation": {"beam_szie": 5}}, r"decoding.validation: unknown key"),
                       ({"strategy": "viterbi"}, "unknown decoding strategy"),
                       ({"top_kk": 3}, r"decoding: unknown key")):
        with pytest.raises(ValueError, match=match):
            TranslationTask(model=model, data_info=info, decoding=bad)


@pytest.mark.slow
def test_bleu_recipe_composes_and_runs_on_cpu(make_cfg):
    """experiment=transformer_multi30k_gpu (the >= 35 BLEU recipe) with trainer=cpu, shrunk: its keys
    are accepted and it trains, validates and tests (beam 5 on the test split, greedy validation)."""
    cfg = make_cfg("experiment=transformer_multi30k_gpu", "trainer=cpu", *TINY[1:], "trainer.fast_dev_run=true",
                   "logger=none", tiny=False)
    assert cfg.task.scheduler == "cosine" and cfg.task.decoding.strategy == "beam"
    assert cfg.task.decoding.validation.strategy == "greedy"
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.max_epochs == 24
    metrics = train(cfg)
    assert {"val/BLEU", "test/BLEU"} <= set(metrics)
