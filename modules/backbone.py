"""Image adapter: ResNet trunk -> 1x1 projection -> flattened tokens with 2-D sine positions, and the
hybrid encoder's fusion neck (attention on the stride-32 tokens, fused into the stride-16 map)."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .position import sine_positions_2d

_RESNETS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
# Per-channel RGB statistics of ImageNet, which the pretrained trunks were trained on: the image data
# modules normalise with them, display and export code undo or state that normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConvFrozenBN(nn.Module):
    """A convolution followed by a frozen BatchNorm, run as one convolution.

    A frozen BatchNorm is an affine map per channel, so it folds into the convolution's weight and
    bias on every call: the activation map is written once instead of twice. Gradients still reach
    the convolution's weight; the BatchNorm statistics stay frozen.
    """

    def __init__(self, conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: Tensor) -> Tensor:
        scale = self.bn.weight * (self.bn.running_var + self.bn.eps).rsqrt()
        bias = self.bn.bias - self.bn.running_mean * scale
        w = self.conv.weight * scale[:, None, None, None]
        c = self.conv
        return F.conv2d(x, w, bias, c.stride, c.padding, c.dilation, c.groups)


def _fuse_frozen_bn(module: nn.Module) -> None:
    """Replace every (conv, frozen BN) pair of a torchvision ResNet by a ConvFrozenBN."""
    for child in module.children():
        _fuse_frozen_bn(child)
    pairs = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
    for conv_name, bn_name in pairs:
        conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, FrozenBatchNorm2d):
            setattr(module, conv_name, ConvFrozenBN(conv, bn))
            setattr(module, bn_name, nn.Identity())
    down = getattr(module, "downsample", None)
    if isinstance(down, nn.Sequential) and len(down) == 2 and isinstance(down[1], FrozenBatchNorm2d):
        module.downsample = nn.Sequential(ConvFrozenBN(down[0], down[1]))


_TORCHVISION_WEIGHTS = ("DEFAULT", "IMAGENET1K_V1", "IMAGENET1K_V2")
_BODY_INDEX = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}


def trunk_key(name: str, fused: bool) -> str:
    """Where a torchvision ResNet tensor (``layer1.0.bn1.weight``) lives in ``ImageAdapter.body``
    (``4.0.conv1.bn.weight`` when frozen BatchNorms are fused into their convolutions, else
    ``4.0.bn1.weight``)."""
    first, _, rest = name.partition(".")
    if first in ("conv1", "bn1"):
        if not fused:
            return f"{_BODY_INDEX[first]}.{rest}"
        return f"0.{'conv' if first == 'conv1' else 'bn'}.{rest}"
    if first not in _BODY_INDEX:
        raise KeyError(name)
    block, module, tail = rest.split(".", 2)
    if fused and module.startswith(("conv", "bn")):
        module = f"conv{module[-1]}.{'conv' if module.startswith('conv') else 'bn'}"
    elif fused and module == "downsample":
        index, tail = tail.split(".", 1)
        module = f"downsample.0.{'conv' if index == '0' else 'bn'}"
    return f"{_BODY_INDEX[first]}.{block}.{module}.{tail}"


def _torchvision_weights_file(backbone: str, name: str) -> str:
    """The cached file of torchvision's ``<backbone>`` weights enum member ``name``, downloaded into
    torchvision's cache (``$TORCH_HOME/hub/checkpoints``) when it is not there yet."""
    enum = torchvision.models.get_model_weights(backbone)
    if name not in enum.__members__:
        raise ValueError(f"torchvision has no {name} weights for {backbone}; choose one of {list(enum.__members__)}")
    weights = enum[name]
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, os.path.basename(weights.url))
    if os.path.isfile(path):
        return path
    try:
        torch.hub.load_state_dict_from_url(weights.url, model_dir=folder, map_location="cpu", check_hash=True)
    except Exception as e:  # noqa: BLE001 - offline, proxy, disk: the same remedy
        raise FileNotFoundError(
            f"torchvision weights {backbone}.{name} are not cached and could not be downloaded ({type(e).__name__}: "
            f"{str(e)[:120]}): put {os.path.basename(path)} (from {weights.url}) in {folder} (set TORCH_HOME to "
            "move the cache) or give a local file to model.pretrained_backbone"
        ) from e
    return path


def load_backbone_weights(trunk: nn.Module, path: str, *, backbone: str = "resnet50") -> None:
    """Load torchvision ResNet weights into ``trunk``: a local file (a state dict, or a dict holding one
    under ``state_dict``/``model``) or the name of a torchvision weights enum member (``DEFAULT``,
    ``IMAGENET1K_V1``, ``IMAGENET1K_V2``) of ``backbone``. The classifier (``fc.*``) is ignored."""
    if path in _TORCHVISION_WEIGHTS:
        path = _torchvision_weights_file(backbone, path)
    elif not os.path.isfile(path):
        raise FileNotFoundError(
            f"backbone weights file not found: {path!r}. Give a local .pth file (e.g. torchvision's "
            f"resnet50-0676ba61.pth), one of {'/'.join(_TORCHVISION_WEIGHTS)} (torchvision's weights, "
            "cached in $TORCH_HOME) or model.pretrained_backbone=null to start from scratch."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user error
        raise ValueError(f"could not read backbone weights from {path!r}: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = trunk.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(
            f"backbone weights in {path!r} do not match the trunk (is it the right ResNet depth?): {str(e)[:300]}"
        ) from e
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"backbone weights in {path!r} do not match the trunk: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (is it the right ResNet depth?)"
        )


_BLOCKS = {"resnet18": ("BasicBlock", [2, 2, 2, 2]), "resnet34": ("BasicBlock", [3, 4, 6, 3]),
           "resnet50": ("Bottleneck", [3, 4, 6, 3]), "resnet101": ("Bottleneck", [3, 4, 23, 3])}


class _NarrowResNet(torchvision.models.ResNet):
    """torchvision's ResNet with ``width`` x the channels of the stem and of every stage (the same
    layers, parameter names and initialisation; only a from-scratch trunk can be narrower)."""

    def __init__(self, backbone: str, width: float, norm_layer: type[nn.Module]) -> None:
        self.width = width
        block, layers = _BLOCKS[backbone]
        super().__init__(getattr(torchvision.models.resnet, block), layers, norm_layer=norm_layer)
        stem = self.scaled(64)
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's
        self.bn1 = norm_layer(stem)

    def scaled(self, channels: int) -> int:
        return max(1, round(channels * self.width))

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):  # noqa: ANN001 - torchvision's
        if planes == 64:  # layer1 follows the (narrow) stem
            self.inplanes = self.scaled(64)
        return super()._make_layer(block, self.scaled(planes), blocks, stride, dilate)


class FusionNeck(nn.Module):
    """Top-down fusion of one coarser level (an FPN step; RT-DETR's cross-scale fusion, top-down half):
    the encoded stride-32 map, upsampled 2x, is concatenated with the stride-16 map, reduced to ``d``
    channels by a 1x1 convolution and refined by a residual 3x3 convolution, each with GroupNorm
    (batch-size independent) and ReLU."""

    def __init__(self, d: int) -> None:
        super().__init__()
        groups = math.gcd(32, d)
        self.reduce = nn.Sequential(nn.Conv2d(2 * d, d, 1, bias=False), nn.GroupNorm(groups, d), nn.ReLU())
        self.refine = nn.Sequential(nn.Conv2d(d, d, 3, padding=1, bias=False), nn.GroupNorm(groups, d), nn.ReLU())

    def forward(self, fine: Tensor, coarse: Tensor) -> Tensor:
        up = F.interpolate(coarse, size=fine.shape[-2:], mode="nearest")
        x = self.reduce(torch.cat((fine, up), dim=1))
        return x + self.refine(x)


class ImageAdapter(nn.Module):
    """Turns images into encoder tokens.

    Args:
        backbone: torchvision ResNet name (resnet18/34/50/101).
        d_model: token width.
        pretrained_backbone: ImageNet weights: a local file, a torchvision weights enum name
            (``DEFAULT``, ``IMAGENET1K_V1``, ``IMAGENET1K_V2``: torchvision's cache, downloaded once),
            or None (random init).
        frozen_bn: use frozen BatchNorm (statistics and affine fixed), DETR's choice for small batches.
        trainable_layers: how many of the last ResNet stages (layer4, layer3, ...) receive gradients;
            0 freezes the trunk. DETR trains layer2-4 (3).
        stride: 32 (the whole trunk) or 16 (stop after layer3: 4x more tokens, better for small images).
        fuse_frozen_bn: fold frozen BatchNorms into the preceding convolutions (same result, less work).
        channels_last: run the trunk in channels-last memory format (faster convolutions on CPU and GPU).
        trunk_width: channels of the stem and every ResNet stage x this (1: torchvision's ResNet; 0.5 a
            ~4x cheaper from-scratch trunk; pretrained weights need 1).
        encoder_stride: the tokens the shared encoder's self-attention reads: None (or ``stride``) all
            of the trunk's tokens; 32 with ``stride=16`` the hybrid encoder (RT-DETR's): layer4's stride-32
            tokens (1/4 of the tokens, 1/16 of the attention) are encoded, then :class:`FusionNeck` fuses
            them into the stride-16 map, whose tokens are the memory the decoder reads.
        position_offset: subtracted from the cell counts of the 2-D sine positions before normalising:
            0 is DETR's convention, 0.5 (this class's default, kept for its other users) Deformable DETR's.
    """

    def __init__(
        self,
        *,
        backbone: str = "resnet50",
        d_model: int = 256,
        pretrained_backbone: str | None = None,
        frozen_bn: bool = True,
        trainable_layers: int = 3,
        stride: int = 32,
        fuse_frozen_bn: bool = True,
        channels_last: bool = True,
        position_offset: float = 0.5,
        trunk_width: float = 1.0,
        encoder_stride: int | None = None,
    ) -> None:
        super().__init__()
        if backbone not in _RESNETS:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(_RESNETS)}")
        if not 0.125 <= trunk_width <= 1:
            raise ValueError(f"trunk_width must be in [0.125, 1], got {trunk_width}")
        if trunk_width != 1 and pretrained_backbone:
            raise ValueError(f"pretrained trunk weights have the full width: set model.trunk_width=1 (got "
                             f"{trunk_width}) or model.pretrained_backbone=null")
        if stride not in (16, 32):
            raise ValueError(f"stride must be 16 or 32, got {stride}")
        if encoder_stride not in (None, stride, 32):
            raise ValueError(f"encoder_stride must be null, the trunk's stride ({stride}) or 32, got {encoder_stride}")
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in 0..5, got {trainable_layers}")
        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        if trunk_width == 1:
            trunk = getattr(torchvision.models, backbone)(weights=None, norm_layer=norm)
        else:
            trunk = _NarrowResNet(backbone, trunk_width, norm)
        if pretrained_backbone:
            load_backbone_weights(trunk, pretrained_backbone, backbone=backbone)
        stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        for name, p in trunk.named_parameters():
            if not any(name.startswith(s) for s in stages) and not (
                "conv1" in stages and name.startswith("bn1")
            ):
                p.requires_grad_(False)
        if frozen_bn and fuse_frozen_bn:
            _fuse_frozen_bn(trunk)
        layers = [trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool, trunk.layer1, trunk.layer2, trunk.layer3]
        self.hybrid = stride == 16 and encoder_stride == 32
        full, half = round(_RESNETS[backbone] * trunk_width), round(_RESNETS[backbone] // 2 * trunk_width)
        if stride == 32 or self.hybrid:
            layers.append(trunk.layer4)
        self.body = nn.Sequential(*layers)
        self.input_proj = nn.Conv2d(full if stride == 32 else half, d_model, kernel_size=1)
        if self.hybrid:
            self.coarse_proj = nn.Conv2d(full, d_model, kernel_size=1)
            self.neck = FusionNeck(d_model)
        self.d_model, self.stride, self.channels_last = d_model, stride, channels_last
        self.position_offset = position_offset
        self.fused = frozen_bn and fuse_frozen_bn

    def features(self, images: Tensor) -> list[Tensor]:
        """The projected trunk maps ``[B, D, h, w]``: the stride-``stride`` one, then (hybrid) the
        stride-32 one."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if not self.hybrid:
            return [self.input_proj(self.body(images))]
        fine = self.body[:-1](images)
        return [self.input_proj(fine), self.coarse_proj(self.body[-1](fine))]

    def tokens(self, feat: Tensor, pixel_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
        """A map ``[B, D, h, w]`` as tokens ``[B, h*w, D]``, positions ``[B, h*w, D]``, padding mask
        ``[B, h*w]`` and (h, w)."""
        h, w = feat.shape[-2:]
        mask = F.interpolate(pixel_mask[:, None].float(), size=(h, w)).to(torch.bool)[:, 0]
        pos = sine_positions_2d(mask, self.d_model, offset=self.position_offset).flatten(1, 2).to(feat.dtype)
        return feat.flatten(2).transpose(1, 2), pos, mask.flatten(1), (h, w)

    def forward(
        self,
        images: Tensor,  # [B, 3, H, W] normalised, zero-padded
        pixel_mask: Tensor,  # [B, H, W] bool, True = padding
    ) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
        """The encoder's input: tokens ``[B, h*w, D]``, positions ``[B, h*w, D]``, padding mask
        ``[B, h*w]`` and (h, w) (hybrid: of the stride-32 map)."""
        return self.tokens(self.features(images)[-1], pixel_mask)

    def encode(self, images: Tensor, pixel_mask: Tensor, transformer: nn.Module
               ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, tuple[int, int]]:
        """Images through ``transformer.encode``: the memory the decoder reads ``[B, h*w, D]``, its
        positions, its padding mask ``[B, h*w]``, the same mask or None when nothing is padded (the
        argument attention takes: masks only cost time when used) and (h, w). Hybrid: the encoder
        reads the stride-32 tokens and the memory is the fused stride-16 map's tokens."""
        maps = self.features(images)
        tokens, pos, mask, hw = self.tokens(maps[-1], pixel_mask)
        mask_arg = mask if bool(mask.any()) else None
        memory = transformer.encode(tokens, pos, mask_arg)
        if not self.hybrid:
            return memory, pos, mask, mask_arg, hw
        coarse = memory.transpose(1, 2).reshape(memory.shape[0], -1, *hw)
        memory, pos, mask, hw = self.tokens(self.neck(maps[0], coarse), pixel_mask)
        return memory, pos, mask, mask if bool(mask.any()) else None, hw
