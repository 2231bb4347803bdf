"""Reading the user's text inputs: prompt files and query files."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import IclcaError


@dataclass(frozen=True)
class Query:
    input: str
    target: str | None = None


MAX_INPUT_BYTES = 16 << 20  # the default limit on a prompt or queries file (--max-input-mib)


def read_text(path: str | Path, what: str, max_bytes: int | None = None) -> str:
    """A UTF-8 text file's contents, or an IclcaError that says what is wrong with it: missing, not a regular file
    (a folder, a device such as /dev/zero, a FIFO), larger than `max_bytes` (default MAX_INPUT_BYTES), not UTF-8."""
    p = Path(path)
    limit = max_bytes or MAX_INPUT_BYTES
    check_input_file(p, what)
    too_big = IclcaError(f"{what} file {p} is larger than {limit / (1 << 20):g} MiB",
                         "pass --max-input-mib N to allow larger files")
    try:
        if os.stat(p).st_size > limit:
            raise too_big
        with open(p, "rb") as f:
            data = f.read(limit + 1)  # a file that grows while read is still cut at the limit
    except OSError as e:
        raise IclcaError(f"cannot read {what} file {p}: {e.strerror}", "check the file's permissions") from e
    if len(data) > limit:
        raise too_big
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise IclcaError(
            f"{what} file {p} is not UTF-8 (byte {e.start})", "re-save it as UTF-8, e.g. iconv -t UTF-8"
        ) from e


def check_input_file(path: Path, what: str) -> None:
    """Refuse a path that is not a regular file: missing, a folder, a device such as /dev/zero (reading it never
    ends), a FIFO (reading it blocks)."""
    if not path.exists():
        raise IclcaError(f"{what} file not found: {path}", f"check the path; the {what} is a UTF-8 text file")
    if path.is_dir():
        raise IclcaError(f"{what} path is a folder, not a file: {path}", f"pass the {what} text file itself")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise IclcaError(f"{what} path {path} is not a regular file (a device, FIFO or socket)",
                         f"pass the {what} text file itself")


def read_prompt(path: str | Path, max_bytes: int | None = None) -> str:
    text = read_text(path, "prompt", max_bytes)
    if not text.strip():
        raise IclcaError(f"prompt file {path} is empty", "write the demonstrations (in-context examples) into it")
    return text


def read_queries(path: str | Path, max_bytes: int | None = None) -> list[Query]:
    """`.jsonl` lines {"input": ..., "target": ...} (target optional), or any other file: one query per line."""
    text = read_text(path, "queries", max_bytes)
    queries = []
    if str(path).endswith(".jsonl"):
        for n, obj in jsonl_lines(path, text, 'each line is {"input": "...", "target": "..."}'):
            if not isinstance(obj, dict) or not isinstance(obj.get("input"), str):
                raise IclcaError(f'{path} line {n} has no string "input"', 'each line is {"input": "...", "target": "..."}')
            target = obj.get("target")
            if target is not None and not isinstance(target, str):
                raise IclcaError(f'{path} line {n}: "target" must be a string', "quote the target, e.g. \" 3\"")
            queries.append(Query(obj["input"], target))
    else:
        queries = [Query(line) for line in text.splitlines() if line.strip()]
    if not queries:
        raise IclcaError(f"queries file {path} holds no query", 'write one query per line, or {"input": ...} lines in .jsonl')
    return queries


def jsonl_lines(path: str | Path, text: str, hint: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) for each non-blank line of a .jsonl file's text; an IclcaError at the first line
    that is not JSON."""
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise IclcaError(f"{path} line {n} is not valid JSON: {e.msg}", hint) from e


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids: the tokenizer's special tokens (a BOS, if it adds one) then the text."""
    return tokenizer(text).input_ids


def encode_continuation(tokenizer, text: str) -> list[int]:
    """Ids of text that follows other text (queries after the prompt, targets after queries)."""
    return tokenizer(text, add_special_tokens=False).input_ids
