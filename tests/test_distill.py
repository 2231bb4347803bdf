"""The distillation engine (distill.py): a compressed summary trained toward the prompted model, on inputs made from
the prompt alone, gets closer to it on queries it never saw; training is deterministic and leaves the sink alone."""

import pytest
import torch

from helpers import convert, make_llama, random_ids
from iclca_cli.distill import (Training, distill, line_inputs, line_starts, prompt_inputs, sampled_inputs, teacher_targets,
                               top_k_kl, training_inputs)
from iclca_cli.errors import IclcaError


def held_out_kl(teacher, student, inputs):
    """Mean KL(teacher || student) over the inputs' positions, on the whole vocabulary (97 tokens)."""
    with torch.no_grad():
        return sum(float(top_k_kl(logp, top, student(input_ids=torch.tensor([ids])).logits[0]))
                   for ids, (logp, top) in zip(inputs, teacher_targets(teacher, inputs, 97))) / len(inputs)


def refine(budget=4, steps=150, seed=0, lr=5e-2, count=32):
    model = make_llama(seed=5)
    prompt = random_ids(48, 97, 6)
    teacher, _ = convert(model, prompt, "prefix")
    student, patch = convert(model, prompt, "compressed", budget=budget, split="uniform")
    inputs = prompt_inputs(prompt, count, 24, seed)
    targets = list(zip(inputs, teacher_targets(teacher, inputs, 20)))
    names = sorted(patch.tensors)
    keep = {n: torch.zeros_like(patch.tensors[n], dtype=torch.bool) for n in names}
    for n in names:  # the first entry of every head (keys, values, bias): the sink
        keep[n][:, 0] = True
    trained, taken, _ = distill(student, names, targets, Training(steps=steps, lr=lr, seed=seed), keep)
    assert taken == steps
    return model, prompt, teacher, student, patch, trained


def test_training_brings_the_summary_closer_to_the_prompted_model_on_unseen_inputs():
    """A tiny random Llama, 48 prompt tokens kept as 4 entries per head (12x): KL to the prompted model drops on
    random queries and on spans of the prompt that training did not draw (seen: 1.82 -> 1.61 and 1.79 -> 1.29)."""
    model, prompt, teacher, student, patch, trained = refine()
    untrained, _ = convert(model, prompt, "compressed", budget=4, split="uniform")
    queries = [random_ids(8, 97, s) for s in range(100, 106)]  # never trained on
    assert held_out_kl(teacher, student, queries) < held_out_kl(teacher, untrained, queries)
    spans = prompt_inputs(prompt, 6, 24, seed=99)  # other draws than training's (seed 0)
    before, after = held_out_kl(teacher, untrained, spans), held_out_kl(teacher, student, spans)
    assert after < 0.85 * before, (before, after)
    for name, t in trained.items():
        assert torch.equal(t[:, 0], patch.tensors[name][:, 0])  # the sink did not move
        assert not torch.equal(t, patch.tensors[name])  # the rest did
        assert torch.equal(student.get_buffer(name), t)


def test_training_is_deterministic_for_a_seed():
    a, b, c = (refine(steps=10, seed=s, count=8)[-1] for s in (0, 0, 1))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def four_inputs():
    """A tiny Llama, a 40-token prompt, and four spans of it with the prompted model's (prefix) targets."""
    model = make_llama(seed=5)
    prompt = random_ids(40, 97, 6)
    teacher, _ = convert(model, prompt, "prefix")
    inputs = prompt_inputs(prompt, 4, 16, 0)
    return model, prompt, list(zip(inputs, teacher_targets(teacher, inputs, 20)))


def test_a_cosine_schedule_decays_the_learning_rate():
    """schedule cosine: the learning rate after k of N steps is lr * (1 + cos(pi k / N)) / 2. In two steps from the
    same start, the first is constant's own step and the second (same gradient, same Adam state) exactly half of it."""
    model, prompt, targets = four_inputs()

    def trained(steps, schedule):
        student, patch = convert(model, prompt, "compressed", budget=4, split="uniform")
        return distill(student, sorted(patch.tensors), targets, Training(steps=steps, lr=1e-2, schedule=schedule))[0]

    first, constant, cosine = trained(1, "constant"), trained(2, "constant"), trained(2, "cosine")
    assert trained(1, "cosine").keys() == first.keys()
    for name in first:
        assert torch.equal(trained(1, "cosine")[name], first[name])
        second = constant[name].double() - first[name].double()
        assert second.abs().max() > 0
        torch.testing.assert_close(cosine[name].double() - first[name].double(), second / 2, rtol=1e-6, atol=1e-9)


def test_the_top_k_loss_is_a_divergence():
    """KL over the teacher's top-k and the rest as one outcome: >= 0, at most the whole KL, the whole KL at k = V, 0
    where the student matches the teacher's top-k and rest; a student more confident in the teacher's top-k than the
    teacher scores above 0 (the top-k sum alone scored it below)."""
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(5, 50, generator=g, dtype=torch.float64) * 3, torch.randn(5, 50, generator=g, dtype=torch.float64)
    logp_t = teacher.log_softmax(-1)
    whole = (logp_t.exp() * (logp_t - student.log_softmax(-1))).sum(-1).mean()
    for k in (1, 5, 20):
        top = logp_t.topk(k, -1)
        loss = top_k_kl(top.values, top.indices, student)
        assert 0 <= loss <= whole + 1e-12
        rest = torch.ones_like(teacher, dtype=torch.bool).scatter_(-1, top.indices, False)
        noise = torch.randn(5, 50 - k, generator=g, dtype=torch.float64)  # the rest's mass spread otherwise, same total
        spread = noise - noise.logsumexp(-1, keepdim=True) + logp_t[rest].view(5, -1).logsumexp(-1, keepdim=True)
        same = logp_t.clone() + 1.0  # logits: the teacher's top-k probabilities ...
        same[rest] = spread.flatten() + 1.0  # ... and the rest's total
        assert top_k_kl(top.values, top.indices, same) == pytest.approx(0, abs=1e-12)
        confident = logp_t.scatter(-1, top.indices, top.values + 5.0)  # more mass on the top-k than the teacher
        naive = (top.values.exp() * (top.values - confident.log_softmax(-1).gather(-1, top.indices))).sum(-1).mean()
        assert naive < 0 < top_k_kl(top.values, top.indices, confident)
    every = logp_t.topk(50, -1)
    assert top_k_kl(every.values, every.indices, student) == pytest.approx(float(whole), rel=1e-12)


def test_inputs_come_from_the_prompt():
    prompt = list(range(100, 140))
    for ids in prompt_inputs(prompt, 50, 16, 3):
        assert 2 <= len(ids) <= 16
        start = prompt.index(ids[0])
        assert prompt[start:start + len(ids)] == ids


def test_line_inputs_start_where_lines_start_and_hold_whole_lines():
    """A prompt of lines `question answer NL`: each line input starts at a line's start and ends after a line break
    (or at the prompt's end, or max_len), so the teacher's targets include the answers as a query reads them. A
    prompt without breaks, or of lines longer than max_len / 2 on average (paragraphs), gets spans."""
    NL = 0
    prompt = [t for i in range(12) for t in (100 + i, 200 + i, NL)]
    assert line_starts(prompt, frozenset({NL}))[:3] == [0, 3, 6]
    for ids in line_inputs(prompt, 40, 7, 3, frozenset({NL})):
        start = prompt.index(ids[0])
        assert start % 3 == 0 and prompt[start:start + len(ids)] == ids
        assert ids[-1] == NL or len(ids) == 7 or start + len(ids) == len(prompt)
    assert line_inputs(prompt, 5, 7, 3, frozenset()) == prompt_inputs(prompt, 5, 7, 3)  # no breaks: spans
    paragraphs = [t for i in range(3) for t in (*range(100 + 40 * i, 139 + 40 * i), NL)]  # 3 lines of 40 tokens
    assert line_inputs(paragraphs, 5, 64, 3, frozenset({NL})) == prompt_inputs(paragraphs, 5, 64, 3)  # spans
    assert line_inputs(paragraphs, 5, 80, 3, frozenset({NL})) != prompt_inputs(paragraphs, 5, 80, 3)  # 40 <= 80 / 2


def test_sampled_inputs_are_the_prompted_models_own_and_seeded():
    model = make_llama(seed=5)
    prompt = random_ids(30, 97, 6)
    teacher, _ = convert(model, prompt, "prefix")
    firsts = {prompt[i] for i in line_starts(prompt, frozenset({prompt[9]}))}
    a, b = (sampled_inputs(teacher, prompt, 3, 10, 0, frozenset({prompt[9]})) for _ in range(2))
    assert a == b and all(2 <= len(x) <= 10 and x[0] in firsts for x in a)
    assert a != sampled_inputs(teacher, prompt, 3, 10, 1, frozenset({prompt[9]}))
    mixed = training_inputs(teacher, prompt, Training(inputs=7, max_len=10, sources=("spans", "lines", "samples")),
                            frozenset({prompt[9]}))
    assert len(mixed) == 7 and mixed[:3] == prompt_inputs(prompt, 3, 10, 0)


def test_turn_inputs_are_user_turns_the_prompted_model_writes_and_answers(tmp_path):
    """After a chat prompt, each input is a whole user turn as the template renders it after the conversation (the
    message the prompted model wrote), then its answer; seeded. Refined summaries train on them by default too."""
    from helpers import make_decoder, save_chat_checkpoint
    from iclca_cli import chat
    from iclca_cli.convert import convert_prompt
    from iclca_cli.distill import turn_inputs
    from iclca_cli.loading import load_model
    from iclca_cli.methods import build
    from iclca_cli.patch import patched_copy

    model, tokenizer = load_model(str(save_chat_checkpoint(make_decoder("Llama", torch.float32, 72), tmp_path / "c")))
    messages = [{"role": "system", "content": "alpha: one\nbeta: two"}]
    prompt = chat.prompt_ids(tokenizer, messages)[1]
    teacher = patched_copy(model, convert_prompt(model, prompt, "0" * 64, "prefix"))
    a, b = (turn_inputs(teacher, tokenizer, messages, prompt, 3, 12, 0) for _ in range(2))
    assert a == b != turn_inputs(teacher, tokenizer, messages, prompt, 3, 12, 1)
    opener, assistant = chat.turn_opener(tokenizer, messages, prompt), tokenizer.encode("<|im_start|>assistant")
    for ids in a:
        message = tokenizer.decode(ids[len(opener):ids.index(tokenizer.convert_tokens_to_ids("<|im_end|>"))])
        turn = chat.query_ids(tokenizer, messages, message, prompt)
        assert ids[:len(turn)] == turn and len(ids) > len(turn) and ids[:len(opener)] == opener
        assert turn[-len(assistant) - 1:-1] == assistant
    with pytest.raises(IclcaError, match="--train-on turns"):
        training_inputs(teacher, prompt, Training(sources=("turns",)))
    refined = convert_prompt(model, prompt, "0" * 64, build("compressed", budget=4, refine=True, steps=3),
                             tokenizer=tokenizer, messages=messages)
    assert refined.metadata()["iclca.refine_inputs"] == "auto"


def test_training_settings_are_checked_with_the_flags_named():
    for bad, flag in ((dict(steps=0), "--steps"), (dict(lr=0), "--lr"), (dict(sources=("spans", "docs")), "--train-on"),
                      (dict(time_limit=0), "--time-limit"), (dict(held_back=-1), "--held-back"),
                      (dict(schedule="linear"), "--schedule"), (dict(batch=0), "--batch"),
                      (dict(loss_from=-1), "--loss-from")):
        with pytest.raises(IclcaError, match=flag):
            Training(**bad)


def test_a_time_limit_stops_training_and_says_how_far_it_got():
    model, prompt, targets = four_inputs()
    student, patch = convert(model, prompt, "compressed", budget=4, split="uniform")
    _, taken, _ = distill(student, sorted(patch.tensors), targets, Training(steps=10_000, time_limit=0.5))
    assert 1 <= taken < 10_000


def test_a_batch_averages_its_inputs_losses():
    """--batch B: each step trains on B inputs, their losses averaged. Two copies of one input are that input alone
    (halves summed: the same tensors, bit for bit, and the same reported loss); different inputs train otherwise,
    deterministically."""
    model, prompt, targets = four_inputs()

    def trained(pairs, batch):
        student, patch = convert(model, prompt, "compressed", budget=4, split="uniform")
        losses = []
        tensors, taken, _ = distill(student, sorted(patch.tensors), pairs, Training(steps=3, lr=5e-2, batch=batch),
                                    progress=lambda step, steps, loss: losses.append(loss))
        assert taken == 3 and len(losses) == 3
        return tensors, losses

    one, one_losses = trained(targets[:1], 1)
    two, two_losses = trained(targets[:1], 2)
    assert all(torch.equal(one[n], two[n]) for n in one) and one_losses == two_losses
    mixed, again = trained(targets, 3), trained(targets, 3)
    assert all(torch.equal(mixed[0][n], again[0][n]) for n in one)
    assert any(not torch.equal(mixed[0][n], trained(targets, 1)[0][n]) for n in one)


def test_the_loss_is_taken_from_loss_from_on():
    """--loss-from 1 (lora's default: its student reads an input from position 0): the prompted model's targets at
    each input's first position move nothing; with 0 they do. An input of two tokens keeps its last position."""
    model, prompt, targets = four_inputs()
    spoiled = []  # another teacher at the first position: its top-k tokens in reverse order
    for ids, (logp, top) in targets:
        top = top.clone()
        top[0] = top[0].flip(0)
        spoiled.append((ids, (logp, top)))

    def trained(pairs, loss_from):
        student, patch = convert(model, prompt, "compressed", budget=4, split="uniform")
        return distill(student, sorted(patch.tensors), pairs, Training(steps=3, lr=5e-2, loss_from=loss_from))[0]

    kept, spoilt = trained(targets, 1), trained(spoiled, 1)
    assert all(torch.equal(kept[n], spoilt[n]) for n in kept)
    kept, spoilt = trained(targets, 0), trained(spoiled, 0)
    assert any(not torch.equal(kept[n], spoilt[n]) for n in kept)
    ids, (logp, top) = targets[0]
    two = [(ids[:2], (logp[:2], top[:2]))]
    untouched = convert(model, prompt, "compressed", budget=4, split="uniform")[1].tensors
    assert any(not torch.equal(trained(two, 5)[n], untouched[n]) for n in untouched)  # its last position trains


@pytest.mark.parametrize("lr", [5e-2, 50.0])
def test_held_back_inputs_choose_the_step_kept(lr):
    """With held-back inputs, their KL is measured before training and after each quarter of the steps, and the
    tensors of the lowest are kept: at a learning rate that learns, a trained step; at one that ruins the summary,
    step 0, the tensors as given (bit for bit)."""
    model = make_llama(seed=5)
    prompt = random_ids(48, 97, 6)
    teacher, _ = convert(model, prompt, "prefix")
    student, patch = convert(model, prompt, "compressed", budget=4, split="uniform")
    inputs, held = prompt_inputs(prompt, 16, 24, 0), prompt_inputs(prompt, 4, 24, 99)
    targets, held_targets = (list(zip(x, teacher_targets(teacher, x, 20))) for x in (inputs, held))
    names, seen = sorted(patch.tensors), []
    trained, taken, kept = distill(student, names, targets, Training(steps=20, lr=lr), held_back=held_targets,
                                   checked=lambda step, loss: seen.append((step, loss)))
    assert [step for step, _ in seen] == [0, 5, 10, 15, 20] and taken == 20
    assert kept == min(seen, key=lambda s: s[1])[0]
    def held_kl(m):  # the loss distill measures: KL on the teacher's top 20
        with torch.no_grad():
            return sum(float(top_k_kl(logp, top, m(input_ids=torch.tensor([ids])).logits[0]))
                       for ids, (logp, top) in held_targets) / len(held)

    assert seen[0][1] == pytest.approx(held_kl(convert(model, prompt, "compressed", budget=4, split="uniform")[0]))
    assert held_kl(student) == pytest.approx(min(loss for _, loss in seen))  # the student holds the tensors kept
    if lr > 1:
        assert kept == 0 and all(torch.equal(trained[n], patch.tensors[n]) for n in names)
    else:
        assert kept > 0 and any(not torch.equal(trained[n], patch.tensors[n]) for n in names)


def test_refine_held_back_is_recorded_with_the_step_kept():
    """--held-back reaches the patch (iclca.refine_held_back), a patch without it reads 0, and the step kept is
    recorded where it is not the last."""
    from helpers import EXAMPLE_PROMPT
    from iclca_cli.convert import convert_prompt
    from iclca_cli.inputs import encode_prompt
    from iclca_cli.loading import load_model
    from iclca_cli.methods import build

    model, tokenizer = load_model("demo-gpt2", "float32")
    prompt = encode_prompt(tokenizer, EXAMPLE_PROMPT.read_text())
    metas = [convert_prompt(model, prompt, "0" * 64, build("compressed", budget=6, refine=True, steps=8, lr=lr,
                                                           held_back=4), tokenizer=tokenizer).metadata()
             for lr in (0.002, 50.0)]
    assert all(m["iclca.refine_held_back"] == "4" for m in metas)
    assert metas[1]["iclca.refine_step_kept"] == "0"  # a learning rate that ruins: the fitted summary kept
    plain = convert_prompt(model, prompt, "0" * 64, build("compressed", budget=6, refine=True, steps=8),
                           tokenizer=tokenizer).metadata()
    assert plain["iclca.refine_held_back"] == "0" and "iclca.refine_step_kept" not in plain
    assert plain["iclca.refine_batch"] == "1" and plain["iclca.refine_top_k"] == "20"
    assert plain["iclca.refine_loss_from"] == "0"


def test_refine_through_the_command_line_is_deterministic_and_recorded(cli, tmp_path):
    from helpers import EXAMPLE_PROMPT, assert_one_line_error
    from iclca_cli.patch import load_patch

    args = ("convert", EXAMPLE_PROMPT, "-m", "demo-gpt2", "--method", "compressed", "--budget", "6", "--refine",
            "--steps", "10", "--train-on", "lines+samples+spans")
    for name in ("a", "b"):
        assert cli(*args, "-o", tmp_path / f"{name}.st").exit_code == 0
    assert (tmp_path / "a.st").read_bytes() == (tmp_path / "b.st").read_bytes()  # sampled inputs too: seeded
    meta = load_patch(tmp_path / "a.st").metadata()
    assert (meta["iclca.refine"], meta["iclca.refine_steps"], meta["iclca.refine_lr"]) == ("True", "10", "0.002")
    assert meta["iclca.refine_inputs"] == "lines+samples+spans" and "iclca.refine_steps_taken" not in meta
    assert_one_line_error(cli(*args[:-1], "lines+docs", "-o", tmp_path / "x.st"), "--train-on 'lines+docs'")
    assert cli("convert", EXAMPLE_PROMPT, "-m", "demo-gpt2", "--method", "compressed", "--budget", "6",
               "-o", tmp_path / "c.st").exit_code == 0
    assert "iclca.refine" not in load_patch(tmp_path / "c.st").metadata()  # unrefined patches are as before
    assert cli("merge", "-m", "demo-gpt2", "-p", tmp_path / "a.st", "-o", tmp_path / "m").exit_code == 0
    res = cli("convert", EXAMPLE_PROMPT, "-m", "demo-gpt2", "--method", "compressed", "--budget", "6", "--steps", "5",
              "-o", tmp_path / "d.st")
    assert_one_line_error(res, "--steps apply to --refine")


def test_refine_helps_a_hybrids_tight_summary(cli, tmp_path):
    """demo-lfm2 (a convolution layer and an attention layer) at 4 entries for a 24-token prompt: the refined summary
    is closer to the prompted model on the example queries (never trained on: training reads spans of the prompt).
    30 steps at lr 0.02: the tiny demo model moves further per step than SmolLM2, whose default is 0.002."""
    from helpers import EXAMPLE_PROMPT, EXAMPLE_QUERIES, one_json

    kl = {}
    for name, extra in (("fitted", ()), ("refined", ("--refine", "--steps", "30", "--lr", "0.02"))):
        patch = tmp_path / f"{name}.st"
        assert cli("convert", EXAMPLE_PROMPT, "-m", "demo-lfm2", "-o", patch, "--method", "compressed", "--budget", "4",
                   *extra).exit_code == 0
        kl[name] = one_json(cli("eval", "-m", "demo-lfm2", "-p", patch, "--prompt", EXAMPLE_PROMPT, "--queries",
                                EXAMPLE_QUERIES, "--json"))["kl_prompted_patched"]
    assert kl["refined"] < 0.8 * kl["fitted"], kl
