"""The compiled loops (`merge.methods._loops`) against the torch path they replace and against
plain Python references: thresholds, tie cuts and random draws exactly, merges to the last bit
or two (torch may fuse a weighted add into one rounding)."""

from __future__ import annotations

import itertools

import pytest
import torch

from merge.methods import selection
from merge.methods._fused import NO_LOOPS, usable
from merge.methods._gta import fused_merge
from merge.methods._stream import ElementRandom, mix_seed
from merge.methods.selection import StreamingTopK, keep_count


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch):
    """Run a callable with the loops switched off (the reference path)."""

    def run(fn):  # type: ignore[no-untyped-def]
        with monkeypatch.context() as m:
            m.setenv(NO_LOOPS, "1")
            return fn()

    return run


def _fine_tunes(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """bf16-rounded base and fine-tunes: task-vector magnitudes repeat, so ties are common."""
    g = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(n, generator=g)).bfloat16().float()
    xs = [(base + 0.002 * torch.randn(n, generator=g)).bfloat16().float() for _ in range(k)]
    xs[0][: n // 10] = base[: n // 10]  # exact zeros in one task vector
    return base, xs


def test_loops_take_cpu_float32_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert usable(torch.zeros(3), None)
    assert not usable(torch.zeros(3, dtype=torch.float64))
    assert not usable(torch.zeros(3, 2).t())  # not contiguous
    monkeypatch.setenv(NO_LOOPS, "1")
    assert not usable(torch.zeros(3))


def _python_draw(key: int, stream: int, index: int) -> float:
    """The counter draw with Python integers: lowbias32 twice, 24 bits."""

    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    seed = mix_seed(key, stream)
    h = mix((index & 0xFFFFFFFF) ^ (seed & 0xFFFFFFFF))
    h = mix(h ^ (index >> 32) ^ (seed >> 32))
    return (h >> 8) / (1 << 24)


@pytest.mark.parametrize("offset", [0, 12345, (1 << 32) - 3, (1 << 40) + 7])
def test_counter_draws_match_python_and_the_torch_path(offset: int, torch_path) -> None:  # type: ignore[no-untyped-def]
    r = ElementRandom(key=77, offset=offset)
    looped = r.uniform(4096, stream=2)
    reference = torch_path(lambda: r.uniform(4096, stream=2))
    assert torch.equal(looped, reference)
    want = [_python_draw(77, 2, offset + i) for i in (0, 1, 2, 4095)]
    assert [float(looped[i]) for i in (0, 1, 2, 4095)] == want


def test_counter_draws_look_uniform_and_streams_independent() -> None:
    r = ElementRandom(key=5)
    a, b = r.uniform(1 << 20, 0), r.uniform(1 << 20, 1)
    assert float(a.min()) >= 0.0 and float(a.max()) < 1.0
    assert abs(float(a.mean()) - 0.5) < 2e-3  # sd of the mean ≈ 2.8e-4
    assert abs(float(a.var()) - 1 / 12) < 1e-3
    hist = torch.histc(a, bins=16, min=0.0, max=1.0)
    assert float(((hist - 65536) ** 2 / 65536).sum()) < 60  # χ² with 15 dof: p ≈ 1e-6
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1])) < 0.01


CASES = list(
    itertools.product(
        [None, "sum", "count"],  # elect
        [False, True],  # trim
        [False, True],  # drop
        [False, True],  # normalize
    )
)


@pytest.mark.parametrize("elect,trim,drop,normalize", CASES)
def test_task_vector_merge_matches_the_torch_path(elect, trim, drop, normalize, torch_path) -> None:  # type: ignore[no-untyped-def]
    n = 300_001  # not a multiple of any block
    base, xs = _fine_tunes(n, 3)
    kwargs = dict(
        thresholds=[0.002, float("inf"), None] if trim else None,
        cuts=[n // 2, n, n] if trim else None,
        offset=0,
        keep_prob=[0.3, 0.9, 1.0] if drop else None,
        elect=elect,
        normalize=normalize,
        scale=0.7,
        compat="paper",
    )

    def run():  # type: ignore[no-untyped-def]
        return fused_merge("t", xs, base, [0.5, 1.0, -0.3], generator=ElementRandom(3), **kwargs)

    looped, reference = run(), torch_path(run)
    # the same entries survive the trim, the drop and the election ...
    assert torch.equal(looped == base, reference == base)
    # ... and the values agree to a rounding of each weighted add
    torch.testing.assert_close(looped, reference, rtol=0, atol=2.5e-7)


def test_task_vector_merge_with_a_torch_generator_draws_in_the_torch_order(torch_path) -> None:  # type: ignore[no-untyped-def]
    n = 600_000  # more than one of the torch path's 256K-element chunks
    base, xs = _fine_tunes(n, 2, seed=1)

    def run():  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(11)
        return fused_merge(
            "t", xs, base, [1.0, 1.0], keep_prob=[0.5, 0.5], generator=g, elect="sum",
            normalize=False, scale=1.0, compat="paper",
        )  # fmt: skip

    looped, reference = run(), torch_path(run)
    assert torch.equal(looped == base, reference == base)
    torch.testing.assert_close(looped, reference, rtol=0, atol=2.5e-7)


@pytest.mark.parametrize("n,density", [(5000, 0.2), (300_001, 0.1), (300_001, 0.9)])
def test_streaming_top_k_threshold_and_cut_match_the_torch_path(
    n, density, monkeypatch, torch_path
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(selection, "STREAM_SAMPLE", 1000)  # the histogram passes for n > 1000
    base, xs = _fine_tunes(n, 1, seed=2)
    x = xs[0]
    k = keep_count(n, density)

    def select() -> tuple[float, int]:
        s = StreamingTopK(n, k)
        while not s.done:
            for start in range(0, n, 65_537):
                s.observe_abs_diff(start, x[start : start + 65_537], base[start : start + 65_537])
            s.end_pass()
        return s.threshold, s.cut

    got, want = select(), torch_path(select)
    assert got == want
    # and against a sort: exactly k kept, ties at the threshold in index order
    t, cut = got
    a = (x - base).abs()
    index = torch.arange(n)
    kept = (a > t) | ((a == t) & (index < cut))
    assert int(kept.sum()) == k
    assert float(a.sort(descending=True).values[k - 1]) == t


def _passes_and_result(x: torch.Tensor, base: torch.Tensor, k: int) -> tuple[int, float, int]:
    n = x.numel()
    s = StreamingTopK(n, k)
    passes = 0
    while not s.done:
        passes += 1
        for start in range(0, n, 10_000):
            s.observe_abs_diff(start, x[start : start + 10_000], base[start : start + 10_000])
        s.end_pass()
    return passes, s.threshold, s.cut


@pytest.mark.parametrize(
    "first_chunk_scale,limit,passes", [(1.0, None, 1), (50.0, None, 2), (1.0, 10, 2)]
)
def test_the_histogram_pass_guesses_the_bin_and_a_miss_costs_one_pass(
    first_chunk_scale, limit, passes, monkeypatch, torch_path
) -> None:  # type: ignore[no-untyped-def]
    """The first chunk's guess of the threshold's bin saves the collect pass when it holds; a
    first chunk unlike the rest (a miss) or too many entries in the window (an overflow) only
    cost that pass. The threshold and cut are exact either way."""
    monkeypatch.setattr(selection, "STREAM_SAMPLE", 1000)
    if limit is not None:
        monkeypatch.setattr(selection, "GUESS_LIMIT", limit)
    base, (x,) = _fine_tunes(200_000, 1, seed=3)
    x = (base + 0.002 * torch.randn(200_000, generator=torch.Generator().manual_seed(4))).float()
    x[:10_000] = base[:10_000] + first_chunk_scale * (x[:10_000] - base[:10_000])
    k = keep_count(200_000, 0.3)
    got = _passes_and_result(x, base, k)
    assert got[0] == passes
    reference = torch_path(lambda: _passes_and_result(x, base, k))
    assert reference[0] == 2 and got[1:] == reference[1:]


def test_block_gram_loop_is_exact_in_its_chunking_and_close_to_math_fsum() -> None:
    import math

    from merge.methods._gram import BlockGram

    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(200_003, generator=g), torch.randn(200_003, generator=g)

    def sums(cut: int) -> torch.Tensor:
        gram = BlockGram(2)
        for s in range(0, a.numel(), cut):
            gram.add([a[s : s + cut], b[s : s + cut]])
        return gram.total()[:, 0]

    whole = sums(a.numel())
    for cut in (1, 7, 4099, 65_536, 100_000):
        assert torch.equal(sums(cut), whole)
    want = [
        math.fsum(x * y for x, y in zip(u.double().tolist(), v.double().tolist()))
        for u, v in ((a, a), (a, b), (b, b))
    ]
    torch.testing.assert_close(whole, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_two_term_combination_and_bfloat16_store_match_torch_bit_for_bit() -> None:
    import numpy as np

    from merge.methods._fused import loops

    g = torch.Generator().manual_seed(8)
    v0, v1 = torch.randn(100_001, generator=g), torch.randn(100_001, generator=g)
    out = torch.empty_like(v0)
    loops().combine_two(
        v0.numpy(),
        v1.numpy(),
        np.float32(0.3),
        np.float32(0.7),
        out.numpy(),
        np.empty(0, np.uint16),
    )
    assert torch.equal(out, v0 * 0.3 + v1 * 0.7)

    x = 1e3 * torch.randn(100_001, generator=g)
    edges = [float("inf"), -float("inf"), 0.0, -0.0, 3.0e38, 3.3895314e38, 1.00390625, 1e-40]
    x[: len(edges)] = torch.tensor(edges)
    store = torch.empty(x.shape, dtype=torch.bfloat16)
    assert not loops().store_bfloat16(x.numpy(), store.view(torch.int16).numpy())  # ±inf
    assert torch.equal(store.view(torch.int16), x.bfloat16().view(torch.int16))
    assert loops().store_bfloat16(x[8:].numpy(), store[8:].view(torch.int16).numpy())


def _bits(t: torch.Tensor):  # type: ignore[no-untyped-def]
    from merge.methods._fused import as_array

    return as_array(t)


def test_loops_read_bfloat16_chunks_as_their_float32_values() -> None:
    """Every loop that reads model or base chunks takes bfloat16 ones (as uint16 bits) and
    gives exactly what it gives on their float32 copies: histogram, collect, the apply step
    with draws, Gram sums and SLERP's combination."""
    import numpy as np

    from merge.methods._fused import loops

    g = torch.Generator().manual_seed(11)
    n = 70_001
    xs = [torch.randn(n, generator=g).bfloat16() for _ in range(3)]
    b = torch.randn(n, generator=g).bfloat16()
    xs[0][:4] = torch.tensor([0.0, -0.0, 1e-40, 3e38])  # zeros, a subnormal, a large value
    wide = [x.float() for x in xs]
    L = loops()

    h_raw, h_f32 = np.zeros(1 << 16, np.int64), np.zeros(1 << 16, np.int64)
    L.abs_diff_high_histogram(_bits(xs[0]), _bits(b), h_raw)
    L.abs_diff_high_histogram(wide[0].numpy(), b.float().numpy(), h_f32)
    assert np.array_equal(h_raw, h_f32)

    lo, hi = 0x3F00, 0x3F80
    got = []
    for x, base in ((_bits(xs[1]), _bits(b)), (wide[1].numpy(), b.float().numpy())):
        vals, idx = np.empty(n, np.float32), np.empty(n, np.int64)
        filled = L.abs_diff_collect(x, base, lo, hi, 5, vals, idx, 0, np.zeros(0, np.int64))
        got.append((vals[:filled].copy(), idx[:filled].copy()))
    assert np.array_equal(got[0][0], got[1][0]) and np.array_equal(got[0][1], got[1][1])

    def merged(models, base):  # type: ignore[no-untyped-def]
        out = np.empty(n, np.float32)
        L.task_vector_merge(
            models, base,
            np.asarray([0.5, np.nan, 0.1], np.float32), np.full(3, n, np.int64),
            np.asarray([0.7, 1.0, 0.4], np.float32), np.empty((0, 0), np.float32),
            np.asarray([[1, 2], [3, 4], [5, 6]], np.uint64), 9, 0,
            np.asarray([1.0, 0.5, 0.25], np.float32), 1, True,
            np.float32(1.75), np.float32(0.8), out,
        )  # fmt: skip
        return out

    want = merged(tuple(w.numpy() for w in wide), b.float().numpy())
    assert np.array_equal(merged(tuple(_bits(x) for x in xs), _bits(b)), want)

    first, second = np.asarray([0, 0, 1]), np.asarray([0, 1, 1])
    sums = []
    for vectors in ((_bits(xs[0]), _bits(xs[1])), (wide[0].numpy(), wide[1].numpy())):
        lanes, total = np.zeros((3, L.LANES)), np.zeros(3)
        fill = L.gram_blocks(vectors, np.empty(0, np.float32), first, second, lanes, total, 0, 4099)
        assert fill == n % 4099
        sums.append(total.copy())
    assert np.array_equal(sums[0], sums[1])

    out_raw, out_f32 = np.empty(n, np.float32), np.empty(n, np.float32)
    no16 = np.empty(0, np.uint16)
    L.combine_two(_bits(xs[0]), _bits(b), np.float32(0.3), np.float32(0.7), out_raw, no16)
    L.combine_two(
        wide[0].numpy(), b.float().numpy(), np.float32(0.3), np.float32(0.7), out_f32, no16
    )
    assert np.array_equal(out_raw, out_f32)


def test_bfloat16_finite_check_and_store_of_nan_and_inf() -> None:
    from merge.methods._fused import loops

    for n in (10_000, 10_003):  # four values per word, and a tail
        x = torch.randn(n).bfloat16()
        x[:4] = torch.tensor([3.3895314e38, -3.3895314e38, 0.0, -1e-40])  # largest, tiny
        assert loops().all_finite_bfloat16(_bits(x))
        for bad, at in itertools.product(
            (float("nan"), float("inf"), -float("inf")), (0, 5, n - 1)
        ):
            y = x.clone()
            y[at] = bad
            assert not loops().all_finite_bfloat16(_bits(y))
    values = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 1.0])
    values[1] = torch.tensor([0xFFC00001], dtype=torch.int64).to(torch.int32).view(torch.float32)
    store = torch.empty(5, dtype=torch.bfloat16)
    assert not loops().store_bfloat16(values.numpy(), store.view(torch.int16).numpy())
    assert store.view(torch.int16).tolist() == [-1, -1, 0x7F80, -128, 0x3F80]


def test_gram_of_differences_and_scaled_sum_match_their_torch_expressions() -> None:
    """Model Stock's loops: Gram sums of x − base equal those of the float32 differences
    (bfloat16 or float32 chunks), and (1 − t)·base + (t/N)·Σ x equals torch's expression up
    to its fused multiply-adds."""
    import numpy as np

    from merge.methods._fused import loops
    from merge.methods._gram import BlockGram

    g = torch.Generator().manual_seed(12)
    n = 50_003
    xs = [torch.randn(n, generator=g).bfloat16() for _ in range(3)]
    b = torch.randn(n, generator=g).bfloat16()
    want = BlockGram(3)
    want.add([x.float() - b.float() for x in xs])
    for models, base in ((xs, b), ([x.float() for x in xs], b.float())):
        got = BlockGram(3)
        for s in range(0, n, 7919):  # chunks cut inside blocks and lanes
            got.add_differences([x[s : s + 7919] for x in models], base[s : s + 7919])
        assert torch.equal(got.total(), want.total())

    out = torch.empty(n)
    args = (tuple(_bits(x) for x in xs), _bits(b), np.float32(0.4), np.float32(0.2))
    assert loops().scaled_sum(*args, out.numpy(), np.empty(0, np.uint16))
    ref = b.float() * 0.4
    for x in xs:
        ref = ref + x.float() * np.float32(0.2)
    assert torch.equal(out, ref)
    # rounded to bfloat16 in the same loop: torch's rounding of the float32 values
    rounded = torch.empty(n, dtype=torch.bfloat16)
    assert loops().scaled_sum(*args, np.empty(0, np.float32), _bits(rounded))
    assert torch.equal(rounded.view(torch.int16), ref.bfloat16().view(torch.int16))
    # one model: its add and the rounding are the same single loop
    one = torch.empty(n, dtype=torch.bfloat16)
    assert loops().scaled_sum((_bits(xs[0]),), *args[1:], np.empty(0, np.float32), _bits(one))
    want_one = (b.float() * 0.4 + xs[0].float() * np.float32(0.2)).bfloat16()
    assert torch.equal(one.view(torch.int16), want_one.view(torch.int16))
    xs[1][7] = float("inf")
    args = (tuple(_bits(x) for x in xs), _bits(b), np.float32(0.4), np.float32(0.2))
    assert not loops().scaled_sum(*args, np.empty(0, np.float32), _bits(rounded))
    two = torch.empty(n, dtype=torch.bfloat16)
    assert not loops().combine_two(
        _bits(xs[1]),
        _bits(b),
        np.float32(0.3),
        np.float32(0.7),
        np.empty(0, np.float32),
        _bits(two),
    )
    want = (xs[1].float() * np.float32(0.3) + b.float() * np.float32(0.7)).bfloat16()
    assert torch.equal(two.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize(
    ("shape", "density", "gamma"),
    [
        ((37, 257), 0.9, 0.01),
        ((16, 4096), 0.9, 0.01),
        ((5, 64), 0.5, 0.25),
        ((300,), 0.7, 0.0),
        ((9, 33), 1.0, 0.1),
        ((9, 33), 0.01, 0.01),  # ⌊density·n⌋ = 0: nothing kept
        ((4, 50), 0.6, 0.5),  # the band is cut short by the top
    ],
)
def test_breadcrumbs_loop_keeps_the_same_band_as_the_torch_path(
    torch_path, shape: tuple[int, ...], density: float, gamma: float
) -> None:
    """One model at weight 1 gives base + δ̃ exactly, so the band (ties ranked by index on
    quantised magnitudes) must match the torch path bit for bit; three models with weights,
    normalize and scale agree to float32 rounding."""
    from merge.methods.breadcrumbs import breadcrumbs

    g = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    base = torch.randn(shape, generator=g)
    models = [base + (torch.randn(shape, generator=g) * 4).round() / 64 for _ in range(3)]
    kw = {"density": [density], "gamma": [gamma], "weight": [1.0]}
    got = breadcrumbs(models[:1], base=base, **kw)
    want = torch_path(lambda: breadcrumbs(models[:1], base=base, **kw))
    assert torch.equal(got, want)

    kw = {"density": [density, 0.8, 0.3], "gamma": [gamma, 0.05, 0.0], "weight": [0.5, 1.5, -1.0]}
    for normalize in (False, True):
        got = breadcrumbs(models, base=base, normalize=normalize, scale=0.7, **kw)
        want = torch_path(
            lambda n=normalize: breadcrumbs(models, base=base, normalize=n, scale=0.7, **kw)
        )
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_select_finds_every_order_statistic() -> None:
    import numpy as np

    from merge.methods._fused import loops

    rng = np.random.default_rng(3)
    for n in (1, 2, 3, 10, 257):
        keys = rng.permutation(n * 7)[:n].astype(np.int64)
        for k in range(n):
            work = keys.copy()
            assert loops()._select(work, 0, n, k) == np.sort(keys)[k]
            assert (work[:k] < work[k]).all() and (work[k + 1 :] > work[k]).all()


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize(
    ("shape", "density", "epsilon"), [((23, 257), 0.5, 0.1), ((300,), 0.7, 0.3)]
)
def test_della_loop_draws_and_ranks_as_the_torch_path(
    torch_path, method: str, shape: tuple[int, ...], density: float, epsilon: float
) -> None:
    """Ranks from the radix sort (ties by index, on quantised magnitudes), the same counter
    draws and keep probabilities: one model at weight 1 gives the torch path's bytes; three
    models with election agree to float32 rounding. A torch generator keeps the torch path."""
    from merge.methods import della as della_module

    fn = getattr(della_module, method)
    g = torch.Generator().manual_seed(shape[-1])
    base = torch.randn(shape, generator=g)
    models = [base + (torch.randn(shape, generator=g) * 4).round() / 64 for _ in range(3)]
    rng = ElementRandom(mix_seed(5, method), offset=1000)
    kw = {"density": [density], "epsilon": [epsilon], "weight": [1.0], "generator": rng}
    got = fn(models[:1], base=base, normalize=False, **kw)
    assert torch.equal(got, torch_path(lambda: fn(models[:1], base=base, normalize=False, **kw)))

    kw = {"density": [density, 1.0, 0.3], "epsilon": [epsilon, 0.0, 0.2], "weight": [0.5, 1.5, 1.0]}
    for rescale in (True, False):
        args = {"rescale": rescale, "scale": 0.7, "generator": rng, **kw}
        got = fn(models, base=base, **args)
        want = torch_path(lambda a=args: fn(models, base=base, **a))
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_ascending_ranks_are_a_stable_sort() -> None:
    import numpy as np

    from merge.methods._fused import loops

    rng = np.random.default_rng(4)
    for n in (1, 2, 5, 4096):
        bits = rng.integers(0, 1 << 31, n, dtype=np.uint32) >> rng.integers(
            0, 31, n, dtype=np.uint32
        )
        bits[: n // 3] = bits[n // 2] if n > 2 else bits[0]  # ties
        ranks = np.empty(n, np.int64)
        spare = [
            np.empty(n, np.uint32),
            np.empty(n, np.int64),
            np.empty(n, np.uint32),
            np.empty(n, np.int64),
        ]
        loops()._ascending_ranks(
            bits, ranks, spare[0], spare[1], spare[2], spare[3], np.empty(2048, np.int64)
        )
        want = np.empty(n, np.int64)
        want[np.argsort(bits, kind="stable")] = np.arange(n)
        assert np.array_equal(ranks, want)
