"""Pretrained translation models from HuggingFace Marian folders (opus-mt): architecture and weights.

A ``MarianMTModel`` is a post-norm Transformer that :class:`modules.translation.TranslationModel`
expresses with settings, not with a second implementation: SiLU ("swish") feed-forward layers,
embeddings x sqrt(d), sinusoidal positions with the sines in the first half of the channels and the
cosines in the second (``position_layout="halves"``), no LayerNorm after the encoder or the decoder
(``final_norm=False``), a fixed bias on the output logits (``final_logits_bias``), shared or separate
vocabularies, tied output embedding. The decoder starts from the pad token (the data module's
``bos_id``, read from ``config.json`` with the tokenizer: :mod:`modules.marian_vocab`).

A source is a local folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, as
``save_pretrained`` writes it) or ``hf:REPO_ID[@revision]``, fetched once through ``huggingface_hub``
into its cache (``HF_HOME``); offline, the cached copy is used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

SOURCE_FILES = (  # what a translation source needs from a HuggingFace repository
    "config.json", "generation_config.json", "model.safetensors", "pytorch_model.bin", "source.spm",
    "target.spm", "vocab.json", "target_vocab.json", "tokenizer_config.json",
)
ACTIVATIONS = {"swish": "silu", "silu": "silu", "relu": "relu", "gelu": "gelu"}  # HF name -> ours
NOT_IN_MARIAN = ("length_head.", "copy_gate.")  # ours only: kept as initialised (NAT length head, copy gate)


def resolve_source(ref: str | os.PathLike) -> Path:
    """The folder of a pretrained source: ``ref`` itself, or for ``hf:REPO[@rev]`` the local snapshot."""
    text = str(ref)
    if text.startswith("hf:"):
        return hf_snapshot(text)
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{text}: not a folder. init_from for translation takes a HuggingFace MarianMTModel folder "
            "(config.json + model.safetensors, as save_pretrained writes it) or hf:REPO_ID[@revision]"
        )
    return folder


def hf_snapshot(ref: str) -> Path:
    """``hf:REPO_ID[@revision]`` -> the local snapshot folder (download once; the cache after that).

    Kept apart so that it can give way to the project's shared ``hf:`` resolver (detection's weights)."""
    repo, _, revision = ref[3:].partition("@")
    if not repo:
        raise ValueError(f"{ref}: expected hf:REPO_ID[@revision], e.g. hf:Helsinki-NLP/opus-mt-de-en")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ImportError(f"{ref}: hf: sources need huggingface_hub: pip install -e '.[hub]'") from e
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=list(SOURCE_FILES)))
    except Exception as e:  # offline and not cached, unknown repository or revision
        from huggingface_hub.constants import HF_HUB_CACHE

        raise FileNotFoundError(
            f"{ref}: could not fetch it and it is not in the HuggingFace cache ({HF_HUB_CACHE}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Connect once, or download the "
            "repository's files by hand into a folder and pass the folder."
        ) from e


def read_config(folder: Path, ref: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{ref}: no config.json in {folder} (a MarianMTModel folder has one)")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("model_type") != "marian":
        raise ValueError(f"{path}: model_type is {config.get('model_type')!r}; translation init_from reads "
                         "Marian models (opus-mt, model_type 'marian')")
    return config


def marian_architecture(config: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """The :class:`TranslationModel` settings that ``config.json`` of a MarianMTModel states."""
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if config[a] != config[b]:
            raise ValueError(f"{where}: {a}={config[a]} but {b}={config[b]}; the shared Transformer has one "
                             "setting for both sides")
    activation = ACTIVATIONS.get(config.get("activation_function", "gelu"))
    if activation is None:
        raise ValueError(f"{where}: activation_function {config['activation_function']!r} is not one of "
                         f"{sorted(ACTIVATIONS)}")
    shared = config.get("share_encoder_decoder_embeddings", True)
    return {
        "vocab_size": config["vocab_size"], "pad_id": config["pad_token_id"], "d_model": config["d_model"],
        "nhead": config["encoder_attention_heads"], "num_encoder_layers": config["encoder_layers"],
        "num_decoder_layers": config["decoder_layers"], "dim_feedforward": config["encoder_ffn_dim"],
        "norm_first": False, "activation": activation, "tie_embeddings": config.get("tie_word_embeddings", True),
        "tgt_vocab_size": None if shared else (config.get("decoder_vocab_size") or config["vocab_size"]),
        "scale_embedding": bool(config.get("scale_embedding", False)), "position_layout": "halves",
        "final_norm": False, "logits_bias": True,
    }


def read_state_dict(folder: Path, ref: str) -> tuple[dict[str, Tensor], str]:
    """The weights of a HuggingFace folder (``model.safetensors``, else ``pytorch_model.bin``) and the file name."""
    safetensors_file, bin_file = folder / "model.safetensors", folder / "pytorch_model.bin"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_file)), safetensors_file.name
    if bin_file.is_file():
        return torch.load(bin_file, map_location="cpu", weights_only=True), bin_file.name
    raise FileNotFoundError(f"{ref}: neither model.safetensors nor pytorch_model.bin in {folder}")


_LAYER_PARTS = {  # HF Marian layer sub-keys -> ours (attention projections handled apart)
    "encoder": {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2", "fc1": "ffn.0", "fc2": "ffn.3"},
    "decoder": {"self_attn_layer_norm": "norm1", "encoder_attn_layer_norm": "norm2", "final_layer_norm": "norm3",
                "fc1": "ffn.0", "fc2": "ffn.3"},
}
_ATTENTION = {"self_attn": "self_attn", "encoder_attn": "cross_attn"}


def _layer_tensors(hf: dict[str, Tensor], side: str, i: int, used: set[str]) -> dict[str, Tensor]:
    """One encoder/decoder layer in our names: q/k/v projections stacked into ``in_proj``. Keys
    absent from ``hf`` are left out (the loader reports them)."""
    src, dst = f"model.{side}.layers.{i}.", f"transformer.{side}_layers.{i}."
    out: dict[str, Tensor] = {}
    pairs = [([f"{src}{theirs}.{p}"], f"{dst}{ours}.{p}") for theirs, ours in _LAYER_PARTS[side].items()
             for p in ("weight", "bias")]
    for theirs, ours in _ATTENTION.items():
        if side == "decoder" or theirs == "self_attn":
            for p in ("weight", "bias"):
                pairs.append(([f"{src}{theirs}.{x}_proj.{p}" for x in "qkv"], f"{dst}{ours}.in_proj.{p}"))
                pairs.append(([f"{src}{theirs}.out_proj.{p}"], f"{dst}{ours}.out_proj.{p}"))
    for keys, ours in pairs:
        if all(k in hf for k in keys):
            out[ours] = torch.cat([hf[k] for k in keys]) if len(keys) > 1 else hf[keys[0]]
            used.update(keys)
    return out


def _first(hf: dict[str, Tensor], keys: tuple[str, ...], used: set[str]) -> Tensor | None:
    """The first of ``keys`` present (tied weights are saved once, under one of their names)."""
    for key in keys:
        if key in hf:
            used.update(k for k in keys if k in hf)
            return hf[key]
    return None


def convert_state_dict(hf: dict[str, Tensor], architecture: dict[str, Any], where: str) -> tuple[dict[str, Tensor], set[str]]:
    """A MarianMTModel state dict in our names (``TranslationModel`` keys) and the HF keys it used."""
    used: set[str] = set()
    ours: dict[str, Tensor] = {}
    for i in range(architecture["num_encoder_layers"]):
        ours.update(_layer_tensors(hf, "encoder", i, used))
    for i in range(architecture["num_decoder_layers"]):
        ours.update(_layer_tensors(hf, "decoder", i, used))
    shared = architecture["tgt_vocab_size"] is None
    src_keys = ("model.shared.weight", "model.encoder.embed_tokens.weight") if shared else ("model.encoder.embed_tokens.weight",)
    tgt_keys = ("model.shared.weight", "model.decoder.embed_tokens.weight") if shared else ("model.decoder.embed_tokens.weight",)
    tied = architecture["tie_embeddings"]
    embed = _first(hf, src_keys + (("lm_head.weight",) if shared and tied else ()), used)
    target = embed if shared else _first(hf, tgt_keys + (("lm_head.weight",) if tied else ()), used)
    if embed is None or target is None:
        raise KeyError(f"{where}: no token embedding (model.shared.weight / model.*.embed_tokens.weight)")
    ours["embed.weight"] = embed
    if not shared:
        ours["tgt_embed.weight"] = target
    if not tied:
        head = _first(hf, ("lm_head.weight",), used)
        if head is None:
            raise KeyError(f"{where}: tie_word_embeddings is false but there is no lm_head.weight")
        ours["output.weight"] = head
    bias = _first(hf, ("final_logits_bias",), used)
    ours["output_bias"] = bias.reshape(-1) if bias is not None else torch.zeros(target.shape[0])
    used.update(k for k in hf if k.endswith("embed_positions.weight"))  # fixed tables: checked apart
    return ours, used


def _check_positions(hf: dict[str, Tensor], positions: Tensor, where: str) -> None:
    """Saved sinusoidal tables (older files keep them) must be the ones we compute."""
    for key in (k for k in hf if k.endswith("embed_positions.weight")):
        table = hf[key].float()
        n = min(table.shape[0], positions.shape[0])
        if table.shape[1] != positions.shape[1] or not torch.allclose(table[:n], positions[:n].float(), atol=1e-4):
            raise ValueError(f"{where}: {key} is not the sinusoidal table (sines then cosines) this model computes")


@dataclass(kw_only=True)
class MarianSource:
    """A Marian folder opened for :class:`TranslationModel` (``init_from``)."""

    ref: str
    folder: Path
    config: dict[str, Any]

    @classmethod
    def open(cls, ref: str | os.PathLike) -> MarianSource:
        folder = resolve_source(ref)
        return cls(ref=str(ref), folder=folder, config=read_config(folder, str(ref)))

    def architecture(self, given: dict[str, Any]) -> dict[str, Any]:
        """``given`` settings with the source's architecture laid over them; each replaced value is
        printed. The vocabulary is the data's tokenizer's: one larger than the source's, or another
        pad id, means the data was not tokenised with the source's vocabulary, an error."""
        stated = marian_architecture(self.config, f"{self.folder / 'config.json'}")
        for key in ("vocab_size", "tgt_vocab_size"):
            if given.get(key) is not None and stated[key] is not None and given[key] > stated[key]:
                raise ValueError(
                    f"init_from {self.ref}: the data's tokenizer has {given[key]} ids ({key}) but the model has "
                    f"{stated[key]}: tokenise with the model's own vocabulary (data.tokenizer={self.ref})"
                )
        if given.get("pad_id") is not None and given["pad_id"] != stated["pad_id"]:
            raise ValueError(f"init_from {self.ref}: pad id {given['pad_id']} (the data's tokenizer) but the model's "
                             f"is {stated['pad_id']}: tokenise with the model's vocabulary (data.tokenizer={self.ref})")
        replaced = [f"{k}={stated[k]} (was {given[k]})" for k in stated
                    if k in given and k not in ("vocab_size", "tgt_vocab_size") and given[k] != stated[k]]
        if replaced:
            print(f"init_from {self.ref}: architecture from its config.json: {', '.join(replaced)}", flush=True)
        return {**given, **stated}

    def load_into(self, model: nn.Module, strict: bool = True) -> dict[str, list[str]]:
        """Copy the source's weights into ``model`` (built with :meth:`architecture`); print and
        return the report: ``loaded`` (our keys), ``initialised`` (ours only), ``unused`` (theirs)."""
        hf, name = read_state_dict(self.folder, self.ref)
        where = f"{self.folder / name}"
        architecture = dict(model.settings)
        _check_positions(hf, model.positions, where)
        ours, used = convert_state_dict(hf, architecture, where)
        unused = sorted(set(hf) - used)
        target = model.state_dict()
        wrong = [f"{k}: {tuple(v.shape)} in the source, {tuple(target[k].shape)} here"
                 for k, v in ours.items() if k in target and v.shape != target[k].shape]
        missing = sorted(k for k in target if k not in ours and not k.startswith(NOT_IN_MARIAN)
                         and not (architecture["tie_embeddings"] and k == "output.weight"))
        problems = wrong + [f"{k}: not in the source" for k in missing] + [f"{k}: unused" for k in unused]
        if problems and strict:
            raise ValueError(f"init_from {self.ref} ({where}): {'; '.join(problems[:6])}"
                             f"{' ...' if len(problems) > 6 else ''} (model.init_strict=false loads the rest)")
        loadable = {k: v for k, v in ours.items() if k in target and v.shape == target[k].shape}
        model.load_state_dict(loadable, strict=False)
        report = {"loaded": sorted(loadable), "initialised": sorted(k for k in target if k not in loadable
                                                                    and k != "output.weight"),
                  "unused": unused}
        print(f"init_from {self.ref}: loaded {len(loadable)} tensors from {name}; kept as initialised: "
              f"{', '.join(report['initialised']) or 'none'}; unused: {', '.join(unused) or 'none'}", flush=True)
        return report
