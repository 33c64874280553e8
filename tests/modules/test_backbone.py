import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from modules.backbone import ImageAdapter, _fuse_frozen_bn


def randomise_frozen_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g))
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_fused_frozen_bn_matches_unfused():
    trunk = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    randomise_frozen_bn(trunk)
    x = torch.randn(2, 3, 64, 64)
    before = trunk(x)
    _fuse_frozen_bn(trunk)
    assert not any(isinstance(m, torch.nn.Sequential) and any(isinstance(c, FrozenBatchNorm2d) for c in m)
                   for m in trunk.modules())
    torch.testing.assert_close(trunk(x), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride,grid", [(32, (2, 3)), (16, (4, 6))])
def test_adapter_shapes_and_mask(stride, grid):
    adapter = ImageAdapter(backbone="resnet18", d_model=32, stride=stride)
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True  # second image is 64x64, padded on the right
    tokens, pos, token_mask, hw = adapter(images, mask)
    n = grid[0] * grid[1]
    assert hw == grid and tokens.shape == (2, n, 32) and pos.shape == (2, n, 32)
    assert not token_mask[0].any() and token_mask[1].view(*grid)[:, -1].all()


def test_trainable_layers_freeze_the_rest():
    adapter = ImageAdapter(backbone="resnet18", d_model=32, trainable_layers=1)
    trainable = {n.split(".")[0] for n, p in adapter.body.named_parameters() if p.requires_grad}
    assert trainable == {"7"}  # layer4 is the 8th module of the body


@pytest.mark.slow
def test_local_weights_load_and_bad_files_are_explained(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    adapter = ImageAdapter(backbone="resnet18", d_model=32, pretrained_backbone=str(path), fuse_frozen_bn=False)
    torch.testing.assert_close(adapter.body[0].weight, ref.conv1.weight)
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageAdapter(backbone="resnet18", d_model=32, pretrained_backbone=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="do not match"):
        ImageAdapter(backbone="resnet50", d_model=32, pretrained_backbone=str(path))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        ImageAdapter(backbone="resnet18", d_model=32, pretrained_backbone=str(junk))


@pytest.mark.parametrize("backbone,out", [("resnet18", 128), ("resnet50", 512)])
def test_narrow_trunk_has_the_scaled_channels_and_trains(backbone, out):
    """trunk_width=0.5: every stage (and the stem) at half the channels, ~1/4 of the weights, same layers."""
    full = ImageAdapter(backbone=backbone, d_model=32, frozen_bn=False, trainable_layers=5, stride=16)
    narrow = ImageAdapter(backbone=backbone, d_model=32, frozen_bn=False, trainable_layers=5, stride=16,
                          trunk_width=0.5)
    assert narrow.body[0].out_channels == 32 and narrow.input_proj.in_channels == out
    assert [n for n, _ in narrow.body.named_parameters()] == [n for n, _ in full.body.named_parameters()]
    count = lambda m: sum(p.numel() for p in m.body.parameters())  # noqa: E731
    assert 0.2 < count(narrow) / count(full) < 0.3
    tokens, pos, mask, hw = narrow(torch.randn(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool))
    assert tokens.shape == (2, 4 * 6, 32) and hw == (4, 6)
    tokens.square().mean().backward()
    assert narrow.body[0].weight.grad is not None and narrow.body[0].weight.grad.abs().sum() > 0


def test_narrow_trunk_settings_are_checked():
    with pytest.raises(ValueError, match="trunk_width must be in"):
        ImageAdapter(backbone="resnet18", trunk_width=2.0)
    with pytest.raises(ValueError, match="model.trunk_width=1"):
        ImageAdapter(backbone="resnet18", trunk_width=0.5, pretrained_backbone="IMAGENET1K_V1")
