"""The tokenizer of Marian / opus-mt models: SentencePiece pieces mapped to model ids by ``vocab.json``.

A Marian folder has a SentencePiece model per side (``source.spm``, ``target.spm``) and a JSON map
from piece to model id (``vocab.json``; with separate vocabularies also ``target_vocab.json``). The
ids are not SentencePiece's own: a piece missing from the map is ``<unk>``. A source sentence is its
pieces then ``</s>`` (a leading language code such as ``>>fra<<`` is one token); the decoder starts
from ``config.json``'s ``decoder_start_token_id`` (the pad token in every opus-mt model). This gives
the ids of HuggingFace's ``MarianTokenizer`` (tests compare them), on text normalised as our data
is (NFC, one space for any whitespace run, stripped; SentencePiece then applies its own rules).

The whole tokenizer fits in plain strings (:meth:`MarianVocab.to_info`): stored in a checkpoint,
it translates without the source folder.
"""

from __future__ import annotations

import base64
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_WHITESPACE = re.compile(r"\s+")
KIND = "marian-sentencepiece"


def _normalize(text: str) -> str:
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def _token(value: Any, default: str) -> str:
    """A special token of ``tokenizer_config.json``: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return str(value.get("content", default))
    return default if value is None else str(value)


class MarianVocab:
    """Source/target SentencePiece models and the piece -> id maps of a Marian model.

    ``vocab_size`` counts the source (or shared) ids, ``tgt_vocab_size`` the target ids when the
    vocabularies are separate (None otherwise); ``pad_id``, ``eos_id``, ``unk_id`` and ``bos_id``
    (the decoder start) are model ids.
    """

    def __init__(self, *, source_spm: bytes, target_spm: bytes, vocab: Mapping[str, int],
                 target_vocab: Mapping[str, int] | None = None, unk: str = "<unk>", eos: str = "</s>",
                 pad: str = "<pad>", decoder_start_id: int | None = None, where: str = "vocab.json") -> None:
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError("Marian tokenizers need sentencepiece: pip install -e '.[hub]'") from e
        self.source_spm, self.target_spm = bytes(source_spm), bytes(target_spm)
        self._source = sentencepiece.SentencePieceProcessor(model_proto=self.source_spm)
        self._target = sentencepiece.SentencePieceProcessor(model_proto=self.target_spm)
        self.source_vocab = {str(k): int(v) for k, v in vocab.items()}
        self.target_vocab = None if target_vocab is None else {str(k): int(v) for k, v in target_vocab.items()}
        self.special = {"unk": unk, "eos": eos, "pad": pad}
        for name, piece in self.special.items():
            for side in filter(None, (self.source_vocab, self.target_vocab)):
                if piece not in side:
                    raise ValueError(f"{where}: the {name} token {piece!r} is not in the vocabulary")
        tgt = self.target_vocab or self.source_vocab
        self.unk_id, self.eos_id, self.pad_id = (self.source_vocab[p] for p in (unk, eos, pad))
        if any(tgt[p] != self.source_vocab[p] for p in (unk, eos, pad)):
            raise ValueError(f"{where}: special tokens have other ids in the target vocabulary")
        self.bos_id = self.pad_id if decoder_start_id is None else int(decoder_start_id)
        self._pieces = {i: p for p, i in tgt.items()}
        self._skip = {self.unk_id, self.eos_id, self.pad_id, self.bos_id}

    @property
    def vocab_size(self) -> int:
        return max(self.source_vocab.values()) + 1

    @property
    def tgt_vocab_size(self) -> int | None:
        return None if self.target_vocab is None else max(self.target_vocab.values()) + 1

    # files and plain dicts ----------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path) -> MarianVocab:
        """Read ``source.spm``, ``target.spm``, ``vocab.json`` (``target_vocab.json``), and
        ``tokenizer_config.json`` / ``config.json`` when present."""
        folder = Path(folder)
        for name in ("source.spm", "target.spm", "vocab.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name}: missing; a Marian tokenizer needs source.spm, "
                                        "target.spm and vocab.json")
        settings = _read_json(folder / "tokenizer_config.json")
        config = _read_json(folder / "config.json")
        separate = bool(settings.get("separate_vocabs", False))
        target_vocab = _read_json(folder / "target_vocab.json", required=True) if separate else None
        return cls(
            source_spm=(folder / "source.spm").read_bytes(), target_spm=(folder / "target.spm").read_bytes(),
            vocab=_read_json(folder / "vocab.json", required=True), target_vocab=target_vocab,
            unk=_token(settings.get("unk_token"), "<unk>"), eos=_token(settings.get("eos_token"), "</s>"),
            pad=_token(settings.get("pad_token"), "<pad>"), decoder_start_id=config.get("decoder_start_token_id"),
            where=str(folder / "vocab.json"),
        )

    def to_info(self) -> dict[str, Any]:
        """Plain strings and ints (checkpoint hyper-parameters load with ``weights_only=True``)."""
        return {
            "kind": KIND,
            "source_spm": base64.b64encode(self.source_spm).decode("ascii"),
            "target_spm": base64.b64encode(self.target_spm).decode("ascii"),
            "vocab_json": json.dumps(self.source_vocab, ensure_ascii=False),
            "target_vocab_json": None if self.target_vocab is None else json.dumps(self.target_vocab, ensure_ascii=False),
            "special": dict(self.special),
            "decoder_start_id": self.bos_id,
        }

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> MarianVocab:
        if info.get("kind") != KIND:
            raise ValueError(f"tokenizer info of kind {info.get('kind')!r}, expected {KIND!r}")
        target = info.get("target_vocab_json")
        return cls(
            source_spm=base64.b64decode(info["source_spm"]), target_spm=base64.b64decode(info["target_spm"]),
            vocab=json.loads(info["vocab_json"]), target_vocab=None if target is None else json.loads(target),
            **dict(info["special"]), decoder_start_id=info["decoder_start_id"], where="data_info['tokenizer']",
        )

    # text <-> ids ---------------------------------------------------------------------------------
    def _encode(self, text: str, spm: Any, vocab: dict[str, int]) -> list[int]:
        text = _normalize(text)
        code: list[str] = []
        if text.startswith(">>") and (end := text.find("<<")) != -1:  # language code of multilingual models
            code, text = [text[: end + 2]], text[end + 2 :]
        return [vocab.get(p, self.unk_id) for p in code + spm.encode(text, out_type=str)]

    def encode_source(self, text: str) -> list[int]:
        """Model ids of a source sentence, without the final ``</s>``."""
        return self._encode(text, self._source, self.source_vocab)

    def encode_target(self, text: str) -> list[int]:
        """Model ids of a target sentence (target SentencePiece and vocabulary), without ``</s>``."""
        return self._encode(text, self._target, self.target_vocab or self.source_vocab)

    def id_to_token(self, token_id: int) -> str | None:
        """The target-side piece of ``token_id`` (None when unknown)."""
        return self._pieces.get(token_id)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of target ids; special tokens (pad, eos, unk, decoder start) dropped."""
        pieces = [self._pieces[i] for i in map(int, ids) if i not in self._skip and i in self._pieces]
        return self._target.decode_pieces(pieces).replace("\u2581", " ").strip()


def _read_json(path: Path, required: bool = False) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path}: missing")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
