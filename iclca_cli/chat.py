"""Chat models (`--chat`): the prompt is a conversation's start (a system message, or few-shot turns) rendered with
the tokenizer's chat template, and each query is a user turn followed by the generation prompt. Query ids are the
rendered conversation's tokens after the prompt's, so prompt ids + query ids are the whole conversation's tokens
exactly, as the model would read it in one piece."""

from __future__ import annotations

from pathlib import Path

from .errors import IclcaError
from .inputs import encode_continuation, encode_prompt, jsonl_lines, read_prompt

ROLES = ("system", "user", "assistant")


def read_messages(path: str | Path, max_bytes: int | None = None) -> list[dict]:
    """A `.jsonl` of {"role", "content"} lines (few-shot turns), or any other file: its text as the system message."""
    text = read_prompt(path, max_bytes)
    if not str(path).endswith(".jsonl"):
        return [{"role": "system", "content": text}]
    messages = []
    for n, obj in jsonl_lines(path, text, 'each line is {"role": "user", "content": "..."}'):
        if not isinstance(obj, dict) or obj.get("role") not in ROLES or not isinstance(obj.get("content"), str):
            raise IclcaError(f"{path} line {n} is not a message",
                             f'each line is {{"role": ..., "content": "..."}} with role {", ".join(ROLES)}')
        messages.append({"role": obj["role"], "content": obj["content"]})
    if not messages:
        raise IclcaError(f"prompt file {path} holds no message", 'write {"role": "system", "content": "..."} lines')
    return messages


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise IclcaError("--chat needs a chat template, and this model's tokenizer has none",
                         "drop --chat to use the prompt as raw text, or use the instruct version of the model")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises its own errors for conversations a template refuses
        raise IclcaError(f"the chat template refuses this conversation: {str(e).splitlines()[0][:200]}",
                         "check the roles and their order (some templates want user and assistant to alternate)") from e


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids  # the template writes its own special tokens


def prompt_ids(tokenizer, messages: list[dict]) -> tuple[str, list[int]]:
    """(rendered text, ids) of the conversation's start."""
    text = render(tokenizer, messages)
    return text, _ids(tokenizer, text)


def query_ids(tokenizer, messages: list[dict], query: str, head: list[int] | None = None) -> list[int]:
    """The tokens a user turn `query` and the generation prompt add to the conversation `messages` (whose ids, from
    prompt_ids, the caller may pass as `head`, so that many queries render and tokenize the prompt once)."""
    head = prompt_ids(tokenizer, messages)[1] if head is None else head
    whole = _ids(tokenizer, render(tokenizer, [*messages, {"role": "user", "content": query}], add_generation_prompt=True))
    if whole[:len(head)] != head:
        raise IclcaError("this chat template renders the prompt differently once a user turn follows it",
                         "iclca needs the conversation's start to stay as it is; use the prompt without --chat")
    return whole[len(head):]


PLACEHOLDER = "x"  # stands for a baked message's content where only the conversation's shape matters


def continuation_ids(tokenizer, roles: list[str], query: str) -> list[int]:
    """The tokens a user turn `query` and the generation prompt add after a baked conversation of these roles, when
    its content is not at hand (a merged folder, a patch without its prompt): rendered after placeholder messages of
    the same roles, which the template renders the same way whatever their content."""
    baked = [{"role": role, "content": PLACEHOLDER} for role in roles]
    return query_ids(tokenizer, baked, query)


def served_head(tokenizer, roles: list[str]) -> list[int]:
    """The tokens a stock chat template puts before a conversation's first user turn (a default system turn, a BOS,
    or none): what a server reads before each query to a model whose weights hold the baked conversation (a weight
    patch, lora, made with --chat), where the other patches continue after the conversation itself. Refused where
    the template renders a first user turn otherwise than one after the baked conversation of these roles."""
    whole = _ids(tokenizer, render(tokenizer, [{"role": "user", "content": PLACEHOLDER}], add_generation_prompt=True))
    after = continuation_ids(tokenizer, roles, PLACEHOLDER)
    if whole[len(whole) - len(after):] != after:
        raise IclcaError("this chat template renders a conversation's first user turn otherwise than one after the "
                         "baked conversation, so a weight patch cannot stand for it",
                         "convert the prompt as plain text, or with --method prefix or compressed")
    return whole[:len(whole) - len(after)]


def turn_opener(tokenizer, messages: list[dict], head: list[int]) -> list[int]:
    """The tokens that open a user turn after the conversation `messages` (ids `head`) and come before its content:
    what an empty user turn and one with content share."""
    empty, said = (query_ids(tokenizer, messages, text, head) for text in ("", "Hello"))
    n = next((i for i, (a, b) in enumerate(zip(empty, said)) if a != b), min(len(empty), len(said)))
    return empty[:n]


def encoders(tokenizer, prompt_text: str | None, messages: list[dict] | None = None, roles: list[str] | None = None):
    """(the prompt's ids, or None without one; query text -> its ids), as the prompted model reads them: each query a
    user turn after the rendered conversation `messages`, or after placeholders of its `roles` (a chat patch whose
    prompt is not at hand: continuation_ids), or raw text after the raw prompt text."""
    if messages is not None:
        head = prompt_ids(tokenizer, messages)[1]
        return head, lambda query: query_ids(tokenizer, messages, query, head)
    if roles is not None:
        return None, lambda query: continuation_ids(tokenizer, roles, query)
    head = encode_prompt(tokenizer, prompt_text) if prompt_text is not None else None
    return head, lambda query: encode_continuation(tokenizer, query)


def merged_template(template: str, roles: list[str]) -> str:
    """A chat template that renders a conversation as it continues after a baked one (roles as given): the original
    template renders the baked messages (placeholders) and then the conversation, and the baked part's rendering is
    cut off. A merged --chat folder carries it, so apply_chat_template(messages) gives the merged model exactly the
    tokens that follow its baked system prompt."""
    baked = ", ".join(f'{{"role": "{role}", "content": "{PLACEHOLDER}"}}' for role in roles)
    return ("{%- macro iclca_render(messages, add_generation_prompt) -%}" + template + "{%- endmacro -%}"
            "{%- set iclca_baked = [" + baked + "] -%}"
            "{%- set iclca_head = iclca_render(iclca_baked, false) -%}"
            "{{- iclca_render(iclca_baked + messages, add_generation_prompt)[iclca_head | length:] -}}")
