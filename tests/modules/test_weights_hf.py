"""Hugging Face DETR (``transformers``' DetrForObjectDetection) -> our DETR, without network: random
models written with ``save_pretrained`` into a temporary folder or a hand-made Hub cache.

Precision: float32, eval mode, pred_logits / pred_boxes within 1e-4 absolute."""

from __future__ import annotations

import json

import pytest
import torch

from modules.detr import build_detr

transformers = pytest.importorskip("transformers", reason="the hub extra: pip install -e '.[hub]'")
pytest.importorskip("timm", reason="the hub extra: pip install -e '.[hub]'")

SMALL = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=12, num_labels=5)


def randomise_hf_frozen_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Random frozen-BN statistics, every vector parameter (biases, LayerNorms) moved off its 0/1
    initialisation, and the transformer's matrices at DETR's scale (Xavier; HF's std 0.02 makes every
    query's output the same), so that a swapped tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif "backbone" not in name:
                p.copy_(torch.nn.init.xavier_uniform_(torch.empty(p.shape), generator=g))
        for m in model.modules():
            if type(m).__name__ == "DetrFrozenBatchNorm2d":
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def hf_detr(folder, timm: bool = True, **overrides):
    """A random DetrForObjectDetection saved into ``folder``; returns it in eval mode."""
    from transformers import DetrConfig, DetrForObjectDetection

    if timm:
        config = DetrConfig(backbone="resnet18", use_timm_backbone=True, use_pretrained_backbone=False,
                            **{**SMALL, **overrides})
    else:
        from transformers import ResNetConfig

        backbone = ResNetConfig(depths=[2, 2, 2, 2], layer_type="basic", hidden_sizes=[64, 128, 256, 512],
                                out_features=["stage4"])
        config = DetrConfig(use_timm_backbone=False, backbone_config=backbone, **{**SMALL, **overrides})
    torch.manual_seed(0)
    model = DetrForObjectDetection(config).eval()
    randomise_hf_frozen_bn(model)
    model.save_pretrained(folder)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 96, 128, generator=g)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)  # ours: True = padding
    mask[1, 70:] = True
    mask[1, :, 100:] = True
    images[mask[:, None].expand_as(images)] = 0.0
    return images, mask


def compare(hf_model, ours) -> float:
    images, mask = batch()
    with torch.no_grad():
        theirs = hf_model(pixel_values=images, pixel_mask=(~mask).long())  # HF: 1 = valid pixel
        out = ours(images, mask)
    assert theirs.logits.std(1).min() > 1e-3 and theirs.pred_boxes.std(1).min() > 1e-4  # queries differ
    return max((theirs.logits - out["pred_logits"]).abs().max().item(),
               (theirs.pred_boxes - out["pred_boxes"]).abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("timm", [True, False], ids=["timm-backbone", "hf-resnet-backbone"])
def test_hf_folder_computes_what_transformers_computes(tmp_path, timm):
    hf_model = hf_detr(tmp_path / "detr", timm=timm)
    ours = build_detr(num_classes=5, init_from=str(tmp_path / "detr")).eval()  # architecture from config.json
    assert ours.settings["d_model"] == 64 and ours.settings["backbone"] == "resnet18"
    assert ours.load_report.loaded == len(ours.state_dict()) and not ours.load_report.unused
    diff = compare(hf_model, ours)
    print(f"HF DETR ({'timm' if timm else 'HF ResNet'} backbone): max |diff| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.slow
def test_pytorch_model_bin_and_config_contradictions(tmp_path):
    hf_model = hf_detr(tmp_path / "detr")
    sd = hf_model.state_dict()
    (tmp_path / "detr" / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "detr" / "pytorch_model.bin")
    ours = build_detr(num_classes=5, init_from=str(tmp_path / "detr")).eval()
    assert compare(hf_model, ours) <= 1e-4
    with pytest.raises(ValueError, match=r"model.d_model=256 contradicts .*config.json \(d_model=64\)"):
        build_detr(num_classes=5, d_model=256, init_from=str(tmp_path / "detr"))
    config = json.loads((tmp_path / "detr" / "config.json").read_text())
    config["d_model"] = 32
    (tmp_path / "detr" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json says d_model=32 but the weights .* have d_model=64"):
        build_detr(num_classes=5, init_from=str(tmp_path / "detr"))


def hub_cache(root, repo: str, files: dict[str, bytes]) -> str:
    """A Hugging Face cache entry as ``hf download`` leaves it (refs/main -> snapshots/<commit>/)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = root / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    snapshot = entry / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return commit


@pytest.mark.slow
def test_hub_source_uses_the_cache_offline_and_explains_a_miss(tmp_path, monkeypatch):
    from huggingface_hub import constants

    hf_model = hf_detr(tmp_path / "detr")
    files = {name: (tmp_path / "detr" / name).read_bytes() for name in ("config.json", "model.safetensors")}
    hub_cache(tmp_path / "hub", "someone/detr-tiny", files)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network in tests
    ours = build_detr(num_classes=5, init_from="hf:someone/detr-tiny").eval()
    assert compare(hf_model, ours) <= 1e-4
    with pytest.raises(FileNotFoundError) as info:
        build_detr(num_classes=5, init_from="hf:someone/not-cached@v2")
    assert "\n" not in str(info.value) and "not in the Hugging Face cache" in str(info.value)
