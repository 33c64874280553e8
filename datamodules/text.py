"""Parallel text (translation) data: aligned files, a joint byte-level BPE, token-budget batches.

Files follow the fairseq convention ``PREFIX.LANG`` (e.g. ``train.en`` / ``train.de``): UTF-8, one
sentence per line, line i of one language translating line i of the other. ``PREFIX.LANG.gz`` is read
when the plain file is absent. Every line is whitespace-normalised (``normalize_text``) on reading.

A dataset item (``ParallelTextDataset``) is ``dict(src int64 [S] = ids + EOS, tgt int64 [T] =
BOS + ids + EOS, src_text str, tgt_text str, index int)``; the strings are the normalised, untruncated
sentences (references for BLEU).

A batch (``collate_translation``) is ``dict(src int64 [B,S], src_padding_mask bool [B,S] (True = pad),
tgt int64 [B,T] (BOS..EOS, padded), tgt_padding_mask bool [B,T], src_text list[str],
tgt_text list[str], index int64 [B])``.

Special token ids are fixed: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, ``<mask>`` 4.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import json
import math
import os
import re
import tempfile
import time
import unicodedata
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from modules.marian import resolve_source
from modules.marian_vocab import MarianVocab

from .base import SplitDataModule
from .errors import DataError, MissingDataError
from .sampling import EpochPosition, ResumableDataLoader

PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>")  # position = id
# Bump when normalisation or the tokenizer recipe changes: cached tokenizers are then retrained.
TOKENIZER_VERSION = "mtdetr-bytelevel-bpe-v1"
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # specials + the 256 byte symbols

EMPTY_LINE_POLICIES = ("error", "skip")
LONG_SENTENCE_POLICIES = ("truncate", "skip", "error")

REPO_ROOT = Path(__file__).resolve().parents[1]
MULTI30K_DIR = REPO_ROOT / "data" / "multi30k"

_WHITESPACE = re.compile(r"\s+")
_UTF8_BOM = b"\xef\xbb\xbf"
_MAX_LISTED_LINES = 5


def _info(message: str) -> None:
    """Print once per job (global rank 0 only), like the other data modules' progress lines."""
    if rank_zero_only.rank == 0:
        print(message, flush=True)


def _list_lines(lines: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in lines[:_MAX_LISTED_LINES])
    return shown + (", ..." if len(lines) > _MAX_LISTED_LINES else "")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """NFC-normalise, turn every Unicode whitespace run (tab, NBSP, thin space, CR...) into one ' ', strip."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def resolve_text_file(prefix: str | Path, lang: str) -> Path:
    """``PREFIX.LANG`` if it exists, else ``PREFIX.LANG.gz``; ``MissingDataError`` listing both otherwise."""
    plain = Path(f"{prefix}.{lang}")
    if plain.is_file():
        return plain
    compressed = Path(f"{prefix}.{lang}.gz")
    if compressed.is_file():
        return compressed
    raise MissingDataError(
        f"{plain}: text file not found (tried {plain} and {compressed}). Check the data config's "
        "*_prefix (files are PREFIX.LANG, one sentence per line) and src_lang/tgt_lang."
    )


def read_bytes(path: str | Path) -> bytes:
    """The file's content, gunzipped when the name ends in ``.gz``; ``DataError`` for a broken archive."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path}: file not found.")
    raw = path.read_bytes()
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path}: not a valid gzip file ({e}). Re-compress it or store it uncompressed."
        ) from e


def read_lines(path: str | Path, data: bytes | None = None) -> list[str]:
    """Decode ``path`` (or its already read ``data``) as UTF-8 and split on '\\n' only; lines not normalised.

    A final newline does not add an empty line; a leading UTF-8 byte-order mark is dropped. Invalid
    UTF-8 raises ``DataError`` with the line number and byte offset (of the decompressed stream for .gz).
    """
    path = Path(path)
    if data is None:
        data = read_bytes(path)
    skip = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = e.start + skip
        line = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1)
        where = "decompressed byte offset" if path.suffix == ".gz" else "byte offset"
        raise DataError(
            f"{path}:{line}: invalid UTF-8 on line {line} ({where} {offset}, byte {column} of the line: "
            f"{e.reason}, bytes {data[offset : offset + 4]!r}). Re-encode the file as UTF-8."
        ) from e
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


@dataclass
class ParallelText:
    """Aligned, normalised sentence pairs of one split; ``line_numbers`` are the 1-based file lines."""

    src: list[str]
    tgt: list[str]
    line_numbers: list[int]
    src_path: Path
    tgt_path: Path

    def __len__(self) -> int:
        return len(self.src)


def read_parallel(
    prefix: str | Path, src_lang: str, tgt_lang: str, empty_lines: str = "skip"
) -> ParallelText:
    """Read ``PREFIX.SRC`` / ``PREFIX.TGT``, normalise whitespace and apply the empty-line policy.

    ``empty_lines="skip"`` drops pairs with an empty side (after normalisation) and prints how many;
    ``"error"`` raises ``DataError`` at the first one. Different line counts always raise.
    """
    if empty_lines not in EMPTY_LINE_POLICIES:
        raise ValueError(f"empty_lines must be one of {EMPTY_LINE_POLICIES}, got {empty_lines!r}")
    src_path = resolve_text_file(prefix, src_lang)
    tgt_path = resolve_text_file(prefix, tgt_lang)
    src_lines = read_lines(src_path)
    tgt_lines = read_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise DataError(
            f"{src_path} has {len(src_lines)} lines but {tgt_path} has {len(tgt_lines)}: line i of one "
            "file must be the translation of line i of the other. Re-align the files."
        )
    corpus = ParallelText([], [], [], src_path, tgt_path)
    skipped = _add_non_empty_pairs(corpus, src_lines, tgt_lines, empty_lines)
    if skipped:
        _info(
            f"{prefix}.{{{src_lang},{tgt_lang}}}: skipped {len(skipped)} of {len(src_lines)} sentence pairs "
            f"with an empty side (lines {_list_lines(skipped)})"
        )
    return corpus


def _add_non_empty_pairs(
    corpus: ParallelText, src_lines: Sequence[str], tgt_lines: Sequence[str], empty_lines: str
) -> list[int]:
    """Append the normalised pairs with two non-empty sides to ``corpus``; return the line numbers of
    the others (``empty_lines="skip"``) or raise ``DataError`` at the first one (``"error"``)."""
    skipped = []
    for i, (s_raw, t_raw) in enumerate(zip(src_lines, tgt_lines), start=1):
        s, t = normalize_text(s_raw), normalize_text(t_raw)
        if s and t:
            corpus.src.append(s)
            corpus.tgt.append(t)
            corpus.line_numbers.append(i)
        elif empty_lines == "skip":
            skipped.append(i)
        else:
            raise DataError(
                f"{corpus.src_path if not s else corpus.tgt_path}:{i}: line {i} is empty after whitespace "
                f"normalisation (pair {i} of {corpus.src_path} / {corpus.tgt_path}). Fix the line or set "
                "empty_lines='skip' to drop such pairs."
            )
    return skipped


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _new_tokenizer() -> Tokenizer:
    """Untrained byte-level BPE, lossless for any text: ``tokenizer.decode(tokenizer.encode(x).ids)`` is
    ``normalize_text(x)`` (``decode`` drops the special tokens).

    The normalizer repeats ``normalize_text`` (a no-op on its output) so that the tokenizer alone,
    e.g. rebuilt from a checkpoint, treats raw input the same way. ``add_prefix_space`` gives the first
    word the same tokens as inside a sentence; the Strip decoder removes that one space again.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tokenizer.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    return tokenizer


def check_special_ids(tokenizer: Tokenizer, where: str) -> None:
    """``DataError`` unless ``<pad> <bos> <eos> <unk> <mask>`` have ids 0..4 in ``tokenizer``."""
    got = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    if got != list(range(len(SPECIAL_TOKENS))):
        raise DataError(
            f"{where}: special tokens {SPECIAL_TOKENS} must have ids 0..4, got {got}. "
            "Delete the cached tokenizer to retrain it."
        )


def tokenizer_cache_key(file_hashes: Sequence[str], vocab_size: int, min_frequency: int) -> str:
    """sha256 over the (sorted) content hashes of the training files, the BPE settings and the version."""
    payload = json.dumps(
        {
            "files": sorted(file_hashes),
            "vocab_size": int(vocab_size),
            "min_frequency": int(min_frequency),
            "version": TOKENIZER_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def train_or_load_tokenizer(
    files: Sequence[str | Path],
    vocab_size: int = 8000,
    min_frequency: int = 2,
    cache_dir: str | Path = ".cache",
) -> Tokenizer:
    """Joint BPE over the normalised lines of ``files`` (the train split of both languages), cached.

    The tokenizer JSON lives at ``cache_dir/bpe-<key>.json`` (``tokenizer_cache_key``: content of the
    files, ``vocab_size``, ``min_frequency``, ``TOKENIZER_VERSION``) and is reused when present; it is
    written atomically, so concurrent jobs never read a half-written file. The vocabulary may come out
    smaller than ``vocab_size`` on tiny data (no more merges to learn); use ``get_vocab_size()``.
    """
    if int(vocab_size) < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (5 special tokens + 256 byte symbols), got {vocab_size}"
        )
    if int(min_frequency) < 0:
        raise ValueError(f"min_frequency must be >= 0, got {min_frequency}")
    if not files:
        raise ValueError("train_or_load_tokenizer needs at least one training file")
    contents = {}
    for f in files:
        data = read_bytes(f)
        contents[hashlib.sha256(data).hexdigest()] = (Path(f), data)
    path = Path(cache_dir) / f"bpe-{tokenizer_cache_key(list(contents), vocab_size, min_frequency)}.json"
    tokenizer = _load_cached_tokenizer(path)
    if tokenizer is None:
        start = time.perf_counter()
        tokenizer, num_lines = _train_tokenizer(contents, files, vocab_size, min_frequency)
        _write_atomic(path, tokenizer.to_str())
        _info(
            f"BPE tokenizer: trained vocab {tokenizer.get_vocab_size()} on {num_lines} lines in "
            f"{time.perf_counter() - start:.1f}s -> {path}"
        )
    return tokenizer


def _load_cached_tokenizer(path: Path) -> Tokenizer | None:
    """The tokenizer cached at ``path``; None when there is none or it is unusable (then retrained)."""
    if not path.is_file():
        return None
    try:
        tokenizer = Tokenizer.from_file(str(path))
        check_special_ids(tokenizer, str(path))
    except Exception as e:  # corrupted or foreign file: retrain and overwrite
        rank_zero_warn(f"{path}: cached tokenizer unusable ({e}); retraining it.")
        return None
    _info(f"BPE tokenizer: loaded {path} (vocab {tokenizer.get_vocab_size()})")
    return tokenizer


def _train_tokenizer(
    contents: Mapping[str, tuple[Path, bytes]], files: Sequence[str | Path], vocab_size: int, min_frequency: int
) -> tuple[Tokenizer, int]:
    """(a new byte-level BPE trained on the non-empty normalised lines of ``contents``, how many lines)."""
    lines: list[str] = []
    for digest in sorted(contents):  # content order, not argument order: en-de and de-en share a tokenizer
        f, data = contents[digest]
        lines.extend(s for s in map(normalize_text, read_lines(f, data)) if s)
    if not lines:
        raise DataError(f"{', '.join(str(f) for f in files)}: no non-empty lines to train the tokenizer on.")
    tokenizer = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        min_frequency=int(min_frequency),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer, length=len(lines))
    check_special_ids(tokenizer, "newly trained tokenizer")
    return tokenizer, len(lines)


def encode_many(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids (no BOS/EOS) of strings already passed through ``normalize_text`` (parallel ``encode_batch``)."""
    return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]


# --------------------------------------------------------------------------------------------
# Dataset and collate
# --------------------------------------------------------------------------------------------


class ParallelTextDataset(Dataset):
    """Tokenised sentence pairs; item ``i`` = ``dict(src [S_i], tgt [T_i], src_text, tgt_text, index=i)``.

    ``src_ids[i]`` / ``tgt_ids[i]`` are token ids without specials (already truncated if need be);
    ``src`` gets EOS appended, ``tgt`` gets BOS prepended and EOS appended. ``line_numbers[i]`` is the
    1-based line of the pair in its files. ``lengths[i] = max(S_i, T_i)`` feeds the batch sampler.
    """

    def __init__(
        self,
        *,
        src_ids: Sequence[Sequence[int]],
        tgt_ids: Sequence[Sequence[int]],
        src_text: Sequence[str],
        tgt_text: Sequence[str],
        line_numbers: Sequence[int] | None = None,
        bos_id: int = BOS_ID,
        eos_id: int = EOS_ID,
    ) -> None:
        n = len(src_ids)
        if not (len(tgt_ids) == len(src_text) == len(tgt_text) == n):
            raise ValueError("src_ids, tgt_ids, src_text and tgt_text must have the same length")
        self.src_text = list(src_text)
        self.tgt_text = list(tgt_text)
        self.line_numbers = list(line_numbers) if line_numbers is not None else list(range(1, n + 1))
        # One flat tensor per side plus offsets: cheap to hold and to share with worker processes.
        self._src, self._src_offsets = self._pack(src_ids, [], [eos_id])
        self._tgt, self._tgt_offsets = self._pack(tgt_ids, [bos_id], [eos_id])
        self.src_lengths = np.diff(self._src_offsets.numpy())
        self.tgt_lengths = np.diff(self._tgt_offsets.numpy())
        self.lengths = np.maximum(self.src_lengths, self.tgt_lengths)

    @staticmethod
    def _pack(rows: Sequence[Sequence[int]], prefix: list[int], suffix: list[int]) -> tuple[Tensor, Tensor]:
        """Concatenate ``prefix + row + suffix`` for every row -> (flat int64 [N], offsets int64 [n+1])."""
        n = len(rows)
        sizes = np.fromiter(map(len, rows), dtype=np.int64, count=n)
        content = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(sizes.sum()))
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(sizes + len(prefix) + len(suffix), out=offsets[1:])
        flat = np.empty(int(offsets[-1]), dtype=np.int64)
        is_content = np.ones(flat.shape, dtype=bool)
        for j, token in enumerate(prefix):
            flat[offsets[:-1] + j] = token
            is_content[offsets[:-1] + j] = False
        for j, token in enumerate(suffix):
            flat[offsets[1:] - len(suffix) + j] = token
            is_content[offsets[1:] - len(suffix) + j] = False
        flat[is_content] = content
        return torch.from_numpy(flat), torch.from_numpy(offsets)

    def __len__(self) -> int:
        return len(self.src_text)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        index = index % len(self)
        so, to = self._src_offsets, self._tgt_offsets
        return {
            "src": self._src[so[index] : so[index + 1]],
            "tgt": self._tgt[to[index] : to[index + 1]],
            "src_text": self.src_text[index],
            "tgt_text": self.tgt_text[index],
            "index": index,
        }


def _sentence_encoders(tokenizer: Tokenizer | MarianVocab):
    """(source encoder, target encoder): lists of normalised strings -> lists of ids without specials."""
    if isinstance(tokenizer, MarianVocab):
        return (lambda texts: [tokenizer.encode_source(t) for t in texts],
                lambda texts: [tokenizer.encode_target(t) for t in texts])
    # The tokenizer's normalizer is a no-op on normalize_text output; a copy without it encodes faster.
    fast = Tokenizer.from_str(tokenizer.to_str())
    fast.normalizer = None
    return partial(encode_many, fast), partial(encode_many, fast)


def encode_parallel(
    corpus: ParallelText,
    tokenizer: Tokenizer | MarianVocab,
    max_len: int = 128,
    long_sentences: str = "skip",
    max_examples: int | None = None,
    name: str = "train",
) -> ParallelTextDataset:
    """Tokenise ``corpus`` and apply the long-sentence policy; keep the first ``max_examples`` pairs.

    A pair is too long when ``len(src ids) + 1 > max_len`` (EOS) or ``len(tgt ids) + 2 > max_len``
    (BOS, EOS). ``"truncate"`` cuts the ids (EOS is still appended), ``"skip"`` drops the pair and
    prints a count, ``"error"`` raises ``DataError`` naming the file and line. The raw strings are
    never truncated.
    """
    if long_sentences not in LONG_SENTENCE_POLICIES:
        raise ValueError(f"long_sentences must be one of {LONG_SENTENCE_POLICIES}, got {long_sentences!r}")
    if max_len < 3:
        raise ValueError(f"max_len must be >= 3 (BOS, one token, EOS), got {max_len}")
    limit = len(corpus) if max_examples is None else min(int(max_examples), len(corpus))
    kept, too_long, examined = _apply_length_policy(
        _encoded_pairs(corpus, tokenizer, chunk=max(2 * limit, 1024)), corpus, max_len, long_sentences, limit
    )
    if too_long:
        _report_too_long(corpus, [corpus.line_numbers[j] for j in too_long], examined, name, max_len, long_sentences)
    if not kept:
        raise DataError(
            f"{corpus.src_path} / {corpus.tgt_path}: no sentence pairs left for {name} after the empty-line "
            f"and long-sentence policies (max_len={max_len})."
        )
    return ParallelTextDataset(
        src_ids=[s for _, s, _ in kept],
        tgt_ids=[t for _, _, t in kept],
        src_text=[corpus.src[j] for j, _, _ in kept],
        tgt_text=[corpus.tgt[j] for j, _, _ in kept],
        line_numbers=[corpus.line_numbers[j] for j, _, _ in kept],
        **_special_ids(tokenizer),
    )


EncodedPair = tuple[int, list[int], list[int]]  # corpus position, source ids, target ids (no specials)


def _encoded_pairs(corpus: ParallelText, tokenizer: Tokenizer | MarianVocab, chunk: int) -> Iterator[EncodedPair]:
    """The corpus's pairs tokenised ``chunk`` at a time (in order, lazily: a caller that stops early
    leaves the rest untokenised)."""
    encode_src, encode_tgt = _sentence_encoders(tokenizer)
    for pos in range(0, len(corpus), chunk):
        stop = min(pos + chunk, len(corpus))
        yield from zip(range(pos, stop), encode_src(corpus.src[pos:stop]), encode_tgt(corpus.tgt[pos:stop]))


def _apply_length_policy(
    pairs: Iterator[EncodedPair], corpus: ParallelText, max_len: int, long_sentences: str, limit: int
) -> tuple[list[EncodedPair], list[int], int]:
    """(the first ``limit`` pairs kept, the positions of the too-long pairs, how many pairs were examined)."""
    kept: list[EncodedPair] = []
    too_long: list[int] = []
    examined = 0
    for j, s, t in pairs if limit > 0 else ():
        examined = j + 1
        if len(s) + 1 > max_len or len(t) + 2 > max_len:
            too_long.append(j)
            if long_sentences == "error":
                raise _too_long_error(corpus, j, s, t, max_len)
            if long_sentences == "skip":
                continue
            s, t = s[: max_len - 1], t[: max_len - 2]
        kept.append((j, s, t))
        if len(kept) >= limit:
            break
    return kept, too_long, examined


def _too_long_error(corpus: ParallelText, j: int, src: list[int], tgt: list[int], max_len: int) -> DataError:
    """The ``long_sentences="error"`` message for pair ``j``: the file and line of its too-long side."""
    line = corpus.line_numbers[j]
    path, side, n, extra = (
        (corpus.src_path, "source", len(src) + 1, "EOS")
        if len(src) + 1 > max_len
        else (corpus.tgt_path, "target", len(tgt) + 2, "BOS+EOS")
    )
    return DataError(
        f"{path}:{line}: {side} sentence on line {line} has {n} tokens (with {extra}) > "
        f"max_len={max_len}. Raise max_len or set long_sentences to 'skip' or 'truncate'."
    )


def _report_too_long(
    corpus: ParallelText, lines: list[int], examined: int, name: str, max_len: int, long_sentences: str
) -> None:
    """Print how many pairs were skipped (an expected policy), or warn how many were truncated."""
    action = "skipped" if long_sentences == "skip" else "truncated"
    message = (
        f"{name} ({corpus.src_path.name}/{corpus.tgt_path.name}): {action} {len(lines)} of {examined} sentence "
        f"pairs longer than max_len={max_len} tokens (lines {_list_lines(lines)})"
    )
    if long_sentences == "skip":
        _info(message)
    else:
        rank_zero_warn(message)


def _special_ids(tokenizer: Tokenizer | MarianVocab) -> dict[str, int]:
    """BOS (the decoder's first input) and EOS of a tokenizer: ours fixed, a Marian model's its own."""
    if isinstance(tokenizer, MarianVocab):
        return {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}
    return {"bos_id": BOS_ID, "eos_id": EOS_ID}


def collate_translation(batch: Sequence[Mapping[str, Any]], pad_id: int = PAD_ID) -> dict[str, Any]:
    """Pad dataset items into the translation batch contract (see the module docstring); masks True = pad."""
    if not batch:
        raise ValueError("collate_translation got an empty batch")
    out: dict[str, Any] = {}
    for key in ("src", "tgt"):
        seqs = [torch.as_tensor(item[key], dtype=torch.int64) for item in batch]
        lengths = torch.tensor([len(s) for s in seqs])
        padded = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.int64)
        for row, s in enumerate(seqs):
            padded[row, : len(s)] = s
        out[key] = padded
        out[f"{key}_padding_mask"] = torch.arange(padded.shape[1])[None, :] >= lengths[:, None]
    out["src_text"] = [item["src_text"] for item in batch]
    out["tgt_text"] = [item["tgt_text"] for item in batch]
    out["index"] = torch.tensor([int(item["index"]) for item in batch], dtype=torch.int64)
    return out


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


class _EpochForwarder:
    """Stands in as ``batch_sampler.sampler``: Lightning calls ``set_epoch`` there at every epoch start."""

    def __init__(self, owner: TokenBucketBatchSampler) -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


class TokenBucketBatchSampler(EpochPosition, BatchSampler):
    """Batches of similar-length examples whose padded size ``B * max(lengths in batch)`` <= ``max_tokens``.

    Examples are sorted by length (``lengths[i]`` = max(S_i, T_i) in tokens) and cut greedily into
    batches. With ``shuffle``, ties are broken and the batch order is drawn at random from
    ``(seed, epoch)`` (``set_epoch``), so each epoch differs, is reproducible, and -- since the sorted
    length sequence is the same every epoch -- has the same number of batches (Lightning counts the
    batches once). Without ``shuffle`` the order is plain ascending length. No example is dropped;
    one longer than ``max_tokens`` becomes a batch of its own (with a warning).

    Distributed: each of ``num_replicas`` ranks takes every ``num_replicas``-th batch of the common
    list. With ``shuffle`` (training) the list is padded by repeating batches so every rank gets the same
    count (duplicates carry the same ``index``); without it (evaluation) nothing is repeated, so every
    sentence is scored exactly once and ranks may differ by one batch.
    ``resume(k)`` skips the first ``k`` batches of the current epoch once (a mid-epoch restart). ``num_replicas``/``rank`` default to those of ``sampler`` when Lightning injects a
    ``DistributedSampler`` (its index order is otherwise ignored), else to the initialised process group.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray | Tensor,
        max_tokens: int,
        shuffle: bool = True,
        seed: int = 0,
        sampler: Sampler | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        lengths = np.asarray(lengths.tolist() if isinstance(lengths, Tensor) else lengths, dtype=np.int64)
        if lengths.ndim != 1:
            raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
        if lengths.size and lengths.min() < 1:
            raise ValueError("every length must be >= 1")
        if int(max_tokens) < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.lengths = lengths
        self.max_tokens = int(max_tokens)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        if num_replicas is None:
            num_replicas = getattr(sampler, "num_replicas", None)
            rank = getattr(sampler, "rank", None) if rank is None else rank
        if num_replicas is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            num_replicas = torch.distributed.get_world_size()
            rank = torch.distributed.get_rank() if rank is None else rank
        self.num_replicas = int(num_replicas or 1)
        self.rank = int(rank or 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} not in [0, {self.num_replicas})")
        self.epoch = 0
        self.skip = 0
        self.generator: torch.Generator | None = None  # reseeded per epoch when set (DataLoader base seed)
        self.sampler = _EpochForwarder(self)
        self.drop_last = False
        self.batch_size = None  # variable; the attribute exists for tools that look for it
        self._cache: tuple[int, list[list[int]]] | None = None
        oversized = int((lengths > self.max_tokens).sum())
        if oversized:
            rank_zero_warn(
                f"{oversized} example(s) are longer than max_tokens={self.max_tokens} (longest "
                f"{int(lengths.max())}); each forms a batch of its own. Raise max_tokens or lower max_len."
            )
        self._num_batches = len(self._cut(np.argsort(lengths, kind="stable")))

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch`` (no effect without ``shuffle``); a pending ``resume`` is kept
        only for the same epoch."""
        super().set_epoch(epoch)
        if self.generator is not None:
            self.generator.manual_seed(self.seed * 1_000_003 + self.epoch)

    def _cut(self, order: np.ndarray) -> list[list[int]]:
        """Greedy batches over ``order`` (sorted by length): extend while B * max_len fits the budget."""
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for i, n in zip(order.tolist(), self.lengths[order].tolist()):
            if current and (len(current) + 1) * max(longest, n) > self.max_tokens:
                batches.append(current)
                current, longest = [], 0
            current.append(i)
            longest = max(longest, n)
        if current:
            batches.append(current)
        return batches

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All ranks' batches for ``epoch`` (default: the current one), before the per-rank split."""
        epoch = self.epoch if epoch is None else int(epoch)
        if not self.shuffle:
            return self._cut(np.argsort(self.lengths, kind="stable"))
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.lengths))
        batches = self._cut(perm[np.argsort(self.lengths[perm], kind="stable")])
        return [batches[k] for k in rng.permutation(len(batches))]

    def _rank_batches(self) -> list[list[int]]:
        key = self.epoch if self.shuffle else -1
        if self._cache is None or self._cache[0] != key:
            batches = self.global_batches()
            if self.num_replicas > 1 and batches and not self.shuffle:
                batches = batches[self.rank :: self.num_replicas]
            elif self.num_replicas > 1 and batches:
                total = math.ceil(len(batches) / self.num_replicas) * self.num_replicas
                batches = [batches[k % len(batches)] for k in range(total)][self.rank :: self.num_replicas]
            self._cache = (key, batches)
        return self._cache[1]

    def __iter__(self) -> Iterator[list[int]]:
        yield from (list(b) for b in self._rank_batches()[self.take_skip():])

    def __len__(self) -> int:
        if not self.shuffle and self.num_replicas > 1:
            return len(range(self.rank, self._num_batches, self.num_replicas))
        return math.ceil(self._num_batches / self.num_replicas)


# --------------------------------------------------------------------------------------------
# DataModules
# --------------------------------------------------------------------------------------------


def _check_text_settings(
    *, empty_lines: str, long_sentences: str, src_lang: str, tgt_lang: str, vocab_size: int, max_len: int,
    max_tokens: int, max_examples: dict[str, int | None],
) -> None:
    """``ValueError`` naming the first ``ParallelTextDataModule`` setting out of its range."""
    if empty_lines not in EMPTY_LINE_POLICIES:
        raise ValueError(f"empty_lines must be one of {EMPTY_LINE_POLICIES}, got {empty_lines!r}")
    if long_sentences not in LONG_SENTENCE_POLICIES:
        raise ValueError(f"long_sentences must be one of {LONG_SENTENCE_POLICIES}, got {long_sentences!r}")
    if src_lang == tgt_lang:
        raise ValueError(f"src_lang and tgt_lang must differ, both are {src_lang!r}")
    if int(vocab_size) < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
    if int(max_len) < 3:
        raise ValueError(f"max_len must be >= 3 (BOS, one token, EOS), got {max_len}")
    if int(max_tokens) < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    for name, value in max_examples.items():
        if value is not None and int(value) < 1:
            raise ValueError(f"{name} must be None or >= 1, got {value}")


class ParallelTextDataModule(SplitDataModule):
    """Translation DataModule over ``PREFIX.{src_lang,tgt_lang}`` files (optionally ``.gz``) per split.

    ``prepare_data`` trains (or loads from ``cache_dir``) a joint BPE on the train split of both
    languages; ``setup`` reads, normalises and tokenises the splits. Train batches are shuffled
    token-budget buckets (a new order each epoch, reproducible from ``seed``); val/test batches are
    ordered by length. On train, pairs longer than ``max_len`` tokens follow ``long_sentences``; on
    val/test they are always truncated (with a warning) so that BLEU covers every sentence.
    ``test_prefix=None`` tests on the validation split. ``max_*_examples`` keep the first N pairs.

    ``tokenizer``: a pretrained model's own vocabulary instead of our BPE: a Marian (opus-mt) folder
    or ``hf:REPO[@revision]`` (its SentencePiece models and ``vocab.json``,
    :class:`modules.marian_vocab.MarianVocab`; ``vocab_size`` / ``min_frequency`` then unused). The
    translation task sets it to ``model.init_from``. ``data_info`` carries the whole tokenizer.
    """

    def __init__(
        self,
        *,
        train_prefix: str,
        val_prefix: str,
        test_prefix: str | None,
        src_lang: str = "en",
        tgt_lang: str = "de",
        vocab_size: int = 8000,
        min_frequency: int = 2,
        max_tokens: int = 4096,
        max_len: int = 128,
        cache_dir: str = ".cache",
        num_workers: int = 0,
        seed: int = 0,
        empty_lines: str = "skip",
        long_sentences: str = "skip",
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        tokenizer: str | None = None,
    ) -> None:
        super().__init__()
        _check_text_settings(
            empty_lines=empty_lines, long_sentences=long_sentences, src_lang=src_lang, tgt_lang=tgt_lang,
            vocab_size=vocab_size, max_len=max_len, max_tokens=max_tokens,
            max_examples={"max_train_examples": max_train_examples, "max_eval_examples": max_eval_examples},
        )
        self.train_prefix = str(train_prefix)
        self.val_prefix = str(val_prefix)
        self.test_prefix = None if test_prefix is None else str(test_prefix)
        self.src_lang = str(src_lang)
        self.tgt_lang = str(tgt_lang)
        self.vocab_size = int(vocab_size)
        self.min_frequency = int(min_frequency)
        self.max_tokens = int(max_tokens)
        self.max_len = int(max_len)
        self.cache_dir = str(cache_dir)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.empty_lines = empty_lines
        self.long_sentences = long_sentences
        self.max_train_examples = None if max_train_examples is None else int(max_train_examples)
        self.max_eval_examples = None if max_eval_examples is None else int(max_eval_examples)
        self.train_dataset: ParallelTextDataset | None = None
        self.val_dataset: ParallelTextDataset | None = None
        self.test_dataset: ParallelTextDataset | None = None
        self.tokenizer_source = None if tokenizer is None else str(tokenizer)
        self._tokenizer: Tokenizer | MarianVocab | None = None

    # tokenizer ---------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer | MarianVocab:
        """The joint BPE (trained or loaded from the cache on first use), or the pretrained model's."""
        if self._tokenizer is None and self.tokenizer_source is not None:
            self._tokenizer = MarianVocab.from_folder(resolve_source(self.tokenizer_source))
            _info(f"tokenizer: {self.tokenizer_source} (SentencePiece, vocab {self._tokenizer.vocab_size})")
        if self._tokenizer is None:
            files = [resolve_text_file(self.train_prefix, lang) for lang in (self.src_lang, self.tgt_lang)]
            self._tokenizer = train_or_load_tokenizer(
                files, self.vocab_size, self.min_frequency, self.cache_dir
            )
        return self._tokenizer

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id if isinstance(self.tokenizer, MarianVocab) else PAD_ID

    def use_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Use a trained model's tokenizer (e.g. from its checkpoint) instead of the train split's."""
        self._tokenizer = tokenizer

    def prepare_data(self) -> None:
        """Train or load the tokenizer (Lightning calls this on one process per node)."""
        _ = self.tokenizer

    @property
    def data_info(self) -> dict[str, Any]:
        """Plain str/int dict for the task: vocabulary, special ids, languages and the tokenizer JSON.

        The translation task rebuilds the tokenizer from it (``tasks.translation.tokenizer_from_info``),
        so a checkpoint that stores this dict translates without the training files.
        """
        tokenizer = self.tokenizer
        if isinstance(tokenizer, MarianVocab):
            info = {"vocab_size": tokenizer.vocab_size, "pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id,
                    "eos_id": tokenizer.eos_id, "unk_id": tokenizer.unk_id, "tokenizer": tokenizer.to_info()}
            if tokenizer.tgt_vocab_size is not None:
                info["tgt_vocab_size"] = tokenizer.tgt_vocab_size
            return {**info, "src_lang": self.src_lang, "tgt_lang": self.tgt_lang}
        return {
            "vocab_size": tokenizer.get_vocab_size(),
            "pad_id": PAD_ID,
            "bos_id": BOS_ID,
            "eos_id": EOS_ID,
            "unk_id": UNK_ID,
            "mask_id": MASK_ID,
            "src_lang": self.src_lang,
            "tgt_lang": self.tgt_lang,
            "tokenizer_json": tokenizer.to_str(),
        }

    # setup -------------------------------------------------------------------------------------
    def _build(self, prefix: str, name: str, train: bool) -> ParallelTextDataset:
        corpus = read_parallel(prefix, self.src_lang, self.tgt_lang, self.empty_lines)
        return encode_parallel(
            corpus,
            self.tokenizer,
            max_len=self.max_len,
            long_sentences=self.long_sentences if train else "truncate",
            max_examples=self.max_train_examples if train else self.max_eval_examples,
            name=name,
        )

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets ``stage`` needs (fit: train+val, validate: val, test/predict: test); idempotent."""
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._build(self.train_prefix, "train", train=True)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._build(self.val_prefix, "val", train=False)
        if stage in (None, "test", "predict") and self.test_dataset is None:
            if self.test_prefix is None:
                if self.val_dataset is None:
                    self.val_dataset = self._build(self.val_prefix, "val", train=False)
                self.test_dataset = self.val_dataset
            else:
                self.test_dataset = self._build(self.test_prefix, "test", train=False)

    # loaders -----------------------------------------------------------------------------------
    def _loader(self, dataset: ParallelTextDataset | None, shuffle: bool, name: str) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{name} dataset not built: call setup() with the matching stage first")
        sampler = TokenBucketBatchSampler(dataset.lengths, self.max_tokens, shuffle=shuffle, seed=self.seed)
        generator = sampler.generator = torch.Generator()  # the loader's worker seeds: not the global RNG
        sampler.set_epoch(self.trainer.current_epoch if shuffle and self.trainer is not None else 0)
        if self.num_workers > 0:
            # Workers never tokenise; this only silences the tokenizers library's warning at fork time.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return ResumableDataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=partial(collate_translation, pad_id=self.pad_id),
            persistent_workers=self.num_workers > 0,
            generator=generator,
            progress=self.train_progress if shuffle else None,
        )


class Multi30kDataModule(ParallelTextDataModule):
    """Multi30k Task 1 English-German shipped in ``data/multi30k`` (29,000 / 1,014 / 1,000 pairs).

    Defaults read the repository's copy (gzip-compressed) so the Hydra config needs only ``_target_``;
    every other setting is ``ParallelTextDataModule``'s.
    """

    def __init__(
        self,
        *,
        train_prefix: str = str(MULTI30K_DIR / "train"),
        val_prefix: str = str(MULTI30K_DIR / "val"),
        test_prefix: str | None = str(MULTI30K_DIR / "test2016"),
        **settings: Any,
    ) -> None:
        super().__init__(train_prefix=train_prefix, val_prefix=val_prefix, test_prefix=test_prefix, **settings)
