"""Translation speed: our TranslationModel (``modules/``) against HuggingFace's MarianMTModel, side by side.

Setting ``T1``: the joint BPE of ``datamodules.text`` trained on the shipped Multi30k (vocab 8000),
d 256, 3+3 layers, 4 heads, FFN 1024, dropout 0.1, token-budget batches of ~4096 tokens from the
Multi30k training split, label smoothing 0.1, AdamW, gradient clipping at norm 1.0.

Each measurement runs in its own subprocess (so peak memory is that run's alone), after warm-up:

- training target tokens/s (forward, label-smoothed NLL, reading the loss, backward, clipping,
  AdamW step) on the same batches for both models;
- decoding sentences/s on the first test2016 sentences: ours greedy with and without the KV cache
  and beam 5, Marian ``generate()`` greedy and beam 5, every sentence forced to the same length.

    PYTHONPATH=. .venv/bin/python benchmarks/translation_speed.py --what train --steps 8 --warmup 2
    PYTHONPATH=. .venv/bin/python benchmarks/translation_speed.py --what train --precision bf16
    PYTHONPATH=. .venv/bin/python benchmarks/translation_speed.py --what decode
    PYTHONPATH=. .venv/bin/python benchmarks/translation_speed.py --quick      # smoke test

The reference needs ``pip install transformers`` (a benchmark-only dependency). One JSON document
goes to stdout (and ``--out``), a short table to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable without PYTHONPATH
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import cpu_model, emit_json, max_rss_mib  # noqa: E402
from modules import private_api  # noqa: E402
from modules.decoding import beam_search, greedy_decode, pad_hypotheses  # noqa: E402
from modules.translation import TranslationModel, shift_right  # noqa: E402

# datamodules.text's fixed special ids (checked in prepare_data; workers do not import the data
# module, which would pull Lightning into every timed process)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
HF_IGNORE = -100  # HF's label value for "no loss here"
IMPLS = ("ours", "marian")
# each comparison back to back, so that a change in machine load hits both sides alike
DECODE_RUNS = (("ours", "greedy"), ("marian", "greedy"), ("ours", "beam"), ("marian", "beam"),
               ("ours", "greedy_nocache"))
DECODE_RUNS_MARIAN_FIRST = (("marian", "greedy"), ("ours", "greedy"), ("marian", "beam"), ("ours", "beam"),
                            ("ours", "greedy_nocache"))
PRECISIONS = ("fp32", "bf16")
# optimisation as configs/task/translation.yaml (the LR schedule is left out: its cost is nil)
LR, WEIGHT_DECAY, BETAS, GRAD_CLIP = 1e-3, 1e-4, (0.9, 0.98), 1.0
# decoding length rule (configs/model/transformer_small.yaml): a * source length + b
MAX_LEN_A, MAX_LEN_B = 1.2, 10
QUICK_MAX_TOKENS, QUICK_SENTENCES = 1024, 32


@dataclass(frozen=True)
class Setting:
    vocab_size: int  # asked of the BPE; the trained vocabulary may be a little smaller
    d_model: int
    nhead: int
    num_encoder_layers: int
    num_decoder_layers: int
    dim_feedforward: int
    dropout: float
    max_tokens: int  # token budget of a training batch (TokenBucketBatchSampler)
    max_len: int  # training pairs longer than this (in tokens) are skipped, as in the data module
    label_smoothing: float
    decode_sentences: int
    decode_batch_size: int
    beam_size: int


SETTINGS = {"T1": Setting(8000, 256, 4, 3, 3, 1024, 0.1, 4096, 128, 0.1, 256, 64, 5)}


# ------------------------------------------------------------------------------------------ helpers




def version_of(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": version_of("transformers"),
        "tokenizers": version_of("tokenizers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": "cpu",
        "loadavg_1m_5m_15m": [round(x, 2) for x in os.getloadavg()],  # other work on the machine skews timings
    }


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def decode_limit(src_padding_mask: torch.Tensor) -> int:
    """One output limit for the whole batch: max over its sentences of floor(1.2 * src_len + 10),
    ``src_len`` counting the source's non-pad tokens (EOS included), as ``modules.decoding.max_lengths``."""
    src_len = (~src_padding_mask).sum(1).to(torch.float64)
    return int(torch.floor(MAX_LEN_A * src_len + MAX_LEN_B + 1e-9).max())


# ---------------------------------------------------------------------------------------- data
def prepare_data(setting: Setting, args: argparse.Namespace, path: Path) -> dict:
    """Tokenizer, training batches and decoding batches, built once and saved to ``path`` for the workers.

    Returns statistics of what was built (for the JSON document)."""
    from datamodules import text

    if (text.PAD_ID, text.BOS_ID, text.EOS_ID) != (PAD_ID, BOS_ID, EOS_ID):
        raise RuntimeError("datamodules.text changed its special ids; update translation_speed.py")
    data: dict = {"train": [], "decode": []}
    stats: dict = {}
    with contextlib.redirect_stdout(sys.stderr):  # the data module prints progress lines to stdout
        files = [text.resolve_text_file(text.MULTI30K_DIR / "train", lang) for lang in ("en", "de")]
        tokenizer = text.train_or_load_tokenizer(files, setting.vocab_size, 2, args.cache_dir)
        data["vocab_size"] = stats["vocab_size"] = tokenizer.get_vocab_size()
        if "train" in args.what:
            corpus = text.read_parallel(text.MULTI30K_DIR / "train", "en", "de")
            train = text.encode_parallel(corpus, tokenizer, max_len=setting.max_len, long_sentences="skip")
            max_tokens = QUICK_MAX_TOKENS if args.quick else setting.max_tokens
            sampler = text.TokenBucketBatchSampler(train.lengths, max_tokens, shuffle=True, seed=args.seed)
            order = list(sampler)  # epoch 0: the first batches a training run would see
            for i in range(args.warmup + args.steps):
                b = text.collate_translation([train[j] for j in order[i % len(order)]], pad_id=PAD_ID)
                data["train"].append({k: b[k] for k in ("src", "src_padding_mask", "tgt", "tgt_padding_mask")})
            timed = data["train"][args.warmup:]
            stats["train"] = {
                "pairs": len(train),
                "max_tokens": max_tokens,
                "batches_in_epoch": len(order),
                "timed_batches": [
                    {
                        "sentences": b["src"].shape[0],
                        "src_shape": list(b["src"].shape),
                        "tgt_shape": list(b["tgt"].shape),
                        "target_tokens": int((~b["tgt_padding_mask"][:, 1:]).sum()),
                    }
                    for b in timed
                ],
            }
        if "decode" in args.what:
            n = QUICK_SENTENCES if args.quick else setting.decode_sentences
            corpus = text.read_parallel(text.MULTI30K_DIR / "test2016", "en", "de")
            test = text.encode_parallel(corpus, tokenizer, max_len=setting.max_len, long_sentences="truncate",
                                        max_examples=n, name="test")
            bs = setting.decode_batch_size
            for start in range(0, len(test), bs):
                b = text.collate_translation([test[j] for j in range(start, min(start + bs, len(test)))], PAD_ID)
                data["decode"].append({
                    "src": b["src"], "src_padding_mask": b["src_padding_mask"],
                    "limit": decode_limit(b["src_padding_mask"]),
                })
            stats["decode"] = {
                "sentences": len(test),
                "batch_size": bs,
                "batches": [{"sentences": b["src"].shape[0], "src_len_max": b["src"].shape[1],
                             "max_new_tokens": b["limit"]} for b in data["decode"]],
            }
    torch.save(data, path)
    return stats


# ---------------------------------------------------------------------------------------- models
def marian_config_kwargs(setting: Setting, vocab_size: int, args: argparse.Namespace) -> dict:
    kwargs = dict(
        vocab_size=vocab_size, d_model=setting.d_model,
        encoder_layers=setting.num_encoder_layers, decoder_layers=setting.num_decoder_layers,
        encoder_attention_heads=setting.nhead, decoder_attention_heads=setting.nhead,
        encoder_ffn_dim=setting.dim_feedforward, decoder_ffn_dim=setting.dim_feedforward,
        max_position_embeddings=256, pad_token_id=PAD_ID, decoder_start_token_id=BOS_ID, eos_token_id=EOS_ID,
        dropout=setting.dropout, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
        scale_embedding=True,
    )
    if args.marian_match:  # the same computation as ours: ReLU, dropout on attention weights and in the FFN
        kwargs.update(activation_function="relu", attention_dropout=setting.dropout,
                      activation_dropout=setting.dropout)
    return kwargs


def build_model(impl: str, setting: Setting, vocab_size: int, args: argparse.Namespace) -> torch.nn.Module:
    if impl == "ours":
        return TranslationModel(
            vocab_size=vocab_size, pad_id=PAD_ID, d_model=setting.d_model, nhead=setting.nhead,
            num_encoder_layers=setting.num_encoder_layers, num_decoder_layers=setting.num_decoder_layers,
            dim_feedforward=setting.dim_feedforward, dropout=setting.dropout, norm_first=True,
            activation="relu", tie_embeddings=True,
        )
    if impl == "marian":
        import transformers

        transformers.logging.set_verbosity_error()
        config = transformers.MarianConfig(**marian_config_kwargs(setting, vocab_size, args),
                                           attn_implementation=args.marian_attn)
        return transformers.MarianMTModel(config)
    raise ValueError(f"unknown implementation {impl!r}; choose among {IMPLS}")


def count_params(model: torch.nn.Module) -> tuple[float, float]:
    params = list(model.parameters())  # tied weights appear once
    return (round(sum(p.numel() for p in params) / 1e6, 3),
            round(sum(p.numel() for p in params if p.requires_grad) / 1e6, 3))


def model_info(impl: str, model: torch.nn.Module) -> dict:
    total, trainable = count_params(model)
    info = {"params_m": total, "trainable_params_m": trainable}
    if impl == "marian":
        info["attn_implementation"] = private_api.hf_attention_implementation(model.config)
        info["activation_function"] = model.config.activation_function
    return info


# ---------------------------------------------------------------------------------------- training
def train_inputs(impl: str, batch: dict) -> dict:
    """What each side's data pipeline hands the step (built before timing).

    Ours: the batch contract (``shift_right`` is a view, done in the step as ``TranslationTask`` does).
    Marian: what an HF seq2seq collator gives: ``attention_mask`` (1 = token), decoder input ids and
    labels with -100 on padding; no ``decoder_attention_mask`` (HF's default: causal mask only)."""
    if impl == "ours":
        return batch
    tgt_in, labels = shift_right(batch["tgt"])
    return {
        "input_ids": batch["src"],
        "attention_mask": (~batch["src_padding_mask"]).long(),
        "decoder_input_ids": tgt_in.contiguous(),
        "labels": labels.masked_fill(batch["tgt_padding_mask"][:, 1:], HF_IGNORE),
    }


def forward_loss(impl: str, model: torch.nn.Module, inputs: dict, epsilon: float) -> torch.Tensor:
    """Label-smoothed cross entropy of one teacher-forced pass, each side the way its users compute it.

    Ours: as ``TranslationTask._losses`` (causal mask only, vocabulary projection on the real targets,
    the fused float32 loss on the logits). Marian: PyTorch's own label-smoothed ``F.cross_entropy`` on
    the float32 logits, padding ignored: the same quantity (fairseq's smoothing: (1 - eps) * NLL +
    eps * mean over the vocabulary of -log p)."""
    if impl == "ours":
        tgt_in, labels = shift_right(inputs["tgt"])
        keep = ~inputs["tgt_padding_mask"][:, 1:]
        out = model(inputs["src"], inputs["src_padding_mask"], tgt_in, None, select=keep, output="hidden")
        return model.sequence_loss(out, labels[keep], epsilon, PAD_ID)[0]
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                decoder_input_ids=inputs["decoder_input_ids"], use_cache=False, return_dict=True)
    logits = out.logits.float()
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), inputs["labels"].view(-1),
                                             ignore_index=HF_IGNORE, label_smoothing=epsilon)


def run_train(impl: str, precision: str, setting: Setting, args: argparse.Namespace, data: dict) -> dict:
    rss_start, load_start = max_rss_mib(), os.getloadavg()[0]
    torch.manual_seed(args.seed)
    model = build_model(impl, setting, data["vocab_size"], args)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                                  weight_decay=WEIGHT_DECAY, betas=BETAS)
    batches = [train_inputs(impl, b) for b in data["train"]]
    tokens = [int((~b["tgt_padding_mask"][:, 1:]).sum()) for b in data["train"]]

    def step(inputs: dict) -> float:
        with autocast(precision):
            loss = forward_loss(impl, model, inputs, setting.label_smoothing)
        value = loss.item()  # the training loop reads the loss every step (finite check / logging)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad()
        return value

    losses = [step(batches[i]) for i in range(args.warmup)]
    times = []
    for i in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()
        losses.append(step(batches[i]))
        times.append(time.perf_counter() - t0)
    timed_tokens = sum(tokens[args.warmup:])
    return {
        "what": "train",
        "impl": impl,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "warmup": args.warmup,
        "steps": args.steps,
        **model_info(impl, model),
        "timed_target_tokens": timed_tokens,
        "train_tokens_per_s": round(timed_tokens / sum(times), 1),
        "train_step_ms": round(statistics.fmean(times) * 1e3, 2),
        "train_step_ms_median": round(statistics.median(times) * 1e3, 2),
        "train_step_ms_each": [round(t * 1e3, 1) for t in times],
        "peak_mem_mib": round(max_rss_mib(), 1),
        "peak_mem_kind": "process_max_rss",
        "rss_at_start_mib": round(rss_start, 1),
        "peak_mem_above_start_mib": round(max_rss_mib() - rss_start, 1),
        "loadavg_1m_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "first_loss": round(losses[0], 5) if losses else None,
        "last_loss": round(losses[-1], 5) if losses else None,
        "losses_finite": all(math.isfinite(v) for v in losses),
    }


# ---------------------------------------------------------------------------------------- decoding
def ours_decode(model: torch.nn.Module, mode: str, src: torch.Tensor, mask: torch.Tensor, limit: int,
                beam_size: int) -> torch.Tensor:
    """Our decoding at the benchmark's forced length: output tokens ``[B, limit]`` (EOS last).
    ``mode``: greedy | greedy_nocache | beam (each sentence's best hypothesis)."""
    if mode == "beam":
        hyps = beam_search(model, src, mask, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, beam_size=beam_size,
                           length_penalty=1.0, max_len_a=0.0, max_len_b=limit, min_len=limit)
        return pad_hypotheses([h[0][0] for h in hyps], PAD_ID)
    # min_len = limit: EOS never chosen freely, only forced at the limit (HF: min_new_tokens)
    return greedy_decode(model, src, mask, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, max_len_a=0.0, max_len_b=limit,
                         use_cache=mode == "greedy", min_len=limit)


def make_decoder(impl: str, mode: str, model: torch.nn.Module, beam_size: int):
    """``fn(src, src_padding_mask, limit) -> output tokens per sentence (list[int], EOS included)``."""
    if impl == "ours":
        def run(src, mask, limit):
            return ((ours_decode(model, mode, src, mask, limit, beam_size) != PAD_ID).sum(1)).tolist()

        return run

    from transformers import GenerationConfig

    def run(src, mask, limit):
        config = GenerationConfig(
            max_new_tokens=limit, min_new_tokens=limit, num_beams=beam_size if mode == "beam" else 1,
            do_sample=False, use_cache=True, length_penalty=1.0, num_return_sequences=1,
            decoder_start_token_id=BOS_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
            forced_eos_token_id=EOS_ID,  # as ours: EOS forced at the limit (MarianConfig's default is 0)
            suppress_tokens=[PAD_ID],  # as ours: pad is never generated
        )
        out = model.generate(input_ids=src, attention_mask=(~mask).long(), generation_config=config)
        return ((out[:, 1:] != PAD_ID).sum(1)).tolist()  # without the decoder start token

    return run


def run_decode(impl: str, mode: str, precision: str, setting: Setting, args: argparse.Namespace,
               data: dict) -> dict:
    rss_start, load_start = max_rss_mib(), os.getloadavg()[0]
    torch.manual_seed(args.seed)
    model = build_model(impl, setting, data["vocab_size"], args).eval()
    fn = make_decoder(impl, mode, model, setting.beam_size)
    batches = data["decode"]
    with autocast(precision):
        if args.warmup:  # allocator, thread pool, one-time checks: a few sentences, a few steps
            fn(batches[0]["src"][:8], batches[0]["src_padding_mask"][:8], 4)
        times, lengths_ok, new_tokens = [], True, 0
        for b in batches:
            t0 = time.perf_counter()
            lengths = fn(b["src"], b["src_padding_mask"], b["limit"])
            times.append(time.perf_counter() - t0)
            lengths_ok &= all(n == b["limit"] for n in lengths)
            new_tokens += sum(lengths)
    sentences = sum(b["src"].shape[0] for b in batches)
    return {
        "what": "decode",
        "impl": impl,
        "mode": mode,
        "beam_size": setting.beam_size if mode == "beam" else 1,
        "use_cache": mode != "greedy_nocache",
        "precision": precision,
        "threads": torch.get_num_threads(),
        **model_info(impl, model),
        "sentences": sentences,
        "output_tokens": new_tokens,
        "all_outputs_at_limit": lengths_ok,
        "decode_sentences_per_s": round(sentences / sum(times), 2),
        "decode_batch_ms": round(statistics.fmean(times) * 1e3, 1),
        "decode_batch_ms_each": [round(t * 1e3, 1) for t in times],
        "peak_mem_mib": round(max_rss_mib(), 1),
        "peak_mem_kind": "process_max_rss",
        "rss_at_start_mib": round(rss_start, 1),
        "peak_mem_above_start_mib": round(max_rss_mib() - rss_start, 1),
        "loadavg_1m_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }


# ---------------------------------------------------------------------------------------- orchestration
def worker(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    data = torch.load(args.data, weights_only=True)
    setting = SETTINGS[args.setting]
    parts = args.worker.split(":")
    if parts[1] == "marian":  # before the start RSS is read, so that both sides' "above start" is model work
        import transformers  # noqa: F401
    if parts[0] == "train":
        return run_train(parts[1], parts[2], setting, args, data)
    return run_decode(parts[1], parts[2], parts[3], setting, args, data)


def spawn(args: argparse.Namespace, job: str, data_path: Path) -> dict:
    argv = [
        sys.executable, str(Path(__file__).resolve()), "--worker", job, "--data", str(data_path),
        "--setting", args.setting, "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--seed", str(args.seed), "--marian-attn", args.marian_attn,
        "--marian-match" if args.marian_match else "--no-marian-match",
    ]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")  # models are built from configs: nothing to download
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    parts = job.split(":")
    head = {"what": parts[0], "impl": parts[1]}
    if parts[0] == "decode":
        head["mode"] = parts[2]
    head["precision"] = parts[-1]
    if proc.returncode != 0:
        return {**head, "error": proc.stderr.strip()[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median_of(results: list[dict], key: str, **match) -> float | None:
    """Median of ``key`` over the repeats of one (what, impl, [mode,] precision)."""
    values = [r[key] for r in results if "error" not in r and all(r.get(k) == v for k, v in match.items())]
    return statistics.median(values) if values else None


def ratios(results: list[dict]) -> dict:
    """ours / Marian, each side's median over the repeats."""
    out: dict = {}
    for precision in PRECISIONS:
        train = {}
        for impl in IMPLS:
            keys = ("train_tokens_per_s", "train_step_ms", "peak_mem_above_start_mib")
            values = [_median_of(results, k, what="train", impl=impl, precision=precision) for k in keys]
            if None not in values:
                train[impl] = dict(zip(keys, values))
        if "ours" in train and "marian" in train:
            o, m = train["ours"], train["marian"]
            out[f"train_{precision}"] = {
                "tokens_per_s_ours_over_marian": round(o["train_tokens_per_s"] / m["train_tokens_per_s"], 3),
                "step_ms_ours_over_marian": round(o["train_step_ms"] / m["train_step_ms"], 3),
                "peak_mem_above_start_ours_over_marian": round(
                    o["peak_mem_above_start_mib"] / max(m["peak_mem_above_start_mib"], 1e-9), 3),
            }
        dec = {}
        for impl, mode in DECODE_RUNS:
            v = _median_of(results, "decode_sentences_per_s", what="decode", impl=impl, mode=mode,
                           precision=precision)
            if v is not None:
                dec[impl, mode] = v
        pairs = {
            "greedy_ours_over_marian": (("ours", "greedy"), ("marian", "greedy")),
            "greedy_nocache_ours_over_marian_greedy": (("ours", "greedy_nocache"), ("marian", "greedy")),
            "beam_ours_over_marian": (("ours", "beam"), ("marian", "beam")),
            "ours_cache_speedup": (("ours", "greedy"), ("ours", "greedy_nocache")),
        }
        d = {name: round(dec[a] / dec[b], 3) for name, (a, b) in pairs.items() if a in dec and b in dec}
        if d:
            out[f"decode_{precision}"] = d
    return out


def print_table(results: list[dict], rat: dict) -> None:
    err = sys.stderr
    train = [r for r in results if r["what"] == "train"]
    dec = [r for r in results if r["what"] == "decode"]
    if train:
        print(f"{'train':>15} {'prec':>5} {'rep':>3} {'tok/s':>10} {'step ms':>10} {'peak MiB':>9} "
              f"{'first loss':>10}", file=err)
        for r in train:
            name = r["impl"]
            if "error" in r:
                print(f"{name:>15} {r['precision']:>5} {r['repeat']:>3}  FAILED: {r['error'].splitlines()[-1]}",
                      file=err)
                continue
            print(f"{name:>15} {r['precision']:>5} {r['repeat']:>3} {r['train_tokens_per_s']:>10} "
                  f"{r['train_step_ms']:>10} {r['peak_mem_mib']:>9} {r['first_loss']!s:>10}", file=err)
    if dec:
        print(f"{'decode':>22} {'prec':>5} {'rep':>3} {'sent/s':>8} {'batch ms':>10} {'out tok':>8} "
              f"{'at limit':>8}", file=err)
        for r in dec:
            name = f"{r['impl']} {r['mode']}"
            if "error" in r:
                print(f"{name:>22} {r['precision']:>5} {r['repeat']:>3}  FAILED: {r['error'].splitlines()[-1]}",
                      file=err)
                continue
            print(f"{name:>22} {r['precision']:>5} {r['repeat']:>3} {r['decode_sentences_per_s']:>8} "
                  f"{r['decode_batch_ms']:>10} {r['output_tokens']:>8} {r['all_outputs_at_limit']!s:>8}", file=err)
    for key, values in rat.items():
        print(f"{key}: " + ", ".join(f"{k} {v}" for k, v in values.items()), file=err)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", default="train,decode", help="comma list of train, decode")
    p.add_argument("--setting", default="T1", choices=list(SETTINGS))
    p.add_argument("--steps", type=int, default=8, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed training steps before timing (decoding: > 0 adds one tiny untimed call)")
    p.add_argument("--precision", default="fp32",
                   help="comma list of fp32, bf16 (bf16: torch.autocast('cpu', bfloat16) for both models)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every measurement N times (odd repeats Marian first); ratios use the medians")
    p.add_argument("--marian-attn", default="sdpa", choices=["sdpa", "eager"],
                   help="Marian's attention implementation (ours: SDPA in training and the encoder, "
                        "explicit matmuls in cached decoding steps)")
    p.add_argument("--marian-match", action=argparse.BooleanOptionalAction, default=True,
                   help="Marian with ReLU and attention/activation dropout 0.1 like ours "
                        "(--no-marian-match: HF defaults, GELU and no attention/activation dropout)")
    p.add_argument("--cache-dir", type=Path,
                   default=Path(os.environ.get("MTDETR_CACHE_DIR", ROOT / ".cache")), help="BPE cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: 1 warm-up, 2 steps, {QUICK_MAX_TOKENS}-token batches, "
                        f"{QUICK_SENTENCES} decoded sentences")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON document here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: train:IMPL:PREC | decode:IMPL:MODE:PREC
    p.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)  # internal: prepared batches
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 1, 2
    if args.steps < 1 or args.warmup < 0 or args.repeat < 1:
        p.error("--steps and --repeat must be >= 1 and --warmup >= 0")
    args.what = [x for x in args.what.split(",") if x]
    args.precision = [x for x in args.precision.split(",") if x]
    for x in args.what:
        if x not in ("train", "decode"):
            p.error(f"unknown --what {x!r}; choose among train, decode")
    for x in args.precision:
        if x not in PRECISIONS:
            p.error(f"unknown precision {x!r}; choose among {', '.join(PRECISIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if version_of("transformers") is None:
        print("translation_speed: the reference needs HuggingFace transformers: pip install transformers",
              file=sys.stderr)
        return 2
    machine = machine_info()  # before the runs: the load average says whether the machine was idle
    setting = SETTINGS[args.setting]
    jobs = []
    for repeat in range(args.repeat):
        # odd repeats run Marian first: a drift in machine load then does not favour one side
        impls = IMPLS if repeat % 2 == 0 else IMPLS[::-1]
        runs = DECODE_RUNS if repeat % 2 == 0 else DECODE_RUNS_MARIAN_FIRST
        for precision in args.precision:
            if "train" in args.what:
                jobs += [(repeat, f"train:{impl}:{precision}") for impl in impls]
            if "decode" in args.what:
                jobs += [(repeat, f"decode:{impl}:{mode}:{precision}") for impl, mode in runs]
    with tempfile.TemporaryDirectory(prefix="translation_speed-") as tmp:
        data_path = Path(tmp) / "batches.pt"
        print("[bench] preparing data ...", file=sys.stderr, flush=True)
        data_stats = prepare_data(setting, args, data_path)
        results = []
        for repeat, job in jobs:
            print(f"[bench] {job} (repeat {repeat}) ...", file=sys.stderr, flush=True)
            results.append({**spawn(args, job, data_path), "repeat": repeat})
    rat = ratios(results)
    marian_kwargs = marian_config_kwargs(setting, data_stats["vocab_size"], args)
    doc = {
        "benchmark": "translation_speed",
        "machine": machine,
        "config": {
            "setting": args.setting,
            **asdict(setting),
            "what": args.what, "precision": args.precision, "steps": args.steps, "warmup": args.warmup,
            "repeat": args.repeat, "quick": args.quick, "seed": args.seed,
            "optimizer": {"name": "AdamW", "lr": LR, "weight_decay": WEIGHT_DECAY, "betas": list(BETAS),
                          "grad_clip": GRAD_CLIP},
            "ours": {"norm_first": True, "activation": "relu", "tie_embeddings": True,
                     "decoder_gets_tgt_padding_mask": False, "vocab_projection_on_real_targets_only": True},
            "marian_config": {**marian_kwargs, "attn_implementation": args.marian_attn},
            "decode_length_rule": (f"every sentence of a batch gets max_new_tokens = max over the batch of "
                                   f"floor({MAX_LEN_A} * src_len + {MAX_LEN_B}); EOS banned before, forced at it"),
        },
        "data": data_stats,
        "results": results,
        "ratios": rat,
    }
    emit_json(doc, args.out)
    print_table(results, rat)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
