import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modules.dropout import Dropout, drop_mask, dropout


def test_drop_rate_and_scale_match_p():
    torch.manual_seed(0)
    x = torch.ones(400_000)
    for p in (0.1, 0.3, 0.5):
        y = dropout(x, p)
        dropped = (y == 0).float().mean().item()
        assert dropped == pytest.approx(p, abs=4e-3)  # 400k draws: the std of the rate is < 1e-3
        assert y.mean().item() == pytest.approx(1.0, abs=1e-2)  # expectation kept
        kept = y[y != 0]
        assert torch.all(kept == kept[0])  # one scale for every kept element
    _, scale = drop_mask(torch.Size([1]), 0.1, torch.device("cpu"))
    assert scale == pytest.approx(1 / 0.9, rel=1e-4)


def test_lanes_are_independent():
    """Each of the four 16-bit lanes of a 64-bit draw decides one element: no lane is biased and
    neighbouring elements are uncorrelated."""
    torch.manual_seed(1)
    mask, _ = drop_mask(torch.Size([800_000]), 0.25, torch.device("cpu"))
    lanes = mask.view(-1, 4).float()
    for rate in lanes.mean(0).tolist():
        assert rate == pytest.approx(0.25, abs=5e-3)
    both = (lanes[:, 0] * lanes[:, 1]).mean().item()
    assert both == pytest.approx(0.25 * 0.25, abs=3e-3)


def test_backward_uses_the_forward_mask_and_dtype_is_kept():
    torch.manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(64, 33, dtype=dtype, requires_grad=True)
        y = dropout(x, 0.2)
        assert y.dtype == dtype and y.shape == x.shape
        upstream = torch.randn_like(y)
        (y * upstream).sum().backward()
        kept = y != 0
        scale = 1 / (1 - 0.2)
        torch.testing.assert_close(x.grad[kept].float(), (upstream[kept] * scale).float(), rtol=1e-2, atol=1e-2)
        assert torch.all(x.grad[~kept] == 0)


def test_identity_cases_and_reproducibility():
    x = torch.randn(10, 10)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0) is x
    assert torch.all(dropout(x, 1.0) == 0)  # F.dropout's own rule
    torch.manual_seed(3)
    a = dropout(x, 0.3)
    torch.manual_seed(3)
    torch.testing.assert_close(dropout(x, 0.3), a)


def test_module_is_a_drop_in_nn_dropout():
    m = Dropout(0.1)
    assert isinstance(m, nn.Dropout) and m.state_dict() == {} and repr(m) == repr(nn.Dropout(0.1))
    x = torch.randn(8, 8)
    assert torch.equal(m.eval()(x), x)
    inplace = Dropout(0.5, inplace=True).train()
    torch.manual_seed(4)
    ref = F.dropout(x.clone(), 0.5, True, inplace=True)
    torch.manual_seed(4)
    torch.testing.assert_close(inplace(x.clone()), ref)  # inplace: torch's own path
