"""Whole-model DETR weights from the field's sources, for ``build_detr(init_from=...)``.

Sources: the original facebookresearch/detr checkpoints (``{"model": state_dict}``, optionally with
the training ``args``), Hugging Face ``DetrForObjectDetection`` folders (``config.json`` +
``model.safetensors`` / ``pytorch_model.bin``; torchvision/timm or HF ResNet backbone layouts), the
same from the Hub (``hf:REPO_ID[@revision]``) and our own Lightning ``.ckpt`` files.

Every reader turns its source into one *canonical* state dict: this package's DETR names, except the
ResNet trunk, which keeps torchvision's names under ``adapter.trunk.`` (our trunk's own names depend
on whether frozen BatchNorms are fused). :func:`load_detr_weights` then maps the trunk onto the model,
checks every shape and reports what was loaded, re-initialised and left unused.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .backbone import trunk_key

TRUNK = "adapter.trunk."
# build_detr settings a source can state; the others (dropout, trainable layers, ...) are training choices
ARCHITECTURE = (
    "backbone", "d_model", "nhead", "num_encoder_layers", "num_decoder_layers", "dim_feedforward",
    "norm_first", "activation", "num_queries", "position_offset", "trunk_width", "encoder_stride",
)
_DETR_COMPUTATION = {"position_offset": 0.0, "activation": "relu"}  # what DETR's code fixes


@dataclass
class WeightSource:
    """A source read into canonical names. ``settings``: the architecture it states (build_detr names),
    ``stated_by``: where each setting came from (for error messages)."""

    name: str
    state: dict[str, Tensor]
    settings: dict[str, Any] = field(default_factory=dict)
    stated_by: dict[str, str] = field(default_factory=dict)
    class_loss: str = "ce"  # the head it was trained with: ce (softmax + no-object) or focal (sigmoid)


@dataclass
class LoadReport:
    source: str
    loaded: int = 0
    reinitialised: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # source tensors only training needs, not this model

    def summary(self) -> str:
        lines = [f"init_from {self.source}: loaded {self.loaded} tensors"]
        for title, items in (("re-initialised", self.reinitialised), ("unused", self.unused),
                             ("missing (kept random)", self.missing), ("dropped (only for training)", self.dropped)):
            if items:
                lines.append(f"  {title} ({len(items)}): {_abbreviate(items)}")
        return "\n".join(lines)


def _abbreviate(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def _rename(state: dict[str, Tensor], rules: list[tuple[str, Any]]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


# ------------------------------------------------------------------------------------- name mapping
_ORIGINAL_RULES: list[tuple[str, Any]] = [
    (r"^detr\.", ""),  # panoptic checkpoints wrap the detector
    (r"^backbone\.0\.body\.", TRUNK),
    (r"^input_proj\.", "adapter.input_proj."),
    (r"^transformer\.(en|de)coder\.layers\.", r"transformer.\1coder_layers."),
    (r"^transformer\.(en|de)coder\.norm\.", r"transformer.\1coder_norm."),
    (r"\.multihead_attn\.", ".cross_attn."),
    (r"\.in_proj_(weight|bias)$", r".in_proj.\1"),
    (r"\.linear1\.", ".ffn.0."),
    (r"\.linear2\.", ".ffn.3."),
    (r"^class_embed\.", "head.class_embed."),
    (r"^bbox_embed\.layers\.(\d+)\.", lambda m: f"head.bbox_embed.{2 * int(m[1])}."),
]

_HF_RULES: list[tuple[str, Any]] = [
    (r"^model\.backbone\.(conv_encoder\.)?model\.", TRUNK),  # saved files / transformers 5 in memory
    (r"\.o_proj\.", ".out_proj."),
    # HF's own ResNet (use_timm_backbone=false) -> torchvision names
    (r"embedder\.embedder\.convolution\.", "conv1."),
    (r"embedder\.embedder\.normalization\.", "bn1."),
    (r"encoder\.stages\.(\d+)\.layers\.(\d+)\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}."),
    (r"\.shortcut\.convolution\.", ".downsample.0."),
    (r"\.shortcut\.normalization\.", ".downsample.1."),
    (r"\.layer\.(\d)\.convolution\.", lambda m: f".conv{int(m[1]) + 1}."),
    (r"\.layer\.(\d)\.normalization\.", lambda m: f".bn{int(m[1]) + 1}."),
    (r"^model\.input_projection\.", "adapter.input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.(en|de)coder\.layers\.", r"transformer.\1coder_layers."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder_norm."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.self_attn_layer_norm\.", ".norm1."),
    (r"\.encoder_attn_layer_norm\.", ".norm2."),
    (r"^(transformer\.encoder_layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"^(transformer\.decoder_layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
    (r"\.(mlp\.)?fc1\.", ".ffn.0."),
    (r"\.(mlp\.)?fc2\.", ".ffn.3."),
    (r"^class_labels_classifier\.", "head.class_embed."),
    (r"^bbox_predictor\.layers\.(\d+)\.", lambda m: f"head.bbox_embed.{2 * int(m[1])}."),
]


def original_to_canonical(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """facebookresearch/detr names (``transformer.decoder.layers.0.multihead_attn.in_proj_weight``)
    -> canonical names."""
    return _rename(state, _ORIGINAL_RULES)


def hf_to_canonical(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ``DetrForObjectDetection`` names -> canonical names; separate q/k/v projections
    are stacked into one ``in_proj`` ``[3D, D]`` as ours."""
    state = _rename(state, _HF_RULES)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = re.match(r"^(.*)\.([qkv])_proj\.(weight|bias)$", key)
        if m is None:
            out[key] = value
            continue
        parts = [state.get(f"{m[1]}.{p}_proj.{m[3]}") for p in "qkv"]
        if all(p is not None for p in parts):
            out[f"{m[1]}.in_proj.{m[3]}"] = torch.cat(parts)
        else:  # an incomplete triple stays unmapped and is reported as unused
            out[key] = value
    return out


def body_to_torchvision(name: str) -> str:
    """Inverse of :func:`modules.backbone.trunk_key`: an ``ImageAdapter.body`` name (fused or not)
    -> the torchvision ResNet name."""
    first, _, rest = name.partition(".")
    if first in ("0", "1"):
        stem = {"conv": "conv1", "bn": "bn1"}
        head, _, tail = rest.partition(".")
        return f"{stem[head]}.{tail}" if head in stem else f"{'conv1' if first == '0' else 'bn1'}.{rest}"
    layer = f"layer{int(first) - 3}"
    rest = re.sub(r"^(\d+)\.conv(\d)\.conv\.", r"\1.conv\2.", rest)
    rest = re.sub(r"^(\d+)\.conv(\d)\.bn\.", r"\1.bn\2.", rest)
    rest = re.sub(r"^(\d+)\.downsample\.0\.conv\.", r"\1.downsample.0.", rest)
    rest = re.sub(r"^(\d+)\.downsample\.0\.bn\.", r"\1.downsample.1.", rest)
    return f"{layer}.{rest}"


def ours_to_canonical(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ``DETR.state_dict()`` (any trunk layout) -> canonical names."""
    out = {}
    for key, value in state.items():
        if key.startswith("adapter.body."):
            key = TRUNK + body_to_torchvision(key[len("adapter.body."):])
        out[key] = value
    return out


# --------------------------------------------------------------------------------------- settings
def _resnet_name(state: dict[str, Tensor]) -> str | None:
    blocks = {int(m[1]) for k in state if (m := re.match(rf"^{re.escape(TRUNK)}layer3\.(\d+)\.", k))}
    bottleneck = f"{TRUNK}layer1.0.conv3.weight" in state
    return {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101"}.get(
        (bottleneck, len(blocks))
    )


def settings_from_weights(state: dict[str, Tensor]) -> dict[str, Any]:
    """The architecture the tensors themselves fix: widths, layer counts, query count, ResNet depth,
    pre-norm (DETR's pre-norm variant has an encoder norm)."""
    s: dict[str, Any] = {}
    if (q := state.get("query_embed.weight")) is not None:
        s["num_queries"], s["d_model"] = q.shape
    for part in ("encoder", "decoder"):
        ids = {int(m[1]) for k in state if (m := re.match(rf"^transformer\.{part}_layers\.(\d+)\.", k))}
        if ids:
            s[f"num_{part}_layers"] = max(ids) + 1
    for part in ("encoder", "decoder"):
        if (w := state.get(f"transformer.{part}_layers.0.ffn.0.weight")) is not None:
            s["dim_feedforward"] = w.shape[0]
            break
    if "num_encoder_layers" in s:
        s["norm_first"] = "transformer.encoder_norm.weight" in state
    if (name := _resnet_name(state)) is not None:
        s["backbone"] = name
    if (stem := state.get(f"{TRUNK}conv1.weight")) is not None:
        s["trunk_width"] = stem.shape[0] / 64
    if "adapter.neck.reduce.0.weight" in state:  # the hybrid encoder's fusion neck
        s["encoder_stride"] = 32
    return s


def _merge_settings(source: WeightSource, stated: dict[str, Any], where: str) -> None:
    """Add the settings a config states; one that contradicts the weights is an error naming both."""
    inferred = settings_from_weights(source.state)
    for key, value in stated.items():
        if key in inferred and inferred[key] != value:
            raise ValueError(
                f"{where} says {key}={value!r} but the weights of {source.name} have {key}={inferred[key]!r}"
            )
    source.settings = {**inferred, **stated}
    source.stated_by = {**{k: f"the weights of {source.name}" for k in inferred},
                        **{k: where for k in stated}}


def _hf_backbone(config: dict, where: str) -> str:
    """The ResNet name of an HF DETR config: v4 layout (``backbone``, ``use_timm_backbone``) or v5
    (``backbone_config`` with a timm name, or HF ResNet depths)."""
    sub = config.get("backbone_config") or {}
    if sub.get("model_type") == "resnet" or (sub and not config.get("use_timm_backbone", True)):
        kind = "bottleneck" if sub.get("layer_type", "bottleneck") == "bottleneck" else "basic"
        names = {("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
                 ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101"}
        name = names.get((kind, tuple(sub.get("depths", ()))))
    else:
        name = sub.get("backbone") or config.get("backbone")
    if name is None or name.split(".")[0] not in ("resnet18", "resnet34", "resnet50", "resnet101"):
        raise ValueError(f"{where}: backbone {name!r} is not a ResNet-18/34/50/101, the trunks mtdetr builds")
    return name.split(".")[0]


def hf_settings(config: dict, where: str) -> dict[str, Any]:
    """build_detr settings stated by an HF ``DetrConfig`` (``config.json``)."""
    if config.get("model_type") != "detr":
        raise ValueError(f"{where}: model_type is {config.get('model_type')!r}; only DETR (model_type detr) loads")
    if config.get("dilation") or (config.get("backbone_config") or {}).get("output_stride"):
        raise ValueError(f"{where}: dilation (DETR-DC5) is not supported: mtdetr's trunks run at stride 32 or 16")
    if config.get("position_embedding_type", "sine") != "sine":
        raise ValueError(f"{where}: position_embedding_type={config['position_embedding_type']!r}; only sine is supported")
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if config.get(enc, 8) != config.get(dec, 8):
            raise ValueError(f"{where}: {enc}={config.get(enc)} != {dec}={config.get(dec)}; mtdetr uses one value")
    return {
        "backbone": _hf_backbone(config, where), "d_model": config.get("d_model", 256),
        "nhead": config.get("encoder_attention_heads", 8), "num_encoder_layers": config.get("encoder_layers", 6),
        "num_decoder_layers": config.get("decoder_layers", 6), "dim_feedforward": config.get("encoder_ffn_dim", 2048),
        "activation": config.get("activation_function", "relu"), "num_queries": config.get("num_queries", 100),
        "norm_first": False, "position_offset": 0.0,
    }


def original_settings(args: Any, where: str) -> dict[str, Any]:
    """build_detr settings stated by the ``args`` namespace some original checkpoints carry."""
    if getattr(args, "dilation", False):
        raise ValueError(f"{where}: dilation (DETR-DC5) is not supported: mtdetr's trunks run at stride 32 or 16")
    if getattr(args, "position_embedding", "sine") not in ("sine", "v2"):
        raise ValueError(f"{where}: position_embedding={args.position_embedding!r}; only sine is supported")
    names = {"backbone": "backbone", "hidden_dim": "d_model", "nheads": "nhead", "enc_layers": "num_encoder_layers",
             "dec_layers": "num_decoder_layers", "dim_feedforward": "dim_feedforward", "num_queries": "num_queries",
             "pre_norm": "norm_first"}
    stated = {ours: getattr(args, theirs) for theirs, ours in names.items() if hasattr(args, theirs)}
    return {**stated, **_DETR_COMPUTATION}


# ------------------------------------------------------------------------------------------ readers
def _torch_load(path: str) -> Any:
    """``torch.load`` with ``weights_only=True``; the one class allowed beyond tensors and containers
    is ``argparse.Namespace`` (the ``args`` some original DETR checkpoints pickle)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt file, arbitrary pickled objects: one user error
        raise ValueError(f"could not read {path} safely (weights_only): {str(e).splitlines()[0][:300]}") from e


def _read_file(path: str) -> WeightSource:
    obj = _torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return _from_lightning(obj, path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        source = WeightSource(path, original_to_canonical(obj["model"]))
        args = obj.get("args")
        where = f"the args saved in {path}"
        _merge_settings(source, original_settings(args, where) if args is not None else dict(_DETR_COMPUTATION),
                        where if args is not None else f"the original DETR code ({path})")
        return source
    raise ValueError(
        f"{path}: not a DETR checkpoint: expected {{'model': state_dict}} (facebookresearch/detr) or a "
        "Lightning .ckpt of a detection run; for Hugging Face weights give the folder with config.json"
    )


def _from_lightning(ckpt: dict, path: str) -> WeightSource:
    """Our own checkpoint: the detection task's ``model.*`` tensors; settings from its hyperparameters."""
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if "head.class_embed.weight" not in state:
        raise ValueError(f"{path}: no DETR weights under model.* (is it a detection checkpoint?)")
    source = WeightSource(path, ours_to_canonical(state))
    hparams = ckpt.get("hyper_parameters") or {}
    model = hparams.get("model") or {}
    stated = {k: model[k] for k in ARCHITECTURE if model.get(k) is not None}
    _merge_settings(source, stated, f"the model settings saved in {path}")
    # the head: task.class_loss (older checkpoints may state model.sigmoid_classes instead)
    if "sigmoid_classes" in model:
        source.class_loss = "focal" if model["sigmoid_classes"] else "ce"
    else:
        source.class_loss = hparams.get("class_loss") or "ce"
    return source


def _read_hf_folder(folder: str, name: str) -> WeightSource:
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder}: no config.json (a Hugging Face DetrForObjectDetection folder has one)")
    with open(config_path) as f:
        config = json.load(f)
    settings = hf_settings(config, config_path)
    safetensors_path, bin_path = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(safetensors_path):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"reading {safetensors_path} needs safetensors: pip install 'mtdetr[hub]'") from e
        raw = load_file(safetensors_path)
    elif os.path.isfile(bin_path):
        raw = _torch_load(bin_path)
    else:
        raise FileNotFoundError(f"{folder}: neither model.safetensors nor pytorch_model.bin is there")
    source = WeightSource(name, hf_to_canonical(raw))
    _merge_settings(source, settings, config_path)
    return source


def _hub_folder(spec: str) -> str:
    """Download (or find in the Hugging Face cache) ``REPO_ID[@revision]``; returns its snapshot folder."""
    repo, _, revision = spec.partition("@")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError as e:
        raise ImportError(f"init_from=hf:{spec} needs huggingface_hub: pip install 'mtdetr[hub]'") from e
    from huggingface_hub import constants

    try:
        config = hf_hub_download(repo, "config.json", revision=revision or None)
        for filename in ("model.safetensors", "pytorch_model.bin"):
            try:
                hf_hub_download(repo, filename, revision=revision or None)
                break
            except EntryNotFoundError:
                if filename == "pytorch_model.bin":
                    raise
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, network: the same one-line remedy
        raise FileNotFoundError(
            f"hf:{spec}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and not downloadable "
            f"({type(e).__name__}): on a connected machine run `hf download {repo}` (same HF_HOME), or give "
            "model.init_from a local folder with config.json and model.safetensors"
        ) from e
    return os.path.dirname(config)


def read_weights(source: str) -> WeightSource:
    """Read ``source`` (see the module docstring) into canonical names and the settings it states."""
    if source.startswith("hf:"):
        return _read_hf_folder(_hub_folder(source[3:]), source)
    if os.path.isdir(source):
        return _read_hf_folder(source, source)
    if not os.path.isfile(source):
        raise FileNotFoundError(
            f"model.init_from: {source!r} not found; give an original DETR .pth, a Hugging Face folder "
            "(config.json + model.safetensors), hf:REPO_ID[@revision] or a detection .ckpt"
        )
    return _read_file(source)


# ------------------------------------------------------------------------------------------ loading
def _to_model_names(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Canonical names -> the model's own (its trunk layout); BatchNorm counters the model lacks are
    dropped, as frozen BatchNorms do when loading."""
    target = model.state_dict()
    out = {}
    for key, value in state.items():
        if key.startswith(TRUNK):
            try:
                key = "adapter.body." + trunk_key(key[len(TRUNK):], model.adapter.fused)
            except (KeyError, ValueError):
                pass  # not a ResNet tensor: reported as unused
            if key.endswith("num_batches_tracked") and key not in target:
                continue
        out[key] = value
    return out


def _class_head(model: nn.Module, source: WeightSource, state: dict[str, Tensor], target: dict[str, Tensor],
                report: LoadReport) -> int:
    """Fine-tuning on other classes (or with the other classification loss): the class rows of every class
    head (the decoder's, and the encoder proposals' with two-stage) are re-initialised; DETR's no-object
    row (the last of a softmax head) keeps the source's values, at the new head's last row. Returns how
    many of the model's own tensors (from ``target``, its state dict) were put into ``state``."""
    own = 0
    for prefix in ("head.class_embed", "enc_head.class_embed"):
        key_w, key_b = f"{prefix}.weight", f"{prefix}.bias"
        if key_w not in state or key_b not in state or key_w not in target or (
                state[key_w].shape == target[key_w].shape and source.class_loss == model.class_loss):
            continue
        src_w, src_b = state[key_w], state[key_b]
        if src_w.shape[1:] != target[key_w].shape[1:]:
            continue  # a width mismatch: the shape check names it
        weight, bias = target[key_w].clone(), target[key_b].clone()
        c_src = src_w.shape[0] - (1 if source.class_loss == "ce" else 0)
        note = f"{prefix} ({c_src} -> {model.num_classes} classes"
        if source.class_loss == model.class_loss == "ce":
            weight[-1], bias[-1] = src_w[-1], src_b[-1]
            note += ", no-object row kept)"
        else:
            note += ", softmax/sigmoid head changed)" if source.class_loss != model.class_loss else ")"
        state[key_w], state[key_b] = weight, bias
        own += 2
        report.reinitialised.append(note)
    return own


def _denoising_embedding(state: dict[str, Tensor], target: dict[str, Tensor], report: LoadReport) -> int:
    """The label embedding of denoising queries (``dn_groups``) is used only while training: a source's
    is dropped when the model trains without denoising, and a model that denoises keeps its own fresh one
    when the source has none or one for other classes. Each case is named in the report; returns how many
    of the model's own tensors were put into ``state``."""
    key = "label_embed.weight"
    mine = target.get(key)
    theirs = state.get(key)
    if theirs is not None and mine is None:
        state.pop(key)
        report.dropped.append(f"{key} (the source's denoising embedding; this model has model.dn_groups=0)")
    elif mine is not None and (theirs is None or theirs.shape != mine.shape):
        state[key] = mine.clone()
        why = "not in the source" if theirs is None else f"{theirs.shape[0] - 1} -> {mine.shape[0] - 1} classes"
        report.reinitialised.append(f"label_embed ({why}: the denoising embedding, used only while training)")
        return 1
    return 0


def load_detr_weights(model: nn.Module, source: WeightSource, strict: bool = True) -> LoadReport:
    """Copy ``source`` into ``model`` (a :class:`modules.detr.DETR`) and return what happened.

    Every tensor of the model must come from the source and every source tensor must be used, except
    the class head when the class count differs (see :func:`_class_head`) and the training-only
    denoising embedding (:func:`_denoising_embedding`); with ``strict=False``
    missing tensors keep their initialisation and unused ones are only reported. A shape mismatch is
    always an error."""
    report = LoadReport(source.name)
    state = _to_model_names(source.state, model)
    target = model.state_dict()
    own = _class_head(model, source, state, target, report) + _denoising_embedding(state, target, report)
    report.unused = sorted(k for k in state if k not in target)
    report.missing = sorted(k for k in target if k not in state and not k.endswith("num_batches_tracked"))
    for key in sorted(k for k in state if k in target):
        if state[key].shape != target[key].shape:
            raise ValueError(
                f"{source.name}: {key} has shape {tuple(state[key].shape)} in the source but "
                f"{tuple(target[key].shape)} in the model: the model settings do not match the weights"
            )
    if strict and (report.unused or report.missing):
        raise ValueError(
            f"{source.name} does not fit the model: unused {_abbreviate(report.unused)}; missing "
            f"{_abbreviate(report.missing)}. Check the model settings, or set model.init_strict=false to "
            "load the rest"
        )
    loadable = {k: v for k, v in state.items() if k in target}
    with torch.no_grad():
        for key, value in loadable.items():
            target[key].copy_(value)
    report.loaded = len(loadable) - own
    return report
