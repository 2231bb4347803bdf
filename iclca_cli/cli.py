"""`iclca` command line: parse, call the library, render. Results on stdout, the rest on stderr.

Exit codes: 0 ok; 1 an eval threshold given by the user was missed; 2 bad usage or bad input.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import warnings
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import typer
import typer.core
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from . import __version__
from .dtypes import DTYPE_NAMES
from .errors import IclcaError, IclcaWarning, printable
from .methods import all_methods, taking


class _Commands(TyperGroup):
    """The command group, whose usage errors (a bad option value, a missing option, an unknown flag) end like every
    other error: one `error:` line, one `hint:` line, exit code 2; not the parser's usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        click = getattr(typer.core, "_click", None) or __import__("click")  # typer >= 0.26 carries its own click
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # `iclca` alone: the help
            from typer import rich_utils

            rich_utils.rich_format_error(e)
            rv = e.exit_code
        except click.exceptions.UsageError as e:
            command = e.ctx.command_path if e.ctx is not None else "iclca"
            _print_error(e.format_message(), f"see `{command} --help` for the options and their values")
            rv = 2
        except click.exceptions.ClickException as e:
            _print_error(e.format_message(), "see `iclca --help`")
            rv = e.exit_code
        except typer.Abort:
            err.print("Aborted.", markup=False)
            rv = 1
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn a demonstration prompt (in-context examples) into a weight patch, merge it, and prove it right.",
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
_state = {"debug": False}


Method = Enum("Method", {name: name for name in all_methods()}, type=str)  # the registry's, in order of preference
DType = Enum("DType", {name: name for name in ("auto", *DTYPE_NAMES)}, type=str)


def _method_help() -> str:
    listed = "; ".join(f"{m.name}: {m.help}" for m in all_methods().values())
    return f"{listed}. Default: exact where every layer keeps a finite state, else prefix."


def _param_help(field: str) -> str:
    """A method parameter's help, from the registry: what it is, which methods take it, its default."""
    owners = taking(field)
    p = owners[0].param(field)
    defaults = {m.name: m.default(m.param(field)) for m in owners}
    if len(set(map(str, defaults.values()))) > 1:  # the methods differ: each one's
        shown = " (default " + ", ".join(f"{name} {d}" for name, d in defaults.items()) + ")"
    else:
        default = defaults[owners[0].name]
        shown = f" (default {default})" if default not in (None, 0) else ""
    return f"{' and '.join(m.name for m in owners)}: {p.help}{shown}."


def _version(value: bool):
    if value:
        out.print(f"iclca {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: bool = typer.Option(False, "--debug", help="Show a traceback on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    _state["debug"] = debug
    warnings.showwarning = _show_warning


_library_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """iclca's warnings as one `warning: ...` line on stderr; other libraries' as they print them."""
    if issubclass(category, IclcaWarning):
        err.print(f"warning: {printable(message, 500)}", markup=False, highlight=False)
    else:
        _library_showwarning(message, category, filename, lineno, file, line)


def _print_error(message: str, hint: str) -> None:
    """The one shape of every error: `error: ...` and `hint: ...`, each one printable line (errors.printable)."""
    err.print(f"error: {printable(message, 500)}", markup=False, highlight=False)
    err.print(f"hint: {printable(hint, 500)}", markup=False, highlight=False)


def handled(fn):
    """Turn IclcaError (and any unexpected error) into `error:` + `hint:` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except IclcaError as e:
            if _state["debug"]:
                raise
            _print_error(e.message, e.hint)
            raise typer.Exit(2) from None
        except Exception as e:  # not foreseen: still one line, and --debug shows where
            if _state["debug"]:
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            _print_error(f"{type(e).__name__}: {printable(first, 300)}",
                         "rerun with --debug for a traceback, and report it if the input looks right")
            raise typer.Exit(2) from None

    return wrapper


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@contextmanager
def _progress(description: str):
    """A Rich progress bar on a terminal's stderr; a no-op callback elsewhere. Yields update(done, total[, note]):
    a note (a training's loss) replaces the description."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int, note: str | None = None) -> None:
            bar.update(task, completed=done, total=total, description=note or description)

        yield update


def _emit(as_json: bool, obj: dict, table_title: str) -> None:
    """One JSON object (values in full), or a table whose cells show data as text: escaped, never read as markup,
    long values cut (--json has them whole)."""
    if as_json:
        sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
        return
    table = Table(title=_cell(table_title), show_header=False)
    table.add_column(overflow="fold")
    table.add_column(overflow="fold")
    for key, value in obj.items():
        if isinstance(value, dict):
            for k, v in value.items():
                table.add_row(_cell(f"{key}.{k}"), _cell(v))
        else:
            table.add_row(_cell(key), _cell(value))
    out.print(table)


def _cell(value, limit: int = 400) -> Text:
    """A table cell of data: one printable line (errors.printable), cut at `limit` characters, no markup."""
    return Text(printable(_fmt(value), limit))


def _force_folder_option():
    return typer.Option(False, "--force", help="Replace an output folder iclca wrote before (one with iclca.json; "
                        "never another folder).")


def _allow_pickle_option():
    return typer.Option(False, "--allow-pickle", help="Also load pickled .bin weights (only from a source you trust).")


def _device_option():
    return typer.Option(None, "--device", help="Where to run: cpu (the default), cuda, cuda:N or mps.")


def _device_map_option():
    return typer.Option(None, "--device-map", help="auto: accelerate places the layers over the GPUs present and "
                        "offloads to CPU (then disk) what does not fit; replaces --device.")


def _max_memory_option():
    return typer.Option(None, "--max-memory", help='Limits for --device-map auto, e.g. "0=20GiB,1=20GiB,cpu=64GiB".')


def _chat_option():
    return typer.Option(False, "--chat", help="Render the prompt with the tokenizer's chat template: a text file is the "
                        "system message, a .jsonl holds {role, content} messages; in eval each query is a user turn.")


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _max_input_option():
    return typer.Option(16, "--max-input-mib", min=1, help="Refuse a prompt or queries file larger than this (MiB).")


def _with_method_options(fn):
    """Give a command one option per parameter of the registry's methods (`--budget`, `--order`, ...): typer reads
    the signature, so a method file's new parameter becomes a flag with no edit here. The command receives them as
    keyword arguments (None: not given)."""
    import inspect

    signature = inspect.signature(fn)
    fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    added, seen = [], set()
    for method in all_methods().values():
        for p in method.params:
            if p.field in seen:
                continue
            seen.add(p.field)
            limits = {"min": p.minimum} if p.type is int and p.minimum is not None and not p.choices else {}
            option = typer.Option(None, p.flag, help=_param_help(p.field), **limits)
            added.append(inspect.Parameter(p.field, inspect.Parameter.KEYWORD_ONLY, default=option,
                                           annotation=p.type | None))
    fn.__signature__ = signature.replace(parameters=fixed + added)
    fn.__annotations__ = {**fn.__annotations__, **{p.name: p.annotation for p in added}}
    return fn


@app.command()
@handled
@_with_method_options
def convert(
    prompt_files: list[Path] = typer.Argument(..., help="UTF-8 text files: the demonstrations to fold into the weights "
                                              "(several with --out-dir: the model is loaded once)."),
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint folder, built-in name (demo-linear), or hub id; "
                              "a local path wins over a built-in name."),
    out_path: str = typer.Option(None, "--out", "-o", help="Patch file to write (.safetensors), for one prompt file."),
    out_dir: Path = typer.Option(None, "--out-dir", help="Folder for one <prompt file stem>.safetensors per prompt file "
                                 "(created if missing); a patch already there with the same provenance, whose data "
                                 "verifies, is kept, so a rerun resumes."),
    force: bool = typer.Option(False, "--force", help="Replace an iclca patch of other provenance already at the "
                               "output (never a file iclca did not write)."),
    method: Method = typer.Option(None, "--method", help=_method_help()),
    base_patch: Path = typer.Option(None, "--base-patch", help="Convert on top of this patch (stacking)."),
    dtype: DType = typer.Option(DType.float32, "--dtype", help="Dtype to run the prompt in; the patch stores each "
                                "tensor as the model computes it (auto: the checkpoint's own dtype)."),
    device: str = _device_option(),
    device_map: str = _device_map_option(),
    max_memory: str = _max_memory_option(),
    chunk_size: int = typer.Option(512, "--chunk-size", min=1, help="Prompt tokens per forward pass."),
    chat: bool = _chat_option(),
    max_input_mib: int = _max_input_option(),
    allow_pickle: bool = _allow_pickle_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    **method_params,
):
    """Run each PROMPT_FILE through MODEL once and write its weight patch."""
    from . import api
    from .methods import build, check_parameters

    _quiet_transformers()
    if method is None:  # the model's default, decided once it loads: it takes no parameter
        check_parameters(None, **method_params)
    chosen = build(method.value, **method_params) if method else None
    with _progress("converting" if out_dir is None else "prompts") as progress:
        report = api.convert(prompt_files, model, out_path, out_dir, chosen, base_patch, dtype.value, device, device_map,
                             max_memory, chunk_size, chat, force, max_input_mib << 20, allow_pickle, progress)
    if out_dir is None:  # one prompt, one patch: its errors were the command's
        _emit(as_json, report, "iclca convert")
        return
    if as_json:
        _emit(True, report, "")
    else:
        table = Table(title=_cell(f"iclca convert -> {out_dir}"))
        columns = ("prompt", "patch", "status", "method", "prompt_tokens", "patch_bytes")
        for column in columns:
            table.add_column(column, overflow="fold")
        for r in report["patches"]:
            table.add_row(*(_cell(r[c]) for c in columns))
        for f in report["errors"]:
            table.add_row(_cell(f["prompt"]), "", "failed", "", "", "")
        out.print(table)
    failed = report["errors"]
    if failed:
        listed = "; ".join(f"{f['prompt']}: {f['error']}" for f in failed)
        hints = "; ".join(dict.fromkeys(f["hint"] for f in failed))
        raise IclcaError(f"{len(failed)} of {len(failed) + len(report['patches'])} prompt files failed ({listed})",
                         f"{hints}; then rerun the same command: the patches already written are kept")


@app.command()
@handled
def merge(
    model: str = typer.Option(..., "--model", "-m", help="The base checkpoint the patch was made for."),
    patch_path: Path = typer.Option(..., "--patch", "-p", help="Patch file from `iclca convert`."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write the merged checkpoint to."),
    force: bool = _force_folder_option(),
    allow_pickle: bool = _allow_pickle_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Fold a patch into a new checkpoint folder that loads with Hugging Face tooling."""
    from . import api

    _quiet_transformers()
    _emit(as_json, api.merge(model, patch_path, out_dir, force, allow_pickle), "iclca merge")


@app.command("export-peft")
@handled
def export_peft(
    model: str = typer.Option(..., "--model", "-m", help="The checkpoint the patch was made for."),
    patch_path: Path = typer.Option(..., "--patch", "-p", help="A prefix or lora patch from `iclca convert`."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write the PEFT adapter to."),
    force: bool = _force_folder_option(),
    allow_pickle: bool = _allow_pickle_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Write a prefix patch as a PEFT prefix-tuning adapter, a lora patch as a PEFT LoRA adapter (load either with
    PeftModel.from_pretrained)."""
    from . import api

    _quiet_transformers()
    _emit(as_json, api.export_peft(model, patch_path, out_dir, force, allow_pickle), "iclca export-peft")


@app.command("eval")
@handled
def eval_(
    model: str = typer.Option(..., "--model", "-m", help="The base checkpoint."),
    patch_path: Path = typer.Option(None, "--patch", "-p", help="Patch file to evaluate."),
    merged: str = typer.Option(None, "--merged", help="Merged checkpoint folder to evaluate."),
    prompt_file: Path = typer.Option(..., "--prompt", help="The prompt the patch was made from."),
    queries_file: Path = typer.Option(..., "--queries", help=".jsonl {input, target} lines, or .txt one query a line."),
    dtype: DType = typer.Option(DType.float32, "--dtype", help="Dtype to run the models in (auto: the checkpoint's "
                                "own); bfloat16 and float16 also run the prompted model in float32, the yardstick."),
    device: str = _device_option(),
    device_map: str = _device_map_option(),
    max_memory: str = _max_memory_option(),
    max_abs_logit_diff: float = typer.Option(None, "--max-abs-logit-diff", help="Exit 1 if the max |Δlogit| exceeds this."),
    min_top1_agreement: float = typer.Option(None, "--min-top1-agreement", help="Exit 1 if top-1 agreement is below this."),
    chat: bool = _chat_option(),
    max_input_mib: int = _max_input_option(),
    show: int = typer.Option(3, "--show", min=0, help="Answers to show for the first N queries (table view; --json "
                             "has them all)."),
    one_pass: bool = typer.Option(False, "--one-pass", help="Run the prompted model over prompt + query in one pass "
                                  "per query (slower), not on from a copy of the prompt's cache: the strictest "
                                  "reference, which rounds differently in reduced precision."),
    allow_pickle: bool = _allow_pickle_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Compare patched (or merged), prompted and plain outputs: fidelity, accuracy, speed, size."""
    from . import api
    from .evaluate import missed_gates

    _quiet_transformers()
    for flag, threshold in (("--max-abs-logit-diff", max_abs_logit_diff), ("--min-top1-agreement", min_top1_agreement)):
        if threshold is not None and not math.isfinite(threshold):
            raise IclcaError(f"{flag} {threshold} is not a finite number", f"pass a number, e.g. {flag} 1e-4")
    if min_top1_agreement is not None and not 0 <= min_top1_agreement <= 1:
        raise IclcaError(f"--min-top1-agreement {min_top1_agreement:g} is not a fraction", "pass a number from 0 to 1")
    if max_abs_logit_diff is not None and max_abs_logit_diff < 0:
        raise IclcaError(f"--max-abs-logit-diff {max_abs_logit_diff:g} is negative", "pass a bound of 0 or more")
    with _progress("evaluating") as progress:
        report = api.evaluate(model, prompt_file, queries_file, patch_path, merged, dtype.value, device, device_map,
                              max_memory, chat, one_pass, max_input_mib << 20, allow_pickle, progress)
    if as_json:
        _emit(True, report, "")
    else:
        _emit(False, {k: v for k, v in report.items() if k != "answers"}, "iclca eval")
        _show_answers(report["answers"][:show])
    nonfinite = report["nonfinite_positions"]
    if nonfinite["patched"] or nonfinite["prompted"]:
        err.print(f"warning: NaN or Inf logits at {nonfinite['patched']} patched and {nonfinite['prompted']} prompted "
                  "positions", markup=False, highlight=False)
    missed = missed_gates(report, max_abs_logit_diff, min_top1_agreement)
    if missed:
        err.print(f"check failed: {'; '.join(missed)}", markup=False)
        raise typer.Exit(1)


def _show_answers(answers: list[dict]) -> None:
    """The greedy answers of the prompted, patched and plain models to a few queries, as a table."""
    if not answers:
        return
    columns = ["input", *(["target"] if any("target" in a for a in answers) else []), "prompted", "patched", "base"]
    table = Table(title="answers (greedy)")
    for column in columns:
        table.add_column(column, overflow="fold")
    for a in answers:
        table.add_row(*(_cell(a.get(c, ""), 200) for c in columns))
    out.print(table)


@app.command()
@handled
def generate(
    queries: list[str] = typer.Argument(None, help="Queries to answer (or --queries FILE)."),
    model: str = typer.Option(..., "--model", "-m", help="The base checkpoint."),
    patch_path: Path = typer.Option(None, "--patch", "-p", help="Patch file to generate with."),
    merged: Path = typer.Option(None, "--merged", help="Merged checkpoint folder to generate with."),
    queries_file: Path = typer.Option(None, "--queries", help=".jsonl {input} lines, or .txt one query a line."),
    prompt_file: Path = typer.Option(None, "--prompt", help="The prompt the patch was made from: --compare runs the "
                                     "prompted model on it; with --chat, each query is rendered after it."),
    compare: bool = typer.Option(False, "--compare", help="Also show the prompted model (needs --prompt) and the plain "
                                 "model, side by side."),
    chat: bool = typer.Option(False, "--chat", help="Each query is a user turn after the baked conversation."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy (the default); else sampling."),
    top_p: float = typer.Option(1.0, "--top-p", help="Sampling: the smallest set of tokens with this much probability."),
    seed: int = typer.Option(0, "--seed", help="Sampling: the random seed."),
    dtype: DType = typer.Option(DType.float32, "--dtype", help="Dtype to run the models in (auto: the checkpoint's own)."),
    device: str = _device_option(),
    device_map: str = _device_map_option(),
    max_memory: str = _max_memory_option(),
    max_input_mib: int = _max_input_option(),
    allow_pickle: bool = _allow_pickle_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (nothing streamed)."),
):
    """Print what the patched (or merged) model answers to each query, as it is produced."""
    from . import api
    from .generation import Sampling
    from .inputs import read_queries

    _quiet_transformers()
    asked = list(queries or [])
    if queries_file is not None:
        asked += [q.input for q in read_queries(queries_file, max_input_mib << 20)]
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    shown = {"query": -1}

    def on_text(n: int, who: str, piece: str) -> None:
        if shown["query"] != n:
            out.print(("\n" if n else "") + f"> {printable(asked[n], 400)}", markup=False, highlight=False)
            shown["query"], shown["who"] = n, None
        if shown.get("who") != who:
            if shown.get("who") is not None:
                sys.stdout.write("\n")
            if compare:
                sys.stdout.write(f"{who + ':':10}")
            shown["who"] = who
        sys.stdout.write(_shown_text(piece))
        sys.stdout.flush()

    report = api.generate(model, asked, patch_path, merged, prompt_file, compare, chat, sampling, dtype.value, device,
                          device_map, max_memory, max_input_mib << 20, allow_pickle, None if as_json else on_text)
    if as_json:
        _emit(True, report, "")
    elif shown["query"] >= 0:
        sys.stdout.write("\n")


def _shown_text(text: str) -> str:
    """Generated text as it prints: its lines kept, other control characters escaped (errors.printable)."""
    return "\n".join(printable(line) for line in text.split("\n"))


@app.command()
@handled
def inspect(
    patch_path: Path = typer.Argument(..., help="Patch file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Show a patch's metadata (provenance, fingerprint) and tensors."""
    from . import api

    _emit(as_json, api.inspect(patch_path), f"iclca inspect {patch_path}")


if __name__ == "__main__":
    app()
