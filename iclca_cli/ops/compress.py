"""A prompt's keys and values cut down to a few entries per key/value head: `compressed` (attention matching: keys,
values and a score bias per entry, fitted so that attention over them reproduces attention over the whole prompt)
and `evict` (the baseline: the prompt's own entries that receive the most attention, nothing fitted). Not part of
merged folders: a summary is data; attending to it is ops/softmax_attention.py.

Attention matching (after Zweiger, Fu, Guo, Kim 2026, arXiv 2602.16284), per key/value head, batched over heads:
1. Reference queries stand for the queries to come: the prompt's own, and with `repeat` also those of a second copy
   of the prompt read right after it (the look-ups a later question makes into the prompt, at the right distance).
   The query heads of a group are pooled; at most MAX_QUERIES, evenly spaced.
2. Keys: the first token (an attention sink in trained models) and the prompt keys that receive the most attention
   from any reference query (`attention`); or, as in iclca 0.x, k-means centroids of keys and values (`kmeans`).
3. A score bias b_j = log w_j per entry: w >= 0 by non-negative least squares, so that the entries carry each
   reference query's attention mass: sum_j w_j exp(s q.c_j) ~ sum_{prompt i} exp(s q.k_i).
4. Values: least squares so that attention over the entries reproduces each reference query's attention output.
The budget split (`split_budget`): every head is fitted at each budget of a grid (`attention` keys: from one score
matrix, fit_ranked), and entries go to the heads (or layers) whose attention-output error drops most per entry,
under the same total as a uniform budget.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .softmax_attention import soft_cap

CHUNK_TOKENS = 4096  # prompt tokens per step of a Taylor memory (methods/taylor.py): memory bounded in P
REFERENCE_ELEMENTS = 1 << 26  # reference queries x prompt tokens per step of `reference` (heads at a time)
MAX_QUERIES = 2048  # reference queries per key/value head
MIN_WEIGHT = math.exp(-7)  # the smallest mass weight an entry keeps (a bias of -7)
PAD_BIAS = -1e4  # another head's entry in a layer's shared list (summaries.layer_tensors): exp(-1e4) = 0
RIDGE = 1e-3  # relative ridge of the value fit (conditioning; the fit has many more queries than entries)
NNLS_STEPS = 100
CACHE_BYTES = 8 << 20  # the systems one round of FISTA iterations holds (the processor's cache)
GRID_TOP = 4  # a head takes at most GRID_TOP x the budget in a split (but `free`: up to the whole prompt)
SYMMETRIC_FROM = 192  # gram: entries from which multiplying only half of x^T x pays
CHEAP_FIT = 64  # the ranked search fits every grid budget up to this many entries (a fraction of a forward at P = 1k)


def own_entries(bias: torch.Tensor) -> torch.Tensor:
    """(Hkv, E) bias of a layer's entry list -> (Hkv, E) bool: True on each head's own entries (not PAD_BIAS)."""
    return bias > PAD_BIAS / 2


@dataclass
class Reference:
    """What attention over the whole prompt does for the reference queries, for B heads."""

    queries: torch.Tensor  # (B, N, D)
    outputs: torch.Tensor  # (B, N, D): attention outputs over the prompt
    log_mass: torch.Tensor  # (B, N): logsumexp of the scores over the prompt
    received: torch.Tensor  # (B, P): the most attention each prompt key receives from any reference query
    ranked: torch.Tensor  # (B, G): evict's output error at each budget `reference` was given (G = 0: none)
    power: torch.Tensor  # (B,) float64: sum over the queries of |output|^2 (fit_scored's error)

    @classmethod
    def joined(cls, parts: list[Reference]) -> Reference:
        """The references of consecutive batches of heads as one (their fields concatenated along B)."""
        return cls(*(torch.cat([getattr(r, f.name) for r in parts]) for f in dataclasses.fields(cls)))


@dataclass
class Summary:
    keys: torch.Tensor  # (B, R, D)
    values: torch.Tensor  # (B, R, D)
    bias: torch.Tensor | None  # (B, R); None for evicted entries (plain keys and values)
    error: torch.Tensor  # (B,): mean squared attention-output error over the reference queries


def reference(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, scaling: float, softcap: float | None,
              budgets: list[int] = ()) -> Reference:
    """k, v (B, P, D); q (B, N, D) reference queries, thinned to MAX_QUERIES. With budgets, also evict's output error
    at each (ranked): attention over the prompt entries that receive the most attention, as they are, against
    attention over the whole prompt; 0 at budgets >= P. The outputs are summed in rank order, budget by budget, so
    the errors come from the same score matrix: no second pass over the prompt. A few heads at a time, whose (N, P)
    scores stay under REFERENCE_ELEMENTS."""
    if q.shape[1] > MAX_QUERIES:
        q = q[:, torch.linspace(0, q.shape[1] - 1, MAX_QUERIES, device=q.device).round().long()]
    step = max(1, REFERENCE_ELEMENTS // (q.shape[1] * k.shape[1]))
    per_head = torch.is_tensor(scaling) and scaling.dim() > 0  # (B, 1, 1), or one for all heads
    parts = [_reference(k[i:i + step], v[i:i + step], q[i:i + step], scaling[i:i + step] if per_head else scaling,
                        softcap, budgets) for i in range(0, len(k), step)]
    return Reference.joined(parts)


def _reference(k, v, q, scaling, softcap: float | None, budgets: list[int]) -> Reference:
    """reference for a few heads, q already thinned."""
    P = k.shape[1]
    scores = scored(q, k, scaling, softcap)  # (B, N, P)
    top = scores.amax(-1, keepdim=True)  # (B, N, 1)
    share = scores.sub_(top).exp_()  # in place: one (B, N, P) buffer
    total = share.sum(-1, keepdim=True)
    share.div_(total)  # each key's share of the query's attention
    received = share.amax(1)  # (B, P)
    cuts = sorted({b for b in budgets if b < P})
    if cuts:  # the keys in rank order, so that each budget's entries are the first columns
        rank = _order(received)  # (B, P)
        share, v = share.gather(-1, rank[:, None, :].expand_as(share)), gather(v, rank)
    numerator = torch.zeros(*q.shape[:2], v.shape[-1], dtype=v.dtype, device=v.device)  # (B, N, D)
    mass = q.new_zeros(q.shape[:2])  # (B, N)
    partial, start = [], 0  # (numerator, mass) over each budget's entries
    for r in [*cuts, P]:
        numerator = numerator + share[..., start:r] @ v[:, start:r]
        mass = mass + share[..., start:r].sum(-1)
        partial.append((numerator, mass))
        start = r
    outputs = numerator  # the shares sum to one
    errors = {r: ((n / m[..., None] - outputs) ** 2).sum(-1).mean(-1) for r, (n, m) in zip(cuts, partial)}
    ranked = [errors.get(r, q.new_zeros(len(q))) for r in budgets]  # 0 at budgets >= P
    return Reference(q, outputs, (top + total.log())[..., 0], received,
                     torch.stack(ranked, -1) if ranked else q.new_zeros(len(q), 0),
                     outputs.double().square().sum((1, 2)))


def scored(q: torch.Tensor, keys: torch.Tensor, scaling, softcap: float | None) -> torch.Tensor:
    """(B, N, R) attention scores of queries q (B, N, D) on keys (B, R, D), scaled (a float or (B, 1, 1)) and soft
    capped: the scaling on the queries, not on the (N, R) scores."""
    return soft_cap(q * scaling @ keys.transpose(-1, -2), softcap)


def _order(received: torch.Tensor) -> torch.Tensor:
    """(B, P) prompt positions by the attention they receive (B, P), most first; the first token always first."""
    received = received.clone()
    received[:, 0] = math.inf
    return torch.sort(received, dim=-1, descending=True, stable=True).indices


def ranking(ref: Reference) -> torch.Tensor:
    """(B, P) prompt positions by the attention they receive, most first; the first token always first."""
    return _order(ref.received)


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, P, D), index (B, R) -> (B, R, D)"""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def evict(k: torch.Tensor, v: torch.Tensor, ref: Reference, budget: int, scaling, softcap: float | None) -> Summary:
    """The `budget` prompt entries per head that receive the most attention (in prompt order), as they are."""
    index = ranking(ref)[:, :budget].sort(-1).values  # (B, R)
    keys, values = gather(k, index), gather(v, index)
    return Summary(keys, values, None, output_error(ref, keys, values, None, scaling, softcap))


def spd_solve(A: torch.Tensor, B: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve (A + ridge * mean(diag A) * I) X = B for symmetric positive semi-definite A (B, R, R), B (B, R, K), by
    Cholesky (batched LU in float64 fails inside MKL with two threads, torch 2.13 on CPU)."""
    scale = A.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[:, None, None]  # (B, 1, 1)
    ridged = A.clone()
    ridged.diagonal(dim1=-2, dim2=-1).add_(ridge * scale[..., 0])  # A + ridge * scale * I
    factor, _ = torch.linalg.cholesky_ex(ridged)
    return torch.cholesky_solve(B, factor)


def nnls(A: torch.Tensor, b: torch.Tensor, steps: int = NNLS_STEPS) -> torch.Tensor:
    """argmin_{w >= 0} w.A w - 2 b.w for A (B, R, R) symmetric positive semi-definite, b (B, R): accelerated projected
    gradient (FISTA) from the clamped unconstrained solution, batched over B. The iterations run on a few heads at a
    time, whose systems stay in the processor's cache (CACHE_BYTES): they are matrix-vector products, bound by
    memory, and each head's iterates do not depend on the others'."""
    w0 = spd_solve(A, b[..., None], 1e-6)[..., 0].clamp_min(0)  # (B, R)
    heads = max(1, CACHE_BYTES // (A.shape[-1] ** 2 * A.element_size()))
    out = []
    for i in range(0, len(A), heads):
        a, rhs, w = A[i:i + heads], b[i:i + heads], w0[i:i + heads]
        step = 1 / largest_eigenvalue(a).clamp_min(1e-30)[:, None]  # (b, 1): 1 / Lipschitz constant
        z, t, minus_rhs = w, 1.0, -rhs[:, None]  # (b, 1, r)
        for _ in range(steps):  # four fused operations a step: the small systems' time is in the calls
            gradient = torch.baddbmm(minus_rhs, z[:, None], a)[:, 0]  # z.A - b (z.A = A z: A is symmetric)
            w_next = torch.addcmul(z, step, gradient, value=-1).clamp_min_(0)
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            z, w, t = torch.lerp(w, w_next, 1 + (t - 1) / t_next), w_next, t_next  # w_next + (t-1)/t_next (w_next - w)
        out.append(w)
    return torch.cat(out)


def largest_eigenvalue(A: torch.Tensor, tol: float = 1e-13, steps: int = 200) -> torch.Tensor:
    """(B,) the largest eigenvalue of symmetric positive semi-definite A (B, R, R). With non-negative entries (a mass
    system's), by power iteration from the ones vector: for x > 0, min_i (Ax)_i / x_i <= lambda <= max_i (Ax)_i / x_i
    (Collatz-Wielandt), and the upper bound is taken once the two agree to `tol` (relative), as tight as eigvalsh
    in float64. A head whose bounds do not meet within `steps`, or a matrix with negative entries: eigvalsh."""
    top = torch.full(A.shape[:1], math.nan, dtype=A.dtype, device=A.device)  # (B,)
    active = torch.arange(len(A), device=A.device) if bool((A >= 0).all()) else A.new_zeros(0, dtype=torch.long)
    a, x = A, A.new_ones(A.shape[:2])  # the active heads' systems (b, R, R) and vectors (b, R)
    for _ in range(steps if len(active) else 0):
        y = (x[:, None] @ a)[:, 0]  # x.A = A x: A is symmetric
        ratio = y / x
        hi, lo = ratio.amax(-1), ratio.amin(-1)  # NaN where x has underflowed: never "met"
        met = (hi - lo) <= tol * hi
        top[active[met]] = hi[met]
        if bool(met.any()):
            active, a, y = active[~met], a[~met], y[~met]
        if not len(active):
            break
        x = y / y.amax(-1, keepdim=True)
    rest = top.isnan().nonzero()[:, 0]
    if len(rest):
        top[rest] = torch.linalg.eigvalsh(A[rest])[:, -1]
    return top


def output_error(ref: Reference, keys, values, bias, scaling, softcap) -> torch.Tensor:
    """(B,) mean squared error of attention over the entries against attention over the prompt."""
    scores = scored(ref.queries, keys, scaling, softcap)  # (B, N, R)
    weights = torch.softmax(scores if bias is None else scores + bias[:, None, :], -1)
    return ((weights @ values - ref.outputs) ** 2).sum(-1).mean(-1)


def fit(ref: Reference, keys: torch.Tensor, scaling, softcap: float | None) -> Summary:
    """Bias and values for entries with these keys (B, R, D), fitted to the reference (module docstring, 3-4)."""
    scores = scored(ref.queries, keys, scaling, softcap)  # (B, N, R)
    return fit_scored(ref, keys, scores, *mass_system(ref, scores))


def mass_system(ref: Reference, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (B, R, R), b (B, R)) in float64 of min_w |share w - 1|^2, share (B, N, R) each entry's share of a reference
    query's mass: the whole mass, for every query. The system of a subset of entries is A's and b's subset."""
    share = (scores - ref.log_mass[..., None]).exp_()  # (B, N, R)
    return gram(share).double(), share.sum(1).double()


def gram(x: torch.Tensor, blocks: int = 3) -> torch.Tensor:
    """x (B, N, R) -> x^T x (B, R, R). From SYMMETRIC_FROM entries, only the blocks on and above the diagonal are
    multiplied (a third fewer products with three blocks a side), and mirrored below."""
    R, xt = x.shape[-1], x.transpose(-1, -2)
    if R < SYMMETRIC_FROM:
        return xt @ x
    out = x.new_empty(x.shape[0], R, R)
    edges = [i * R // blocks for i in range(blocks + 1)]
    for a, b in zip(edges, edges[1:]):
        out[:, a:b, a:] = xt[:, a:b] @ x[..., a:]  # a block row, from its diagonal block on
        out[:, b:, a:b] = out[:, a:b, b:].transpose(-1, -2)
    return out


def fit_scored(ref: Reference, keys: torch.Tensor, scores: torch.Tensor, A: torch.Tensor, b: torch.Tensor) -> Summary:
    """fit, given the entries' scores (B, N, R) and their mass_system."""
    work = torch.float64  # the (R, R) systems are small: solve them in double precision
    bias = nnls(A, b).clamp_min(MIN_WEIGHT).log().to(keys.dtype)  # (B, R)
    weights = scores + bias[:, None, :]  # (B, N, R): attention over the entries (a softmax in place)
    weights = weights.sub_(weights.amax(-1, keepdim=True)).exp_()
    weights = weights.div_(weights.sum(-1, keepdim=True))
    products = gram(weights).to(work)  # (B, R, R)
    cross = (weights.transpose(-1, -2) @ ref.outputs).to(work)  # (B, R, D)
    values = spd_solve(products, cross, RIDGE)
    # mean |weights values - outputs|^2 over the queries, from the normal equations: no (B, N, D) product
    error = ((values * (products @ values - 2 * cross)).sum((1, 2)) + ref.power) / scores.shape[1]
    error = error.clamp_min(0).to(keys.dtype)
    return Summary(keys, values.to(keys.dtype), bias, error)


def fit_ranked(k: torch.Tensor, ref: Reference, budgets: list[int], scaling, softcap: float | None) -> dict[int, Summary]:
    """{budget: Summary} with `attention` keys at each budget (< P). A budget's keys are the first of one ranking, so
    the scores and the mass system of the largest budget serve every smaller one: one (B, N, top) score matrix, not
    one per budget. Entries in prompt order."""
    rank = ranking(ref)[:, :max(budgets)]  # (B, top)
    keys = gather(k, rank)  # (B, top, D), most attended first
    scores = scored(ref.queries, keys, scaling, softcap)  # (B, N, top)
    A, b = mass_system(ref, scores)
    out = {}
    for r in budgets:
        s = fit_scored(ref, keys[:, :r], scores[..., :r], A[:, :r, :r], b[:, :r])
        order = rank[:, :r].argsort(-1)  # (B, r): the entries in prompt order
        out[r] = Summary(gather(s.keys, order), gather(s.values, order), s.bias.gather(1, order), s.error)
    return out


def ranked_errors(k: torch.Tensor, v: torch.Tensor, ref: Reference, budgets: list[int], scaling,
                  softcap: float | None) -> torch.Tensor:
    """(B, len(budgets)) evict's output error at each budget (Reference.ranked, for budgets the reference was not
    given): a second pass over the prompt."""
    return reference(k, v, ref.queries, scaling, softcap, budgets).ranked


def kmeans_keys(k: torch.Tensor, v: torch.Tensor, budget: int, iters: int = 20) -> torch.Tensor:
    """(B, budget, D): the first key, and the mean keys of budget-1 k-means clusters of the others' keys and values
    together (so that alike keys with different values stay apart); deterministic, evenly spaced starts."""
    out = []
    unit = lambda x: x / x.norm(dim=-1).mean().clamp_min(1e-12)  # noqa: E731  (mean row norm 1)
    for kh, vh in zip(k, v):
        x = torch.cat([unit(kh[1:]), unit(vh[1:])], dim=-1)  # (P-1, 2D)
        C = budget - 1
        centres = x[torch.linspace(0, x.shape[0] - 1, C, device=x.device).round().long()].clone()  # (C, 2D)
        for _ in range(iters + 1):
            assign = torch.cdist(x, centres).argmin(-1)  # (P-1,)
            counts = torch.bincount(assign, minlength=C).to(x.dtype)
            sums = torch.zeros_like(centres).index_add_(0, assign, x)
            centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        means = torch.zeros(C, kh.shape[-1], dtype=kh.dtype, device=kh.device).index_add_(0, assign, kh[1:])
        means = torch.where(counts[:, None] > 0, means / counts.clamp_min(1)[:, None], kh[1:2])  # an empty cluster
        out.append(torch.cat([kh[:1], means]))
    return torch.stack(out)


def summarise(k: torch.Tensor, v: torch.Tensor, ref: Reference, budgets: list[int], scaling, softcap: float | None,
              keys: str = "attention") -> dict[int, Summary]:
    """{budget: B heads' prompt keys/values (B, P, D) in `budget` entries each}; budget >= P: the entries themselves,
    bias 0 (exactly the prefix)."""
    P = k.shape[1]
    out = {r: Summary(k, v, k.new_zeros(k.shape[:2]), k.new_zeros(k.shape[0])) for r in budgets if r >= P}
    fitted = [r for r in budgets if r < P]
    if fitted and keys == "attention":
        out.update(fit_ranked(k, ref, fitted, scaling, softcap))
    for r in fitted if keys == "kmeans" else []:
        out[r] = fit(ref, kmeans_keys(k, v, r), scaling, softcap)
    return out


def budget_grid(budget: int, prompt_tokens: int, free: bool = False) -> list[int]:
    """The budgets a head is fitted at for the split: 2, 3, 4, 6, 8, 11, 16, 23, ... (steps of about sqrt 2), the uniform
    budget itself, up to the top: GRID_TOP x the budget, or the whole prompt (P entries as they are, exact:
    summarise) where that is a step or less above it (a fit at nearly P entries costs most and gains least). free:
    also the sink alone (1) and the whole prompt, so that a head may take anything from one entry to all of it."""
    top = prompt_tokens if GRID_TOP * budget * math.sqrt(2) >= prompt_tokens else GRID_TOP * budget
    grid, b = {min(budget, top), top}, 2
    while b < top:
        grid.add(b)
        b = max(b + 1, round(b * math.sqrt(2)))
    return sorted(grid | ({1, prompt_tokens} if free else set()))


def split_budget(errors: torch.Tensor, grid: list[int], members: int, total: int) -> list[int]:
    """Greedy: units (heads, or layers of `members` heads each) start at the grid's first budget; while entries are
    left, the unit whose summed error (errors (U, len(grid))) drops most per entry moves up the grid. What is left
    then goes to the units with the best next steps (off the grid), so that the units hold `total` entries in all,
    budget * members each (unless every unit holds the grid's top).
    -> each unit's budget."""
    err = errors.double()  # (U, G)
    sizes = torch.tensor(grid, dtype=torch.float64, device=err.device)  # (G,)
    units = torch.arange(len(err), device=err.device)
    at = torch.zeros(len(err), dtype=torch.long, device=err.device)  # each unit's place on the grid
    left = total - members * grid[0] * len(err)
    while True:
        cost = members * (sizes[None] - sizes[at][:, None])  # (U, G) entries a move to each point takes (> 0: above)
        gain = (err[units, at][:, None] - err) / cost  # error dropped per entry
        gain = gain.masked_fill((cost <= 0) | (cost > left) | gain.isnan(), -math.inf)
        best = int(gain.argmax())  # the first best move in (unit, point) order
        if not float(gain.view(-1)[best]) > 0:
            break
        u, j = divmod(best, len(grid))
        at[u], left = j, left - int(cost[u, j])
    at = at.tolist()
    nxt = [min(i + 1, len(grid) - 1) for i in at]
    rates = [(((err[u, i] - err[u, n]) / (members * (grid[n] - grid[i]))).item(), u)  # the gain per entry of each
             for u, (i, n) in enumerate(zip(at, nxt)) if n > i]  # unit's next step
    budgets = [grid[i] for i in at]
    for _, u in sorted(rates, reverse=True):  # the rest, between grid points
        extra = min(left // members, grid[-1] - budgets[u])
        budgets[u] += extra
        left -= extra * members
    return budgets
