"""`compressed` (attention matching, budget split) and `evict`: the fit's parts against their definitions, the padded
layout against attention over each head's own entries, the options on the command line and in the patch."""

import json

import pytest
import torch

from helpers import convert, logits, make_gpt2_model, make_llama
from iclca_cli.methods import build
from iclca_cli.errors import IclcaError
from iclca_cli.ops import compress
from iclca_cli.patch import canonical_safetensors, check_patch_fits, load_patch
from iclca_cli.fingerprint import model_fingerprint

S = 8**-0.5


def heads(n=2, P=40, N=60, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v, q = (torch.randn(n, T, D, dtype=torch.float64, generator=g) for T in (P, P, N))
    return k, v, q


def test_nnls_meets_its_optimality_conditions():
    """w >= 0; the gradient vanishes where w > 0 and is >= 0 where w = 0 (KKT), on a problem whose unconstrained
    solution has negative entries."""
    g = torch.Generator().manual_seed(3)
    M = torch.rand(2, 50, 6, dtype=torch.float64, generator=g)
    y = M @ torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.0], dtype=torch.float64) + 0.01 * torch.randn(2, 50, generator=g, dtype=torch.float64)
    A, b = M.transpose(-1, -2) @ M, (M.transpose(-1, -2) @ y[..., None])[..., 0]
    assert (torch.linalg.solve(A, b) < 0).any()
    w = compress.nnls(A, b, steps=2000)
    grad = (A @ w[..., None])[..., 0] - b
    assert (w >= 0).all() and (w == 0).any()
    assert grad[w > 0].abs().max() < 1e-6 and grad[w == 0].min() > -1e-6


def test_largest_eigenvalue_is_eigvalsh_s_by_power_iteration_or_by_eigvalsh_itself():
    """A mass system (non-negative entries): the power iteration's bound agrees with eigvalsh to ~1e-13; a matrix
    with negative entries, or one whose bounds do not meet in the steps given, gets eigvalsh's own value."""
    g = torch.Generator().manual_seed(4)
    share = torch.rand(5, 80, 30, dtype=torch.float64, generator=g) ** 6  # (B, N, R): far from uniform
    A = share.transpose(-1, -2) @ share
    exact = torch.linalg.eigvalsh(A)[:, -1]
    torch.testing.assert_close(compress.largest_eigenvalue(A), exact, rtol=1e-12, atol=0)
    M = torch.randn(3, 40, 12, dtype=torch.float64, generator=g)
    signed = M.transpose(-1, -2) @ M
    assert (signed < 0).any()
    assert torch.equal(compress.largest_eigenvalue(signed), torch.linalg.eigvalsh(signed)[:, -1])
    assert torch.equal(compress.largest_eigenvalue(A, steps=1), exact)


def test_nnls_of_a_batch_is_each_head_s_own(monkeypatch):
    """The iterations run a few heads at a time (CACHE_BYTES): the same weights as one head alone."""
    g = torch.Generator().manual_seed(5)
    share = torch.rand(5, 60, 20, dtype=torch.float64, generator=g) ** 4
    A, b = share.transpose(-1, -2) @ share, share.sum(1)
    monkeypatch.setattr(compress, "CACHE_BYTES", 2 * 20 * 20 * 8)  # two heads a round
    w = compress.nnls(A, b)
    for h in range(5):
        torch.testing.assert_close(w[h:h + 1], compress.nnls(A[h:h + 1], b[h:h + 1]), rtol=1e-12, atol=1e-12)


def test_a_fit_over_every_key_is_the_prompt_itself():
    """All P keys kept: weight 1 each (bias 0) carries the whole mass, the values are the prompt's: error ~ 0 (up to
    the solver's steps and the values' small ridge)."""
    k, v, q = heads()
    ref = compress.reference(k, v, q, S, None)
    s = compress.fit(ref, k, S, None)
    assert s.bias.abs().max() < 1e-3
    assert s.error.max() < 1e-3 * (ref.outputs**2).sum(-1).mean()


def test_reference_is_attention_over_the_prompt_and_its_steps_do_not_matter(monkeypatch):
    """The outputs, masses and received attention are the definition's, whether the outputs are summed at once or in
    rank order, budget by budget (with budgets), and whatever the heads per step."""
    k, v, q = heads(n=3)
    w = torch.softmax(torch.tanh(q @ k.transpose(-1, -2) * S / 30) * 30, -1)  # (B, N, P), soft-capped
    scores = torch.tanh(q @ k.transpose(-1, -2) * S / 30) * 30
    for budgets in ([], [3, 9, 40, 50]):
        ref = compress.reference(k, v, q, S, 30.0, budgets)
        torch.testing.assert_close(ref.outputs, w @ v, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ref.received, w.amax(1))
        torch.testing.assert_close(ref.log_mass, scores.logsumexp(-1))
        torch.testing.assert_close(ref.power, ((w @ v) ** 2).sum((1, 2)), rtol=1e-12, atol=0)
        assert ref.ranked.shape == (3, len(budgets))
        monkeypatch.setattr(compress, "REFERENCE_ELEMENTS", 1)  # one head a step
        one_by_one = compress.reference(k, v, q, torch.full((3, 1, 1), S, dtype=k.dtype), 30.0, budgets)
        monkeypatch.undo()
        for name in ("outputs", "log_mass", "received", "ranked", "power"):
            torch.testing.assert_close(getattr(one_by_one, name), getattr(ref, name), rtol=0, atol=1e-12)


@pytest.mark.parametrize("R", [5, compress.SYMMETRIC_FROM - 1, compress.SYMMETRIC_FROM, 301])
def test_gram_is_x_transposed_x_by_blocks_or_at_once(R):
    """From SYMMETRIC_FROM entries only the blocks on and above the diagonal are multiplied; the rest mirrored."""
    x = torch.randn(2, 70, R, dtype=torch.float64, generator=torch.Generator().manual_seed(R))
    got = compress.gram(x)
    torch.testing.assert_close(got, x.transpose(-1, -2) @ x, rtol=1e-12, atol=1e-12)
    if R >= compress.SYMMETRIC_FROM:  # below the first block row: its mirror
        edge = R // 3
        assert torch.equal(got[:, edge:, :edge], got[:, :edge, edge:].transpose(-1, -2))


def test_matching_beats_eviction_and_both_keep_the_sink():
    k, v, q = heads(P=60)
    k[:, 5] *= 6  # a key that some queries look at above all others
    ref = compress.reference(k, v, q, S, None)
    evicted, fitted = compress.evict(k, v, ref, 12, S, None), compress.summarise(k, v, ref, [12], S, None)[12]
    for s in (evicted, fitted):
        assert torch.equal(s.keys[:, 0], k[:, 0])
        assert (s.keys == k[:, 5:6]).all(-1).any(-1).all()  # kept, in every head
    kept = (evicted.keys[..., None, :] == k[:, None]).all(-1).nonzero()[:, -1].view(2, 12)  # (B, R) prompt positions
    assert torch.equal(evicted.values, compress.gather(v, kept)) and evicted.bias is None  # entries as they were
    assert (fitted.error < evicted.error).all()
    assert (compress.summarise(k, v, ref, [24], S, None)[24].error < fitted.error).all()  # more entries, closer


def test_one_ranking_serves_every_budget_of_the_grid():
    """fit_ranked (one score matrix and mass system for the whole grid, the error from the normal equations) equals
    fit on each budget's own keys (the most attended, in prompt order), and its error is the definition's."""
    k, v, q = heads(P=50)
    ref = compress.reference(k, v, q, S, 20.0)
    grid = [2, 5, 11, 23]
    ranked = compress.fit_ranked(k, ref, grid, S, 20.0)
    for r in grid:
        own = compress.fit(ref, compress.gather(k, compress.ranking(ref)[:, :r].sort(-1).values), S, 20.0)
        for name in ("keys", "values", "bias", "error"):
            torch.testing.assert_close(getattr(ranked[r], name), getattr(own, name), rtol=1e-9, atol=1e-9)
        direct = compress.output_error(ref, own.keys, own.values, own.bias, S, 20.0)
        torch.testing.assert_close(ranked[r].error, direct, rtol=1e-9, atol=1e-12)
    assert ranked[23].error.max() < ranked[2].error.min()  # the test has room: more entries fit better


def test_kmeans_keys_keep_the_sink_and_fit_like_the_rest():
    k, v, q = heads()
    ref = compress.reference(k, v, q, S, None)
    s = compress.summarise(k, v, ref, [6], S, None, keys="kmeans")[6]
    assert s.keys.shape == (2, 6, 8) and torch.equal(s.keys[:, 0], k[:, 0])
    assert s.error.max() < ((ref.outputs - ref.outputs.mean(1, keepdim=True)) ** 2).sum(-1).mean()  # beats a constant


def test_budget_grid_and_the_split():
    assert compress.budget_grid(8, 24) == [2, 3, 4, 6, 8, 11, 16, 23, 24]
    assert compress.budget_grid(5, 300) == [2, 3, 4, 5, 6, 8, 11, 16, 20]
    assert compress.budget_grid(5, 29)[-1] == 20 and compress.budget_grid(5, 28)[-1] == 28  # 20 sqrt 2 = 28.3
    assert compress.budget_grid(275, 1103)[-2:] == [1056, 1103]  # no fit at 1,100 of 1,103: the prompt as it is
    grid = [2, 4, 8]
    # unit 0 gains nothing from entries, unit 1 a lot: unit 1 takes what the total allows
    errors = torch.tensor([[1.0, 1.0, 1.0], [9.0, 2.0, 0.0]])
    assert compress.split_budget(errors, grid, 1, 10) == [2, 8]
    assert compress.split_budget(errors, grid, 1, 6) == [2, 4]
    assert compress.split_budget(errors, grid, 2, 12) == [2, 4]  # units of two heads pay twice per entry
    assert compress.split_budget(errors, grid, 1, 4) == [2, 2]
    assert compress.split_budget(errors, grid, 1, 7) == [2, 5]  # the rest between grid points, to the best next step
    assert compress.split_budget(errors, grid, 1, 12) == [4, 8]  # both at their best: the rest to the other
    assert compress.split_budget(errors, grid, 1, 30) == [8, 8]  # the grid's top caps every unit


def test_a_free_split_keeps_a_head_that_cannot_be_summarised_whole():
    """`free`: one head whose prompt cannot be summarised (sharp attention over random keys and values) takes all P
    of its entries as they are (bias 0: exact for that head), paid for by heads that need their sink alone (every key
    and value alike); `heads` caps it at GRID_TOP x the budget. Both hold the same total."""
    from iclca_cli.summaries import Heads, head_budgets

    P, D, easy = 60, 8, 7
    g = torch.Generator().manual_seed(5)
    k = torch.cat([torch.ones(easy, P, D, dtype=torch.float64), 4 * torch.randn(1, P, D, dtype=torch.float64, generator=g)])
    v = torch.cat([torch.ones(easy, P, D, dtype=torch.float64), torch.randn(1, P, D, dtype=torch.float64, generator=g)])
    q = 4 * torch.randn(easy + 1, 2 * P, D, dtype=torch.float64, generator=g)
    one = Heads(["layer"], k, v, compress.reference(k, v, q, S, None), torch.full((easy + 1, 1, 1), S, dtype=torch.float64),
                None, torch.float64)
    assert compress.budget_grid(10, P, free=True) == [1, *compress.budget_grid(10, P)[:-1], 40, 60]
    free, fits = head_budgets(one, 10, split="free")
    capped, capped_fits = head_budgets(one, 10, split="heads")
    assert sum(free) == sum(capped) == 10 * (easy + 1)
    assert free[-1] == P and capped[-1] == compress.GRID_TOP * 10
    kept = fits[P][easy]
    assert torch.equal(kept.keys[0], k[-1]) and torch.equal(kept.values[0], v[-1]) and (kept.bias == 0).all()
    assert float(capped_fits[capped[-1]][easy].error) > 1e-3  # what the cap leaves: the head is not summarised well


def test_ranked_errors_are_evict_s_at_each_budget():
    """One pass over the ranked keys gives evict's output error at every budget of a grid; 0 for the whole prompt."""
    k, v, q = heads(P=40)
    ref = compress.reference(k, v, q, S, 20.0)
    grid = [1, 3, 7, 16, 40]
    errors = compress.ranked_errors(k, v, ref, grid, S, 20.0)
    for i, r in enumerate(grid[:-1]):
        torch.testing.assert_close(errors[:, i], compress.evict(k, v, ref, r, S, 20.0).error, rtol=1e-9, atol=1e-12)
    assert (errors[:, -1] == 0).all() and (errors[:, 0] > errors[:, -2]).all()
    torch.testing.assert_close(compress.reference(k, v, q, S, 20.0, grid).ranked, errors, rtol=0, atol=0)


def test_a_conversion_takes_evict_s_errors_from_the_reference_pass(monkeypatch):
    """compressed_tensors hands captured_heads the grid its split weighs, so that evict's errors come with the
    reference (no second pass over the prompt): the patch equals the one whose errors come from a second pass."""
    from iclca_cli import summaries
    from iclca_cli.families import family_of
    from iclca_cli.methods.compressed import Compressed
    from iclca_cli.softmax_layers import capture

    monkeypatch.setattr(compress, "CHEAP_FIT", 4)
    model = make_llama()
    prompt = torch.randint(0, 97, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    captured = capture(model, family_of(model), prompt, Compressed(budget=10))
    second_pass, plain = summaries.Heads.ranked_errors, summaries.captured_heads
    calls = []
    monkeypatch.setattr(compress, "ranked_errors", lambda *a: calls.append(a) or pytest.fail("a second pass"))
    for split in ("heads", "free"):
        fused = summaries.compressed_tensors(captured, 60, 10, split=split)
        with monkeypatch.context() as m:
            m.setattr(summaries, "captured_heads", lambda c, p, ranked_at: plain(c, p))  # a reference without budgets
            m.setattr(compress, "ranked_errors", lambda k, v, ref, b, sc, cap: compress.reference(
                k, v, ref.queries, sc, cap, b).ranked)
            m.setattr(summaries.Heads, "ranked_errors", lambda self, b: calls.append(b) or second_pass(self, b))
            again = summaries.compressed_tensors(captured, 60, 10, split=split)
        grid = compress.budget_grid(10, 60, free=split == "free")
        assert calls.pop() == grid[grid.index(4):] and not calls  # the last fitted budget (CHEAP_FIT) and above
        assert fused.keys() == again.keys()
        for name in fused:
            for buffer in fused[name]:
                torch.testing.assert_close(fused[name][buffer], again[name][buffer], rtol=0, atol=1e-6)


@pytest.mark.parametrize("split", ["heads", "free"])
def test_a_ranked_search_fits_only_the_budgets_the_heads_take(split, monkeypatch):
    """search=ranked: every grid budget up to half the budget (or CHEAP_FIT entries, here 4) is fitted; above, evict's
    error, scaled to meet the fitted one, steers the split, and only the budgets the heads take are fitted, as the
    full search fits them. The same total; the fitted error it holds lies between the full search's and a uniform
    budget's."""
    from iclca_cli import summaries
    from iclca_cli.methods.compressed import Compressed

    monkeypatch.setattr(compress, "CHEAP_FIT", 4)
    model = make_llama()
    prompt = torch.randint(0, 97, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    one = summaries.prompt_heads(model, prompt)
    asked = []
    summarise = summaries.Heads.summarise
    monkeypatch.setattr(summaries.Heads, "summarise", lambda self, b, *a: asked.append(list(b)) or summarise(self, b, *a))
    per_head, fits = summaries.head_budgets(one, 10, split=split, search="ranked")
    grid = compress.budget_grid(10, 60, free=split == "free")
    assert asked[0] == [b for b in grid if b <= 5] and all(len(b) == 1 for b in asked[1:])
    assert sum(per_head) == 10 * len(one.keys)
    full, full_fits = summaries.head_budgets(one, 10, split=split)
    for h, b in enumerate(per_head):
        for name in ("keys", "values", "bias"):
            torch.testing.assert_close(getattr(fits[b][h], name), getattr(summaries.Heads.summarise(one, [b], "attention", [h])[b][h], name))
    uniform, uniform_fits = summaries.head_budgets(one, 10, split="uniform")
    weight = one.weights[Compressed.weigh]  # each head's layer's (Captured.weights), as the default split weighs
    error = lambda per, f: sum(float(f[b][h].error * weight[h]) for h, b in enumerate(per))  # noqa: E731  (held)
    assert error(full, full_fits) <= error(per_head, fits) < error(uniform, uniform_fits)


def test_a_grid_within_cheap_fits_is_searched_in_full():
    """Where every grid budget is at most CHEAP_FIT entries (short prompts, small budgets), the ranked search is the
    full one: the same budgets and the same fits."""
    from iclca_cli import summaries

    one = summaries.prompt_heads(make_llama(), list(range(3, 63)))
    assert compress.budget_grid(10, 60)[-1] <= compress.CHEAP_FIT
    ranked, ranked_fits = summaries.head_budgets(one, 10, search="ranked")
    full, full_fits = summaries.head_budgets(one, 10, search="fitted")
    assert ranked == full and all(torch.equal(ranked_fits[b][h].keys, full_fits[b][h].keys) for h, b in enumerate(full))


def test_a_layer_of_heads_with_different_budgets_attends_as_each_heads_own_entries():
    """A split by heads gives the heads of a layer different budgets; the layer keeps their entries in one list with a
    bias per head that hides the others' entries: attention over it equals attention over each head's own entries
    (float64, through the patched attention function as a model calls it)."""
    from iclca_cli.ops.softmax_attention import patched_attention, patched_attention_reference
    from iclca_cli.summaries import _one, layer_tensors

    k, v, q = heads(P=30)
    ref = compress.reference(k, v, q, S, None)
    narrow, wide = compress.summarise(k, v, ref, [4], S, None)[4], compress.summarise(k, v, ref, [9], S, None)[9]
    layer = layer_tensors([_one(narrow, 0), _one(wide, 1)], torch.float64)
    assert layer["prefix_keys"].shape == (1, 13, 8) and layer["prefix_bias"].shape == (2, 13)
    assert (layer["prefix_bias"][0, 4:] == compress.PAD_BIAS).all() and (layer["prefix_bias"][1, :4] == compress.PAD_BIAS).all()
    module = torch.nn.Module()
    for name, t in layer.items():
        module.register_buffer(name, t)
    g = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(1, 4, 5, 8, dtype=torch.float64, generator=g) for _ in range(3))  # 4 query heads
    key, value = key[:, :2], value[:, :2]  # 2 key/value heads: query heads 0-1 use head 0, 2-3 head 1
    got = patched_attention(module, query, key, value, None, scaling=S)[0].transpose(1, 2)  # (B, H, T, D)
    for h, s in ((0, narrow), (1, wide)):
        own = patched_attention_reference(query[:, 2 * h:2 * h + 2], key[:, h:h + 1].expand(-1, 2, -1, -1),
                                          value[:, h:h + 1].expand(-1, 2, -1, -1), s.keys[h:h + 1].expand(2, -1, -1),
                                          s.values[h:h + 1].expand(2, -1, -1), S, s.bias[h:h + 1].expand(2, -1))
        torch.testing.assert_close(got[:, 2 * h:2 * h + 2], own, rtol=0, atol=1e-12)


@pytest.mark.parametrize("split", ["uniform", "layers", "heads", "free"])
def test_a_split_never_holds_more_entries_than_the_uniform_budget(split):
    model = make_llama()
    prompt = torch.randint(0, 97, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    _, patch = convert(model, prompt, "compressed", budget=10, split=split)
    bias = [t for n, t in patch.tensors.items() if n.endswith("prefix_bias")]  # (Hkv, R) or (Hkv, E)
    keys = [t for n, t in patch.tensors.items() if n.endswith("prefix_keys")]  # (Hkv, R, D) or (1, E, D)
    held = sum(int((b > compress.PAD_BIAS / 2).sum()) for b in bias)
    assert held == 10 * sum(b.shape[0] for b in bias)  # the whole budget, no more
    assert sum(k.shape[0] * k.shape[1] for k in keys) == held  # no unused slots
    if split == "uniform":
        assert {k.shape for k in keys} == {(2, 10, 16)}
    check_patch_fits(patch, model, model_fingerprint(model))  # the shapes a split allows


def test_repeat_queries_run_a_second_copy_within_the_position_table():
    assert build("compressed", budget=2, queries="own").capture_ids([5, 6, 7], None) == [5, 6, 7]
    assert build("compressed", budget=2).capture_ids([5, 6, 7], None) == [5, 6, 7, 5, 6, 7]
    assert build("compressed", budget=2).capture_ids([5, 6, 7], 5) == [5, 6, 7, 5, 6]
    model = make_gpt2_model(vocab_size=97, n_positions=24)  # a 20-token prompt leaves room for 4 repeated tokens
    _, patch = convert(model, list(range(20)), "compressed", budget=6)
    assert patch.method.queries == "repeat" and patch.metadata()["iclca.summary_queries"] == "repeat"


@pytest.mark.parametrize("method", ["compressed", "evict"])
def test_full_budget_is_the_prefix(method):
    model = make_llama()
    prompt, query = list(range(3, 33)), [40, 41, 42, 43]
    prefix, _ = convert(model, prompt, "prefix")
    full, _ = convert(model, prompt, method, budget=len(prompt))
    assert (logits(full, query) - logits(prefix, query)).abs().max() <= 1e-10
    assert (logits(full, query) - logits(model, query)).abs().max() > 1e-3  # the prompt matters here


def test_evict_keeps_prompt_entries_as_they_are():
    model = make_llama()
    prompt = list(range(3, 43))
    _, patch = convert(model, prompt, "evict", budget=8)
    _, prefix = convert(model, prompt, "prefix")
    name = "model.layers.0.self_attn.prefix_keys"
    assert set(patch.tensors) == set(prefix.tensors) and patch.tensors[name].shape == (2, 8, 16)
    for h in range(2):  # every kept key is one of the prompt's, the first among them
        kept, allk = patch.tensors[name][h], prefix.tensors[name][h]
        assert torch.equal(kept[0], allk[0]) and all((allk == row).all(-1).any() for row in kept)


def test_a_patch_with_a_layer_wider_than_the_split_allows_is_refused(tmp_path):
    model = make_llama()
    _, patch = convert(model, list(range(3, 33)), "compressed", budget=4)
    name = "model.layers.0.self_attn"
    for buffer in ("prefix_keys", "prefix_values", "prefix_bias"):
        t = patch.tensors[f"{name}.{buffer}"]
        patch.tensors[f"{name}.{buffer}"] = t.repeat_interleave(40, dim=1)[:, :33]  # > 2 heads x the grid's top, 16
    with pytest.raises(IclcaError, match="shape"):
        check_patch_fits(patch, model, model_fingerprint(model))
    meta = {**patch.metadata(), "iclca.summary_split": "diagonal"}
    meta.pop("iclca.tensors_sha256")
    tensors = {k: t.contiguous() for k, t in patch.tensors.items()}
    (tmp_path / "p.st").write_bytes(canonical_safetensors(tensors, meta))
    with pytest.raises(IclcaError, match="iclca.summary_split 'diagonal', not one of uniform, layers, heads, free"):
        load_patch(tmp_path / "p.st")
    meta = patch.metadata()  # a patch from before the default search was ranked and errors weighed: made without
    for key in ("iclca.tensors_sha256", "iclca.summary_search", "iclca.summary_weigh"):
        meta.pop(key)
    (tmp_path / "old.st").write_bytes(canonical_safetensors(tensors, meta))
    old = load_patch(tmp_path / "old.st").method
    assert (patch.method.search, patch.method.weigh) == ("ranked", "leaving")
    assert (old.search, old.weigh) == ("fitted", "none")


def test_cli_options_reach_the_patch_and_bad_ones_are_one_line_errors(cli, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("".join(f"w{i}: {i % 10}\n" for i in range(8)))
    out = tmp_path / "c.safetensors"
    res = cli("convert", prompt, "-m", "demo-gpt2", "-o", out, "--method", "compressed", "--budget", "6",
              "--split", "uniform", "--reference", "own", "--search", "ranked", "--json")
    assert res.exit_code == 0, res.stderr
    method = load_patch(out).method
    assert (method.split, method.queries, method.keys, method.search) == ("uniform", "own", "attention", "ranked")
    res = cli("convert", prompt, "-m", "demo-gpt2", "-o", out, "--method", "compressed", "--budget", "6", "--split", "rows")
    assert res.exit_code == 2 and "--split 'rows'" in res.stderr and "Traceback" not in res.stderr
    res = cli("convert", prompt, "-m", "demo-gpt2", "-o", tmp_path / "e.safetensors", "--method", "evict", "--budget", "6",
              "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["method"] == "evict"
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"input": "w3:", "target": " 3"}\n')
    res = cli("eval", "-m", "demo-gpt2", "--patch", tmp_path / "e.safetensors", "--prompt", prompt, "--queries", queries,
              "--json")
    assert res.exit_code == 0, res.stderr


def test_demo_gpt2_keeps_its_answers_at_a_third_of_the_prompt():
    """The demo's look-up head needs more entries than the others: the split gives it them. Fixed development prompts
    (seed 7, not the README's): the default (repeat queries, attention keys, split by heads) against the uniform
    budget and eviction, each at P/3."""
    import random

    from helpers import ROOT
    from iclca_cli.evaluate import evaluate
    from iclca_cli.inputs import encode_prompt
    from iclca_cli.loading import load_model
    from iclca_cli.patch import patched_copy
    from iclca_demo.tasks import RecallTask

    model, tokenizer = load_model("demo-gpt2", "float32")
    task = RecallTask.from_json(ROOT / "configs/tasks/recall.json")
    rng = random.Random(7)
    accuracy = {"default": [], "uniform": [], "evict": []}
    for _ in range(12):
        prompt, queries = task.sample(rng)
        ids = encode_prompt(tokenizer, prompt)
        R = len(ids) // 3
        for name, method, options in (("default", "compressed", {}), ("uniform", "compressed", {"split": "uniform"}),
                                      ("evict", "evict", {})):
            patch = convert(model, ids, method, budget=R, **options)[1]
            r = evaluate(model, patched_copy(model, patch), tokenizer, prompt, queries, method, patch.nbytes, 0)
            accuracy[name].append(r["accuracy"]["patched"])
    mean = {k: sum(v) / len(v) for k, v in accuracy.items()}
    assert mean["default"] >= 0.95 and mean["default"] > mean["uniform"] > mean["evict"], mean


def test_held_out_tasks_are_other_kinds_whose_answers_are_only_in_the_prompt():
    """scripts/real_model.py chooses on DEV_TASKS and reports on HELDOUT_TASKS (seeded apart): no task in both; a fact
    is asked only of the prompt that states it (once), and a format is asked of words the prompt does not show."""
    import random

    from helpers import load_script

    tasks = load_script("few_shot_tasks")
    assert not set(tasks.DEV_TASKS) & set(tasks.HELDOUT_TASKS)
    for task in (*tasks.DEV_TASKS, *tasks.HELDOUT_TASKS):
        rng = random.Random(f"test-{task}")
        prompt, asked = tasks.few_shot(task, rng)
        other, _ = tasks.few_shot(task, rng)
        assert asked and prompt != other  # a fresh mapping per prompt
        for query, target in asked:
            if task.startswith("format"):
                assert query.split("\n")[0] not in prompt  # the rule, applied to a new word
            else:
                assert query + target in prompt and prompt.count(query) == 1  # stated once: one right answer


def test_inspect_shows_each_heads_entries(cli, tmp_path):
    """A free split's patch: inspect names every summarised layer's entries per key/value head, as many in all as the
    uniform budget would hold; a prefix patch has no such key."""
    prompt = tmp_path / "p.txt"
    prompt.write_text("".join(f"w{i}: {i % 10}\n" for i in range(8)))
    out = tmp_path / "c.safetensors"
    assert cli("convert", prompt, "-m", "demo-gpt2", "-o", out, "--method", "compressed", "--budget", "6",
               "--split", "free").exit_code == 0
    info = json.loads(cli("inspect", out, "--json").stdout)
    entries = info["entries_per_head"]
    heads = sum(len(h) for h in entries.values())
    assert heads > 1 and sum(sum(h) for h in entries.values()) == 6 * heads and min(min(h) for h in entries.values()) >= 1
    assert info["iclca.summary_split"] == "free"
    assert cli("convert", prompt, "-m", "demo-gpt2", "-o", tmp_path / "x.safetensors", "--method", "prefix").exit_code == 0
    assert "entries_per_head" not in json.loads(cli("inspect", tmp_path / "x.safetensors", "--json").stdout)


def test_the_research_surface_rebuilds_the_prefix_and_the_default_patch():
    """summaries.prompt_heads + patched_with (what scripts/research/ use): every head exact is the prefix patch, and
    the default split's summaries are the `compressed` patch (float64 logits)."""
    from iclca_cli.summaries import head_budgets, patched_with, prompt_heads

    model = make_llama()
    prompt, query = list(range(3, 43)), [50, 51, 52, 53]
    heads = prompt_heads(model, prompt)
    exact = compress.summarise(heads.keys, heads.values, heads.ref, [len(prompt)], heads.scaling, None)[len(prompt)]
    rows = range(len(heads.keys))
    every = patched_with(model, heads, [compress.Summary(exact.keys[b:b + 1], exact.values[b:b + 1], exact.bias[b:b + 1],
                                                          exact.error[b:b + 1]) for b in rows], len(prompt))
    prefix, _ = convert(model, prompt, "prefix")
    assert (logits(every, query) - logits(prefix, query)).abs().max() <= 1e-10
    per_head, fits = head_budgets(heads, 6)
    default, _ = convert(model, prompt, "compressed", budget=6)
    summarised = patched_with(model, heads, [fits[per_head[b]][b] for b in rows], len(prompt))
    assert (logits(summarised, query) - logits(default, query)).abs().max() <= 1e-10
    assert (logits(summarised, query) - logits(prefix, query)).abs().max() > 1e-4  # a summary, not the prefix


@pytest.mark.parametrize("make", [make_llama, make_gpt2_model])
def test_each_layer_s_weights_are_its_output_gain_over_its_residual_stream(make):
    """Captured.weights, recorded by hooks during capture: the output projection's gain over the attention output
    (its input), x the mean over tokens of 1 / the squared norm of the residual stream entering the layer (residual)
    or leaving it (leaving). Checked against the projection's own input and output, the model's hidden states and
    the final norm's input, on the same ids."""
    from iclca_cli import summaries
    from iclca_cli.families import family_of
    from iclca_cli.methods.compressed import Compressed
    from iclca_cli.softmax_layers import attention_modules, capture

    model = make()
    prompt = list(range(3, 33))
    method = Compressed(budget=4)
    captured = capture(model, family_of(model), prompt, method)
    ids = torch.tensor([method.capture_ids(prompt, None)])
    seen = {}
    projections = {name: m.o_proj if hasattr(m, "o_proj") else m.c_proj
                   for name, m in attention_modules(model, family_of(model)).items()}
    hooks = [p.register_forward_hook(lambda _m, a, y, name=name: seen.__setitem__(name, (a[0], y)))
             for name, p in projections.items()]
    final_norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
    hooks.append(final_norm.register_forward_pre_hook(lambda _m, a: seen.__setitem__("last", a[0])))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    streams = [h[0] for h in hidden[:len(projections)]] + [seen["last"][0]]  # entering each layer, then the last's out
    for i, name in enumerate(projections):
        a, y = seen[name]
        gain = float(y.pow(2).sum() / a.pow(2).sum())
        for weigh, stream in (("residual", streams[i]), ("leaving", streams[i + 1])):
            want = gain * float(stream.pow(2).sum(-1).reciprocal().mean())
            assert captured[name].weights[weigh] == pytest.approx(want, rel=1e-9)
    weights = summaries.captured_heads(captured, len(prompt)).weights  # {weigh: (B,)}: each head its layer's
    assert sorted(weights) == ["leaving", "residual"]
    for weigh, per_head in weights.items():
        assert per_head.tolist() == [captured[n].weights[weigh] for n in captured
                                     for _ in range(len(per_head) // len(captured))]


def test_weighing_moves_budget_to_the_heads_whose_errors_move_the_model():
    """weigh=residual splits by error x weight: four like heads, one of them weighed 1000x, takes more entries than
    the others and than it does unweighed (weigh=none, or no weights known); the same total either way."""
    from iclca_cli.summaries import Heads, head_budgets

    k, v, q = heads(n=4, P=60, N=90)
    one = Heads(["a", "b"], k, v, compress.reference(k, v, q, S, None), torch.full((4, 1, 1), S, dtype=torch.float64),
                None, torch.float64, {"residual": torch.tensor([1.0, 1.0, 1000.0, 1.0], dtype=torch.float64)})
    weighed, _ = head_budgets(one, 8, weigh="residual")
    plain, _ = head_budgets(one, 8, weigh="none")
    unknown, _ = head_budgets(one, 8, weigh="leaving")  # no weights of that kind known
    assert sum(weighed) == sum(plain) == 32 and unknown == plain
    assert weighed[2] > plain[2] and weighed[2] > max(weighed[:2] + weighed[3:])
