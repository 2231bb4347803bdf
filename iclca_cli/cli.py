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
    evict = "evict"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    float64 = "float64"
    bfloat16 = "bfloat16"
    float16 = "float16"


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


def _device_option():
    return typer.Option("cpu", "--device", help="Where to run: cpu, cuda, cuda:N or mps.")


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


@app.command()
@handled
def convert(
    prompt_files: list[Path] = typer.Argument(..., help="UTF-8 text files: the demonstrations to fold into the weights "
                                              "(several with --out-dir: the model is loaded once)."),
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint folder, hub id, or built-in name (demo-linear)."),
    out_path: Path = typer.Option(None, "--out", "-o", help="Patch file to write (.safetensors), for one prompt file."),
    out_dir: Path = typer.Option(None, "--out-dir", help="Folder for one <prompt file stem>.safetensors per prompt file "
                                 "(created if missing); a patch already there with the same provenance is kept, so a "
                                 "rerun resumes."),
    method: Method = typer.Option(
        None, "--method", help="exact (linear-attention layers, exact), prefix (softmax attention, exact), compressed "
        "(softmax, constant size, approximate, fitted), evict (softmax, constant size, the most attended entries kept: "
        "a baseline), taylor (softmax, constant size, approximate). Default: exact for "
        "linear-attention models, else prefix."),
    order: int = typer.Option(2, "--order", min=1, max=2, help="Taylor order (method taylor)."),
    budget: int = typer.Option(0, "--budget", min=0, help="Entries per layer and key/value head (methods compressed, "
                               "evict; compressed: on average, see --split)."),
    reference: str = typer.Option("repeat", "--reference", help="compressed: the queries a summary is fitted to: the "
                                  "prompt's own (own), or also those of a repeat of the prompt read after it (repeat)."),
    keys: str = typer.Option("attention", "--keys", help="compressed: a summary's keys: the prompt keys that receive "
                             "most attention (attention), or k-means centroids (kmeans)."),
    split: str = typer.Option("heads", "--split", help="compressed: the same budget for every head (uniform), or the "
                              "total split by fitted error across layers (layers) or across heads (heads)."),
    base_patch: Path = typer.Option(None, "--base-patch", help="Convert on top of this patch (stacking)."),
    dtype: DType = typer.Option(DType.float32, "--dtype", help="Dtype to run the prompt in; the patch stores each "
                                "tensor as the model computes it (auto: the checkpoint's own dtype)."),
    device: str = _device_option(),
    device_map: str = _device_map_option(),
    max_memory: str = _max_memory_option(),
    chunk_size: int = typer.Option(512, "--chunk-size", min=1, help="Prompt tokens per forward pass."),
    chat: bool = _chat_option(),
    allow_pickle: bool = _allow_pickle_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Run each PROMPT_FILE through MODEL once and write its weight patch."""
    from .loading import load_fingerprinted
    from .patch import load_patch

    _quiet_transformers()
    targets = _convert_targets(prompt_files, out_path, out_dir)
    parent = load_patch(base_patch) if base_patch is not None else None
    m, tokenizer, fingerprint = load_fingerprinted(model, dtype.value, device, allow_pickle, device_map, max_memory)
    settings = dict(method=method and method.value, order=order, budget=budget, base_patch=parent,
                    options=summary_options(reference, keys, split),
                    chunk_size=chunk_size, fingerprint=fingerprint, chat=chat)
    if out_path is not None:  # one prompt, one patch: its errors are the command's
        with _progress("converting") as progress:
            row = _convert_one(m, tokenizer, prompt_files[0], out_path, progress=progress, **settings)
        row.pop("status")
        _emit(as_json, {"patch": str(out_path), **{k: v for k, v in row.items() if k != "prompt"}}, "iclca convert")
        return
    rows, failed = [], []
    with _progress("prompts") as progress:
        for n, (prompt_file, patch_file) in enumerate(targets, start=1):
            try:
                rows.append(_convert_one(m, tokenizer, prompt_file, patch_file, **settings))
            except IclcaError as e:  # reported at the end; the other prompts still convert
                failed.append({"prompt": str(prompt_file), "error": e.message})
            if progress is not None:
                progress(n, len(targets))
    summary = {"out_dir": str(out_dir), "converted": sum(r["status"] == "converted" for r in rows),
               "skipped": sum(r["status"] == "skipped" for r in rows), "failed": len(failed),
               "base_fingerprint": fingerprint, "patches": rows, "errors": failed}
    if as_json:
        _emit(True, summary, "")
    else:
        table = Table(title=f"iclca convert -> {out_dir}")
        for column in ("prompt", "patch", "status", "method", "prompt_tokens", "patch_bytes"):
            table.add_column(column, overflow="fold")
        for r in rows:
            table.add_row(*(str(r[c]) for c in ("prompt", "patch", "status", "method", "prompt_tokens", "patch_bytes")))
        for f in failed:
            table.add_row(f["prompt"], "", "failed", "", "", "")
        out.print(table)
    if failed:
        listed = "; ".join(f"{f['prompt']}: {f['error']}" for f in failed)
        raise IclcaError(f"{len(failed)} of {len(targets)} prompt files failed ({listed})",
                         "fix them and rerun the same command: the patches already written are kept")


def _convert_targets(prompt_files: list[Path], out_path: Path | None, out_dir: Path | None) -> list[tuple[Path, Path]]:
    """(prompt file, patch file) pairs, or an IclcaError for outputs that are missing, ambiguous or collide."""
    if (out_path is None) == (out_dir is None):
        raise IclcaError("pass exactly one of --out and --out-dir",
                         "--out PATCH for one prompt file, --out-dir DIR for one patch per prompt file")
    if out_path is not None:
        if len(prompt_files) > 1:
            raise IclcaError(f"--out names one patch, but {len(prompt_files)} prompt files were given",
                             "use --out-dir DIR to write one patch per prompt file")
        if not out_path.parent.is_dir():
            raise IclcaError(f"output folder does not exist: {out_path.parent}", "create it first, or choose another --out")
        return [(prompt_files[0], out_path)]
    if out_dir.exists() and not out_dir.is_dir():
        raise IclcaError(f"--out-dir {out_dir} is a file", "pass a folder (it is created if missing)")
    targets, seen = [], {}
    for p in prompt_files:
        if p.stem in seen:
            raise IclcaError(f"prompt files {seen[p.stem]} and {p} would both write {p.stem}.safetensors",
                             "rename one of them, or convert them into different --out-dir folders")
        seen[p.stem] = p
        targets.append((p, out_dir / f"{p.stem}.safetensors"))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IclcaError(f"cannot create --out-dir {out_dir}: {e.strerror}", "choose a writable folder") from e
    return targets


def summary_options(reference: str, keys: str, split: str):
    """compressed's options from the command line (--reference sets Options.queries), or a one-line error."""
    from .ops.compress import Options

    options = Options(queries=reference, keys=keys, split=split)
    for name, value in options.unknown().items():
        flag = "reference" if name == "queries" else name
        raise IclcaError(f"--{flag} {value!r} is not one of {', '.join(Options.CHOICES[name])}",
                         f"pass --{flag} {getattr(Options(), name)} (the default)")
    return options


def _convert_one(m, tokenizer, prompt_file: Path, out: Path, method, order, budget, base_patch, chunk_size, fingerprint,
                 options=None, chat=False, progress=None) -> dict:
    """Convert one prompt file into `out`, or keep `out` if it already holds this patch; one row of the report."""
    from . import chat as chats
    from .convert import describe_patch, fill_patch, sha256_text
    from .inputs import encode_prompt, read_prompt
    from .patch import read_header, save_patch, shared_copy

    if chat:  # the rendered conversation is the prompt (and what its sha256 is of)
        text, ids = chats.prompt_ids(tokenizer, chats.read_messages(prompt_file))
    else:
        text = read_prompt(prompt_file)
        ids = encode_prompt(tokenizer, text)
    header = describe_patch(m, ids, sha256_text(text), method, order, base_patch, budget, fingerprint, options)
    existing = read_header(out)
    if existing is not None and existing[0] == header.metadata():
        status, file_bytes, tensors = "skipped", out.stat().st_size, existing[1]
    else:  # a base patch is applied in place: convert on a copy, so the next prompt starts from the plain model
        model = shared_copy(m) if base_patch is not None else m
        patch = fill_patch(model, header, ids, base_patch, chunk_size, progress)
        status, file_bytes, tensors = "converted", save_patch(patch, out), len(patch.tensors)
    return {"prompt": str(prompt_file), "patch": str(out), "status": status, "method": header.method,
            "prompt_tokens": header.prompt_tokens, "position_offset": header.position_offset, "tensors": tensors,
            "patch_bytes": file_bytes, "base_fingerprint": header.base_fingerprint}


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
    from .loading import load_fingerprinted
    from .merge import check_output_folder, merge_patch
    from .patch import check_patch_fits, load_patch

    _quiet_transformers()
    check_output_folder(out_dir.absolute(), force)
    patch = load_patch(patch_path)
    # the merged checkpoint is stored in the patch's dtype
    m, tokenizer, fingerprint = load_fingerprinted(model, patch.dtype, allow_pickle=allow_pickle)
    check_patch_fits(patch, m, fingerprint)
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
    from .loading import load_fingerprinted, resolve_model
    from .patch import check_patch_fits, load_patch
    from .peft_export import write_peft_prefix_adapter

    _quiet_transformers()
    patch = load_patch(patch_path)
    m, _, fingerprint = load_fingerprinted(model, patch.dtype, allow_pickle=allow_pickle)
    check_patch_fits(patch, m, fingerprint)
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
    dtype: DType = typer.Option(DType.float32, "--dtype", help="Dtype to run the models in (auto: the checkpoint's "
                                "own); bfloat16 and float16 also run the prompted model in float32, the yardstick."),
    device: str = _device_option(),
    device_map: str = _device_map_option(),
    max_memory: str = _max_memory_option(),
    max_abs_logit_diff: float = typer.Option(None, "--max-abs-logit-diff", help="Exit 1 if the max |Δlogit| exceeds this."),
    min_top1_agreement: float = typer.Option(None, "--min-top1-agreement", help="Exit 1 if top-1 agreement is below this."),
    chat: bool = _chat_option(),
    one_pass: bool = typer.Option(False, "--one-pass", help="Run the prompted model over prompt + query in one pass "
                                  "per query (slower), not on from a copy of the prompt's cache: the strictest "
                                  "reference, which rounds differently in reduced precision."),
    allow_pickle: bool = _allow_pickle_option(),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Compare patched (or merged), prompted and plain outputs: fidelity, accuracy, speed, size."""

    from .evaluate import evaluate
    from .chat import read_messages
    from .inputs import read_prompt, read_queries
    from .loading import load_fingerprinted, load_model
    from .merge import load_merged
    from .patch import DTYPES, check_patch_fits, load_patch, patched_copy

    _quiet_transformers()
    if (patch_path is None) == (merged is None):
        raise IclcaError("pass exactly one of --patch and --merged", "--patch PATCH evaluates a patch file, --merged DIR a merged folder")
    messages = read_messages(prompt_file) if chat else None
    prompt = None if chat else read_prompt(prompt_file)
    queries = read_queries(queries_file)
    patch = load_patch(patch_path) if patch_path is not None else None
    placement = (device, allow_pickle, device_map, max_memory)
    base, tokenizer, fingerprint = load_fingerprinted(model, dtype.value, *placement)
    reduced = next(base.parameters()).dtype in (DTYPES["bfloat16"], DTYPES["float16"])
    float32_base = load_model(model, "float32", *placement)[0] if reduced else None  # the yardstick
    if patch is not None:
        check_patch_fits(patch, base, fingerprint)
        patched = patched_copy(base, patch)
        method, nbytes, element = patch.method, patch.nbytes, DTYPES[patch.dtype].itemsize
    else:
        patched, method, nbytes, element = load_merged(merged, fingerprint, dtype.value, device, device_map, max_memory)
    with _progress("evaluating") as progress:
        report = evaluate(base, patched, tokenizer, prompt, queries, method, nbytes, element, progress,
                          float32_base=float32_base, chat_messages=messages, reuse_cache=False if one_pass else None)
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
