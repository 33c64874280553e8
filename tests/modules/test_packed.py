import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from modules import packed, private_api
from modules.packed import linear, packed_linears


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 16, generator=g), torch.randn(40, 16, generator=g), torch.randn(40, generator=g)


class FakeOps:
    """Stands in for ``torch.ops.mkldnn`` to force a branch on any CPU: "packs" a weight by copying it
    and multiplies with ``F.linear`` in the packed dtype (what oneDNN computes, up to summation order).
    ``missing`` names an op it lacks; ``failing`` one that raises like oneDNN on a CPU without the
    instructions, from call number ``fail_after`` on (0: already in the availability trial)."""

    def __init__(self, missing=None, failing=None, fail_after=0):
        self.missing, self.failing, self.fail_after = missing, failing, fail_after
        self.calls = {"_reorder_linear_weight": 0, "_linear_pointwise": 0}
        self.packed_dtypes = []

    def __getattr__(self, name):
        if name not in ("_reorder_linear_weight", "_linear_pointwise") or name == self.missing:
            raise AttributeError(name)
        return getattr(self, "_fake" + name)

    def _count(self, name):
        self.calls[name] += 1
        if name == self.failing and self.calls[name] > self.fail_after:
            raise RuntimeError(f"{name}: needs avx512bf16 (fake)")

    def _fake_reorder_linear_weight(self, w):
        self._count("_reorder_linear_weight")
        self.packed_dtypes.append(w.dtype)
        return w.clone()

    def _fake_linear_pointwise(self, x, w, b, attr, scalars, algorithm):
        self._count("_linear_pointwise")
        assert x.dtype == w.dtype and (b is None or b.dtype == w.dtype), "the op takes one dtype"
        out = F.linear(x, w, b)
        return {"none": lambda: out, "relu": lambda: F.relu(out), "gelu": lambda: F.gelu(out, approximate=algorithm),
                "swish": lambda: F.silu(out)}[attr]()


@pytest.fixture
def fresh(monkeypatch):
    """Availability decided again, with ``fresh(ops)`` as the oneDNN ops (None: torch's own)."""

    def use(ops=None):
        monkeypatch.setattr(packed, "_available", {})
        if ops is not None:
            monkeypatch.setattr(private_api, "ONEDNN_OPS", ops)
        return ops

    return use


@pytest.fixture(params=["onednn", "fake"])
def ops(request, fresh):
    """The branch that packs, forced: torch's oneDNN ops (float32 packing works on every x86 CPU with a
    oneDNN build), or the fake ones (the caching logic, whatever the machine)."""
    if request.param == "onednn":
        if not torch.backends.mkldnn.is_available():
            pytest.skip("torch built without oneDNN: the fake-ops run covers the packing logic")
        fresh()
        assert packed._ops_work(torch.float32)
    else:
        fresh(FakeOps())
    return request.param


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "silu"])
def test_packed_linear_equals_f_linear(activation, ops):
    x, w, b = _inputs()
    act = {None: lambda t: t, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}[activation]
    with torch.no_grad(), packed_linears():
        for weight, bias in ((w, b), (w[8:24], b[8:24]), (w, None)):  # views with an offset, no bias
            got = linear(x, weight, bias, activation)
            torch.testing.assert_close(got, act(F.linear(x, weight, bias)), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(linear(x[0], weight, bias, activation), got[0], rtol=1e-5, atol=1e-5)
        assert len(packed._contexts()[-1]) == 2  # one packed copy per distinct weight (full, slice)


def test_weights_are_packed_again_after_an_in_place_change(ops):
    x, w, b = _inputs(1)
    with torch.no_grad(), packed_linears():
        before = linear(x, w, b)
        w.mul_(2)  # an optimizer step between two decoding calls, or inside one
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, F.linear(x, w, b))
    assert packed._contexts() == []  # the context leaves nothing behind


def test_outside_the_context_or_with_autograd_it_is_f_linear():
    x, w, b = _inputs(2)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    w.requires_grad_(True)
    with packed_linears():
        out = linear(x, w, b, "relu")  # autograd on: the unpacked path, gradients flow
        assert torch.equal(out, F.relu(F.linear(x, w, b)))
        out.sum().backward()
        assert w.grad is not None
    with pytest.raises(ValueError, match="activation"):
        linear(x, w, b, "tanh")


@pytest.mark.parametrize("ops", ["native", "packs_bf16", "refuses_bf16"])
def test_under_bf16_autocast_it_is_autocasts_linear(ops, fresh):
    """Under CPU bfloat16 autocast the answer is autocast's ``F.linear`` (bfloat16), whether this CPU
    packs in bfloat16 (forced: "packs_bf16"), refuses it as an AVX2 CPU does (forced: "refuses_bf16":
    F.linear), or whatever the machine does ("native"). Same values to bfloat16 rounding (2**-8
    relative, the packed weight cast once instead of per call): checked at 1e-2."""
    fake = fresh({"native": None, "packs_bf16": FakeOps(), "refuses_bf16": FakeOps(failing="_reorder_linear_weight")}[ops])
    x, w, b = _inputs(2)
    with torch.no_grad(), packed_linears(), torch.autocast("cpu", dtype=torch.bfloat16):
        for activation in (None, "relu", "gelu"):
            got, want = linear(x, w, b, activation), F.linear(x, w, b)
            want = want if activation is None else {"relu": F.relu, "gelu": F.gelu}[activation](want)
            assert got.dtype == want.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    if ops == "packs_bf16":  # the packed branch ran, with the weight packed once in bfloat16
        assert fake.packed_dtypes == [torch.bfloat16] * 2 and fake.calls["_linear_pointwise"] == 4 + 3
    expected = {"native": packed._trial(torch.bfloat16), "packs_bf16": True, "refuses_bf16": False}[ops]
    assert packed._available == {torch.bfloat16: expected}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("broken", ["missing_reorder", "missing_linear", "raising_reorder", "raising_linear"])
def test_ops_that_are_missing_or_raise_turn_packing_off_for_that_dtype(broken, dtype, fresh):
    kind, op = broken.split("_")
    op = {"reorder": "_reorder_linear_weight", "linear": "_linear_pointwise"}[op]
    fresh(FakeOps(missing=op) if kind == "missing" else FakeOps(failing=op))
    x, w, b = _inputs(4)
    with torch.no_grad(), packed_linears(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
        assert torch.equal(linear(x, w, b, "gelu"), F.gelu(F.linear(x, w, b)))
    assert packed._available == {dtype: False}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_op_that_fails_after_the_trial_falls_back_with_one_warning(dtype, fresh):
    fake = fresh(FakeOps(failing="_linear_pointwise", fail_after=5))  # the trial's 4 calls and one more work
    x, w, b = _inputs(5)
    with torch.no_grad(), packed_linears(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
        want = F.linear(x, w, b)
        torch.testing.assert_close(linear(x, w, b), want, rtol=0, atol=0)  # packed (the fake: same kernel)
        with pytest.warns(RuntimeWarning, match="packed linear failed"):
            torch.testing.assert_close(linear(x, w, b), want, rtol=0, atol=0)
        torch.testing.assert_close(linear(x, w, b), want, rtol=0, atol=0)  # no more tries, no warning
    assert packed._available == {dtype: False} and fake.calls["_linear_pointwise"] == 6


def test_the_callers_own_mistake_raises_and_keeps_packing_on(fresh):
    fresh(FakeOps())
    x, w, b = _inputs(6)
    with torch.no_grad(), packed_linears(), pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        linear(x, w[:, :3], b)  # F.linear's own error, not a fallback
    assert packed._available == {torch.float32: True}


def test_availability_is_decided_the_same_under_autocast(fresh):
    """The one-time check compares the oneDNN op with F.linear; run first under autocast it must
    not see F.linear's bfloat16 answer as a disagreement (and turn packing off for good)."""
    for dtype in (torch.float32, torch.bfloat16):
        fresh()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = packed._ops_work(dtype)
        fresh()
        assert under_autocast == packed._ops_work(dtype)


@pytest.mark.slow
def test_an_owner_keeps_its_packed_weights_across_contexts_until_they_change(ops):
    x, w, b = _inputs(3)
    owner = torch.nn.Linear(1, 1)  # any weak-referenceable object: decoding passes the model
    with torch.no_grad():
        with packed_linears(owner=owner):
            first = linear(x, w, b)
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
