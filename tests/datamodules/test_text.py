"""Behaviour of the parallel-text (translation) data path on tiny files written to tmp_path."""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from datamodules.errors import DataError, MissingDataError
from datamodules.text import (
    BOS_ID,
    EOS_ID,
    MASK_ID,
    MULTI30K_DIR,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    Multi30kDataModule,
    ParallelTextDataModule,
    ParallelTextDataset,
    TokenBucketBatchSampler,
    collate_translation,
    normalize_text,
    read_parallel,
    train_or_load_tokenizer,
)
from tasks.translation import tokenizer_from_info


def ids_of(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a sentence without BOS/EOS, as the translation task encodes one."""
    return tokenizer.encode(text, add_special_tokens=False).ids


EN = [
    "Two young men are outside near many bushes.",
    "A little girl climbs into a wooden playhouse.",
    "A man in a blue shirt is standing on a ladder cleaning a window.",
    "Two men are at the stove preparing food.",
    "A man in green holds a guitar while the other man observes his shirt.",
    "A man is smiling at a stuffed lion.",
    "A trendy girl talking on her cellphone while gliding slowly down the street.",
    "A woman with a large purse is walking by a gate.",
    "Boys dancing on poles in the middle of the night.",
    "A ballet class of five girls jumping in sequence.",
    "Four guys, three wearing hats and one not, are jumping at the top of a staircase.",
    "A black dog and a spotted dog are fighting.",
    "A man in a neon green and orange uniform is driving a green tractor.",
    "Several women wait outside in a city.",
    "A lady in a black top with glasses is sprinkling powdered sugar on a bundt cake.",
    "A little girl is sitting in front of a large painted rainbow.",
    "A man lays on the bench to which a white dog is also tied.",
    "5 children, 2 dogs and 1 cat play at 3:30 pm.",
    "Five ballet dancers caught mid jump in a dancing studio with sunlight coming through a window.",
    "A group of people standing in front of an igloo.",
]
DE = [
    "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
    "Ein kleines Mädchen klettert in ein Spielhaus aus Holz.",
    "Ein Mann in einem blauen Hemd steht auf einer Leiter und putzt ein Fenster.",
    "Zwei Männer stehen am Herd und bereiten Essen zu.",
    "Ein Mann in grün hält eine Gitarre, während der andere Mann sein Hemd ansieht.",
    "Ein Mann lächelt einen ausgestopften Löwen an.",
    "Ein schickes Mädchen spricht mit dem Handy während sie langsam die Straße entlangschwebt.",
    "Eine Frau mit einer großen Geldbörse geht an einem Tor vorbei.",
    "Jungen tanzen mitten in der Nacht auf Pfosten.",
    "Eine Ballettklasse mit fünf Mädchen, die nacheinander springen.",
    "Vier Typen, von denen drei Hüte tragen und einer nicht, springen oben in einem Treppenhaus.",
    "Ein schwarzer Hund und ein gefleckter Hund kämpfen.",
    "Ein Mann in einer neongrünen und orangefarbenen Uniform fährt einen grünen Traktor.",
    "Mehrere Frauen warten in einer Stadt im Freien.",
    "Eine Frau mit schwarzem Oberteil und Brille streut Puderzucker auf einen Gugelhupf.",
    "Ein kleines Mädchen sitzt vor einem großen gemalten Regenbogen.",
    "Ein Mann liegt auf der Bank, an die auch ein weißer Hund angebunden ist.",
    "5 Kinder, 2 Hunde und 1 Katze spielen um 15:30 Uhr – „schön“!",
    "Fünf Balletttänzerinnen mitten im Sprung in einem Tanzstudio mit Sonnenlicht, das durch ein Fenster fällt.",
    "Eine Gruppe von Menschen steht vor einem Iglu.",
]
VOCAB = 300


def write_pair(prefix: Path, en: list[str], de: list[str], gz: bool = False) -> Path:
    """Write PREFIX.en / PREFIX.de (or their .gz), one sentence per line with a final newline."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for lang, lines in (("en", en), ("de", de)):
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        if gz:
            Path(f"{prefix}.{lang}.gz").write_bytes(gzip.compress(data))
        else:
            Path(f"{prefix}.{lang}").write_bytes(data)
    return prefix


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """tmp_path/data/{train,val,test}.{en,de}; returns the data folder."""
    root = tmp_path / "data"
    write_pair(root / "train", EN, DE)
    write_pair(root / "val", EN[:6], DE[:6])
    write_pair(root / "test", EN[6:10], DE[6:10])
    return root


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    root = tmp_path_factory.mktemp("tok")
    write_pair(root / "train", EN, DE)
    return train_or_load_tokenizer([root / "train.en", root / "train.de"], VOCAB, 1, root / "cache")


def make_dm(root: Path, tmp_path: Path, **kw: Any) -> ParallelTextDataModule:
    args: dict[str, Any] = {"vocab_size": VOCAB, "min_frequency": 1, "cache_dir": str(tmp_path / "cache")}
    args.update(kw)
    return ParallelTextDataModule(
        train_prefix=str(root / "train"), val_prefix=str(root / "val"), test_prefix=str(root / "test"), **args
    )


# ---------------------------------------------------------------------------------------------
# normalisation and reading
# ---------------------------------------------------------------------------------------------


def test_normalize_text_whitespace_and_nfc() -> None:
    assert normalize_text("  a\u00a0b\tc   d \r") == "a b c d"
    assert normalize_text("x\u2009\u3000\u202fy") == "x y"  # thin, ideographic, narrow no-break spaces
    assert normalize_text("Cafe\u0301") == "Café"  # combining accent composed (NFC)
    assert normalize_text(" \t\u00a0 ") == ""
    assert normalize_text("Zwei  Männer") == "Zwei Männer"


def test_read_parallel_normalises_and_reads_gz(tmp_path: Path) -> None:
    write_pair(tmp_path / "g", ["a\u00a0 b ", "\tc"], ["x  y\t", "z\u00a0"], gz=True)
    pairs = read_parallel(tmp_path / "g", "en", "de")
    assert pairs.src == ["a b", "c"] and pairs.tgt == ["x y", "z"]
    assert pairs.src_path.name == "g.en.gz" and pairs.line_numbers == [1, 2]
    # a plain file wins over the .gz
    write_pair(tmp_path / "g", ["plain"], ["klar"])
    assert read_parallel(tmp_path / "g", "en", "de").src == ["plain"]


def test_file_without_final_newline_and_bom(tmp_path: Path) -> None:
    (tmp_path / "t.en").write_bytes(b"\xef\xbb\xbfone\ntwo")
    (tmp_path / "t.de").write_bytes(b"eins\r\nzwei\r\n")
    pairs = read_parallel(tmp_path / "t", "en", "de")
    assert pairs.src == ["one", "two"] and pairs.tgt == ["eins", "zwei"]


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Ein Mann lächelt einen ausgestopften Löwen an.",
        "Größe: 3,5 m² — ÄÖÜ äöü ß ẞ é è ê ç ñ",
        "5 Kinder, 2 Hunde & 1 Katze (15:30 Uhr); 1.000.000 € / 42% ?!",
        "„Quoted“ «guillemets» 'single' \"double\" [brackets] {braces} #hash @at",
        "Unseen in training: 😀 Ω ж 漢字 ▁ Ġ",
        "  leading\u00a0and trailing\twhitespace  ",
        "Cafe\u0301 in NFD",
        ".",
    ],
)
def test_tokenizer_round_trip(tokenizer: Tokenizer, text: str) -> None:
    """As the translation task uses it: raw text in, the tokenizer's own normalizer, specials dropped."""
    ids = ids_of(tokenizer, text)
    assert ids and all(i >= len(SPECIAL_TOKENS) for i in ids)  # no specials, never <unk> (byte-level)
    assert tokenizer.decode(ids) == normalize_text(text)
    assert tokenizer.decode([BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]) == normalize_text(text)


def test_tokenizer_special_ids_fixed(tokenizer: Tokenizer) -> None:
    assert (
        [tokenizer.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>")]
        == [
            PAD_ID,
            BOS_ID,
            EOS_ID,
            UNK_ID,
            MASK_ID,
        ]
        == [0, 1, 2, 3, 4]
    )
    assert VOCAB - 20 <= tokenizer.get_vocab_size() <= VOCAB
    # the tokenizer alone (e.g. rebuilt from a checkpoint) normalises raw input the same way
    rebuilt = Tokenizer.from_str(tokenizer.to_str())
    raw = "Zwei\u00a0 Männer\t"
    assert ids_of(rebuilt, raw) == ids_of(tokenizer, normalize_text(raw))


def test_tokenizer_cache_reused_and_invalidated(corpus: Path, tmp_path: Path, capsys) -> None:
    files = [corpus / "train.en", corpus / "train.de"]
    cache = tmp_path / "cache"
    first = train_or_load_tokenizer(files, VOCAB, 1, cache)
    assert "trained" in capsys.readouterr().out
    (cached,) = cache.glob("bpe-*.json")
    assert len(cached.stem) == len("bpe-") + 64
    stamp = cached.stat().st_mtime_ns

    second = train_or_load_tokenizer(files, VOCAB, 1, cache)
    out = capsys.readouterr().out
    assert "loaded" in out and "trained" not in out
    assert cached.stat().st_mtime_ns == stamp
    assert second.to_str() == first.to_str()
    # languages in the other order (de->en) share the tokenizer
    train_or_load_tokenizer(files[::-1], VOCAB, 1, cache)
    assert "loaded" in capsys.readouterr().out

    train_or_load_tokenizer(files, VOCAB + 10, 1, cache)
    assert "trained" in capsys.readouterr().out
    assert len(list(cache.glob("bpe-*.json"))) == 2

    write_pair(corpus / "train", EN[:-1], DE[:-1])  # content changed -> new key
    train_or_load_tokenizer(files, VOCAB, 1, cache)
    assert "trained" in capsys.readouterr().out
    assert len(list(cache.glob("bpe-*.json"))) == 3
    assert not list(cache.glob("*.tmp"))  # atomic writes leave nothing behind


def test_corrupt_cache_is_retrained(corpus: Path, tmp_path: Path, capsys) -> None:
    files = [corpus / "train.en", corpus / "train.de"]
    train_or_load_tokenizer(files, VOCAB, 1, tmp_path)
    (cached,) = tmp_path.glob("bpe-*.json")
    cached.write_text("{not json")
    with pytest.warns(UserWarning, match="unusable"):
        tok = train_or_load_tokenizer(files, VOCAB, 1, tmp_path)
    assert tok.token_to_id("<eos>") == EOS_ID
    assert Tokenizer.from_file(str(cached)).to_str() == tok.to_str()


def test_vocab_size_too_small(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_or_load_tokenizer([corpus / "train.en"], 100, 1, tmp_path)


# ---------------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------------


def random_lengths(n: int = 500, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 60, size=n)


def padded_size(batch: list[int], lengths: np.ndarray) -> int:
    return len(batch) * int(lengths[batch].max())


def test_batches_respect_budget_and_cover_every_index_once() -> None:
    lengths = random_lengths()
    for shuffle in (True, False):
        sampler = TokenBucketBatchSampler(lengths, max_tokens=256, shuffle=shuffle, seed=1)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert all(padded_size(b, lengths) <= 256 for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    # length bucketing: batches are far less padded than random batches of the same sizes
    waste = sum(padded_size(b, lengths) - lengths[b].sum() for b in batches)
    assert waste < 0.05 * lengths.sum()


def test_batches_deterministic_per_epoch_and_different_across_epochs() -> None:
    lengths = random_lengths()
    a = TokenBucketBatchSampler(lengths, 256, shuffle=True, seed=3)
    b = TokenBucketBatchSampler(lengths, 256, shuffle=True, seed=3)
    epoch0 = list(a)
    assert list(b) == epoch0 and list(a) == epoch0  # same seed + epoch -> same batches
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 != epoch0
    assert len(epoch1) == len(epoch0) == len(a)  # Lightning counts the batches once
    b.set_epoch(1)
    assert list(b) == epoch1
    assert list(TokenBucketBatchSampler(lengths, 256, shuffle=True, seed=4)) != epoch0


def test_unshuffled_batches_are_ordered_by_length() -> None:
    lengths = random_lengths()
    sampler = TokenBucketBatchSampler(lengths, 256, shuffle=False)
    order = [i for b in sampler for i in b]
    assert list(lengths[order]) == sorted(lengths)
    sampler.set_epoch(5)
    assert [i for b in sampler for i in b] == order


def test_example_longer_than_budget_forms_its_own_batch() -> None:
    lengths = np.array([5, 5, 50, 5, 7])
    with pytest.warns(UserWarning, match="longer than max_tokens"):
        sampler = TokenBucketBatchSampler(lengths, max_tokens=20, shuffle=True)
    batches = list(sampler)
    assert [2] in batches
    assert all(padded_size(b, lengths) <= 20 for b in batches if b != [2])
    assert sorted(i for b in batches for i in b) == list(range(5))


def test_distributed_ranks_get_equal_batch_counts() -> None:
    lengths = random_lengths(301)
    full = TokenBucketBatchSampler(lengths, 256, shuffle=True, seed=2)
    ranks = [
        TokenBucketBatchSampler(lengths, 256, shuffle=True, seed=2, num_replicas=3, rank=r) for r in range(3)
    ]
    per_rank = [list(s) for s in ranks]
    assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == len(ranks[0])
    assert sorted({i for p in per_rank for b in p for i in b}) == list(range(301))
    assert sum(len(p) for p in per_rank) - len(full) < 3  # only padding duplicates


def test_lightning_injected_distributed_sampler(corpus: Path, tmp_path: Path) -> None:
    """What the Trainer does under DDP: re-create the batch sampler with a DistributedSampler (private API)."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    dm = make_dm(corpus, tmp_path, max_tokens=96)
    dm.setup("fit")
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()
    seen, counts = [], []
    for rank in (0, 1):
        dist = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True)
        per_rank = _update_dataloader(loader, dist)
        assert per_rank.batch_sampler.num_replicas == 2 and per_rank.batch_sampler.rank == rank
        batches = [b["index"].tolist() for b in per_rank]
        counts.append(len(batches))
        seen += [i for b in batches for i in b]
    assert counts[0] == counts[1]
    assert sorted(set(seen)) == list(range(len(dm.train_dataset)))


# ---------------------------------------------------------------------------------------------
# dataset and collate
# ---------------------------------------------------------------------------------------------


def test_dataset_items_and_collate_contract() -> None:
    ds = ParallelTextDataset(
        src_ids=[[10, 11, 12], [13]], tgt_ids=[[20], [21, 22, 23, 24]], src_text=["a b c", "d"], tgt_text=["x", "y z"]
    )
    item = ds[0]
    assert item["src"].tolist() == [10, 11, 12, EOS_ID]
    assert item["tgt"].tolist() == [BOS_ID, 20, EOS_ID]
    assert (item["src_text"], item["tgt_text"], item["index"]) == ("a b c", "x", 0)
    assert ds.lengths.tolist() == [4, 6]

    batch = collate_translation([ds[0], ds[1]], pad_id=PAD_ID)
    assert batch["src"].dtype == batch["tgt"].dtype == batch["index"].dtype == torch.int64
    assert batch["src_padding_mask"].dtype == batch["tgt_padding_mask"].dtype == torch.bool
    assert batch["src"].shape == batch["src_padding_mask"].shape == (2, 4)
    assert batch["tgt"].shape == batch["tgt_padding_mask"].shape == (2, 6)
    assert batch["src"].tolist() == [[10, 11, 12, EOS_ID], [13, EOS_ID, PAD_ID, PAD_ID]]
    assert batch["src_padding_mask"].tolist() == [[False] * 4, [False, False, True, True]]
    assert batch["tgt_padding_mask"].tolist() == [[False, False, False, True, True, True], [False] * 6]
    assert batch["src_text"] == ["a b c", "d"] and batch["tgt_text"] == ["x", "y z"]
    assert batch["index"].tolist() == [0, 1]


def test_datamodule_batches(corpus: Path, tmp_path: Path) -> None:
    dm = make_dm(corpus, tmp_path, max_tokens=80)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("fit")  # idempotent
    assert len(dm.train_dataset) == len(EN) and len(dm.val_dataset) == 6
    seen = []
    for batch in dm.train_dataloader():
        src, tgt = batch["src"], batch["tgt"]
        assert src.shape[0] * max(src.shape[1], tgt.shape[1]) <= 80 or src.shape[0] == 1
        assert (tgt[:, 0] == BOS_ID).all()
        assert ((src == EOS_ID).sum(1) == 1).all() and ((tgt == EOS_ID).sum(1) == 1).all()
        assert torch.equal(batch["src_padding_mask"], src == PAD_ID)
        assert torch.equal(batch["tgt_padding_mask"], tgt == PAD_ID)
        # EOS is the last non-pad token
        last = (~batch["tgt_padding_mask"]).sum(1) - 1
        assert (tgt[torch.arange(len(tgt)), last] == EOS_ID).all()
        for row, i in enumerate(batch["index"].tolist()):
            assert batch["src_text"][row] == EN[i] and batch["tgt_text"][row] == DE[i]
            ids = src[row][~batch["src_padding_mask"][row]].tolist()
            assert dm.tokenizer.decode(ids) == EN[i]
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(len(EN)))
    val_lengths = [len(b["index"]) for b in dm.val_dataloader()]
    assert sum(val_lengths) == 6


def test_data_info_is_plain_and_rebuilds_tokenizer(corpus: Path, tmp_path: Path) -> None:
    dm = make_dm(corpus, tmp_path, src_lang="de", tgt_lang="en")
    info = dm.data_info  # works before setup: loads/trains the tokenizer
    assert all(type(v) in (int, str) for v in info.values())
    assert {k: info[k] for k in ("pad_id", "bos_id", "eos_id", "unk_id", "mask_id")} == {
        "pad_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "unk_id": 3,
        "mask_id": 4,
    }
    assert (info["src_lang"], info["tgt_lang"]) == ("de", "en")
    tok = tokenizer_from_info(info)
    assert tok.get_vocab_size() == info["vocab_size"]
    assert tok.decode(ids_of(tok, DE[0])) == DE[0]
    torch.save({"data_info": info}, tmp_path / "ck.pt")
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["data_info"] == info


def test_test_prefix_none_uses_val(corpus: Path, tmp_path: Path) -> None:
    dm = ParallelTextDataModule(
        train_prefix=str(corpus / "train"), val_prefix=str(corpus / "val"), test_prefix=None, vocab_size=VOCAB, cache_dir=str(tmp_path)
    )
    dm.setup("test")
    assert dm.test_dataset is dm.val_dataset and len(dm.test_dataset) == 6


def test_misspelled_or_invalid_arguments(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        make_dm(corpus, tmp_path, max_token=100)
    with pytest.raises(TypeError):
        Multi30kDataModule(vocab_sizes=100)
    with pytest.raises(ValueError, match="empty_lines"):
        make_dm(corpus, tmp_path, empty_lines="drop")
    with pytest.raises(ValueError, match="long_sentences"):
        make_dm(corpus, tmp_path, long_sentences="cut")


def test_max_examples_keep_the_first_pairs(corpus: Path, tmp_path: Path) -> None:
    dm = make_dm(corpus, tmp_path, max_train_examples=5, max_eval_examples=2)
    dm.setup()
    assert dm.train_dataset.src_text == EN[:5]
    assert dm.val_dataset.src_text == EN[:2] and dm.test_dataset.src_text == EN[6:8]


# ---------------------------------------------------------------------------------------------
# bad inputs and policies
# ---------------------------------------------------------------------------------------------


def test_different_line_counts(corpus: Path, tmp_path: Path) -> None:
    write_pair(corpus / "train", EN, DE[:-2])
    with pytest.raises(DataError) as e:
        make_dm(corpus, tmp_path).setup("fit")
    msg = str(e.value)
    assert "train.en" in msg and "train.de" in msg and str(len(EN)) in msg and str(len(DE) - 2) in msg


def test_invalid_utf8_names_file_and_line(corpus: Path, tmp_path: Path) -> None:
    lines = [s.encode() for s in DE]
    lines[2] = "Ein Mädchen".encode("latin-1")
    (corpus / "val.de").write_bytes(b"\n".join(lines[:6]) + b"\n")
    with pytest.raises(DataError) as e:
        make_dm(corpus, tmp_path).setup("fit")
    msg = str(e.value)
    assert str(corpus / "val.de") in msg and "line 3" in msg and ":3:" in msg and "byte offset" in msg


def test_invalid_utf8_in_gz(tmp_path: Path) -> None:
    (tmp_path / "c.en.gz").write_bytes(gzip.compress(b"fine\nbad \xff here\n"))
    (tmp_path / "c.de.gz").write_bytes(gzip.compress(b"gut\nschlecht\n"))
    with pytest.raises(DataError, match=r"c\.en\.gz:2: invalid UTF-8 on line 2"):
        read_parallel(tmp_path / "c", "en", "de")


def test_missing_file_lists_tried_paths(corpus: Path, tmp_path: Path) -> None:
    os.remove(corpus / "test.de")
    dm = make_dm(corpus, tmp_path)
    with pytest.raises(MissingDataError) as e:
        dm.setup("test")
    assert isinstance(e.value, DataError)
    assert str(corpus / "test.de") in str(e.value) and str(corpus / "test.de.gz") in str(e.value)


def test_empty_lines_skipped_with_count_or_error(corpus: Path, tmp_path: Path, capsys) -> None:
    en, de = list(EN), list(DE)
    en[3], de[7], de[9] = "   ", "\u00a0\t", ""
    write_pair(corpus / "train", en, de)
    dm = make_dm(corpus, tmp_path)
    dm.setup("fit")
    out = capsys.readouterr().out
    assert "skipped 3 of 20" in out and "lines 4, 8, 10" in out
    assert len(dm.train_dataset) == 17 and dm.train_dataset.line_numbers[3] == 5

    with pytest.raises(DataError) as e:
        make_dm(corpus, tmp_path, empty_lines="error").setup("fit")
    assert str(corpus / "train.en") + ":4" in str(e.value)


def test_long_sentences_policies(corpus: Path, tmp_path: Path, capsys) -> None:
    long_en = " ".join(["word"] * 200)  # >= 200 tokens; the others < 120
    write_pair(corpus / "train", [*EN, long_en], [*DE, "kurz."])
    write_pair(corpus / "val", [long_en, "short."], ["kurz.", "auch kurz."])
    max_len = 150

    dm = make_dm(corpus, tmp_path, max_len=max_len)  # default "skip" on train
    with pytest.warns(UserWarning, match="truncated 1 of 2"):  # val is always truncated
        dm.setup("fit")
    assert "skipped 1 of 21" in capsys.readouterr().out
    assert len(dm.train_dataset) == len(EN)
    assert dm.train_dataset.lengths.max() <= max_len
    val = dm.val_dataset
    assert len(val) == 2 and val.src_lengths[0] == max_len and val[0]["src"][-1] == EOS_ID
    assert val.src_text[0] == long_en  # the reference strings stay whole

    dm = make_dm(corpus, tmp_path, max_len=max_len, long_sentences="truncate")
    with pytest.warns(UserWarning, match="truncated"):
        dm.setup("fit")
    assert len(dm.train_dataset) == len(EN) + 1
    item = dm.train_dataset[len(EN)]
    assert len(item["src"]) == max_len and item["src"][-1] == EOS_ID

    with pytest.raises(DataError, match=rf"train\.en:{len(EN) + 1}: source sentence"):
        make_dm(corpus, tmp_path, max_len=max_len, long_sentences="error").setup("fit")


# ---------------------------------------------------------------------------------------------
# Lightning integration and the shipped dataset
# ---------------------------------------------------------------------------------------------


class _RecordOrder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.orders: dict[int, list[int]] = {}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.orders.setdefault(self.current_epoch, []).extend(batch["index"].tolist())
        return self.w * batch["src"].float().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_trainer_reshuffles_every_epoch(corpus: Path, tmp_path: Path) -> None:
    dm = make_dm(corpus, tmp_path, max_tokens=96, seed=7)
    model = _RecordOrder()
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
    orders = [model.orders[e] for e in range(3)]
    assert all(sorted(o) == list(range(len(EN))) for o in orders)
    assert orders[0] != orders[1] != orders[2]
    sampler = TokenBucketBatchSampler(dm.train_dataset.lengths, 96, shuffle=True, seed=7)
    sampler.set_epoch(2)
    assert [i for b in sampler for i in b] == orders[2]


@pytest.mark.slow
def test_shipped_multi30k_loads(tmp_path_factory: pytest.TempPathFactory) -> None:
    readme = MULTI30K_DIR / "README.md"
    assert readme.is_file() and "non-commercial" in readme.read_text()
    for split in ("train", "val", "test2016"):
        for lang in ("en", "de"):
            assert (MULTI30K_DIR / f"{split}.{lang}.gz").is_file()
    dm = Multi30kDataModule(
        cache_dir=str(tmp_path_factory.mktemp("m30k")), max_train_examples=200, max_eval_examples=50
    )
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_dataset) == 200 and len(dm.val_dataset) == 50 and len(dm.test_dataset) == 50
    assert dm.train_dataset.src_text[0] == "Two young, White males are outside near many bushes."
    assert dm.train_dataset.tgt_text[0] == "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."
    assert dm.data_info["vocab_size"] == 8000
    batch = next(iter(dm.train_dataloader()))
    assert batch["src"].shape[0] * max(batch["src"].shape[1], batch["tgt"].shape[1]) <= 4096
    for text in dm.val_dataset.tgt_text[:50]:
        assert dm.tokenizer.decode(ids_of(dm.tokenizer, text)) == text
