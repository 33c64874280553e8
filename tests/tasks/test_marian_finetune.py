"""experiment=marian_finetune through train.py with a random Marian source written by the test: the
data is tokenised with the model's SentencePiece vocabulary, and the checkpoint translates after the
source is gone."""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("transformers")  # the .[hub] extra
pytest.importorskip("sentencepiece")

from modules.marian_vocab import MarianVocab  # noqa: E402
from tasks.translation import TranslationTask  # noqa: E402
from tests.marian_source import multi30k_lines, write_marian_source  # noqa: E402
from train import train  # noqa: E402


@pytest.fixture
def corpus(tmp_path):
    """(Marian source folder, train prefix, val prefix): de -> en Multi30k lines as plain files."""
    source = tmp_path / "opus-mt-tiny"
    write_marian_source(source, seed=3)
    for split, start, n in (("train", 3000, 48), ("val", 4000, 12)):
        for lang in ("de", "en"):
            (tmp_path / f"{split}.{lang}").write_text("\n".join(multi30k_lines(lang, n, start)) + "\n", encoding="utf-8")
    return source, tmp_path / "train", tmp_path / "val"


def recipe(make_cfg, corpus, *extra):
    source, train_prefix, val_prefix = corpus
    return make_cfg("experiment=marian_finetune", "trainer=cpu", f"model.init_from={source}",
                    f"data.train_prefix={train_prefix}", f"data.val_prefix={val_prefix}", "data.max_tokens=256",
                    "decoding.max_len_b=4", "decoding.max_len_a=0.5", *extra, tiny=False)


@pytest.mark.slow
def test_recipe_composes_and_runs_fast_dev_run(make_cfg, corpus):
    cfg = recipe(make_cfg, corpus, "trainer.fast_dev_run=true", "logger=none")
    assert cfg.data.tokenizer == cfg.model.init_from == str(corpus[0])  # the model's own vocabulary
    assert cfg.task.lr == 3e-5 and cfg.task.label_smoothing == 0.1 and cfg.task.warmup_steps == 500
    assert cfg.task.decoding.beam_size == 5 and cfg.task.decoding.validation.strategy == "greedy"
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert {"val/BLEU", "test/BLEU"} <= set(metrics)


@pytest.mark.slow
def test_checkpoint_keeps_architecture_and_tokenizer_without_the_source(make_cfg, corpus, tmp_path):
    cfg = recipe(make_cfg, corpus, "logger=none", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                 "trainer.limit_val_batches=1", "test=false")
    train(cfg)
    source = corpus[0]
    vocab = MarianVocab.from_folder(source)
    sentence = "Ein Mann in einem blauen Hemd spielt Gitarre."
    shutil.rmtree(source)  # the checkpoint must not need it again
    path = tmp_path / "outputs" / "detection" / "run1" / "checkpoints" / "last.ckpt"
    hparams = torch.load(path, weights_only=True)["hyper_parameters"]
    assert hparams["model"]["init_from"] is None and hparams["model"]["activation"] == "silu"
    assert hparams["data_info"]["tokenizer"]["kind"] == "marian-sentencepiece"
    task = TranslationTask.load_from_checkpoint(path, weights_only=True)
    assert task.source_ids(sentence) == vocab.encode_source(sentence)
    assert task.bos_id == task.pad_id == vocab.pad_id and task.eos_id == vocab.eos_id == 0
    assert task.model.settings["position_layout"] == "halves" and not task.model.settings["final_norm"]
    out = task.translate([sentence, "Zwei Hunde spielen im Schnee."])
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
