"""Textual pipelines: ``cleanup,fold-bn,prune(ratio=0.5)`` parses and prints round-trip. Grammar::

    pipeline := item ("," item)*
    item     := NAME [ "(" [ option ("," option)* ] ")" ]
    option   := KEY "=" VALUE          VALUE: anything but , ( ) = and whitespace, or "quoted"
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import PipelineError

_TOKEN = re.compile(r'\s*(?:(?P<punct>[(),=])|"(?P<quoted>[^"]*)"|(?P<word>[^\s(),="]+))')


@dataclass(frozen=True)
class PipelineItem:
    """One pass in a pipeline, options as written (typed later against the pass)."""

    name: str
    options: tuple[tuple[str, str], ...] = ()
    group: str = field(default="", compare=False)   # the named pipeline it was expanded from

    def __str__(self) -> str:
        return f"{self.name}({','.join(f'{k}={_quote(v)}' for k, v in self.options)})" if self.options else self.name


@dataclass(frozen=True)
class Pipeline:
    items: tuple[PipelineItem, ...]

    def __str__(self) -> str:
        return ",".join(map(str, self.items))


@dataclass(frozen=True)
class NamedPipeline:
    """A plugin's composite (``fuse``): pipeline text expanded in place, each member run and verified as a pass."""

    name: str
    description: str
    pipeline: str
    default_order: int | None = None      # position in the default pipeline; None: not in it

    def problems(self) -> list[str]:
        """Why this definition is invalid (empty when it is fine)."""
        try:
            parse_pipeline(self.pipeline)
        except PipelineError as exc:
            return [f"named pipeline {self.name!r}: {exc}"]
        return []


def _quote(value: str) -> str:
    return value if value and re.fullmatch(r'[^\s(),="]+', value) else f'"{value}"'


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos, text = [], 0, text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise PipelineError(f"bad pipeline text at column {pos + 1}: {text[pos:]!r}")
        out.append((m.lastgroup, m.group(m.lastgroup)))
        pos = m.end()
    return out


def parse_pipeline(text: str) -> Pipeline:
    """Parse pipeline text; a syntax error says where it is."""
    toks = _tokens(text)
    if not toks:
        raise PipelineError("empty pipeline; give pass names separated by commas, e.g. cleanup,fold-bn")
    items, i = [], 0      # the items parsed, the next token

    def expect(kind: str, value: str | None = None) -> str:
        nonlocal i
        if i >= len(toks) or toks[i][0] != kind or (value is not None and toks[i][1] != value):
            got = repr(toks[i][1]) if i < len(toks) else "end of text"
            want = repr(value) if value else ("a name" if kind == "word" else kind)
            raise PipelineError(f"bad pipeline {text!r}: expected {want}, got {got}")
        i += 1
        return toks[i - 1][1]

    while True:
        name = expect("word")
        options: list[tuple[str, str]] = []
        if i < len(toks) and toks[i] == ("punct", "("):
            i += 1
            while not (i < len(toks) and toks[i] == ("punct", ")")):
                if i == len(toks):
                    raise PipelineError(f"bad pipeline {text!r}: expected ')' to close {name}(, got end of text")
                if options:
                    expect("punct", ",")
                key = expect("word")
                expect("punct", "=")
                value = expect("quoted" if i < len(toks) and toks[i][0] == "quoted" else "word")
                if any(k == key for k, _ in options):
                    raise PipelineError(f"bad pipeline {text!r}: option {key!r} given twice to {name}")
                options.append((key, value))
            expect("punct", ")")
        items.append(PipelineItem(name, tuple(options)))
        if i == len(toks):
            return Pipeline(tuple(items))
        expect("punct", ",")


def did_you_mean(word: str, candidates: list[str]) -> str:
    near = difflib.get_close_matches(word, candidates, n=3, cutoff=0.5)
    return f"did you mean {' or '.join(near)}? " if near else ""


def resolve(pipeline: Pipeline, passes: dict[str, Any], kind: str = "pass") -> list[tuple[Any, dict[str, Any]]]:
    """Each item's definition (a Pass, or an Emitter for ``kind="format"``) and typed options, defaults filled in."""
    out: list[tuple[Any, dict[str, Any]]] = []
    for item in pipeline.items:
        if (spec := passes.get(item.name)) is None:
            raise PipelineError(f"unknown {kind} {item.name!r}; {did_you_mean(item.name, sorted(passes))}"
                                f"available: {', '.join(sorted(passes)) or 'none'}")
        values = {o.name: o.default for o in spec.options}
        for key, raw in item.options:
            opt, names = spec.option(key), [o.name for o in spec.options]
            if opt is None:
                raise PipelineError(f"{kind} {item.name} has no option {key!r}; {did_you_mean(key, names)}"
                                    f"valid options: {', '.join(names) or 'none'}")
            try:
                values[key] = opt.parse(raw)
            except ValueError as exc:
                raise PipelineError(f"{item}: {exc}") from None
        out.append((spec, values))
    return out
