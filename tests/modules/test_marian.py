"""A HuggingFace MarianMTModel (opus-mt's architecture) loaded into the shared Transformer computes
what HF computes: logits, greedy and beam search, tokenizer ids. No network: a random tiny model and
SentencePiece vocabularies trained on shipped Multi30k lines, written with ``save_pretrained``.

Precision: logits within 1e-4 absolute (fp32, eval mode; measured ~3e-6 with logits up to ~6).
Generation settings that make HF ``generate`` do what our decoders do: ``do_sample=False``,
``bad_words_ids=[[pad]]`` (opus-mt's generation config has it; ours never generates pad),
``max_new_tokens=N`` with ``forced_eos_token_id`` = EOS (ours: ``max_len_a=0, max_len_b=N``, EOS
forced as the N-th token), beam: ``num_beams=5, early_stopping=True, length_penalty=1.0`` (both
divide a finished hypothesis' log-prob sum by its length, EOS counted; both stop a sentence at 5
finished hypotheses). The one difference left: a hypothesis ended by the forced EOS adds 0 to its
score in HF and the model's own EOS log-prob in ours, so the beam test's model ends its sentences
before the limit (a raised EOS logits bias) and the test checks that they did.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")  # the .[hub] extra
pytest.importorskip("sentencepiece")

from modules.decoding import beam_search, greedy_decode  # noqa: E402
from modules.marian import MarianSource, marian_architecture  # noqa: E402
from modules.marian_vocab import MarianVocab  # noqa: E402
from modules.translation import TranslationModel  # noqa: E402
from tests.marian_source import multi30k_lines, write_marian_source  # noqa: E402

EOS = 0
MAX_NEW = 40


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(folder, HF model, HF tokenizer, sizes) of a random tiny shared-vocabulary Marian model."""
    from transformers import MarianTokenizer

    folder = tmp_path_factory.mktemp("marian")
    hf, sizes = write_marian_source(folder)
    return folder, hf, MarianTokenizer.from_pretrained(folder), sizes


def ours_from(folder, sizes) -> TranslationModel:
    return TranslationModel(vocab_size=sizes["vocab_size"], pad_id=sizes["pad"], init_from=str(folder), dropout=0.0).eval()


def src_batch(tokenizer, n=10, start=1000):
    enc = tokenizer(multi30k_lines("de", n, start), padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def cut(row: list[int]) -> list[int]:
    """Tokens up to and including the first EOS."""
    return row[: row.index(EOS) + 1] if EOS in row else row


@pytest.mark.slow
def test_tokenizer_ids_and_text_equal_marian_tokenizer(source):
    folder, _, tokenizer, _ = source
    vocab = MarianVocab.from_folder(folder)
    de, en = multi30k_lines("de", 60, 2000), multi30k_lines("en", 60, 2000)
    assert [vocab.encode_source(s) + [vocab.eos_id] for s in de] == tokenizer(de)["input_ids"]
    targets = tokenizer(text_target=en)["input_ids"]
    assert [vocab.encode_target(s) + [vocab.eos_id] for s in en] == targets
    assert any(vocab.unk_id in ids for ids in tokenizer(de)["input_ids"])  # pieces left out of vocab.json
    assert [vocab.decode(ids) for ids in targets] == [tokenizer.decode(ids, skip_special_tokens=True) for ids in targets]
    assert vocab.bos_id == vocab.pad_id == tokenizer.pad_token_id  # the decoder starts from pad
    again = MarianVocab.from_info(vocab.to_info())  # what a checkpoint stores: no folder needed
    assert [again.encode_source(s) for s in de] == [vocab.encode_source(s) for s in de]
    assert again.to_info() == vocab.to_info()


def test_architecture_comes_from_config_json(source):
    folder, hf, _, sizes = source
    settings = marian_architecture(hf.config.to_dict())
    assert settings["activation"] == "silu" and settings["position_layout"] == "halves"
    assert not settings["norm_first"] and not settings["final_norm"] and settings["logits_bias"]
    model = ours_from(folder, sizes)
    assert model.settings["d_model"] == 32 and model.settings["num_decoder_layers"] == 2
    assert isinstance(model.transformer.decoder_norm, torch.nn.Identity)


def test_logits_equal_hf(source):
    folder, hf, tokenizer, sizes = source
    model = ours_from(folder, sizes)
    de, en = multi30k_lines("de", 8, 1000), multi30k_lines("en", 8, 1000)
    enc = tokenizer(de, text_target=en, padding=True, return_tensors="pt")
    src, mask, labels = enc["input_ids"], enc["attention_mask"], enc["labels"]
    pad = sizes["pad"]
    tgt_in = torch.cat([torch.full((len(de), 1), pad), labels[:, :-1]], 1)  # decoder starts from pad
    with torch.no_grad():
        want = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt_in).logits
        got = model(src, mask == 0, tgt_in, None, output="logits")["logits"]
    real = torch.cat([torch.ones(len(de), 1, dtype=torch.bool), labels[:, :-1] != pad], 1)
    diff = (got - want)[real].abs().max().item()
    assert diff < 1e-4, f"max |logits diff| {diff:.2e}"
    assert want[real].abs().max() > 1  # not a degenerate comparison


def test_greedy_tokens_equal_hf_generate(source):
    folder, hf, tokenizer, sizes = source
    model, pad = ours_from(folder, sizes), sizes["pad"]
    src, mask = src_batch(tokenizer)
    want = hf.generate(input_ids=src, attention_mask=mask, num_beams=1, do_sample=False, max_new_tokens=MAX_NEW,
                       bad_words_ids=[[pad]], forced_eos_token_id=EOS)
    got = greedy_decode(model, src, mask == 0, bos_id=pad, eos_id=EOS, pad_id=pad, max_len_a=0, max_len_b=MAX_NEW)
    assert [cut(r) for r in got.tolist()] == [cut(r[1:]) for r in want.tolist()]
    lengths = {len(cut(r)) for r in got.tolist()}
    assert len(lengths) > 2 and MAX_NEW in lengths  # natural ends of several lengths, and the forced one


def test_beam5_best_hypothesis_equals_hf_generate(source):
    folder, hf, tokenizer, sizes = source
    model, pad = ours_from(folder, sizes), sizes["pad"]
    src, mask = src_batch(tokenizer)
    want = hf.generate(input_ids=src, attention_mask=mask, num_beams=5, do_sample=False, max_new_tokens=MAX_NEW,
                       bad_words_ids=[[pad]], forced_eos_token_id=EOS, length_penalty=1.0, early_stopping=True)
    got = beam_search(model, src, mask == 0, bos_id=pad, eos_id=EOS, pad_id=pad, beam_size=5, length_penalty=1.0, max_len_a=0,
                      max_len_b=MAX_NEW, early_stopping=True)
    want_rows = [cut(r[1:]) for r in want.tolist()]
    assert all(len(r) < MAX_NEW and r[-1] == EOS for r in want_rows)  # every sentence ended by itself
    assert [hyps[0][0].tolist() for hyps in got] == want_rows
    assert len({len(r) for r in want_rows}) > 2


def test_separate_vocabularies_and_untied_head(tmp_path):
    from transformers import MarianTokenizer

    hf, sizes = write_marian_source(tmp_path, separate=True, tie=False, seed=1)
    tokenizer = MarianTokenizer.from_pretrained(tmp_path)
    model = TranslationModel(vocab_size=sizes["vocab_size"], pad_id=sizes["pad"], init_from=str(tmp_path), dropout=0.0).eval()
    assert model.settings["tgt_vocab_size"] == sizes["tgt_vocab_size"] != sizes["vocab_size"]
    assert model.output.weight is not model.target_embed.weight
    vocab = MarianVocab.from_folder(tmp_path)
    en = multi30k_lines("en", 4, 1000)
    assert [vocab.encode_target(s) + [EOS] for s in en] == tokenizer(text_target=en)["input_ids"]
    enc = tokenizer(multi30k_lines("de", 4, 1000), text_target=en, padding=True, return_tensors="pt")
    pad = hf.config.pad_token_id
    tgt_in = torch.cat([torch.full((4, 1), pad), enc["labels"][:, :-1]], 1)
    with torch.no_grad():
        want = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], decoder_input_ids=tgt_in).logits
        got = model(enc["input_ids"], enc["attention_mask"] == 0, tgt_in, None, output="logits")["logits"]
    assert got.shape[-1] == sizes["tgt_vocab_size"]
    real = torch.cat([torch.ones(4, 1, dtype=torch.bool), enc["labels"][:, :-1] != pad], 1)
    assert (got - want)[real].abs().max().item() < 1e-4


def test_rebuilt_from_settings_without_the_source(source):
    folder, _, tokenizer, sizes = source
    model = ours_from(folder, sizes)
    again = TranslationModel(**model.settings, dropout=0.0).eval()  # what a checkpoint's hparams rebuild
    again.load_state_dict(model.state_dict())
    src, mask = src_batch(tokenizer, 4)
    torch.testing.assert_close(again.encode(src, mask == 0), model.encode(src, mask == 0))


def test_data_tokenizer_that_is_not_the_models_is_an_error(source):
    folder, _, _, sizes = source
    with pytest.raises(ValueError, match="data.tokenizer"):
        TranslationModel(vocab_size=8000, pad_id=0, init_from=str(folder))  # a BPE vocabulary with pad 0
    with pytest.raises(ValueError, match="pad id"):
        TranslationModel(vocab_size=sizes["vocab_size"], pad_id=0, init_from=str(folder))


def test_bad_sources_are_one_line_errors(tmp_path, source):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        MarianSource.open(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text('{"model_type": "bart"}')
    with pytest.raises(ValueError, match="model_type is 'bart'"):
        MarianSource.open(tmp_path)
    folder, _, _, sizes = source
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((folder / "config.json").read_bytes())
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    weights["model.decoder.layers.0.extra.weight"] = torch.zeros(2)
    del weights["model.encoder.layers.1.fc2.bias"]
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="fc2|extra"):
        TranslationModel(vocab_size=sizes["vocab_size"], pad_id=sizes["pad"], init_from=str(broken))


def test_hf_reference_without_network_or_cache_is_a_one_line_error(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="hf:Helsinki-NLP/opus-mt-de-en: could not fetch it"):
        MarianSource.open("hf:Helsinki-NLP/opus-mt-de-en")
