"""Paired A/B: greedy (or beam) decoding of ``translation_speed.py``'s decoding batches with the
encoder packed (``Seq2SeqTransformer.encode(..., pack=True)``, what ``TranslationModel`` asks for)
against the padded encoder, in one process, alternating per batch, so both see the same machine.

    PYTHONPATH=. .venv/bin/python benchmarks/packed_encoder.py --rounds 5 [--mode beam] [--out FILE]

Prints and writes JSON: per variant, sentences/s from the per-batch best and median times over the
rounds; the median over (batch, round) pairs of padded time / packed time; the encoder alone over
all batches (4 x rounds paired passes, best and median ms); the share of padding in
the encoder input; and whether both variants decoded the same tokens.
Needs no ``transformers``; the model is T1 with random weights, as in ``translation_speed.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import translation_speed as ts  # noqa: E402

from modules.packed import packed_linears  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="passes over the batches (order of the variants alternates)")
    p.add_argument("--mode", choices=["greedy", "beam"], default="greedy")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setting = ts.SETTINGS["T1"]
    bench_args = ts.parse_args(["--what", "decode"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.pt"
        ts.prepare_data(setting, bench_args, path)
        data = torch.load(path, weights_only=False)
    torch.manual_seed(bench_args.seed)
    model = ts.build_model("ours", setting, data["vocab_size"], bench_args).eval()
    encode = model.encode

    def run(batch: dict) -> torch.Tensor:
        return ts.ours_decode(model, args.mode, batch["src"], batch["src_padding_mask"], batch["limit"],
                              setting.beam_size)

    variants = {"padded": functools.partial(encode, pack=False), "packed": functools.partial(encode, pack=True)}
    batches = data["decode"]
    model.encode = variants["packed"]
    run({**batches[0], "src": batches[0]["src"][:8], "src_padding_mask": batches[0]["src_padding_mask"][:8],
         "limit": 4})  # warm-up
    times = {name: [[] for _ in batches] for name in variants}
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for i, batch in enumerate(batches):
            for name in order:
                model.encode = variants[name]
                t0 = time.perf_counter()
                out = run(batch)
                times[name][i].append(time.perf_counter() - t0)
                if r == 0:
                    outputs[name].append(out)
    # the encoder alone (what packing changes), the same pairing, under decoding's inference settings
    encoder_ms = {name: [] for name in variants}
    with torch.inference_mode(), packed_linears(owner=model):
        for r in range(4 * args.rounds):
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                t0 = time.perf_counter()
                for batch in batches:
                    variants[name](batch["src"], batch["src_padding_mask"])
                encoder_ms[name].append((time.perf_counter() - t0) * 1e3)
    sentences = sum(b["src"].shape[0] for b in batches)
    padding = sum(int(b["src_padding_mask"].sum()) for b in batches) / sum(b["src_padding_mask"].numel() for b in batches)
    result = {
        "machine": ts.machine_info(),
        "mode": args.mode,
        "rounds": args.rounds,
        "sentences": sentences,
        "encoder_padding_share": round(padding, 3),
        "same_tokens": all(torch.equal(a, b) for a, b in zip(outputs["padded"], outputs["packed"])),
        # each batch in each round timed both ways back to back: padded time / packed time
        "paired_speedup_median": round(statistics.median(
            x / y for xs, ys in zip(times["padded"], times["packed"]) for x, y in zip(xs, ys)), 3),
        "variants": {
            name: {
                "sentences_per_s_best": round(sentences / sum(min(t) for t in v), 1),
                "sentences_per_s_median": round(sentences / sum(statistics.median(t) for t in v), 1),
                "batch_ms_each_round": [[round(x * 1e3, 1) for x in t] for t in v],
                "encoder_ms_all_batches_best": round(min(encoder_ms[name]), 1),
                "encoder_ms_all_batches_median": round(statistics.median(encoder_ms[name]), 1),
            }
            for name, v in times.items()
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    print(f"paired speed-up of packing (median over batches x rounds): {result['paired_speedup_median']}",
          file=sys.stderr)
    for name, v in result["variants"].items():
        print(f"{name:7s} best-of {v['sentences_per_s_best']:7.1f} sent/s   median-of {v['sentences_per_s_median']:7.1f}"
              f"   encoder alone (all batches) median {v['encoder_ms_all_batches_median']:.1f} ms", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
