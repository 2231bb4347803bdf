"""A least-squares start for `lora` (a probe, not part of iclca): layer after layer, the update of the MLP's down
projection is fitted so that the layer's output on inputs made from the prompt moves toward the prompted model's,
as a reduced-rank ridge regression from the down projection's input to what is missing. `fitted_update` has the
signature of lora_layers.convert, so scripts/research/lora_checks.py puts it in its place (`@init=fit`).
"""

from __future__ import annotations

import dataclasses

import torch

from iclca_cli.distill import prompt_inputs
from iclca_cli.lora_layers import convert as plain_start  # B = 0 (bound now: the probe puts fitted_update there)


def reduced_rank_ridge(x: torch.Tensor, y: torch.Tensor, rank: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (O, r), A (r, I)) minimising |x Aᵀ Bᵀ - y|² + ridge·tr(xᵀx)/I·|W|² at rank r (ridge fit, then its fitted
    values' top-r output directions). (N, I), (N, O)."""
    gram = x.T @ x  # (I, I)
    lam = ridge * gram.diagonal().mean()
    w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=x.dtype), x.T @ y)  # (I, O)
    _, _, vh = torch.linalg.svd(x @ w, full_matrices=False)
    v = vh[:rank].T  # (O, r)
    return v, v.T @ w.T


@torch.no_grad()
def fitted_update(model, family, prompt_ids, method, chunk_size=512, progress=None, ridge=1e-2, count=32,
                  part="down_proj"):
    """lora_layers.convert's tensors with each layer's `part` update fitted in turn (reduced_rank_ridge) on `count`
    spans of the prompt: the student (earlier layers' fits in place) against the prompted model, layer by layer."""
    from iclca_cli.convert import default_method, describe_patch, fill_patch
    from iclca_cli.patch import patched_copy

    tensors = plain_start(model, family, prompt_ids, method)
    inputs = prompt_inputs(prompt_ids, count, 64, method.seed)
    exact = describe_patch(model, prompt_ids, "0" * 64, default_method(model))
    teacher = patched_copy(model, fill_patch(model, exact, prompt_ids))
    layers = model.model.layers

    def outputs(m, ids, part_of=None):  # each layer's output (T, d) and, for layer part_of, its part's input
        seen, hooks = {}, []
        for i, layer in enumerate(m.model.layers):
            hooks.append(layer.register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(
                i, (out[0] if isinstance(out, tuple) else out)[0].double())))
        if part_of is not None:
            hooks.append(m.model.layers[part_of].mlp.get_submodule(part).register_forward_pre_hook(
                lambda _m, args: seen.__setitem__("x", args[0][0].double())))
        try:
            m(input_ids=torch.tensor([ids]))
        finally:
            for h in hooks:
                h.remove()
        return seen

    wanted = [outputs(teacher, ids) for ids in inputs]
    dtype = next(model.parameters()).dtype
    for n in range(len(layers)):
        student = student_with(model, tensors, method, prompt_ids)
        xs, ys = [], []
        for ids, want in zip(inputs, wanted):
            got = outputs(student, ids, n)
            xs.append(got["x"][1:])  # position 0 left out: the student's is a sink, the teacher's is not
            ys.append((want[n] - got[n])[1:])
        b, a = reduced_rank_ridge(torch.cat(xs), torch.cat(ys), method.rank, ridge)
        path = f"model.layers.{n}.mlp.{part}"
        tensors[f"{path}.lora_B"], tensors[f"{path}.lora_A"] = b.to(dtype), a.to(dtype)
        if progress is not None:
            progress(n + 1, len(layers), "fitting")
    return tensors


def student_with(model, tensors, method, prompt_ids):
    """The model with these lora tensors (a patched copy)."""
    from iclca_cli.convert import describe_patch
    from iclca_cli.patch import patched_copy

    patch = describe_patch(model, prompt_ids, "0" * 64, method)
    return patched_copy(model, dataclasses.replace(patch, tensors=dict(tensors)))
