"""The Python API: one function per command, doing what the command does (paths in, files written, the command's
report out as a dict), so that batch resume, the float32 yardstick and the rest are the library's, not the command
line's. docs/python-api.md shows them; cli.py only parses, calls one of them and renders.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from . import chat as chats
from .errors import IclcaError
from .generation import Sampling
from .inputs import MAX_INPUT_BYTES, check_input_file, encode_prompt, read_prompt, read_queries
from .loading import load_fingerprinted, load_model, resolve_model
from .methods import Method
from .outputs import check_apart, check_folder_target, check_patch_target

Progress = Callable[[int, int], None]  # (done, total)


def convert(prompt_files: list[str | Path], model: str, out: str | Path | None = None, out_dir: str | Path | None = None,
            method: Method | str | None = None, base_patch: str | Path | None = None, dtype: str = "float32",
            device: str | None = None, device_map: str | None = None, max_memory: str | None = None,
            chunk_size: int = 512, chat: bool = False, force: bool = False, max_input_bytes: int = MAX_INPUT_BYTES,
            allow_pickle: bool = False, progress: Progress | None = None) -> dict:
    """Convert each prompt file into a patch file: one prompt to `out`, or several into `out_dir` (one model load;
    `<stem>.safetensors` each). An identical patch already at a target (its data verified) is kept; one of other
    provenance is replaced only with `force`; no output may touch an input. `method`: a Method (`build("compressed",
    budget=32)`), a name, or None (the model's default). progress(done, total): tokens of the one prompt, or prompts.

    Returns the command's report: for `out`, the patch's row (patch, method, prompt_tokens, position_offset,
    tensors, patch_bytes: the tensors' bytes, file_bytes: the file's, base_fingerprint); for `out_dir`, {out_dir, converted, skipped, failed, base_fingerprint,
    patches: [rows with prompt and status], errors: [{prompt, error, hint}]} (a failing prompt does not stop the
    others: the caller decides what its failures mean)."""
    from .patch import load_patch

    prompt_files = [Path(p) for p in prompt_files]
    device = _device(device, device_map)
    inputs = [("model folder", model_folder(model, allow_pickle)), ("base patch", base_patch),
              *(("prompt file", p) for p in prompt_files)]
    targets = _convert_targets(prompt_files, out, Path(out_dir) if out_dir is not None else None, inputs)
    parent = load_patch(base_patch) if base_patch is not None else None
    m, tokenizer, fingerprint = load_fingerprinted(model, dtype, device, allow_pickle, device_map, max_memory)
    settings = dict(method=method, base_patch=parent, chunk_size=chunk_size, fingerprint=fingerprint, chat=chat,
                    force=force, max_bytes=max_input_bytes)
    if out_dir is None:
        row = _convert_one(m, tokenizer, *targets[0], progress=progress, **settings)
        row.pop("status"), row.pop("prompt")
        return row
    rows, failed = [], []
    for n, (prompt_file, patch_file) in enumerate(targets, start=1):
        try:
            rows.append(_convert_one(m, tokenizer, prompt_file, patch_file, **settings))
        except IclcaError as e:  # reported at the end; the other prompts still convert
            failed.append({"prompt": str(prompt_file), "error": e.message, "hint": e.hint})
        except MemoryError:
            failed.append({"prompt": str(prompt_file), "error": "out of memory",
                           "hint": "convert it alone, or on a machine with more memory"})
        if progress is not None:
            progress(n, len(targets))
    return {"out_dir": str(out_dir), "converted": sum(r["status"] == "converted" for r in rows),
            "skipped": sum(r["status"] == "skipped" for r in rows), "failed": len(failed),
            "base_fingerprint": fingerprint.full, "patches": rows, "errors": failed}


def merge(model: str, patch: str | Path, out: str | Path, force: bool = False, allow_pickle: bool = False) -> dict:
    """Fold a patch into a new checkpoint folder at `out` (loaded in the patch's dtype); the command's report."""
    from .merge import merge_patch

    loaded, m, tokenizer = _patch_and_model_for_folder(model, patch, out, force, allow_pickle)
    folder = merge_patch(m, tokenizer, loaded, out, force)
    return {"merged": str(folder), "method": loaded.method.name, "prompt_tokens": loaded.prompt_tokens,
            "position_offset": loaded.position_offset, "base_fingerprint": loaded.base_fingerprint}


def export_peft(model: str, patch: str | Path, out: str | Path, force: bool = False, allow_pickle: bool = False) -> dict:
    """Write a prefix patch as a PEFT prefix-tuning adapter folder at `out`, a lora patch as a PEFT LoRA adapter; the
    command's report: adapter, adapter_type, and num_virtual_tokens (prefix) or rank and target_modules (lora)."""
    from .peft_export import write_peft_adapter

    loaded, m, _ = _patch_and_model_for_folder(model, patch, out, force, allow_pickle)
    folder, described = write_peft_adapter(m, loaded, resolve_model(model, allow_pickle), out, force)
    return {"adapter": str(folder), **described}


def _patch_and_model_for_folder(model: str, patch: str | Path, out: str | Path, force: bool, allow_pickle: bool):
    """(patch, model in the patch's dtype, tokenizer) for writing a folder at `out`, after refusing an `out` that
    touches an input or holds what iclca did not write, and a patch that does not fit the model."""
    from .patch import check_patch_fits, load_patch

    check_apart(Path(out), [("model folder", model_folder(model, allow_pickle)), ("patch", patch)])
    check_folder_target(Path(out).absolute(), force)
    loaded = load_patch(patch)
    m, tokenizer, fingerprint = load_fingerprinted(model, loaded.dtype, allow_pickle=allow_pickle)
    check_patch_fits(loaded, m, fingerprint)
    return loaded, m, tokenizer


def evaluate(model: str, prompt: str | Path, queries: str | Path, patch: str | Path | None = None,
             merged: str | Path | None = None, dtype: str = "float32", device: str | None = None,
             device_map: str | None = None, max_memory: str | None = None, chat: bool = False, one_pass: bool = False,
             max_input_bytes: int = MAX_INPUT_BYTES, allow_pickle: bool = False,
             progress: Progress | None = None) -> dict:
    """Compare a patch (or a merged folder) with the prompted model on the queries file: the eval report (DESIGN.md
    keys). In bfloat16 or float16 the prompted model also runs in float32, the yardstick (`precision`)."""
    from .evaluate import evaluate as report_of
    from .patch import DTYPES

    _one_source(patch, merged, "evaluates")
    device = _device(device, device_map)
    messages = chats.read_messages(prompt, max_input_bytes) if chat else None
    text = None if chat else read_prompt(prompt, max_input_bytes)
    asked = read_queries(queries, max_input_bytes)
    placement = (device, allow_pickle, device_map, max_memory)
    m = _with_patch(model, patch, merged, dtype, *placement)
    m.check_prompt(prompt, text, messages)
    reduced = next(m.base.parameters()).dtype in (DTYPES["bfloat16"], DTYPES["float16"])
    float32_base = load_model(model, "float32", *placement)[0] if reduced else None  # the yardstick
    return report_of(m.base, m.patched, m.tokenizer, text, asked, m.method, m.patch_bytes, m.element_size, progress,
                     float32_base=float32_base, chat_messages=messages, reuse_cache=False if one_pass else None,
                     served_head=m.served_head(chat, messages))


def generate(model: str, queries: list[str], patch: str | Path | None = None, merged: str | Path | None = None,
             prompt: str | Path | None = None, compare: bool = False, chat: bool = False,
             sampling: Sampling = Sampling(), dtype: str = "float32", device: str | None = None,
             device_map: str | None = None, max_memory: str | None = None, max_input_bytes: int = MAX_INPUT_BYTES,
             allow_pickle: bool = False, on_text: Callable[[int, str, str], None] | None = None) -> dict:
    """What the patched (or merged) model says after each query; with `compare`, also the prompted model (the base
    model on the prompt file + query) and the base model alone. `chat`: each query is a user turn, rendered after
    the baked conversation (the prompt file's, or placeholders of the roles the patch recorded). on_text(query
    index, "patched" | "prompted" | "base", text) receives the text as it is produced.

    Returns {"method", "generations": [{"input", "patched", "prompted"?, "base"?, "tokens": {the same: ids}}]}."""
    from .generation import TextStream, continuation

    _one_source(patch, merged, "generates with")
    if compare and prompt is None:
        raise IclcaError("--compare runs the prompted model, which needs the prompt", "add --prompt PROMPT_FILE")
    if not queries:
        raise IclcaError("no query to answer", "pass queries as arguments, or --queries FILE")
    device = _device(device, device_map)
    messages = chats.read_messages(prompt, max_input_bytes) if chat and prompt is not None else None
    text = read_prompt(prompt, max_input_bytes) if prompt is not None and not chat else None
    m = _with_patch(model, patch, merged, dtype, device, allow_pickle, device_map, max_memory)
    if compare:
        m.check_prompt(prompt, text, messages)
    if chat and messages is None and not m.chat_roles:
        raise IclcaError("--chat renders each query after the baked conversation, and this patch does not say what "
                         "it was (made before iclca recorded it, or without --chat)", "add --prompt PROMPT_FILE")
    roles = m.chat_roles.split(",") if chat and messages is None else None
    head, encode = chats.encoders(m.tokenizer, text, messages, roles)
    tokenizer = m.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    served = m.served_head(chat, messages)  # what the patched and the plain model read before a query
    runs = [("patched", m.patched, False)] + ([("prompted", m.base, True), ("base", m.base, False)] if compare else [])
    out = []
    for n, query in enumerate(queries):
        ids = encode(query)
        if not ids:
            raise IclcaError(f"query {n + 1} has no tokens", "every query needs some text")
        row, tokens = {"input": query}, {}
        for who, runner, prompted in runs:
            stream = TextStream(tokenizer, (lambda piece, n=n, who=who: on_text(n, who, piece)) if on_text else
                                (lambda piece: None))
            tokens[who] = continuation(runner, head + ids if prompted else served + ids, sampling, pad, stream)
            row[who] = tokenizer.decode(tokens[who], skip_special_tokens=True)
        out.append({**row, "tokens": tokens})
    return {"method": getattr(m.method, "name", m.method), "generations": out}


class _Patched(NamedTuple):
    base: object  # the base model
    tokenizer: object
    patched: object  # the patched copy of the base, or the merged folder's model
    method: Method | str  # a patch's Method, or a merged folder's method name
    patch_bytes: int  # the patch tensors' bytes
    element_size: int  # bytes per element of the patch's dtype
    chat_roles: str | None  # the roles of the conversation a --chat patch was made after
    prompt_sha256: str | None  # of the prompt the patch holds; None for a stacked patch (it holds its parent's too)

    def check_prompt(self, path, text: str | None, messages: list[dict] | None) -> None:
        """Refuse a prompt file other than the one the patch was made from (the prompted model would read another
        prompt than the patch holds): its text, or with --chat its rendered conversation, by sha256."""
        from .convert import sha256_text

        if self.prompt_sha256 is None:
            return
        read = chats.prompt_ids(self.tokenizer, messages)[0] if messages is not None else text
        if sha256_text(read) == self.prompt_sha256:
            return
        if self.chat_roles and messages is None:
            hint = "the patch was made with --chat: add --chat"
        elif messages is not None and "strftime_now" in (self.tokenizer.chat_template or ""):
            hint = "this chat template writes today's date into the conversation: convert the prompt again today"
        else:
            hint = "pass the prompt file the patch was converted from" + (", without --chat" if messages else "")
        raise IclcaError(f"{path} is not the prompt this patch was made from (its sha256 differs from the "
                         "patch's iclca.prompt_sha256)", hint)

    def served_head(self, chat: bool, messages: list[dict] | None) -> list[int]:
        """What the patched (or merged) model and the plain one read before each query: with --chat, for a weight
        patch (which reads a query without the baked conversation), the chat template's own start, as a server
        renders a query (chat.served_head); nothing otherwise."""
        from .methods import method_class

        in_context = self.method.in_context if isinstance(self.method, Method) else method_class(self.method).in_context
        if not chat or in_context:
            return []
        roles = [msg["role"] for msg in messages] if messages else self.chat_roles.split(",")
        return chats.served_head(self.tokenizer, roles)


def _one_source(patch, merged, verb: str) -> None:
    if (patch is None) == (merged is None):
        raise IclcaError("pass exactly one of --patch and --merged",
                         f"--patch PATCH {verb} a patch file, --merged DIR {verb} a merged folder")


def _with_patch(model: str, patch, merged, dtype: str, device: str, allow_pickle: bool, device_map, max_memory):
    """The base model and its patched copy (the patch checked against it), or the merged folder's model (refused
    unless merged from this base)."""
    from .merge import load_merged
    from .patch import DTYPES, check_patch_fits, load_patch, patched_copy

    loaded = load_patch(patch) if patch is not None else None  # before the model: a bad patch fails at once
    base, tokenizer, fingerprint = load_fingerprinted(model, dtype, device, allow_pickle, device_map, max_memory)
    if loaded is None:
        return _Patched(base, tokenizer, *load_merged(merged, fingerprint, dtype, device, device_map, max_memory))
    check_patch_fits(loaded, base, fingerprint)
    own = None if "parent_prompt_sha256" in loaded.extra else loaded.prompt_sha256
    return _Patched(base, tokenizer, patched_copy(base, loaded), loaded.method, loaded.nbytes,
                    DTYPES[loaded.dtype].itemsize, loaded.extra.get("chat_roles"), own)


def inspect(patch: str | Path) -> dict:
    """A patch's metadata (provenance, fingerprint, method parameters), sizes, non-finite count and tensors."""
    import torch

    from .patch import load_patch
    from .summaries import head_entries

    loaded = load_patch(patch)
    info = dict(loaded.metadata())
    info["nonfinite_values"] = sum(int((~torch.isfinite(t)).sum()) for t in loaded.tensors.values())
    info["patch_bytes"] = loaded.nbytes  # the tensors' bytes, as eval's sizes.patch_bytes
    info["file_bytes"] = Path(patch).stat().st_size
    info["patch_bytes_by_part"] = loaded.bytes_by_part()
    entries = head_entries(loaded.tensors)
    if entries:  # a summary: how the budget went to layers and heads
        info["entries_per_head"] = entries
    info["tensors"] = {name: [list(t.shape), str(t.dtype).removeprefix("torch.")]
                       for name, t in sorted(loaded.tensors.items())}
    return info


def _device(device: str | None, device_map: str | None) -> str:
    """The --device to use: cpu unless given; refused together with --device-map."""
    if device is not None and device_map is not None:
        raise IclcaError(f"--device {device} and --device-map {device_map} both say where to run",
                         "pass one: --device-map auto places the model itself")
    return device or "cpu"


def model_folder(spec: str, allow_pickle: bool) -> Path | None:
    """The local folder a --model names (a built-in's too), or None for a hub id."""
    path = Path(resolve_model(spec, allow_pickle))
    return path if path.exists() else None


def _convert_targets(prompt_files: list[Path], out_path: str | Path | None, out_dir: Path | None,
                     inputs: list[tuple[str, Path | None]]) -> list[tuple[Path, Path]]:
    """(prompt file, patch file) pairs, or an IclcaError for outputs that are missing, ambiguous, collide, or would
    write over an input or over a file iclca did not write."""
    if (out_path is None) == (out_dir is None):
        raise IclcaError("pass exactly one of --out and --out-dir",
                         "--out PATCH for one prompt file, --out-dir DIR for one patch per prompt file")
    if out_path is not None:
        if len(prompt_files) > 1:
            raise IclcaError(f"--out names one patch, but {len(prompt_files)} prompt files were given",
                             "use --out-dir DIR to write one patch per prompt file")
        if str(out_path).endswith(("/", os.sep)):
            raise IclcaError(f"--out {out_path} names a folder (it ends with a slash)",
                             "--out names the patch file to write; use --out-dir for a folder of patches")
        check_input_file(prompt_files[0], "prompt")  # its errors first: the output is checked against it
        targets = [(prompt_files[0], Path(out_path))]
    else:
        if out_dir.exists() and not out_dir.is_dir():
            raise IclcaError(f"--out-dir {out_dir} is a file", "pass a folder (it is created if missing)")
        check_apart(out_dir, inputs[:1], "--out-dir", writes_into=True)  # files go into it: only the model matters
        targets, seen = [], {}
        for p in prompt_files:
            if p.stem in seen:
                raise IclcaError(f"prompt files {seen[p.stem]} and {p} would both write {p.stem}.safetensors",
                                 "rename one of them, or convert them into different --out-dir folders")
            seen[p.stem] = p
            targets.append((p, out_dir / f"{p.stem}.safetensors"))
    flag = "--out" if out_dir is None else "--out-dir"
    for _, target in targets:
        check_apart(target, inputs, flag)
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise IclcaError(f"cannot create --out-dir {out_dir}: {e.strerror}", "choose a writable folder") from e
    for _, target in targets:
        check_patch_target(target, flag)
    return targets


def _convert_one(m, tokenizer, prompt_file: Path, out: Path, method, base_patch, chunk_size, fingerprint, chat=False,
                 force=False, max_bytes=None, progress=None) -> dict:
    """Convert one prompt file into `out`, or keep `out` if it already holds this patch (its data verified); one row
    of the report. An iclca patch of other provenance at `out` is replaced only with `force`."""
    from .convert import describe_patch, fill_patch, sha256_text
    from .patch import save_patch, shared_copy

    messages = chats.read_messages(prompt_file, max_bytes) if chat else None
    if messages:  # the rendered conversation is the prompt (and what its sha256 is of)
        text, ids = chats.prompt_ids(tokenizer, messages)
    else:
        text = read_prompt(prompt_file, max_bytes)
        ids = encode_prompt(tokenizer, text)
    header = describe_patch(m, ids, sha256_text(text), method, base_patch, fingerprint)
    if messages:  # what a merged folder's chat template and `generate --chat` render the query after
        header.extra["chat_roles"] = ",".join(msg["role"] for msg in messages)
    same, patch = _kept(out, header) if check_patch_target(out) else (None, None)
    if same is False and not force:
        raise IclcaError(f"{out} holds an iclca patch of other provenance (another prompt, model or method)",
                         "pass --force to replace it, or choose another output")
    if same:
        status, file_bytes = "skipped", out.stat().st_size
    else:  # a base patch is applied in place: convert on a copy, so the next prompt starts from the plain model
        model = shared_copy(m) if base_patch is not None else m
        patch = fill_patch(model, header, ids, base_patch, chunk_size, progress, tokenizer, messages)
        status, file_bytes = "converted", save_patch(patch, out)
    return {"prompt": str(prompt_file), "patch": str(out), "status": status, "method": header.method.name,
            "prompt_tokens": header.prompt_tokens, "position_offset": header.position_offset,
            "tensors": len(patch.tensors), "patch_bytes": patch.nbytes, "file_bytes": file_bytes,
            "base_fingerprint": header.base_fingerprint}


def _kept(path: Path, header) -> tuple[bool | None, object]:
    """(True, the patch) if the iclca patch at `path` is the one `header` describes and its data verifies (digest,
    finite); (None, None) if its provenance matches but its data does not (to be written again); (False, None) if it
    is another patch."""
    from .patch import DIGEST, check_finite, load_patch, read_header

    meta = read_header(path)[0]
    if {k: v for k, v in meta.items() if k != DIGEST} != header.metadata():
        return False, None
    try:
        patch = load_patch(path)
        check_finite(patch.tensors, str(path))
    except IclcaError:
        return None, None
    return (True, patch) if DIGEST in meta else (None, None)
