import pytest
import torch

from modules.position import sine_positions_2d, sinusoidal_positions
from modules.transformer import Seq2SeqTransformer


@pytest.fixture(params=[False, True], ids=["post-norm", "pre-norm"])
def model(request):
    torch.manual_seed(0)
    return Seq2SeqTransformer(
        d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=64, dropout=0.0,
        norm_first=request.param,
    ).eval()


def test_decode_returns_every_layer(model):
    memory = model.encode(torch.randn(2, 7, 32))
    hs = model.decode_states(torch.randn(2, 5, 32), memory)
    assert hs.shape == (3, 2, 5, 32)
    last = model.decode_states(torch.randn(2, 5, 32), memory, return_intermediate=False)
    assert last.shape == (1, 2, 5, 32)


def test_encoder_padding_is_ignored(model):
    src = torch.randn(1, 6, 32)
    pos = torch.randn(1, 6, 32)
    alone = model.encode(src, pos)
    padded_src = torch.cat([src, torch.randn(1, 3, 32)], 1)
    padded_pos = torch.cat([pos, torch.randn(1, 3, 32)], 1)
    mask = torch.tensor([[False] * 6 + [True] * 3])
    memory = model.encode(padded_src, padded_pos, mask)
    torch.testing.assert_close(memory[:, :6], alone, rtol=1e-4, atol=1e-5)
    tgt = torch.randn(1, 4, 32)
    torch.testing.assert_close(
        model.decode_states(tgt, memory, memory_pos=padded_pos, memory_padding_mask=mask),
        model.decode_states(tgt, alone, memory_pos=pos), rtol=1e-4, atol=1e-5,
    )


@pytest.mark.parametrize("every_layer", [False, True], ids=["pos-once", "pos-every-layer"])
def test_packed_encoder_equals_padded(model, every_layer):
    """encode(pack=True) in inference runs the per-token layers on the real tokens only: the same
    memory at the real positions, zeros at the padding. Not packed: under autograd, or with too
    little padding."""
    torch.manual_seed(1)
    src, pos = torch.randn(3, 8, 32), torch.randn(8, 32)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, 5:], mask[2, 2:] = True, True  # 9 of 24 positions are padding
    kw = dict(pos_at_every_layer=every_layer)
    with torch.no_grad():
        plain, packed = [model.encode(src, pos, mask, pack=p, **kw) for p in (False, True)]
    torch.testing.assert_close(packed[~mask], plain[~mask], rtol=1e-4, atol=1e-5)
    assert packed[mask].abs().max() == 0 and plain[mask].abs().max() > 0  # the packed path ran
    training = model.encode(src, pos, mask, pack=True, **kw)  # autograd on: the padded computation
    torch.testing.assert_close(training.detach(), plain)
    few = torch.zeros(3, 8, dtype=torch.bool)
    few[0, 7] = True  # 1 of 24: not worth packing
    with torch.no_grad():
        assert model.encode(src, pos, few, pack=True, **kw)[few].abs().max() > 0


def test_causal_mask_hides_the_future(model):
    """Changing the last two target tokens leaves the first four outputs as they were (float32: up to
    summation order, 1e-5 relative) and changes the last two clearly (> 0.1 at every layer). The change
    is a random vector per token: a per-token constant would be invisible to a pre-norm stack, whose
    LayerNorms (each sublayer's input and the final one) remove it, masked or not."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        memory = model.encode(torch.randn(1, 5, 32, generator=g))
        tgt = torch.randn(1, 6, 32, generator=g)
        changed = tgt.clone()
        changed[:, 4:] += torch.randn(1, 2, 32, generator=g)
        full, other = (model.decode_states(t, memory, is_causal=True) for t in (tgt, changed))
    torch.testing.assert_close(other[:, :, :4], full[:, :, :4], rtol=1e-5, atol=1e-6)
    assert (other[:, :, 4:] - full[:, :, 4:]).abs().amax(-1).min() > 0.1  # each layer, each later token


@pytest.mark.parametrize("every_layer", [False, True])
def test_cached_decoding_equals_uncached(every_layer):
    torch.manual_seed(0)
    model = Seq2SeqTransformer(
        d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64, dropout=0.0,
        pos_at_every_layer=every_layer,
    ).eval()
    memory = model.encode(torch.randn(2, 5, 32), sinusoidal_positions(5, 32))
    tgt = torch.randn(2, 6, 32)
    pos = sinusoidal_positions(6, 32)
    full = model.decode_states(tgt, memory, pos, is_causal=True, return_intermediate=False)[0]
    cache = model.init_cache()
    steps = [model.decode_states(tgt[:, t : t + 1], memory, pos[t : t + 1], cache=cache, is_causal=True,
                          return_intermediate=False)[0] for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert cache[0]["self"]["length"] == 6  # one key per decoded position
    assert cache[0]["self"]["k"].shape[2] >= 6  # written in place into a buffer with room to spare
    assert cache[0]["cross"]["k_t"].shape[3] == 5  # encoder keys computed once (stored transposed)


def test_cache_grows_past_its_buffer_and_follows_a_reorder():
    """Keys are written into a buffer that is reallocated when full (16, then 2n+1 slots): 40 steps
    cross several reallocations; reordering rows mid-way (beam search) moves each row's history."""
    torch.manual_seed(1)
    model = Seq2SeqTransformer(
        d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=32, dropout=0.0,
        norm_first=True,
    ).eval()
    memory = model.encode(torch.randn(3, 4, 16))
    tgt = torch.randn(3, 40, 16)
    order = torch.tensor([2, 0, 0])
    cache = model.init_cache()
    steps = []
    for t in range(40):
        if t == 20:  # row i continues the history of row order[i]
            for layer in cache:
                for part in layer.values():
                    for key, value in part.items():
                        if isinstance(value, torch.Tensor):
                            part[key] = value.index_select(0, order)
            steps = [s.index_select(0, order) for s in steps]
            tgt = torch.cat([tgt[order, :20], tgt[:, 20:]], 1)
        steps.append(model.decode_states(tgt[:, t : t + 1], memory if t < 20 else memory[order], cache=cache,
                                  is_causal=True, return_intermediate=False)[0])
    assert cache[0]["self"]["length"] == 40 and cache[0]["self"]["k"].shape[2] > 40
    full = model.decode_states(tgt, memory[order], is_causal=True, return_intermediate=False)[0]
    torch.testing.assert_close(torch.cat(steps, 1)[:, 20:], full[:, 20:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
def test_memory_shared_by_consecutive_query_rows(cached):
    """Memory with B rows and queries with g * B rows: each memory row serves g consecutive rows (a
    sentence's beams), exactly as if it were repeated, cross-attention weights included."""
    torch.manual_seed(2)
    model = Seq2SeqTransformer(
        d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64, dropout=0.0,
        norm_first=True,
    ).eval()
    memory = model.encode(torch.randn(2, 5, 32), src_padding_mask=torch.tensor([[False] * 5, [False] * 3 + [True] * 2]))
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    tgt = torch.randn(6, 4, 32)  # 3 rows per memory row
    want, want_w = model.decode_states(tgt, memory.repeat_interleave(3, 0), memory_padding_mask=mask.repeat_interleave(3, 0),
                                is_causal=True, return_intermediate=False, return_cross_attn=True)
    if cached:
        cache = model.init_cache()
        outs = [model.decode_states(tgt[:, t : t + 1], memory, memory_padding_mask=mask, cache=cache, is_causal=True,
                             return_intermediate=False, return_cross_attn=True) for t in range(4)]
        got, got_w = torch.cat([h for h, _ in outs], 2), torch.cat([w for _, w in outs], 1)
        assert cache[0]["cross"]["v"].shape[0] == 2  # one copy per memory row
    else:
        got, got_w = model.decode_states(tgt, memory, memory_padding_mask=mask, is_causal=True, return_intermediate=False,
                                  return_cross_attn=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_w, want_w, rtol=1e-4, atol=1e-5)
    assert torch.all(got_w[3:, :, 3:] == 0)  # rows of the second memory row never see its padding
    with pytest.raises(ValueError, match="multiple"):
        model.decode_states(torch.randn(5, 1, 32), memory)


def test_bad_mask_dtype_is_rejected(model):
    memory = model.encode(torch.randn(1, 3, 32))
    with pytest.raises(TypeError, match="bool"):
        model.decode_states(torch.randn(1, 2, 32), memory, tgt_mask=torch.zeros(2, 2))


def test_sine_positions_ignore_padding():
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    alone = sine_positions_2d(mask, 16)
    padded_mask = torch.ones(1, 6, 8, dtype=torch.bool)
    padded_mask[:, :4, :6] = False
    padded = sine_positions_2d(padded_mask, 16)
    assert alone.shape == (1, 4, 6, 16)
    torch.testing.assert_close(padded[:, :4, :6], alone)
    assert not torch.allclose(alone[0, 0, 0], alone[0, 0, 1])


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_attention_path_equals_sdpa(causal):
    """The explicit-softmax path (used for attention weights and for bf16 on CPU) computes the same
    attention as SDPA, with masks and causality, and in bf16 stays within bf16 rounding of float32."""
    from modules.transformer import MultiheadAttention, _attention_mask

    torch.manual_seed(0)
    attn = MultiheadAttention(d_model=32, nhead=4).eval()
    x, mem = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    if causal:
        args, kw = (x, x, x), {"is_causal": True}
    else:
        args, kw = (x, mem, mem), {"attn_mask": _attention_mask(pad, None)}
    sdpa = attn(*args, **kw)
    explicit, weights = attn(*args, **kw, need_weights=True)
    torch.testing.assert_close(explicit, sdpa, rtol=1e-5, atol=1e-5)
    if not causal:
        assert weights[1, :, 5:].abs().max() == 0  # padding gets no attention
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attn(*args, **kw)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), sdpa, rtol=0.05, atol=0.05)
