import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from modules.backbone import ImageAdapter, _fuse_frozen_bn
from modules.transformer import Seq2SeqTransformer


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


def test_the_hybrid_encoder_attends_on_stride_32_and_gives_the_decoder_stride_16():
    """encoder_stride=32 with stride=16: the shared encoder reads layer4's 2x3 tokens, the memory is the
    fused 4x6 stride-16 map (the neck over the encoded tokens), and every new part gets gradients."""
    torch.manual_seed(0)
    adapter = ImageAdapter(backbone="resnet18", d_model=32, stride=16, encoder_stride=32, frozen_bn=False,
                           trainable_layers=5, trunk_width=0.5)
    transformer = Seq2SeqTransformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                                     dim_feedforward=64, dropout=0.0)
    images = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 64:] = True
    tokens, pos, token_mask, hw = adapter(images, mask)  # the encoder's input
    assert hw == (2, 3) and tokens.shape == (2, 6, 32) and token_mask[1].view(2, 3)[:, -1].all()
    memory, memory_pos, memory_mask, mask_arg, memory_hw = adapter.encode(images, mask, transformer)
    assert memory_hw == (4, 6) and memory.shape == memory_pos.shape == (2, 24, 32)
    assert mask_arg is memory_mask and memory_mask[1].view(4, 6)[:, 4:].all() and not memory_mask[0].any()
    coarse = transformer.encode(tokens, pos, token_mask).transpose(1, 2).reshape(2, 32, 2, 3)
    fused = adapter.neck(adapter.features(images)[0], coarse)
    torch.testing.assert_close(memory, fused.flatten(2).transpose(1, 2))
    memory.square().mean().backward()
    for part in (adapter.body[7], adapter.body[4], adapter.coarse_proj, adapter.input_proj, adapter.neck,
                 transformer.encoder_layers):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_the_plain_encoder_is_unchanged_by_encode():
    """Without the hybrid, ``encode`` is the encoder over the adapter's tokens, and no mask is passed
    when nothing is padded."""
    torch.manual_seed(0)
    adapter = ImageAdapter(backbone="resnet18", d_model=32, stride=16, encoder_stride=16).eval()
    transformer = Seq2SeqTransformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                                     dim_feedforward=64, dropout=0.0).eval()
    images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool)
    memory, pos, token_mask, mask_arg, hw = adapter.encode(images, mask, transformer)
    tokens, pos_ref, _, hw_ref = adapter(images, mask)
    assert mask_arg is None and hw == hw_ref == (4, 4) and not hasattr(adapter, "neck")
    torch.testing.assert_close(memory, transformer.encode(tokens, pos_ref, None))
    with pytest.raises(ValueError, match="encoder_stride must be"):
        ImageAdapter(backbone="resnet18", stride=16, encoder_stride=8)
