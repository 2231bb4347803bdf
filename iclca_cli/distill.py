"""Distillation: a patch's tensors trained so that the patched model (the student) says what the prompted model (the
teacher) says, on inputs made from the prompt alone. The teacher is any model that has read the prompt (the exact
prefix patch, so the prompt is not re-read per step); the loss is KL(teacher || student) on the teacher's top-k
next tokens at every position of the training inputs (or, to compare with fine-tuning, the cross-entropy of the
inputs' own next tokens). The engine of trained methods (a refined `compressed`, `lora`); it knows nothing of which
tensors it trains beyond their names.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch

from .devices import input_device
from .errors import IclcaError
from .training import Training


def prompt_inputs(prompt_ids: list[int], count: int, max_len: int, seed: int | str) -> list[list[int]]:
    """`count` inputs made from the prompt alone: spans of it re-read from a random start, of random lengths up to
    max_len, as the queries to come will look things up in it (never the eval queries)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length = rng.randint(2, min(max_len, len(prompt_ids)))
        start = rng.randint(0, len(prompt_ids) - length)
        out.append(prompt_ids[start:start + length])
    return out


def line_starts(prompt_ids: list[int], breaks: frozenset[int]) -> list[int]:
    """Where the prompt's lines start: 0 and after each token in `breaks` (those whose text holds a newline)."""
    return [0] + [i + 1 for i, t in enumerate(prompt_ids[:-1]) if t in breaks]


def line_inputs(prompt_ids: list[int], count: int, max_len: int, seed: int, breaks: frozenset[int],
                salt: str = "lines") -> list[list[int]]:
    """`count` inputs shaped as queries are: from a line's start, one to three whole lines of the prompt (so the
    teacher's targets include each line's answer after its question), at most max_len tokens. Spans where the prompt
    is not made of such lines: no line breaks, or lines longer than max_len / 2 tokens on average (a document's
    paragraphs, whose ends a line input would never reach). `salt` draws another set for the same seed (held back)."""
    starts = line_starts(prompt_ids, breaks)
    if len(starts) < 2 or len(prompt_ids) / len(starts) > max_len / 2:
        return prompt_inputs(prompt_ids, count, max_len, seed if salt == "lines" else f"{salt}-{seed}")
    ends = starts[1:] + [len(prompt_ids)]  # line i ends where line i + 1 starts
    rng = random.Random(f"{salt}-{seed}")
    out = []
    for _ in range(count):
        i = rng.randrange(len(starts))
        end = ends[min(i + rng.randint(0, 2), len(ends) - 1)]
        line = prompt_ids[starts[i]:max(end, starts[i] + 2)][:max_len]
        out.append(line if len(line) >= 2 else prompt_ids[-2:])
    return out


def sampled_inputs(teacher, prompt_ids: list[int], count: int, max_len: int, seed: int, breaks: frozenset[int],
                   temperature: float = 0.7) -> list[list[int]]:
    """`count` inputs the prompted model writes itself (after Cartridges' self-study): from the first token of a
    random prompt line, what it continues with at `temperature`, up to max_len tokens in all. Seeded."""
    from .generation import Sampling, continuation

    rng = random.Random(f"samples-{seed}")
    starts = [i for i in line_starts(prompt_ids, breaks) if i < len(prompt_ids)]
    out = []
    with torch.random.fork_rng(devices=[]):
        for n in range(count):
            head = [prompt_ids[rng.choice(starts)]]
            tail = continuation(teacher, head, Sampling(max_len - 1, temperature, 1.0, seed * 1000 + n))
            out.append(head + tail if tail else prompt_ids[:2])
    return out


def turn_inputs(teacher, tokenizer, messages: list[dict], prompt_ids: list[int], count: int, max_len: int, seed: int,
                temperature: float = 0.7) -> list[list[int]]:
    """`count` user turns and answers the prompted model writes itself after a chat prompt (Cartridges' self-study):
    after the tokens that open a user turn it writes a user's message (up to max_len / 2 tokens), which is rendered
    as a user turn (chat.query_ids), and it answers it (up to max_len tokens more), at `temperature`. Seeded."""
    from .chat import query_ids, turn_opener
    from .generation import Sampling, continuation

    opener = turn_opener(tokenizer, messages, prompt_ids)
    out = []
    with torch.random.fork_rng(devices=[]):
        for n in range(count):
            said = continuation(teacher, opener, Sampling(max(1, max_len // 2), temperature, 1.0, seed * 1000 + n))
            message = tokenizer.decode(said, skip_special_tokens=True).strip() or "Hello"
            turn = query_ids(tokenizer, messages, message, prompt_ids)
            out.append(turn + continuation(teacher, turn, Sampling(max_len, temperature, 1.0, seed * 1000 + n)))
    return out


def training_inputs(teacher, prompt_ids: list[int], training: Training, breaks: frozenset[int] = frozenset(),
                    tokenizer=None, messages: list[dict] | None = None) -> list[list[int]]:
    """training.inputs inputs made from the prompt alone (never the eval queries), shared out evenly among
    training.sources: spans re-read (prompt_inputs), lines as queries look (line_inputs), continuations the
    prompted model samples (sampled_inputs), and, after a chat prompt (`messages`), user turns it writes and
    answers (turn_inputs)."""
    share = [training.inputs // len(training.sources) + (i < training.inputs % len(training.sources))
             for i in range(len(training.sources))]
    out = []
    for source, count in zip(training.sources, share):
        if source == "spans":
            out += prompt_inputs(prompt_ids, count, training.max_len, training.seed)
        elif source == "lines":
            out += line_inputs(prompt_ids, count, training.max_len, training.seed, breaks)
        elif source == "turns":
            if messages is None:
                raise IclcaError("--train-on turns trains on user turns after a chat prompt", "add --chat, or train "
                                 "on spans, lines or samples")
            out += turn_inputs(teacher, tokenizer, messages, prompt_ids, count, training.max_len, training.seed)
        else:
            out += sampled_inputs(teacher, prompt_ids, count, training.max_len, training.seed, breaks)
    return out


def line_breaks(tokenizer, prompt_ids: list[int]) -> frozenset[int]:
    """The prompt's tokens whose text holds a newline (none without a tokenizer)."""
    if tokenizer is None:
        return frozenset()
    return frozenset(t for t in set(prompt_ids) if "\n" in tokenizer.decode([t]))


@torch.no_grad()
def teacher_targets(teacher, inputs: list[list[int]], k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each input, the teacher's top-k (log-probabilities (T, k), token ids (T, k)) at every position."""
    device = input_device(teacher)
    out = []
    for ids in inputs:
        logp = torch.log_softmax(teacher(input_ids=torch.tensor([ids], device=device)).logits[0].double(), -1)
        top = logp.topk(min(k, logp.shape[-1]), -1)
        out.append((top.values, top.indices))
    return out


def text_targets(inputs: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each input, its own next tokens as targets of probability 1 (log-probabilities (T-1, 1) of 0, ids
    (T-1, 1)): top_k_kl on them is the cross-entropy of next-token training on the text."""
    return [(torch.zeros(len(ids) - 1, 1, dtype=torch.float64), torch.tensor(ids[1:])[:, None]) for ids in inputs]


def top_k_kl(teacher_logp: torch.Tensor, teacher_ids: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top-k tokens and the rest of the vocabulary as one more outcome,
    mean over positions: a true divergence (>= 0, 0 only where the student gives each top-k token and the rest the
    teacher's probability). Summed over the top-k alone it is not one: a student that puts more mass on the
    teacher's top-k than the teacher does scores below 0, so training on it makes the student overconfident.
    With k = V it is the whole KL. (T, k), (T, k), (T, V) -> ()"""
    logp = torch.log_softmax(student_logits.double(), -1)  # (T, V)
    student_logp = logp.gather(-1, teacher_ids)  # (T, k)
    teacher_p = teacher_logp.exp()
    top = (teacher_p * (teacher_logp - student_logp)).sum(-1)  # (T,)
    teacher_rest = (1 - teacher_p.sum(-1)).clamp_min(0)  # (T,): the teacher's mass outside its top-k
    if teacher_ids.shape[-1] >= logp.shape[-1] or not (teacher_rest > 0).any():  # nothing outside (text targets too)
        return top.mean()
    student_rest = logp.scatter(-1, teacher_ids, -math.inf).logsumexp(-1)  # (T,): log of the student's mass outside
    rest = torch.where(teacher_rest > 0, teacher_rest * (teacher_rest.clamp_min(1e-300).log() - student_rest), 0.0)
    return (top + rest).mean()


@contextmanager
def _frozen(model):
    """The model's parameters without gradients while training patch tensors (their flags restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


CHECKS = 4  # with held-back inputs, their loss is measured before training and after each quarter of the steps


def distill(student, names: list[str], targets_of: list[tuple[list[int], tuple[torch.Tensor, torch.Tensor]]],
            training: Training, keep: dict[str, torch.Tensor] | None = None,
            progress: Callable[[int, int, float], None] | None = None, head: list[int] = (),
            held_back: list[tuple[list[int], tuple[torch.Tensor, torch.Tensor]]] = (),
            checked: Callable[[int, float], None] | None = None) -> tuple[dict[str, torch.Tensor], int, int]:
    """Train the student's buffers `names` (its patch tensors, in place) with Adam, training.batch (input, teacher
    targets) pairs per step (their losses averaged) in a seeded order; entries where keep[name] is True do not move
    (a summary's sink). The student reads `head` before each input (a chat template's own start, where a weight
    patch stands for a chat prompt), the loss is on the input's positions from training.loss_from on (the last at
    least). On CUDA the forward runs under bfloat16 autocast; the trained tensors are kept in float64 (float32 on
    CUDA) between steps. With `held_back` pairs (never trained on), their mean loss is measured before the first step
    and after each of CHECKS equal parts of the steps (checked(step, loss) each time), and the tensors where it was
    lowest are kept: step 0, the tensors as given, where training only made it worse. Returns (the tensors kept,
    detached, in the buffers' dtypes; the steps taken: fewer than training.steps where training.time_limit ran out;
    the step whose tensors were kept). progress(step, steps, loss)."""
    buffers = {name: student.get_buffer(name) for name in names}
    device = input_device(student)
    work_dtype = torch.float32 if device.type == "cuda" else torch.float64
    work = {name: b.detach().to(work_dtype).clone().requires_grad_(True) for name, b in buffers.items()}
    optimiser = torch.optim.Adam(list(work.values()), lr=training.lr)
    decay = (lambda done: 0.5 * (1 + math.cos(math.pi * done / training.steps))) if training.schedule == "cosine" \
        else (lambda done: 1.0)  # of lr, after `done` steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, decay)
    order = random.Random(training.seed).choices(range(len(targets_of)), k=training.steps * training.batch)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    checks = {round(training.steps * (c + 1) / CHECKS) for c in range(CHECKS)} if held_back else set()

    def load():  # the buffers hold the working tensors, cast as the model computes
        for name, t in work.items():
            path, buffer = name.rsplit(".", 1)
            setattr(student.get_submodule(path), buffer, t.to(buffers[name].dtype))

    def loss_of(ids, logp, top):
        with autocast:
            logits = student(input_ids=torch.tensor([[*head, *ids]], device=device)).logits[0, len(head):]
        first = min(training.loss_from, len(logp) - 1)
        logp, top = logp[first:].to(logits.device), top[first:].to(logits.device)
        return top_k_kl(logp, top, logits[first:first + len(logp)])  # ce: T - 1 targets

    best = None  # (held-back loss, step, tensors)

    def check(step):
        nonlocal best
        load()
        with torch.no_grad():
            loss = sum(float(loss_of(ids, *targets)) for ids, targets in held_back) / len(held_back)
        if checked is not None:
            checked(step, loss)
        if best is None or loss < best[0]:
            best = (loss, step, {name: t.detach().clone() for name, t in work.items()})

    start, taken = time.monotonic(), 0
    with _frozen(student):
        if held_back:
            check(0)
        for step in range(1, training.steps + 1):
            if training.time_limit is not None and time.monotonic() - start > training.time_limit:
                break
            optimiser.zero_grad()
            loss = 0.0
            for i in order[(step - 1) * training.batch:step * training.batch]:  # gradients summed over the batch
                load()
                ids, (logp, top) = targets_of[i]
                part = loss_of(ids, logp, top) / training.batch
                part.backward()
                loss += float(part.detach())
            for name, mask in (keep or {}).items():
                work[name].grad[mask.to(work[name].device)] = 0
            optimiser.step()
            scheduler.step()
            taken = step
            if progress is not None:
                progress(step, training.steps, float(loss))
            if step in checks:
                check(step)
        if held_back and taken not in checks and taken > 0:  # stopped by the time limit between checks
            check(taken)
    kept_step, kept = (taken, work) if best is None else best[1:]
    trained = {}
    for name, t in kept.items():
        path, buffer = name.rsplit(".", 1)
        trained[name] = t.detach().to(buffers[name].dtype)
        student.get_submodule(path).register_buffer(buffer, trained[name].clone())
    return trained, taken, kept_step


def summary_names_and_sinks(tensors: dict[str, torch.Tensor]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The tensors of a compressed patch's summaries (the layers with a `prefix_bias`; a sliding window's keys and
    values, and recurrent states, are exact and stay), and for each a mask of what stays: every head's first entry
    (the prompt's first token, an attention sink) and the entries another head's bias hides."""
    from .ops.compress import own_entries

    names, keep = [], {}
    for name, bias in tensors.items():
        if not name.endswith(".prefix_bias"):
            continue
        layer = name.removesuffix(".prefix_bias")
        valid = own_entries(bias)  # (Hkv, E)
        sink = valid.float().argmax(-1)  # (Hkv,): the first of each head's entries
        heads = torch.arange(len(bias))
        keep[name] = ~valid
        keep[name][heads, sink] = True
        for part in ("prefix_keys", "prefix_values"):
            t = tensors[f"{layer}.{part}"]  # (Hkv, E, D), or (1, E, D) where the heads share one list
            mask = torch.zeros(t.shape, dtype=torch.bool)
            mask[(heads if len(t) == len(bias) else 0), sink] = True
            keep[f"{layer}.{part}"] = mask
        names += [name, f"{layer}.prefix_keys", f"{layer}.prefix_values"]
    return sorted(names), keep


def train_patch(model, patch, tensors: dict[str, torch.Tensor], prompt_ids: list[int], training: Training,
                names: list[str], keep: dict[str, torch.Tensor] | None = None, objective: str = "kl",
                progress: Callable[..., None] | None = None, tokenizer=None, what: str = "training",
                messages: list[dict] | None = None) -> dict[str, torch.Tensor]:
    """A patch's tensors `names` trained: the student is the model with the patch (tensors as given), the teacher the
    model with the prompt's exact patch (its default method: prefix, or a hybrid's exact cache), the inputs made from
    the prompt (training_inputs; lines need the tokenizer). objective kl: the teacher's top-k; ce: the inputs' own
    next tokens (fine-tuning on the text). `messages`: the prompt is this chat conversation; a weight patch's
    student then reads each input after the chat template's own start (chat.served_head), as a server renders a
    query with no baked conversation in its context. Where a time limit stops training early, patch.extra records
    the steps taken (<what>_steps_taken)."""
    import dataclasses

    from .convert import default_method, describe_patch, fill_patch
    from .patch import patched_copy

    head = []  # checked first: a template a weight patch cannot stand for is refused before any work
    if messages is not None and not patch.method.in_context:
        from .chat import served_head

        head = served_head(tokenizer, [m["role"] for m in messages])
    method = default_method(model)
    if not method.exact:
        raise IclcaError(f"iclca has no exact patch for this {model.config.model_type!r} model's layers to train toward "
                         "(the prompted model is the teacher)", "use a model whose layers iclca patches exactly")
    exact = describe_patch(model, prompt_ids, patch.prompt_sha256, method, fingerprint=patch.base_fingerprint)
    teacher = patched_copy(model, fill_patch(model, exact, prompt_ids))
    student = patched_copy(model, dataclasses.replace(patch, tensors=dict(tensors)))
    breaks = line_breaks(tokenizer, prompt_ids)
    drawn = training_inputs(teacher, prompt_ids, training, breaks, tokenizer, messages)
    held = line_inputs(prompt_ids, training.held_back, training.max_len, training.seed, breaks, "held")
    targets_of = teacher_targets if objective == "kl" else lambda _t, inputs, _k: text_targets(inputs)
    targets, held_targets = (targets_of(teacher, inputs, training.top_k) for inputs in (drawn, held))
    unit = "KL" if objective == "kl" else "CE"
    step = (lambda done, total, loss: progress(done, total, f"{what}, {unit} {loss:.3f}")) if progress else None
    trained, taken, kept = distill(student, names, list(zip(drawn, targets)), training, keep, step, head,
                                   list(zip(held, held_targets)))
    if taken < training.steps:
        patch.extra[f"{what}_steps_taken"] = str(taken)
    if kept < taken:
        patch.extra[f"{what}_step_kept"] = str(kept)
    return {**tensors, **trained}


def refine_summary(model, patch, tensors: dict[str, torch.Tensor], prompt_ids: list[int], training: Training,
                   progress: Callable[..., None] | None = None, tokenizer=None, messages: list[dict] | None = None
                   ) -> dict[str, torch.Tensor]:
    """`compressed --refine`: the fitted summary trained toward the prompted model, its sinks kept (train_patch)."""
    names, keep = summary_names_and_sinks(tensors)
    return train_patch(model, patch, tensors, prompt_ids, training, names, keep, "kl", progress, tokenizer, "refine",
                       messages)

