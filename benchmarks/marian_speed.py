"""Decoding at the opus-mt-de-en shape: our TranslationModel loaded from a MarianMTModel vs HF ``generate``.

One random ``MarianMTModel`` with opus-mt-de-en's architecture (6+6 layers, d 512, 8 heads, FFN 2048,
swish, vocabulary 58,101, pad 58,100 = decoder start, EOS 0, shared tied embeddings, logits bias) is
written with ``save_pretrained`` and loaded into ours through ``init_from``: the same weights on
both sides. Sources are random ids (no opus-mt vocabulary offline) with the lengths of the first
Multi30k test2016 German sentences (words x 1.3, + EOS), batched by length.

Both sides decode every sentence to the same forced length (``floor(1.2 * src_len + 10)``, EOS
forced last; ours ``min_len``, HF ``min_new_tokens`` + ``forced_eos_token_id``), pad never generated,
greedy and beam 5 (length penalty 1.0), fp32, in the same process, alternating ours / HF batch by
batch so that the machine's load hits both alike; sentences/s and the ratio ours / HF. Outputs are
compared token for token (``same_tokens``). Greedy should agree; beam search may not here, and that
is no discrepancy of the model: every hypothesis ends at the forced EOS, which adds the model's EOS
log-prob to a hypothesis' score in ours and 0 in HF, and HF's small random init gives a
near-uniform distribution over 58k tokens whose near-ties float32 rounding can flip.
``tests/modules/test_marian.py`` checks beam equality where sentences end by themselves.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/marian_speed.py --sentences 32 --batch 16

Needs ``pip install -e '.[hub]'`` (transformers). One JSON document goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable without PYTHONPATH
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import cpu_model  # noqa: E402
from modules.decoding import beam_search, greedy_decode, pad_hypotheses  # noqa: E402
from modules.translation import TranslationModel  # noqa: E402

VOCAB, PAD, EOS = 58101, 58100, 0
OPUS_MT_DE_EN = dict(  # Helsinki-NLP/opus-mt-de-en's config.json (architecture keys)
    vocab_size=VOCAB, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
    decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, activation_function="swish",
    scale_embedding=True, max_position_embeddings=512, pad_token_id=PAD, decoder_start_token_id=PAD,
    eos_token_id=EOS, forced_eos_token_id=EOS, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
)


def source_batches(sentences: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(src [B, S], src_padding_mask [B, S], forced output length) per batch, sorted by length."""
    with gzip.open(ROOT / "data" / "multi30k" / "test2016.de.gz", "rt", encoding="utf-8") as f:
        words = [len(line.split()) for line in f.read().split("\n")[:sentences]]
    lengths = sorted(round(1.3 * n) + 1 for n in words)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(lengths), batch):
        part = lengths[i : i + batch]
        src = torch.full((len(part), max(part)), PAD)
        for row, n in enumerate(part):
            src[row, : n - 1] = torch.randint(2, PAD, (n - 1,), generator=g)
            src[row, n - 1] = EOS
        mask = src == PAD
        out.append((src, mask, int(1.2 * max(part) + 10)))
    return out


def ours(model, mode: str, src, mask, limit: int, beam: int) -> torch.Tensor:
    if mode == "beam":
        hyps = beam_search(model, src, mask, bos_id=PAD, eos_id=EOS, pad_id=PAD, beam_size=beam, length_penalty=1.0, max_len_a=0.0,
                           max_len_b=limit, min_len=limit)
        return pad_hypotheses([h[0][0] for h in hyps], PAD)
    return greedy_decode(model, src, mask, bos_id=PAD, eos_id=EOS, pad_id=PAD, max_len_a=0.0, max_len_b=limit, min_len=limit)


def hf(model, mode: str, src, mask, limit: int, beam: int) -> torch.Tensor:
    out = model.generate(input_ids=src, attention_mask=(~mask).long(), max_new_tokens=limit, min_new_tokens=limit,
                         num_beams=beam if mode == "beam" else 1, do_sample=False, length_penalty=1.0,
                         bad_words_ids=[[PAD]], forced_eos_token_id=EOS)
    return out[:, 1:]  # without the decoder start token


def measure(models: dict, mode: str, batches: list, beam: int, repeat: int) -> dict:
    times = {"ours": 0.0, "hf": 0.0}
    same = True
    order = (("ours", ours), ("hf", hf))
    for _ in range(repeat):
        for src, mask, limit in batches:
            outs = {}
            order = order[::-1]  # who goes first alternates
            for name, fn in order:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    outs[name] = fn(models[name], mode, src, mask, limit, beam)
                times[name] += time.perf_counter() - t0
            a, b = outs["ours"], outs["hf"]
            same &= a.shape == b.shape and bool((a == b).all())
    n = repeat * sum(src.shape[0] for src, _, _ in batches)
    rate = {k: round(n / t, 3) for k, t in times.items()}
    return {"mode": mode, "sentences": n, "ours_sent_per_s": rate["ours"], "hf_sent_per_s": rate["hf"],
            "ratio_ours_over_hf": round(rate["ours"] / rate["hf"], 3), "same_tokens": same}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sentences", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--modes", default="greedy,beam")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    reference = transformers.MarianMTModel(transformers.MarianConfig(**OPUS_MT_DE_EN)).eval()
    with torch.no_grad():  # a logits bias that is not zero, as in the released models
        reference.final_logits_bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(args.seed))
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(sys.stderr):  # the load report
        reference.save_pretrained(folder)
        model = TranslationModel(vocab_size=VOCAB, pad_id=PAD, init_from=folder, dropout=0.0).eval()
    models = {"ours": model, "hf": reference}
    batches = source_batches(args.sentences, args.batch, args.seed)
    warm = batches[0][0][:4], batches[0][1][:4], 4
    for name, fn in (("ours", ours), ("hf", hf)):
        with torch.inference_mode():
            fn(models[name], "greedy", *warm, args.beam)
    results = [measure(models, mode, batches, args.beam, args.repeat) for mode in args.modes.split(",")]
    doc = {
        "benchmark": "marian_speed", "shape": "opus-mt-de-en (random weights)", "precision": "fp32",
        "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "loadavg_1m_5m_15m": [round(x, 2) for x in os.getloadavg()],
        "params_m": round(sum(q.numel() for q in model.parameters()) / 1e6, 2),
        "batches": [[int(s.shape[0]), int(s.shape[1]), limit] for s, _, limit in batches], "results": results,
    }
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
