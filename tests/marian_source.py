"""A random tiny HuggingFace MarianMTModel with a small SentencePiece vocabulary, written by tests.

The SentencePiece models are trained on a few hundred Multi30k lines shipped in ``data/multi30k``
(de -> en, opus-mt-de-en's direction); ``vocab.json`` maps their pieces to model ids the way opus-mt
does (``</s>`` 0, ``<unk>`` 1, pieces, ``<pad>`` last). Weights are random but not small, layer
norms and the logits bias included, so that a key mapped to the wrong place changes the outputs.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MULTI30K = ROOT / "data" / "multi30k"


def multi30k_lines(lang: str, n: int, start: int = 0) -> list[str]:
    with gzip.open(MULTI30K / f"train.{lang}.gz", "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [line.strip() for line in lines[start : start + n]]


def train_spm(lines: list[str], vocab_size: int) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def _pieces(model: bytes) -> list[str]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_control(i) and not sp.is_unknown(i)]


def write_vocabulary(folder: Path, lines: int = 300, separate: bool = False, drop: int = 3) -> dict:
    """``source.spm``, ``target.spm``, ``vocab.json`` (+ ``target_vocab.json``), ``tokenizer_config.json``.

    ``drop`` source pieces are left out of the vocabulary (they become ``<unk>``). Returns the sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    source, target = train_spm(multi30k_lines("de", lines), 180), train_spm(multi30k_lines("en", lines), 160)
    (folder / "source.spm").write_bytes(source)
    (folder / "target.spm").write_bytes(target)

    def vocab(pieces: list[str]) -> dict[str, int]:  # pad last (opus-mt), or third in both of two vocabularies
        ids = {"</s>": 0, "<unk>": 1, **({"<pad>": 2} if separate else {})}
        for p in pieces:
            ids.setdefault(p, len(ids))
        ids.setdefault("<pad>", len(ids))
        return ids

    src_pieces = _pieces(source)[drop:]
    if separate:
        shared, tgt = vocab(src_pieces), vocab(_pieces(target))
        (folder / "target_vocab.json").write_text(json.dumps(tgt, ensure_ascii=False), encoding="utf-8")
    else:
        shared, tgt = vocab(src_pieces + _pieces(target)), None
    (folder / "vocab.json").write_text(json.dumps(shared, ensure_ascii=False), encoding="utf-8")
    settings = {"source_lang": "de", "target_lang": "en", "separate_vocabs": separate, "model_max_length": 512,
                "tokenizer_class": "MarianTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    return {"vocab_size": len(shared), "tgt_vocab_size": None if tgt is None else len(tgt), "pad": shared["<pad>"]}


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.25, eos_boost: float = 0.0) -> None:
    """Random weights everywhere (not HF's small init): layer norms near 1, biases and the logits
    bias too; ``eos_boost`` raises the logits bias of ``</s>`` (id 0) so that sentences end."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name:  # the fixed sinusoidal tables
                continue
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "layer_norm.weight" in name else std * noise)
        bias = model.final_logits_bias
        bias.copy_(0.5 * torch.randn(bias.shape, generator=g))
        bias[0, 0] += eos_boost


def write_marian_source(folder: Path, *, separate: bool = False, d_model: int = 32, layers: int = 2,
                        heads: int = 4, ffn: int = 64, seed: int = 0, eos_boost: float = 4.5,
                        tie: bool = True) -> tuple[torch.nn.Module, dict]:
    """Write a random MarianMTModel and its tokenizer into ``folder`` (as ``save_pretrained`` does);
    returns the HF model (eval mode) and the sizes."""
    from transformers import MarianConfig, MarianMTModel

    sizes = write_vocabulary(folder, separate=separate)
    pad = sizes["pad"]
    config = MarianConfig(
        vocab_size=sizes["vocab_size"], decoder_vocab_size=sizes["tgt_vocab_size"], d_model=d_model,
        encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, activation_function="swish", scale_embedding=True,
        max_position_embeddings=128, pad_token_id=pad, eos_token_id=0, decoder_start_token_id=pad,
        forced_eos_token_id=0, share_encoder_decoder_embeddings=not separate, tie_word_embeddings=tie,
        dropout=0.1,
    )
    torch.manual_seed(seed)
    model = MarianMTModel(config)
    randomize_(model, seed, eos_boost=eos_boost)
    model.save_pretrained(folder)
    return model.eval(), sizes
