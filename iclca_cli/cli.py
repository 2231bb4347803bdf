"""`iclca` command line: parse, call the library, render. Results on stdout, the rest on stderr.

Exit codes: 0 ok; 1 an eval threshold given by the user was missed; 2 bad usage or bad input.
"""

from __future__ import annotations

import functools
import json
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import IclcaError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn a demonstration prompt (in-context examples) into a weight patch, merge it, and prove it right.",
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
_state = {"debug": False}


class Method(str, Enum):
    exact = "exact"
    prefix = "prefix"
    taylor = "taylor"
    compressed = "compressed"


class DType(str, Enum):
    float32 = "float32"
    float64 = "float64"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


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
            err.print(f"error: {e.message}", markup=False, highlight=False)
            err.print(f"hint: {e.hint}", markup=False, highlight=False)
            raise typer.Exit(2) from None
        except Exception as e:  # not foreseen: still one line, and --debug shows where
            if _state["debug"]:
                raise
            first = str(e).splitlines()[0][:300] if str(e) else ""
            err.print(f"error: {type(e).__name__}: {first}", markup=False, highlight=False)
            err.print("hint: rerun with --debug for a traceback, and report it if the input looks right", markup=False)
            raise typer.Exit(2) from None

    return wrapper


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@contextmanager
def _progress(description: str):
    """A Rich progress bar on a terminal's stderr; a no-op callback elsewhere. Yields update(done, total)."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _emit(as_json: bool, obj: dict, table_title: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
        return
    table = Table(title=table_title, show_header=False)
    table.add_column(overflow="fold")
    table.add_column(overflow="fold")
    for key, value in obj.items():
        if isinstance(value, dict):
            for k, v in value.items():
                table.add_row(f"{key}.{k}", _fmt(v))
        else:
            table.add_row(key, _fmt(value))
    out.print(table)


def _allow_pickle_option():
    return typer.Option(False, "--allow-pickle", help="Also load pickled .bin weights (only from a source you trust).")


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


@app.command()
@handled
def convert(
    prompt_file: Path = typer.Argument(..., help="UTF-8 text: the demonstrations to fold into the weights."),
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint folder, hub id, or built-in name (demo-linear)."),
    out_path: Path = typer.Option(..., "--out", "-o", help="Patch file to write (.safetensors)."),
    method: Method = typer.Option(
        None, "--method", help="exact (linear-attention layers, exact), prefix (softmax attention, exact), compressed "
        "(softmax, constant size, approximate), taylor (softmax, constant size, approximate). Default: exact for "
        "linear-attention models, else prefix."),
    order: int = typer.Option(2, "--order", min=1, max=2, help="Taylor order (method taylor)."),
    budget: int = typer.Option(0, "--budget", min=0, help="Entries per layer and key/value head (method compressed)."),
    base_patch: Path = typer.Option(None, "--base-patch", help="Convert on top of this patch (stacking)."),
    dtype: DType = typer.Option(DType.float32, "--dtype", help="Dtype to run the prompt in and store the patch."),
    device: Device = typer.Option(Device.cpu, "--device", help="Where to run."),
    chunk_size: int = typer.Option(512, "--chunk-size", min=1, help="Prompt tokens per forward pass."),
    allow_pickle: bool = _allow_pickle_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Run PROMPT_FILE through MODEL once and write its weight patch."""
    from .convert import convert_prompt, sha256_text
    from .inputs import encode_prompt, read_prompt
    from .loading import load_model
    from .patch import load_patch, save_patch

    _quiet_transformers()
    text = read_prompt(prompt_file)
    parent = load_patch(base_patch) if base_patch is not None else None
    if not out_path.parent.is_dir():
        raise IclcaError(f"output folder does not exist: {out_path.parent}", "create it first, or choose another --out")
    m, tokenizer = load_model(model, dtype.value, device.value, allow_pickle)
    ids = encode_prompt(tokenizer, text)
    with _progress("converting") as progress:
        patch = convert_prompt(m, ids, sha256_text(text), method and method.value, order, parent, chunk_size, progress,
                               budget)
    file_bytes = save_patch(patch, out_path)
    _emit(as_json, {
        "patch": str(out_path),
        "method": patch.method,
        "prompt_tokens": patch.prompt_tokens,
        "position_offset": patch.position_offset,
        "tensors": len(patch.tensors),
        "patch_bytes": file_bytes,
        "base_fingerprint": patch.base_fingerprint,
    }, "iclca convert")


@app.command()
@handled
def merge(
    model: str = typer.Option(..., "--model", "-m", help="The base checkpoint the patch was made for."),
    patch_path: Path = typer.Option(..., "--patch", "-p", help="Patch file from `iclca convert`."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write the merged checkpoint to."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    allow_pickle: bool = _allow_pickle_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Fold a patch into a new checkpoint folder that loads with Hugging Face tooling."""
    from .fingerprint import model_fingerprint
    from .loading import load_model
    from .merge import check_output_folder, merge_patch
    from .patch import check_patch_fits, load_patch

    _quiet_transformers()
    check_output_folder(out_dir.absolute(), force)
    patch = load_patch(patch_path)
    m, tokenizer = load_model(model, patch.dtype, allow_pickle=allow_pickle)  # the merged checkpoint is stored in the patch's dtype
    check_patch_fits(patch, m, model_fingerprint(m))
    folder = merge_patch(m, tokenizer, patch, out_dir, force)
    _emit(as_json, {
        "merged": str(folder),
        "method": patch.method,
        "prompt_tokens": patch.prompt_tokens,
        "position_offset": patch.position_offset,
        "base_fingerprint": patch.base_fingerprint,
    }, "iclca merge")


@app.command("export-peft")
@handled
def export_peft(
    model: str = typer.Option(..., "--model", "-m", help="The checkpoint the prefix patch was made for."),
    patch_path: Path = typer.Option(..., "--patch", "-p", help="A prefix patch from `iclca convert --method prefix`."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write the PEFT adapter to."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    allow_pickle: bool = _allow_pickle_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Write a prefix patch as a PEFT prefix-tuning adapter (load it with PeftModel.from_pretrained)."""
    from .fingerprint import model_fingerprint
    from .loading import load_model, resolve_model
    from .patch import check_patch_fits, load_patch
    from .peft_export import write_peft_prefix_adapter

    _quiet_transformers()
    patch = load_patch(patch_path)
    m, _ = load_model(model, patch.dtype, allow_pickle=allow_pickle)
    check_patch_fits(patch, m, model_fingerprint(m))
    folder = write_peft_prefix_adapter(m, patch, resolve_model(model, allow_pickle), out_dir, force)
    _emit(as_json, {"adapter": str(folder), "num_virtual_tokens": patch.prompt_tokens}, "iclca export-peft")


@app.command("eval")
@handled
def eval_(
    model: str = typer.Option(..., "--model", "-m", help="The base checkpoint."),
    patch_path: Path = typer.Option(None, "--patch", "-p", help="Patch file to evaluate."),
    merged: str = typer.Option(None, "--merged", help="Merged checkpoint folder to evaluate."),
    prompt_file: Path = typer.Option(..., "--prompt", help="The prompt the patch was made from."),
    queries_file: Path = typer.Option(..., "--queries", help=".jsonl {input, target} lines, or .txt one query a line."),
    dtype: DType = typer.Option(DType.float32, "--dtype", help="Dtype to run the models in."),
    device: Device = typer.Option(Device.cpu, "--device", help="Where to run."),
    max_abs_logit_diff: float = typer.Option(None, "--max-abs-logit-diff", help="Exit 1 if the max |Δlogit| exceeds this."),
    min_top1_agreement: float = typer.Option(None, "--min-top1-agreement", help="Exit 1 if top-1 agreement is below this."),
    allow_pickle: bool = _allow_pickle_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Compare patched (or merged), prompted and plain outputs: fidelity, accuracy, speed, size."""

    from .evaluate import evaluate
    from .fingerprint import model_fingerprint
    from .inputs import read_prompt, read_queries
    from .loading import load_model
    from .merge import load_merged
    from .patch import DTYPES, check_patch_fits, load_patch, patched_copy

    _quiet_transformers()
    if (patch_path is None) == (merged is None):
        raise IclcaError("pass exactly one of --patch and --merged", "--patch PATCH evaluates a patch file, --merged DIR a merged folder")
    prompt = read_prompt(prompt_file)
    queries = read_queries(queries_file)
    patch = load_patch(patch_path) if patch_path is not None else None
    base, tokenizer = load_model(model, dtype.value, device.value, allow_pickle)
    fingerprint = model_fingerprint(base)
    if patch is not None:
        check_patch_fits(patch, base, fingerprint)
        patched = patched_copy(base, patch)
        method, nbytes, element = patch.method, patch.nbytes, DTYPES[patch.dtype].itemsize
    else:
        patched, method, nbytes, element = load_merged(merged, fingerprint, dtype.value, device.value)
    with _progress("evaluating") as progress:
        report = evaluate(base, patched, tokenizer, prompt, queries, method, nbytes, element, progress)
    _emit(as_json, report, "iclca eval")
    missed = []
    if max_abs_logit_diff is not None and report["max_abs_logit_diff"] > max_abs_logit_diff:
        missed.append(f"max_abs_logit_diff {report['max_abs_logit_diff']:.3g} > {max_abs_logit_diff:g}")
    if min_top1_agreement is not None and report["top1_agreement"] < min_top1_agreement:
        missed.append(f"top1_agreement {report['top1_agreement']:.3g} < {min_top1_agreement:g}")
    if missed:
        err.print(f"check failed: {'; '.join(missed)}", markup=False)
        raise typer.Exit(1)


@app.command()
@handled
def inspect(
    patch_path: Path = typer.Argument(..., help="Patch file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Show a patch's metadata (provenance, fingerprint) and tensors."""
    from .patch import load_patch

    patch = load_patch(patch_path)
    info = dict(patch.metadata())
    info["patch_bytes"] = patch.nbytes
    info["patch_bytes_by_part"] = patch.bytes_by_part()
    info["tensors"] = {name: [list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in sorted(patch.tensors.items())}
    _emit(as_json, info, f"iclca inspect {patch_path}")


if __name__ == "__main__":
    app()
