"""init_from / pretrained_backbone: original DETR checkpoints, Hugging Face folders, the Hub cache, our
own .ckpt and torchvision's weights enum -- all without network.

Precision: outputs are compared in float32, eval mode, with an absolute tolerance of 1e-4 (the
acceptance bar); the maximum difference seen is printed (``pytest -s``)."""

from __future__ import annotations

import argparse
import os
import re

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from benchmarks.reference_detr import build_reference_detr
from modules.backbone import ImageAdapter
from modules.detr import build_detr

# The original checkpoint's names (facebookresearch/detr models/detr.py, transformer.py, backbone.py
# with IntermediateLayerGetter over torchvision's resnet50 up to layer4), per layer i, with R50 shapes.
D, F, Q = 256, 2048, 100
ENCODER_LAYER = {
    "self_attn.in_proj_weight": (3 * D, D), "self_attn.in_proj_bias": (3 * D,),
    "self_attn.out_proj.weight": (D, D), "self_attn.out_proj.bias": (D,),
    "linear1.weight": (F, D), "linear1.bias": (F,), "linear2.weight": (D, F), "linear2.bias": (D,),
    "norm1.weight": (D,), "norm1.bias": (D,), "norm2.weight": (D,), "norm2.bias": (D,),
}
DECODER_LAYER = {
    **ENCODER_LAYER,
    "multihead_attn.in_proj_weight": (3 * D, D), "multihead_attn.in_proj_bias": (3 * D,),
    "multihead_attn.out_proj.weight": (D, D), "multihead_attn.out_proj.bias": (D,),
    "norm3.weight": (D,), "norm3.bias": (D,),
}
TOP_LEVEL = {
    "transformer.decoder.norm.weight": (D,), "transformer.decoder.norm.bias": (D,),
    "class_embed.weight": (92, D), "class_embed.bias": (92,),
    "bbox_embed.layers.0.weight": (D, D), "bbox_embed.layers.0.bias": (D,),
    "bbox_embed.layers.1.weight": (D, D), "bbox_embed.layers.1.bias": (D,),
    "bbox_embed.layers.2.weight": (4, D), "bbox_embed.layers.2.bias": (4,),
    "query_embed.weight": (Q, D), "input_proj.weight": (D, 2048, 1, 1), "input_proj.bias": (D,),
}


def upstream_r50_names_and_shapes() -> dict[str, tuple]:
    names = dict(TOP_LEVEL)
    for i in range(6):
        names.update({f"transformer.encoder.layers.{i}.{k}": s for k, s in ENCODER_LAYER.items()})
        names.update({f"transformer.decoder.layers.{i}.{k}": s for k, s in DECODER_LAYER.items()})
    trunk = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d).state_dict()
    names.update({f"backbone.0.body.{k}": tuple(v.shape) for k, v in trunk.items() if not k.startswith("fc.")})
    return names


def reference_to_upstream(name: str) -> str:
    """benchmarks/reference_detr.py's module names -> facebookresearch/detr's."""
    name = re.sub(r"^backbone\.body\.", "backbone.0.body.", name)
    name = re.sub(r"^transformer\.(en|de)coder_layers\.", r"transformer.\1coder.layers.", name)
    name = name.replace(".cross_attn.", ".multihead_attn.").replace("transformer.decoder_norm.", "transformer.decoder.norm.")
    return name


def randomise_frozen_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Random frozen-BN statistics, and every vector parameter (biases, LayerNorms) moved off its
    0/1 initialisation, so that a swapped tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def images_and_mask(batch: int = 2, h: int = 96, w: int = 128):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, h, w, generator=g)
    mask = torch.zeros(batch, h, w, dtype=torch.bool)
    mask[1, 64:, :] = True  # the second image is 64 x 96, padded below and on the right
    mask[1, :, 96:] = True
    images[mask[:, None].expand_as(images)] = 0.0
    return images, mask


def assert_queries_differ(out: dict) -> None:
    """The outputs vary across queries by much more than the tolerance: a misplaced tensor shows."""
    assert out["pred_logits"].std(1).min() > 1e-3 and out["pred_boxes"].std(1).min() > 1e-4


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in ("pred_logits", "pred_boxes"))


@pytest.mark.slow
def test_upstream_names_and_shapes_map_onto_every_tensor(tmp_path):
    """A state dict with exactly the original R50 checkpoint's names and shapes fills every tensor of
    build_detr's default model, each value where it belongs."""
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in upstream_r50_names_and_shapes().items()}
    path = tmp_path / "detr-r50.pth"
    torch.save({"model": sd}, path)
    model = build_detr(num_classes=91, backbone="resnet50", init_from=str(path))
    report = model.load_report
    assert not report.unused and not report.missing and not report.reinitialised
    assert report.loaded == len(model.state_dict()) == len(sd)
    ours = model.state_dict()
    torch.testing.assert_close(ours["transformer.decoder_layers.3.cross_attn.in_proj.weight"],
                               sd["transformer.decoder.layers.3.multihead_attn.in_proj_weight"], rtol=0, atol=0)
    torch.testing.assert_close(ours["head.bbox_embed.4.bias"], sd["bbox_embed.layers.2.bias"], rtol=0, atol=0)
    torch.testing.assert_close(ours["adapter.body.6.2.bn3.running_var"],
                               sd["backbone.0.body.layer3.2.bn3.running_var"], rtol=0, atol=0)
    torch.testing.assert_close(ours["adapter.body.7.0.downsample.1.bias"],
                               sd["backbone.0.body.layer4.0.downsample.1.bias"], rtol=0, atol=0)


def reference_checkpoint(path, backbone: str = "resnet50", num_classes: int = 91, **sizes):
    torch.manual_seed(0)
    ref = build_reference_detr(num_classes, backbone, **sizes).eval()
    randomise_frozen_bn(ref)
    sd = {reference_to_upstream(k): v for k, v in ref.state_dict().items()}
    torch.save({"model": sd}, path)
    return ref


@pytest.mark.slow  # two full-size DETR-R50 (~30 s on 2 CPU cores)
def test_original_r50_checkpoint_computes_what_the_original_computes(tmp_path):
    """The acceptance setting: DETR-R50 at full size, random weights and frozen-BN statistics, saved in
    the original format, loaded by build_detr(num_classes=91, backbone="resnet50", init_from=FILE)."""
    ref = reference_checkpoint(tmp_path / "detr.pth")
    names = {reference_to_upstream(k): tuple(v.shape) for k, v in ref.state_dict().items()}
    assert names == upstream_r50_names_and_shapes()
    images, mask = images_and_mask()
    with torch.no_grad():
        expected = ref(images, mask)
    assert_queries_differ(expected)
    # the Python defaults (the original's exact computation), then the configs' fast path
    for fast in (False, True):
        model = build_detr(num_classes=91, backbone="resnet50", init_from=str(tmp_path / "detr.pth"),
                           fuse_frozen_bn=fast, channels_last=fast).eval()
        with torch.no_grad():
            ours = model(images, mask)
        diff = max_diff(expected, ours)
        print(f"original R50 checkpoint (fused BN + channels_last: {fast}): max |diff| = {diff:.2e}")
        assert diff <= 1e-4
        for a, b in zip(expected["aux_outputs"], ours["aux_outputs"], strict=True):
            assert max_diff(a, b) <= 1e-4


@pytest.mark.slow
def test_original_checkpoint_with_args_namespace_and_r101_settings(tmp_path):
    """Original files may pickle their argparse ``args``: exactly that class is allowed, and its
    settings are used (R101 here, stated only by the weights and args)."""
    ref = build_reference_detr(91, "resnet101", num_encoder_layers=1, num_decoder_layers=1, num_queries=10)
    args = argparse.Namespace(backbone="resnet101", hidden_dim=256, nheads=8, enc_layers=1, dec_layers=1,
                              dim_feedforward=2048, num_queries=10, pre_norm=False, dilation=False,
                              position_embedding="sine", lr=1e-4)
    sd = {reference_to_upstream(k): v for k, v in ref.state_dict().items()}
    torch.save({"model": sd, "args": args, "epoch": 3}, tmp_path / "r101.pth")
    model = build_detr(num_classes=91, init_from=str(tmp_path / "r101.pth"))
    assert model.settings["backbone"] == "resnet101" and model.settings["num_encoder_layers"] == 1
    assert model.num_queries == 10 and not model.load_report.missing
    with pytest.raises(ValueError, match=r"model.nhead=4 contradicts the args saved in .*nhead=8"):
        build_detr(num_classes=91, nhead=4, init_from=str(tmp_path / "r101.pth"))


def test_arbitrary_pickled_objects_are_refused(tmp_path):
    torch.save({"model": {}, "evil": os.path.join}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="could not read .* safely"):
        build_detr(num_classes=91, init_from=str(tmp_path / "evil.pth"))


def test_fine_tuning_on_other_classes_keeps_the_no_object_row(tmp_path):
    ref = reference_checkpoint(tmp_path / "detr.pth", "resnet18", num_encoder_layers=1, num_decoder_layers=1,
                               num_queries=10)
    model = build_detr(num_classes=3, backbone="resnet18", init_from=str(tmp_path / "detr.pth"))
    assert model.load_report.reinitialised == ["head.class_embed (91 -> 3 classes, no-object row kept)"]
    w = model.head.class_embed.weight
    assert w.shape == (4, 256)
    torch.testing.assert_close(w[-1], ref.class_embed.weight[-1], rtol=0, atol=0)
    assert not torch.equal(w[0], ref.class_embed.weight[0])
    torch.testing.assert_close(model.query_embed.weight, ref.query_embed.weight, rtol=0, atol=0)


@pytest.mark.slow
def test_contradictions_and_partial_loads_are_errors(tmp_path):
    reference_checkpoint(tmp_path / "detr.pth", "resnet18", num_encoder_layers=1, num_decoder_layers=1,
                         num_queries=10)
    path = str(tmp_path / "detr.pth")
    with pytest.raises(ValueError, match=r"model.backbone='resnet50' contradicts the weights of .*resnet18"):
        build_detr(num_classes=91, backbone="resnet50", init_from=path)
    with pytest.raises(ValueError, match="model.position_offset=0.5 contradicts"):
        build_detr(num_classes=91, position_offset=0.5, init_from=path)
    with pytest.raises(ValueError, match="missing .*query_content.*init_strict=false"):
        build_detr(num_classes=91, anchor_queries=True, init_from=path)
    model = build_detr(num_classes=91, anchor_queries=True, init_from=path, init_strict=False)
    assert "query_embed.weight" in model.load_report.unused and model.load_report.missing
    with pytest.raises(FileNotFoundError, match="not found"):
        build_detr(num_classes=91, init_from=str(tmp_path / "nothing.pth"))
    with pytest.raises(ValueError, match="not both"):
        build_detr(num_classes=91, init_from=path, pretrained_backbone="DEFAULT")


def test_defaults_are_detr_r50():
    model = build_detr(num_classes=91)
    assert model.settings == {
        "backbone": "resnet50", "d_model": 256, "nhead": 8, "num_encoder_layers": 6, "num_decoder_layers": 6,
        "dim_feedforward": 2048, "norm_first": False, "activation": "relu", "num_queries": 100,
        "position_offset": 0.0, "trunk_width": 1.0, "encoder_stride": None,
    }
    assert not model.anchors and not model.two_stage and model.num_groups == 1 and model.aux_loss
    assert model.adapter.stride == 32 and isinstance(model.adapter.body[1], FrozenBatchNorm2d)
    assert model.transformer.decoder_layers[0].self_attn.dropout == 0.1


def test_our_checkpoint_loads_weights_and_settings(tmp_path):
    """A detection .ckpt (another dataset): weights and settings come from it; the unfused trunk layout
    of the source maps onto a fused one."""
    src = build_detr(num_classes=5, backbone="resnet18", d_model=64, nhead=4, num_encoder_layers=1,
                     num_decoder_layers=2, dim_feedforward=128, num_queries=7, fuse_frozen_bn=False)
    randomise_frozen_bn(src)
    hparams = {"model": {"backbone": "resnet18", "d_model": 64, "nhead": 4, "num_encoder_layers": 1,
                         "num_decoder_layers": 2, "dim_feedforward": 128, "num_queries": 7}, "class_loss": "ce"}
    state = {f"model.{k}": v for k, v in src.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "pytorch-lightning_version": "2"},
               tmp_path / "run.ckpt")
    model = build_detr(num_classes=5, init_from=str(tmp_path / "run.ckpt"), fuse_frozen_bn=True).eval()
    assert model.settings["nhead"] == 4 and model.load_report.loaded == len(model.state_dict())
    images, mask = images_and_mask(h=64, w=64)
    mask[1, 40:] = True
    with torch.no_grad():
        expected = src.eval()(images, mask)
        assert_queries_differ(expected)
        assert max_diff(expected, model(images, mask)) <= 1e-4


def test_a_narrow_trunk_checkpoint_states_its_width(tmp_path):
    """The trunk width is read off the weights: a narrow run's .ckpt rebuilds narrow, and a config that
    says otherwise is an error naming both."""
    src = build_detr(num_classes=2, backbone="resnet18", d_model=32, nhead=4, num_encoder_layers=1,
                     num_decoder_layers=1, dim_feedforward=64, num_queries=5, trunk_width=0.5, stride=16,
                     frozen_bn=False, trainable_layers=5)
    state = {f"model.{k}": v for k, v in src.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model": {}}, "pytorch-lightning_version": "2"},
               tmp_path / "narrow.ckpt")
    model = build_detr(num_classes=2, init_from=str(tmp_path / "narrow.ckpt"), stride=16, frozen_bn=False)
    assert model.settings["trunk_width"] == 0.5 and model.adapter.body[0].out_channels == 32
    assert model.load_report.loaded == len(model.state_dict())
    with pytest.raises(ValueError, match=r"model.trunk_width=1.0 contradicts .*trunk_width=0.5"):
        build_detr(num_classes=2, init_from=str(tmp_path / "narrow.ckpt"), trunk_width=1.0, stride=16)


def test_a_hybrid_encoder_checkpoint_rebuilds_its_neck(tmp_path):
    """The hybrid encoder is read off the weights (its fusion neck): a .ckpt whose saved settings say
    nothing of it rebuilds it and computes the same detections; a config that says otherwise is an error."""
    torch.manual_seed(0)
    src = build_detr(num_classes=2, backbone="resnet18", d_model=32, nhead=4, num_encoder_layers=1,
                     num_decoder_layers=1, dim_feedforward=64, num_queries=5, trunk_width=0.5, stride=16,
                     encoder_stride=32, frozen_bn=False, trainable_layers=5, two_stage=True, anchor_queries=True,
                     class_loss="focal").eval()
    state = {f"model.{k}": v for k, v in src.state_dict().items()}
    sizes = {"backbone": "resnet18", "d_model": 32, "nhead": 4, "num_encoder_layers": 1, "num_decoder_layers": 1,
             "dim_feedforward": 64, "num_queries": 5}  # saved settings that do not mention the hybrid
    torch.save({"state_dict": state, "hyper_parameters": {"model": sizes, "class_loss": "focal"},
                "pytorch-lightning_version": "2"}, tmp_path / "hybrid.ckpt")
    model = build_detr(num_classes=2, init_from=str(tmp_path / "hybrid.ckpt"), stride=16, frozen_bn=False,
                       two_stage=True, anchor_queries=True, class_loss="focal").eval()
    assert model.settings["encoder_stride"] == 32 and model.adapter.hybrid
    assert model.load_report.loaded == len(model.state_dict())
    images, mask = images_and_mask()  # 96 x 128, the second image padded
    with torch.no_grad():
        expected = src(images, mask)
        assert expected["enc_outputs"]["pred_boxes"].shape[1] == 48  # proposals from the 6x8 stride-16 tokens
        assert max_diff(expected, model(images, mask)) <= 1e-5
    with pytest.raises(ValueError, match=r"model.encoder_stride=16 contradicts .*encoder_stride=32"):
        build_detr(num_classes=2, init_from=str(tmp_path / "hybrid.ckpt"), stride=16, encoder_stride=16)


@pytest.mark.slow
def test_torchvision_weights_enum_uses_the_cache_and_explains_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ref = torchvision.models.resnet18(weights=None)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(ref.state_dict(), folder / "resnet18-f37072fd.pth")  # IMAGENET1K_V1's file name
    adapter = ImageAdapter(backbone="resnet18", d_model=32, pretrained_backbone="IMAGENET1K_V1", fuse_frozen_bn=False)
    torch.testing.assert_close(adapter.body[0].weight, ref.conv1.weight, rtol=0, atol=0)
    adapter = ImageAdapter(backbone="resnet18", d_model=32, pretrained_backbone="DEFAULT", fuse_frozen_bn=False)  # = V1 for r18
    torch.testing.assert_close(adapter.body[0].weight, ref.conv1.weight, rtol=0, atol=0)

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as info:
        ImageAdapter(backbone="resnet50", d_model=32, pretrained_backbone="IMAGENET1K_V2")
    message = str(info.value)
    assert "\n" not in message and "resnet50-11ad3fa6.pth" in message and str(folder) in message


@pytest.mark.parametrize("src_dn, dst_dn, dst_classes", [(5, 0, 3), (0, 5, 3), (5, 5, 4)],
                         ids=["dropped", "fresh", "other-classes"])
def test_the_denoising_embedding_never_blocks_a_strict_load(tmp_path, src_dn, dst_dn, dst_classes):
    """A photo run trains with denoising (its .ckpt has label_embed); fine-tuning from it without
    denoising drops that tensor, and a denoising model from a source without one (or for other classes)
    keeps its own: strict loads succeed, every other tensor is copied, and the report names the case."""
    sizes = dict(backbone="resnet18", d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=2,
                 dim_feedforward=64, num_queries=5, class_loss="focal", anchor_queries=True, box_refine=True)
    src = build_detr(num_classes=3, dn_groups=src_dn, **sizes)
    state = {f"model.{k}": v for k, v in src.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model": {}, "class_loss": "focal"},
                "pytorch-lightning_version": "2"}, tmp_path / "run.ckpt")
    model = build_detr(num_classes=dst_classes, dn_groups=dst_dn, init_from=str(tmp_path / "run.ckpt"), **sizes)
    report = model.load_report
    assert not report.unused and not report.missing
    fresh = {k for k in model.state_dict() if k == "label_embed.weight" or (dst_classes != 3 and "class_embed" in k)}
    for key, value in model.state_dict().items():
        if key not in fresh and not key.endswith("num_batches_tracked"):
            assert torch.equal(value, src.state_dict()[key]), key
    if src_dn and not dst_dn:
        assert report.dropped == ["label_embed.weight (the source's denoising embedding; this model has model.dn_groups=0)"]
        assert "dropped (only for training) (1)" in report.summary()
    else:
        assert any(note.startswith("label_embed (") for note in report.reinitialised) and not report.dropped
        assert report.loaded == len(model.state_dict()) - len(fresh)
