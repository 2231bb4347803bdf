"""The registry of methods: every module in this package but base.py defines one `METHOD` (a Method subclass:
methods/base.py says what that holds). The command line's choices and help, the patch metadata check, which methods
a model takes, and the spec strings of scripts all derive from here; nothing else compares method names. Adding a
method is adding a file here (and its entry in tests/test_contract.py): docs/architecture.md shows one.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re

from ..errors import IclcaError, printable
from ..families import CACHE_KINDS, Family
from .base import Method, Param

__all__ = ["Method", "Param", "all_methods", "applicable", "build", "from_metadata", "from_spec", "method_class",
           "metadata_keys", "taking", "check_parameters"]


@functools.cache
def all_methods() -> dict[str, type[Method]]:
    """name -> Method class, in order of preference."""
    found = [importlib.import_module(f"{__name__}.{info.name}").METHOD
             for info in pkgutil.iter_modules(__path__) if info.name != "base"]
    return {m.name: m for m in sorted(found, key=lambda m: m.preference)}


def method_class(name: str) -> type[Method]:
    methods = all_methods()
    if name not in methods:
        raise IclcaError(f"unknown method {printable(name, 40)!r}", f"iclca knows {', '.join(methods)}")
    return methods[name]


def taking(field: str) -> tuple[type[Method], ...]:
    """The methods with a parameter of this field name."""
    return tuple(m for m in all_methods().values() if any(p.field == field for p in m.params))


def build(name: str, **given) -> Method:
    """The method `name` with the parameters given (None: not given, the default); a parameter the method does not
    take is refused (it would be ignored in silence), as is a value it cannot work with."""
    cls = method_class(name)
    check_parameters(name, **given)
    return cls(**{k: v for k, v in given.items() if v is not None})


def check_parameters(name: str | None, **given) -> None:
    """Refuse parameters (not None) that method `name` does not take; None: the model's default method, which is
    chosen later and takes none (exact or prefix)."""
    fields = {p.field for p in method_class(name).params} if name is not None else set()
    for field, value in given.items():
        if value is not None and field not in fields:
            owners = taking(field)
            flag = owners[0].param(field).flag
            raise IclcaError(f"{flag} applies to --method {' or '.join(m.name for m in owners)}, not "
                             f"{name or 'the default method'}", f"pass --method {owners[0].name}, or drop {flag}")


def applicable(family: Family, config) -> tuple[type[Method], ...]:
    """The methods every layer of this model takes, in order of preference (the first is the default). A family
    whose state lives in a transformers cache takes the methods `on_cache`: "all" of them, and those that act on
    "attention" layers where the family has some (the other layers kept exact)."""
    kinds = set(family.layer_kinds(config))
    if family.state == "cache":
        if not kinds <= set(CACHE_KINDS):
            return ()
        attention = family.attention is not None and kinds & {"full_attention", "hybrid"}
        return tuple(m for m in all_methods().values() if m.on_cache == "all" or (m.on_cache == "attention" and attention))
    return tuple(m for m in all_methods().values() if kinds <= set(m.kinds))


def metadata_keys() -> set[str]:
    """Every parameter's metadata key (iclca.<key>), of every method."""
    return {p.key for m in all_methods().values() for p in m.params}


def from_metadata(name: str, extra: dict[str, str], where: str) -> Method:
    """The method a patch's metadata names, with its parameters (extra: iclca.<key> values without the prefix)."""
    if name not in all_methods():
        raise IclcaError(f"{where} uses unknown method {printable(name, 40)!r}", f"this iclca knows {', '.join(all_methods())}")
    return method_class(name).from_metadata(extra, where)


_SPEC = re.compile(r"^(?P<name>[a-z]+?)(?P<order>\d)?(-(?P<budget>P/\d+|\d+))?(:(?P<options>.*))?$")


def from_spec(spec: str, prompt_tokens: int) -> Method:
    """A method from a compact spec, as scripts and tables name them: exact, prefix, taylor1, taylor2, compressed-R /
    evict-R (R entries per layer and key/value head), compressed-P/N / evict-P/N (the prompt's tokens over N, at
    least 2), then `:`-separated values of the method's other parameters in order (compressed-R:reference:keys:split)
    or by name (compressed-P/4:refine=True:steps=200)."""
    from .base import _parse

    m = _SPEC.match(spec)
    if m is None:
        raise IclcaError(f"cannot read method spec {spec!r}", "write e.g. taylor2, compressed-32, evict-P/3")
    cls = method_class(m["name"])
    values = []
    if m["order"]:
        values.append(int(m["order"]))
    if m["budget"]:
        budget = m["budget"]
        values.append(max(2, prompt_tokens // int(budget[2:])) if budget.startswith("P/") else int(budget))
    options = m["options"].split(":") if m["options"] else []
    given = dict(zip((p.field for p in cls.params), values + [o for o in options if "=" not in o]))
    params = {p.field: p for p in cls.params}
    for option in (o for o in options if "=" in o):
        field, raw = option.split("=", 1)
        if field not in params:
            raise IclcaError(f"method spec {spec!r}: {cls.name} has no parameter {field!r}",
                             f"its parameters: {', '.join(params)}")
        given[field] = _parse(params[field], raw, f"method spec {spec!r}")
    return cls(**given)
