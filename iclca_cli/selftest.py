"""The family self-test: before iclca writes or applies a patch of a family that declares a tiny layout
(Family.tiny: the published checkpoints' layer order at tiny widths), it checks on a random model of that layout that
the family's patches are exact on the transformers actually installed: float64 logits of the patched model on a
query against the stock model on prompt + query.

Why: a transformers release can change how a family keeps or counts its cache without changing what the stock model
computes (5.25 did, for LFM2, Qwen3-Next, Bamba and Zamba2), and a patch would then be wrong in silence; greedy tokens often
still agree. A pass is remembered per (family, transformers, torch, iclca) version, in this process and in
cache_dir()/selftest.json, so the test runs once per installation (a few hundred milliseconds); a failure is an
IclcaError naming the family and the transformers version.
"""

from __future__ import annotations

import torch

from . import __version__
from .cache_store import add_to_store, read_store
from .errors import IclcaError
from .families import Family

TESTED_TRANSFORMERS = ("5.24.0", "5.25.0")  # releases the contract tests pass on (pyproject's range, .ci/drift)
VOCAB, PROMPT, QUERY = 61, 30, 6  # tokens: the prompt is longer than every tiny layout's convolution cache and chunk
STORE = "selftest.json"
_passed: set[str] = set()  # keys verified in this process, or being verified (the test converts through the guard)


def tiny_model(family: Family, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    """A random stock model of the family's tiny layout whose state matters: projections scaled by 4 and time-step
    biases 0 (random init leaves a recurrent layer's state too small to move the logits)."""
    import transformers

    config_class, model_class = family.merged
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(vocab_size=VOCAB, **family.tiny)
    # mixture-of-experts layers: torch's grouped matmul takes no float64, the eager loop over experts does
    model = getattr(transformers, model_class)._from_config(config, experts_implementation="eager").to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name and p.dim() == 2:
                p.mul_(4)
            if "dt_bias" in name:
                p.zero_()
    return model


def bound(family: Family) -> float:
    """How far a patched tiny model's float64 logits may be from prompted: float64 round-off, or ten times the
    family's own float32 noise (never above 1e-5)."""
    return max(1e-9, 10 * family.noise)


def exactness_errors(family: Family, seed: int = 0) -> tuple[float, float]:
    """(max |Δlogit| patched vs prompted, max |Δlogit| unpatched vs prompted) on the family's tiny model, float64,
    by the family's default method."""
    from .convert import convert_prompt
    from .patch import patched_copy

    model = tiny_model(family, seed=seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (1, PROMPT + QUERY), generator=g)  # (1, P + Q), above the special ids
    patch = convert_prompt(model, ids[0, :PROMPT].tolist(), "self-test", fingerprint="self-test")
    patched = patched_copy(model, patch)
    with torch.no_grad():
        want = model(input_ids=ids).logits[0, PROMPT:]  # (Q, V)
        got = patched(input_ids=ids[:, PROMPT:]).logits[0]
        plain = model(input_ids=ids[:, PROMPT:]).logits[0]
    return float((got - want).abs().max()), float((plain - want).abs().max())


def key(family: Family) -> str:
    import transformers

    return f"{family.model_type} transformers={transformers.__version__} torch={torch.__version__} iclca={__version__}"


def check_family(family: Family) -> None:
    """Refuse (IclcaError) a family whose patches are not exact on the installed transformers; once per version."""
    if family.tiny is None:
        return
    k = key(family)
    if k in _passed or k in read_store(STORE):
        _passed.add(k)
        return
    _passed.add(k)  # while the test runs, its own convert and apply pass this check
    try:
        error, reach = exactness_errors(family)
    except Exception as e:  # a transformers that cannot even build or run the family's tiny layout
        _passed.discard(k)
        raise _refusal(family, f"its self-test failed to run ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from e
    if not error <= bound(family) or not reach > 1e3 * bound(family):  # NaN fails both
        _passed.discard(k)
        raise _refusal(family, f"its self-test's patched logits are {error:.2g} off (bound {bound(family):.0e}; "
                               f"without the prompt {reach:.2g})")
    add_to_store(STORE, k, {"max_abs_logit_diff": error, "without_prompt": reach})


def _refusal(family: Family, why: str) -> IclcaError:
    import transformers

    installed = transformers.__version__
    other = [v for v in TESTED_TRANSFORMERS if v != installed][-1]
    return IclcaError(f"{family.model_type} patches are not exact on transformers {installed}: {why}",
                      f"install a transformers iclca was tested with: pip install 'transformers=={other}' "
                      f"(tested: {', '.join(TESTED_TRANSFORMERS)})")
