import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from modules.decoding import (
    beam_search,
    generate,
    greedy_decode,
    max_lengths,
    nat_decode,
    pad_hypotheses,
    reorder_cache,
    sample_decode,
    top_k_top_p_filter,
)
from modules.translation import TranslationModel, guided_attention_loss, label_smoothed_nll, shift_right

PAD, BOS, EOS, MASK = 0, 1, 2, 3
VOCAB = 20


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and leave the other core to whoever shares the machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(copy=False, seed=0, vocab=VOCAB, max_length=64):
    torch.manual_seed(seed)
    return TranslationModel(
        vocab_size=vocab, pad_id=PAD, d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
        dropout=0.0, copy=copy, max_length=max_length,
    ).eval()


def source(batch=4, width=7, seed=0):
    """Right-padded random sources with lengths ``width, width-2, width, 3``."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, VOCAB, (batch, width), generator=g)
    lengths = torch.tensor([width, width - 2, width, 3][:batch])
    mask = torch.arange(width)[None] >= lengths[:, None]
    return src.masked_fill(mask, PAD), mask


def strip(row):
    """Tokens up to and including the first EOS."""
    row = row.tolist()
    return row[: row.index(EOS) + 1] if EOS in row else row


def assert_well_formed(out, limits=None):
    """Every row: non-pad tokens, one EOS, then only pad (and within its limit)."""
    for i, row in enumerate(out.tolist()):
        assert EOS in row, row
        n = row.index(EOS) + 1
        assert PAD not in row[:n] and all(t == PAD for t in row[n:]), row
        if limits is not None:
            assert n <= int(limits[i])


ids = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD)
SHORT = dict(max_len_a=1.0, max_len_b=3)


# cache == no cache ---------------------------------------------------------------------------------
@pytest.mark.parametrize("copy", [False, True], ids=["plain", "copy"])
def test_cached_equals_uncached(copy):
    model = tiny_model(copy)
    src, mask = source()
    greedy = [greedy_decode(model, src, mask, **ids, **SHORT, use_cache=c) for c in (True, False)]
    assert torch.equal(*greedy)
    assert_well_formed(greedy[0])

    beams = [beam_search(model, src, mask, **ids, beam_size=3, n_best=3, **SHORT, use_cache=c) for c in (True, False)]
    for cached, full in zip(*beams):
        assert [h[0].tolist() for h in cached] == [h[0].tolist() for h in full]
        assert [h[1] for h in cached] == pytest.approx([h[1] for h in full], abs=1e-4)

    samples = [
        sample_decode(model, src, mask, **ids, **SHORT, generator=torch.Generator().manual_seed(7), use_cache=c)
        for c in (True, False)
    ]
    assert torch.equal(*samples)
    assert_well_formed(samples[0])


def test_cache_is_filled_once_for_cross_attention_and_grows_for_self_attention():
    model = tiny_model()
    src, mask = source()
    memory = model.encode(src, mask)
    cache = model.init_cache()
    tokens = torch.full((4, 1), BOS)
    for t in range(3):
        model.target_log_probs(tokens, memory, mask, src, cache=cache, offset=t)
    for layer in cache:
        assert layer["self"]["length"] == 3  # one key per fed token
        assert layer["cross"]["v"].shape[2] == src.shape[1]  # the encoder's, computed once


# special cases equal greedy -----------------------------------------------------------------------
@pytest.mark.parametrize("copy", [False, True], ids=["plain", "copy"])
def test_beam_size_one_equals_greedy(copy):
    model = tiny_model(copy, seed=1)
    src, mask = source(seed=1)
    greedy = greedy_decode(model, src, mask, **ids)
    beams = beam_search(model, src, mask, **ids, beam_size=1)
    assert [strip(row) for row in greedy] == [hyps[0][0].tolist() for hyps in beams]


def test_top_k_one_tiny_top_p_and_zero_temperature_equal_greedy():
    model = tiny_model(seed=2)
    src, mask = source(seed=2)
    greedy = greedy_decode(model, src, mask, **ids)
    for kwargs in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=0.0), dict(top_k=1, temperature=5.0)):
        out = sample_decode(model, src, mask, **ids, generator=torch.Generator().manual_seed(0), **kwargs)
        assert torch.equal(out, greedy), kwargs


def test_sampling_depends_on_the_generator_and_is_repeatable():
    model = tiny_model(seed=3)
    src, mask = source(seed=3)
    runs = [sample_decode(model, src, mask, **ids, temperature=2.0, generator=torch.Generator().manual_seed(s))
            for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    inf = float("-inf")
    assert top_k_top_p_filter(logits, top_k=2).isinf().tolist() == [[False, False, True, True]]
    assert top_k_top_p_filter(logits, top_p=0.5).isinf().tolist() == [[False, True, True, True]]
    assert top_k_top_p_filter(logits, top_p=0.7).isinf().tolist() == [[False, False, True, True]]
    assert top_k_top_p_filter(logits, top_p=0.81).isinf().tolist() == [[False, False, False, True]]
    assert top_k_top_p_filter(logits, top_p=1e-9).isinf().tolist() == [[False, True, True, True]]
    shuffled = logits[:, [2, 0, 3, 1]]  # filtering follows the values, not the positions
    assert top_k_top_p_filter(shuffled, top_p=0.7).isinf().tolist() == [[True, False, True, False]]
    assert top_k_top_p_filter(logits).equal(logits)
    assert top_k_top_p_filter(torch.tensor([[0.0, inf, 1.0]]), top_k=2).tolist() == [[0.0, inf, 1.0]]


# beam search --------------------------------------------------------------------------------------
def teacher_forced_sum(model, src, mask, tokens):
    tgt_in = torch.cat([torch.tensor([BOS]), tokens[:-1]])[None]
    with torch.no_grad():
        log_probs = model(src[None], mask[None], tgt_in)["log_probs"][0]
    return float(log_probs.gather(-1, tokens[:, None]).sum())


@pytest.mark.parametrize("copy", [False, True], ids=["plain", "copy"])
@pytest.mark.parametrize("alpha", [1.0, 0.0, 0.6])
def test_beam_n_best_sorted_and_scores_match_teacher_forcing(alpha, copy):
    model = tiny_model(copy, seed=4)
    src, mask = source(seed=4)
    results = beam_search(model, src, mask, **ids, beam_size=4, n_best=3, length_penalty=alpha, **SHORT)
    limits = max_lengths(model, src, mask, **SHORT)
    for i, hyps in enumerate(results):
        assert len(hyps) == 3
        scores = [score for _, score in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(t.tolist()) for t, _ in hyps}) == 3  # distinct hypotheses
        for tokens, score in hyps:
            assert tokens[-1] == EOS and EOS not in tokens[:-1].tolist() and PAD not in tokens.tolist()
            assert len(tokens) <= limits[i]
            expected = teacher_forced_sum(model, src[i], mask[i], tokens) / len(tokens) ** alpha
            assert score == pytest.approx(expected, abs=1e-4)


def test_beam_without_early_stopping_is_never_worse():
    model = tiny_model(seed=5)
    src, mask = source(seed=5)
    early = beam_search(model, src, mask, **ids, beam_size=3, max_len_b=6)
    exact = beam_search(model, src, mask, **ids, beam_size=3, max_len_b=6, early_stopping=False)
    for a, b in zip(early, exact):
        assert b[0][1] >= a[0][1] - 1e-5


def test_beam_search_validates_arguments():
    model = tiny_model()
    src, mask = source()
    with pytest.raises(ValueError, match="n_best"):
        beam_search(model, src, mask, **ids, beam_size=2, n_best=3)


# lengths, EOS, processor --------------------------------------------------------------------------
def never_eos(tokens, log_probs):
    log_probs[:, EOS] = float("-inf")
    return log_probs


@pytest.mark.parametrize("a,b", [(1.0, 0), (0.5, 2), (1.5, 1)])
def test_max_len_is_respected_and_eos_forced(a, b):
    model = tiny_model(seed=6)
    src, mask = source(seed=6)
    src_len = (~mask).sum(1).tolist()
    expected = [max(math.floor(a * n + b), 1) for n in src_len]
    assert max_lengths(model, src, mask, max_len_a=a, max_len_b=b).tolist() == expected
    kw = dict(max_len_a=a, max_len_b=b, logits_processor=never_eos)
    outputs = [
        greedy_decode(model, src, mask, **ids, **kw),
        greedy_decode(model, src, mask, **ids, **kw, use_cache=False),
        sample_decode(model, src, mask, **ids, **kw, generator=torch.Generator().manual_seed(0)),
        pad_hypotheses([h[0][0] for h in beam_search(model, src, mask, **ids, beam_size=3, **kw)], PAD),
    ]
    for out in outputs:
        assert_well_formed(out)
        assert out.shape[1] == max(expected)
        # the processor bans EOS, so every sentence runs to its own limit and gets EOS forced there
        assert [strip(row).__len__() for row in out] == expected


def test_max_len_is_capped_by_argument_and_position_table():
    model = tiny_model(max_length=4)  # position table: max(4, 1024) + 2 rows
    src, mask = source()
    assert max_lengths(model, src, mask, max_len_a=1000.0, max_len_b=0).max() == model.positions.shape[0]
    assert max_lengths(model, src, mask, max_len_a=1.0, max_len_b=50, max_len_cap=5).tolist() == [5, 5, 5, 5]
    out = greedy_decode(model, src, mask, **ids, max_len_b=50, max_len_cap=5, logits_processor=never_eos)
    assert out.shape == (4, 5)


def test_eos_stops_each_sentence_and_pads_after_it():
    model = tiny_model(seed=7)
    src, mask = source(seed=7)
    stop_at = torch.tensor([1, 3, 2, 5])  # output length (EOS included) wanted for each sentence
    seen_rows = []

    def stop(tokens, log_probs):  # rows are sentences still running: identify them by their length
        seen_rows.append(tokens.shape[0])
        log_probs = log_probs.clone()
        step = tokens.shape[1]
        running = [i for i in range(4) if int(stop_at[i]) > step]
        for row, i in enumerate(running):
            if int(stop_at[i]) == step + 1:
                log_probs[row] = float("-inf")
                log_probs[row, EOS] = 0.0
            else:
                log_probs[row, EOS] = float("-inf")
        return log_probs

    out = greedy_decode(model, src, mask, **ids, max_len_b=20, logits_processor=stop)
    assert out.shape == (4, 5)  # stops as soon as the last sentence has finished
    assert [len(strip(row)) for row in out] == stop_at.tolist()
    assert_well_formed(out)
    assert seen_rows == [4, 3, 2, 1, 1]  # finished sentences leave the batch


def test_logits_processor_sees_generated_tokens_and_can_ban_repeats():
    model = tiny_model(seed=8)
    src, mask = source(seed=8)
    widths = []

    def no_repeat(tokens, log_probs):
        widths.append(tokens.shape[1])
        return log_probs.scatter(1, tokens, float("-inf")) if tokens.shape[1] else log_probs

    for fn, kw in ((greedy_decode, {}), (beam_search, dict(beam_size=3)), (sample_decode, {})):
        widths.clear()
        out = fn(model, src, mask, **ids, max_len_b=8, logits_processor=no_repeat, **kw)
        assert widths[:3] == [0, 1, 2]  # BOS is not passed
        rows = [h[0][0].tolist() for h in out] if fn is beam_search else [strip(r) for r in out]
        for row in rows:
            assert len(row) == len(set(row)), row


def test_reorder_cache_selects_every_tensor_along_the_batch():
    cache = [{"self": {"k": torch.arange(3)[:, None].repeat(1, 2), "v": torch.arange(3)}, "cross": {}}]
    index = torch.tensor([2, 2, 0])
    out = reorder_cache(cache, index)
    assert out is cache
    assert cache[0]["self"]["k"].tolist() == [[2, 2], [2, 2], [0, 0]]
    assert cache[0]["self"]["v"].tolist() == [2, 2, 0]
    assert cache[0]["cross"] == {}


# dispatcher ---------------------------------------------------------------------------------------
def test_decode_dispatcher():
    model = tiny_model(seed=9)
    src, mask = source(seed=9)
    common = dict(**ids, mask_id=MASK)
    greedy = greedy_decode(model, src, mask, **ids, max_len_b=5)
    settings = {"strategy": "greedy", "max_len_b": 5, "beam_size": 4, "temperature": 0.7}  # others ignored
    assert torch.equal(generate(model, "greedy", src, mask, **common, settings=settings), greedy)
    beam = generate(model, "beam", src, mask, **common, settings={"beam_size": 1, "max_len_b": 5})
    assert torch.equal(beam, greedy)
    sample = generate(model, "sample", src, mask, **common, settings={"top_k": 1}, max_len_b=5)
    assert torch.equal(sample, greedy)
    nat = generate(model, "nat", src, mask, **common, settings={"iterations": 2})
    assert nat.shape[0] == 4
    assert_well_formed(nat)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \[.beam_szie.\]"):
        generate(model, "greedy", src, mask, **common, settings={"beam_szie": 4})
    with pytest.raises(ValueError, match="unknown decoding strategy"):
        generate(model, "viterbi", src, mask, **common)
    with pytest.raises(ValueError, match="mask_id"):
        generate(model, "nat", src, mask, **ids)
    with pytest.raises(ValueError, match="asked for"):
        generate(model, "beam", src, mask, **ids, settings={"strategy": "greedy"})


def test_decode_dispatcher_with_the_config_as_keywords():
    """``TranslationTask.translate_ids`` form: source first, the whole config (strategy included) as
    keyword arguments."""
    model = tiny_model(seed=9)
    src, mask = source(seed=9)
    greedy = greedy_decode(model, src, mask, **ids, max_len_b=5)
    config = {"strategy": "beam", "beam_size": 1, "max_len_b": 5, "top_p": 0.9}
    assert torch.equal(generate(model, src, mask, **ids, mask_id=MASK, **config), greedy)
    assert torch.equal(generate(model, src, mask, **ids, max_len_b=5), greedy)  # greedy by default
    assert generate(model, src, mask, **ids, mask_id=MASK, strategy="nat").shape[0] == 4


# learning -----------------------------------------------------------------------------------------
TASK_VOCAB, SEQ = 12, 6  # symbols 4..11, lengths 3..6


def copy_batch(n, g, reverse=False):
    """Random sequences: sources [n, 6] (right-padded), padding mask, lengths and ``BOS body EOS pad..``
    targets, the body being the source or (``reverse``) the source backwards."""
    lengths = torch.randint(3, SEQ + 1, (n,), generator=g)
    pad = torch.arange(SEQ)[None] >= lengths[:, None]
    src = torch.randint(4, TASK_VOCAB, (n, SEQ), generator=g).masked_fill(pad, PAD)
    tgt = torch.full((n, SEQ + 2), PAD)
    tgt[:, 0] = BOS
    for i, length in enumerate(lengths.tolist()):
        body = src[i, :length]
        tgt[i, 1 : length + 1] = body.flip(0) if reverse else body
    tgt[torch.arange(n), lengths + 1] = EOS
    return src, pad, lengths, tgt


def task_model(seed):
    torch.manual_seed(seed)
    return TranslationModel(
        vocab_size=TASK_VOCAB, pad_id=PAD, d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
        dropout=0.0, max_length=16,
    )


def exact_match(out, tgt):
    ref = F.pad(tgt[:, 1:], (0, max(out.shape[1] - tgt.shape[1] + 1, 0)), value=PAD)[:, : out.shape[1]]
    return float((out == ref).all(1).float().mean())


@pytest.fixture(scope="module", params=[False, True], ids=["copy", "reverse"])
def copier(request):
    """AR model trained to copy (or reverse) until greedy exact match on held-out sequences reaches
    0.9 (checked every 50 steps, at most 600 Adam steps); returns (model, reverse, accuracy, steps)."""
    reverse = request.param
    model = task_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    val = copy_batch(200, torch.Generator().manual_seed(123), reverse)
    acc, step = 0.0, 0
    for step in range(1, 601):
        src, pad, _, tgt = copy_batch(64, g, reverse)
        tgt_in, labels = shift_right(tgt)
        loss, _ = label_smoothed_nll(model(src, pad, tgt_in)["log_probs"], labels, 0.1, PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            model.eval()
            acc = exact_match(greedy_decode(model, val[0], val[1], **ids, max_len_a=1, max_len_b=2), val[3])
            model.train()
            if acc >= 0.9:
                break
    return model.eval(), reverse, acc, step


@pytest.mark.slow
def test_learns_to_copy_and_reverse_with_greedy_decoding(copier):
    model, reverse, acc, steps = copier
    assert acc >= 0.9 and steps <= 600
    src, pad, _, tgt = copy_batch(200, torch.Generator().manual_seed(321), reverse)  # fresh sequences
    out = greedy_decode(model, src, pad, **ids, max_len_a=1, max_len_b=2)
    assert exact_match(out, tgt) >= 0.9


@pytest.mark.slow
def test_trained_copier_beam_and_cache(copier):
    model, reverse = copier[:2]
    src, pad, _, tgt = copy_batch(64, torch.Generator().manual_seed(5), reverse)
    greedy = greedy_decode(model, src, pad, **ids, max_len_a=1, max_len_b=2)
    assert torch.equal(greedy, greedy_decode(model, src, pad, **ids, max_len_a=1, max_len_b=2, use_cache=False))
    beams = beam_search(model, src, pad, **ids, beam_size=4, max_len_a=1, max_len_b=2)
    assert exact_match(pad_hypotheses([h[0][0] for h in beams], PAD), tgt) >= exact_match(greedy, tgt) - 0.05


@pytest.mark.slow
def test_guided_attention_makes_a_trained_models_alignment_monotonic():
    """Two copiers trained alike, one with the guided-attention loss (weight 1): the last decoder
    layer's cross-attention of the guided one keeps far less mass off the diagonal on fresh
    sequences, and it still learns the task."""

    def train(weight):
        model = task_model(2)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(2)
        for _ in range(120):
            src, pad, _, tgt = copy_batch(64, g)
            tgt_in, labels = shift_right(tgt)
            out = model(src, pad, tgt_in, tgt_in == PAD, need_attn=True)
            loss, nll = label_smoothed_nll(out["log_probs"], labels, 0.1, PAD)
            loss = loss + weight * guided_attention_loss(out["cross_attn"], tgt_in == PAD, pad)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        src, pad, _, tgt = copy_batch(200, torch.Generator().manual_seed(9))
        tgt_in, labels = shift_right(tgt)
        with torch.no_grad():
            out = model(src, pad, tgt_in, tgt_in == PAD, need_attn=True)
            off_diagonal = float(guided_attention_loss(out["cross_attn"], tgt_in == PAD, pad))
            nll = float(label_smoothed_nll(out["log_probs"], labels, 0.0, PAD)[1])
        return off_diagonal, nll

    free_off, free_nll = train(0.0)
    guided_off, guided_nll = train(1.0)
    assert guided_off < 0.6 * free_off, (guided_off, free_off)  # measured: 0.15 vs 0.36
    assert guided_nll < 0.5 * math.log(TASK_VOCAB)  # it learns: well below a uniform guess


@pytest.fixture(scope="module")
def nat_copier():
    """Non-autoregressive copier, CMLM-style: the length head learns the true length (CE), the decoder
    reads the target with a uniform random number (1..L) of its tokens replaced by the mask token
    (all of them: plain NAT; some: what mask-predict's later iterations see), no causal mask, and
    learns the masked tokens."""
    model = task_model(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        src, pad, lengths, _ = copy_batch(64, g)  # the target is the source itself
        memory = model.encode(src, pad)
        length_loss = F.cross_entropy(model.predict_length_logits(memory, pad), lengths)
        n_masked = (torch.rand(len(src), generator=g) * lengths).long() + 1
        rank = torch.rand(src.shape, generator=g).masked_fill(pad, 2.0).argsort(1).argsort(1)
        masked = rank < n_masked[:, None]  # never a pad position
        log_probs, _ = model.target_log_probs(src.masked_fill(masked, MASK), memory, pad, src, tgt_padding_mask=pad,
                                    causal=False)
        loss, _ = label_smoothed_nll(log_probs, src.masked_fill(~masked, PAD), 0.1, PAD)
        opt.zero_grad()
        (loss + length_loss).backward()
        opt.step()
    return model.eval()


@pytest.mark.slow
def test_nat_decode_copies_with_right_lengths(nat_copier):
    src, pad, lengths, tgt = copy_batch(200, torch.Generator().manual_seed(77))
    out = nat_decode(nat_copier, src, pad, mask_id=MASK, eos_id=EOS, pad_id=PAD)
    assert_well_formed(out)
    predicted = torch.tensor([len(strip(row)) - 1 for row in out])
    assert float((predicted == lengths).float().mean()) >= 0.95
    tokens = out[:, :SEQ].masked_fill(pad, PAD)
    assert float(((tokens == src) | pad).all(1).float().mean()) >= 0.8
    assert float((tokens == src)[~pad].float().mean()) >= 0.9


@pytest.mark.slow
def test_mask_predict_does_not_lower_the_models_confidence(nat_copier):
    src, pad, _, _ = copy_batch(200, torch.Generator().manual_seed(78))
    runs = [nat_decode(nat_copier, src, pad, mask_id=MASK, eos_id=EOS, pad_id=PAD, iterations=n, return_scores=True) for n in (1, 2, 4)]
    (_, once), (_, twice), (_, four) = runs
    assert float(twice.mean()) >= float(once.mean()) - 1e-6
    assert float(four.mean()) >= float(once.mean()) - 1e-6
    for out, _ in runs:  # same lengths (the length head decides), well-formed rows
        assert_well_formed(out)
        assert (out == EOS).nonzero()[:, 1].tolist() == (runs[0][0] == EOS).nonzero()[:, 1].tolist()
    copied = [float(((out[:, :SEQ].masked_fill(pad, PAD) == src) | pad).all(1).float().mean()) for out, _ in runs]
    assert copied[2] >= copied[0]


@pytest.mark.slow
def test_nat_length_beam_picks_the_most_confident_candidate(nat_copier):
    src, pad, lengths, _ = copy_batch(50, torch.Generator().manual_seed(79))
    one, s1 = nat_decode(nat_copier, src, pad, mask_id=MASK, eos_id=EOS, pad_id=PAD, return_scores=True)
    three, s3 = nat_decode(nat_copier, src, pad, mask_id=MASK, eos_id=EOS, pad_id=PAD, length_beam=3, return_scores=True)
    assert bool((s3 >= s1 - 1e-6).all())
    assert_well_formed(three)


def test_nat_decode_on_an_untrained_model_is_well_formed():
    model = tiny_model(seed=10, max_length=12)
    src, mask = source(seed=10)
    out, scores = nat_decode(model, src, mask, mask_id=MASK, eos_id=EOS, pad_id=PAD, iterations=3, length_beam=2, return_scores=True)
    assert_well_formed(out)
    assert not bool((out == MASK).any())
    assert out.shape[1] <= 12 + 1 and scores.shape == (4,)
    raw = nat_decode(model, src, mask, mask_id=MASK, eos_id=EOS, pad_id=PAD, iterations=3, length_beam=2, append_eos=False)
    assert raw.shape[1] <= 12
    for row, raw_row in zip(out, raw.tolist()):
        kept = strip(row)[:-1]
        assert raw_row[: len(kept)] == kept


class StubNAT:
    """A fake model with TranslationModel's interface: the length head says ``lengths`` and the
    decoder always predicts ``wanted`` (confidence falling along the sequence); records the number
    of mask tokens in each decoder input row."""

    def __init__(self, lengths, wanted, vocab=10):
        self.lengths, self.wanted, self.vocab, self.masked = lengths, wanted, vocab, []

    def encode(self, src, mask):
        return src.float()[..., None]

    def predict_length_logits(self, memory, mask):
        return F.one_hot(torch.tensor(self.lengths), 20).float() * 10

    def target_log_probs(self, tokens, memory, mask, src, tgt_padding_mask=None, causal=True, **_):
        assert not causal and tokens.shape == tgt_padding_mask.shape
        self.masked.append((tokens == MASK).sum(1).tolist())
        width = tokens.shape[1]
        logits = F.one_hot(torch.tensor(self.wanted)[:, :width], self.vocab).float()
        logits = logits * torch.linspace(8, 4, width)[None, :, None]
        return logits.log_softmax(-1), None


def test_nat_decode_cuts_at_eos_or_appends_it():
    """Works whether the length head counts the target's EOS (the model predicts ``.. EOS``) or not."""
    stub = StubNAT([4, 3], [[5, 6, EOS, 7], [5, 6, 7, 8]])
    src = torch.ones(2, 3, dtype=torch.long)
    assert nat_decode(stub, src, None, mask_id=MASK, eos_id=EOS, pad_id=PAD).tolist() == [[5, 6, EOS, PAD], [5, 6, 7, EOS]]
    raw = nat_decode(stub, src, None, mask_id=MASK, eos_id=EOS, pad_id=PAD, append_eos=False)
    assert raw.tolist() == [[5, 6, EOS, 7], [5, 6, 7, PAD]]


def test_mask_predict_remasks_the_scheduled_number_of_tokens():
    stub = StubNAT([4, 3], [[5, 6, 7, 8], [5, 6, 7, 8]])
    out = nat_decode(stub, torch.ones(2, 3, dtype=torch.long), None, mask_id=MASK, eos_id=EOS, pad_id=PAD, iterations=4)
    # first pass: everything masked; then n = floor(L * (T - i) / T) for i = 1, 2, 3
    assert stub.masked == [[4, 3], [3, 2], [2, 1], [1, 0]]
    assert out.tolist() == [[5, 6, 7, 8, EOS], [5, 6, 7, EOS, PAD]]


@pytest.mark.parametrize("copy", [False, True], ids=["plain", "copy"])
def test_packed_weights_do_not_change_the_decoded_tokens(copy, monkeypatch):
    """Decoding packs the float32 CPU weights (modules.packed); with packing unavailable it runs
    F.linear. Both give the same greedy tokens and beam hypotheses, scores within float32 rounding."""
    from modules import packed

    monkeypatch.setattr(packed, "_available", {})
    if not packed._ops_work(torch.float32):
        pytest.skip("this torch build has no oneDNN (float32 packing works on every x86 CPU with it)")
    model = tiny_model(copy, vocab=40)
    src, mask = source(width=9, seed=4)
    fast = (greedy_decode(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD),
            beam_search(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD, beam_size=3, n_best=2))
    monkeypatch.setattr(packed, "_available", {torch.float32: False})
    slow = (greedy_decode(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD),
            beam_search(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD, beam_size=3, n_best=2))
    assert torch.equal(fast[0], slow[0])
    for hyps_fast, hyps_slow in zip(fast[1], slow[1]):
        assert [h.tolist() for h, _ in hyps_fast] == [h.tolist() for h, _ in hyps_slow]
        assert [s for _, s in hyps_fast] == pytest.approx([s for _, s in hyps_slow], abs=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("broken", ["missing_reorder", "missing_linear", "raising_reorder", "raising_linear",
                                    "raising_mid_run"])
@pytest.mark.slow
def test_decoding_without_the_private_ops_gives_the_same_tokens(broken, precision, monkeypatch):
    """Each oneDNN op taken away (missing, or raising as on a CPU without the instructions, in the
    availability trial or only later, mid-decoding): greedy and beam decoding fall back to F.linear
    and give the tokens that F.linear decoding gives, in float32 and under bfloat16 autocast."""
    from modules import packed, private_api
    from tests.modules.test_packed import FakeOps

    model = tiny_model(vocab=40)
    src, mask = source(width=9, seed=4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def run():
        with autocast:
            return (greedy_decode(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD),
                    beam_search(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD, beam_size=3, n_best=2))

    monkeypatch.setattr(packed, "_available", {torch.float32: False, torch.bfloat16: False})
    want = run()
    kind, part = broken.split("_", 1)
    op = {"reorder": "_reorder_linear_weight", "linear": "_linear_pointwise", "mid_run": "_linear_pointwise"}[part]
    fake = FakeOps(missing=op) if kind == "missing" else FakeOps(failing=op, fail_after=10 if part == "mid_run" else 0)
    monkeypatch.setattr(private_api, "ONEDNN_OPS", fake)
    monkeypatch.setattr(packed, "_available", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        got = run()
    assert len([w for w in caught if "packed linear failed" in str(w.message)]) == (part == "mid_run")
    assert torch.equal(got[0], want[0])
    for hyps_got, hyps_want in zip(got[1], want[1]):
        assert [h.tolist() for h, _ in hyps_got] == [h.tolist() for h, _ in hyps_want]
    assert packed._available == {torch.float32 if precision == "fp32" else torch.bfloat16: False}


def test_min_len_keeps_eos_out_of_the_first_tokens():
    """A processor makes EOS the best token everywhere: without ``min_len`` every output is just EOS;
    with ``min_len=3`` greedy, beam and sampling put 3 other tokens first (EOS banned after the
    processor), and a limit below ``min_len`` still ends the output with the forced EOS."""
    model = tiny_model()
    src, mask = source()

    def eos_first(tokens, log_probs):
        log_probs[:, EOS] = 10.0
        return log_probs

    runs = {
        "greedy": lambda **kw: greedy_decode(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD, logits_processor=eos_first, **kw),
        "sample": lambda **kw: sample_decode(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD, logits_processor=eos_first,
                                             generator=torch.Generator().manual_seed(0), **kw),
        "beam": lambda **kw: pad_hypotheses([h[0][0] for h in beam_search(
            model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD, beam_size=3, logits_processor=eos_first, **kw)], PAD),
    }
    for name, run in runs.items():
        assert run(max_len_a=0, max_len_b=8)[:, 0].tolist() == [EOS] * 4, name
        out = run(max_len_a=0, max_len_b=8, min_len=3)
        assert_well_formed(out)
        assert [strip(row).index(EOS) for row in out] == [3] * 4, name
        short = run(max_len_a=0, max_len_b=2, min_len=3)  # the limit wins: 1 token, then the forced EOS
        assert [len(strip(row)) for row in short] == [2] * 4, name


def test_raw_logits_path_gives_the_log_prob_paths_tokens():
    """Without a logits processor greedy decoding and sampling read the model's logits (no
    log-softmax); an identity processor forces the log-probability path: same tokens."""
    model = tiny_model(vocab=40)
    src, mask = source(width=9, seed=6)

    def identity(tokens, log_probs):
        return log_probs

    from modules.decoding import _NextTokenScorer

    memory = model.encode(src, mask)
    assert _NextTokenScorer(model, memory, mask, src, use_cache=True, raw=True).options == {"output": "logits"}  # the raw path runs
    assert torch.equal(greedy_decode(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD),
                       greedy_decode(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD, logits_processor=identity))
    for kw in ({"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.8}):
        raw = sample_decode(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(1), **kw)
        normalised = sample_decode(model, src, mask, bos_id=BOS, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(1),
                                   logits_processor=identity, **kw)
        assert torch.equal(raw, normalised), kw
