import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from modules import packed
from modules.packed import linear, packed_linears


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 16, generator=g), torch.randn(40, 16, generator=g), torch.randn(40, generator=g)


@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_packed_linear_equals_f_linear(activation):
    x, w, b = _inputs()
    act = {None: lambda t: t, "relu": F.relu, "gelu": F.gelu}[activation]
    with torch.no_grad(), packed_linears():
        for weight, bias in ((w, b), (w[8:24], b[8:24]), (w, None)):  # views with an offset, no bias
            got = linear(x, weight, bias, activation)
            torch.testing.assert_close(got, act(F.linear(x, weight, bias)), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(linear(x[0], weight, bias, activation), got[0], rtol=1e-5, atol=1e-5)
        if packed._ops_work():  # one packed copy per distinct weight (full, slice)
            assert len(packed._contexts()[-1]) == 2


def test_weights_are_packed_again_after_an_in_place_change():
    x, w, b = _inputs(1)
    with torch.no_grad(), packed_linears():
        before = linear(x, w, b)
        w.mul_(2)  # an optimizer step between two decoding calls, or inside one
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, F.linear(x, w, b))
    assert packed._contexts() == []  # the context leaves nothing behind


def test_outside_the_context_with_autograd_or_bf16_it_is_f_linear():
    x, w, b = _inputs(2)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    w.requires_grad_(True)
    with packed_linears():
        out = linear(x, w, b, "relu")  # autograd on: the unpacked path, gradients flow
        assert torch.equal(out, F.relu(F.linear(x, w, b)))
        out.sum().backward()
        assert w.grad is not None
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got = linear(x, w, b, "relu")  # packed in bfloat16: autocast's dtype and values
            want = F.relu(F.linear(x, w, b))
            assert got.dtype == want.dtype == torch.bfloat16
            torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="activation"):
        linear(x, w, b, "tanh")


def test_availability_is_decided_the_same_under_autocast(monkeypatch):
    """The one-time check compares the oneDNN op with F.linear; run first under autocast it must
    not see F.linear's bfloat16 answer as a disagreement (and turn packing off for good)."""
    monkeypatch.setattr(packed, "_available", None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = packed._ops_work()
    monkeypatch.setattr(packed, "_available", None)
    assert under_autocast == packed._ops_work()



def test_an_owner_keeps_its_packed_weights_across_contexts_until_they_change():
    x, w, b = _inputs(3)
    owner = torch.nn.Linear(1, 1)  # any weak-referenceable object: decoding passes the model
    with torch.no_grad():
        with packed_linears(owner=owner):
            first = linear(x, w, b)
        if not packed._ops_work():
            pytest.skip("this torch build has no oneDNN linear ops")
        (entry,) = packed._by_owner[owner].values()
        with packed_linears(owner=owner):
            torch.testing.assert_close(linear(x, w, b), first)
        assert next(iter(packed._by_owner[owner].values()))[2] is entry[2]  # reused, not packed again
        w.add_(1)  # an optimizer step between two validations
        with packed_linears(owner=owner):
            torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        assert len(packed._by_owner[owner]) == 1  # the old packing was replaced
    ref = weakref.ref(owner)
    del owner
    gc.collect()
    assert ref() is None  # the cache does not keep the model alive
