"""YAML with source positions: the manifest parsed once into its data and its node tree, and the 1-based
line of any place in it, so every problem can say where it is.

The loader also drops YAML 1.1's sexagesimal numbers, which would read an aspect ratio as a number.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from batchgen.errors import ManifestError, Problem


class _Loader(yaml.SafeLoader):
    """SafeLoader minus sexagesimal numbers: YAML 1.1 reads an unquoted `16:9` as 969 (base 60), which
    would turn every aspect ratio into a number."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, file: str) -> tuple[Any, yaml.Node | None, list[Problem]]:
    """The document, its node tree (for line numbers) and its duplicate keys as problems, from one parse.
    A syntax error raises ManifestError."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        # Before construction: constructing a mapping merges `<<: *anchor` keys into the node's own keys,
        # where they would look like duplicates.
        duplicates = duplicate_keys(node, file)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as error:
        raise ManifestError([syntax_problem(error, file)]) from None
    except yaml.YAMLError as error:
        raise ManifestError([Problem(file, None, None, f"YAML error: {error}")]) from None
    finally:
        loader.dispose()
    return data, node, duplicates


# PyYAML's contexts ("while scanning a quoted scalar") in plain words, and whether the construct needs closing.
_CONSTRUCTS: dict[str, tuple[str, bool]] = {
    "a quoted scalar": ("quoted text", True),
    "a double-quoted scalar": ("quoted text", True),
    "a flow sequence": ("[ ] list", True),
    "a flow mapping": ("{ } mapping", True),
    "a simple key": ("key", False),
    "a block scalar": ("block of text", False),
    "a block mapping": ("mapping", False),
    "a block collection": ("list", False),
    "a mapping": ("mapping", False),
}


# What to do about PyYAML's commonest complaints, by a phrase of its problem text.
_HINTS: tuple[tuple[str, str], ...] = (
    ("<block end>", "check the indentation"),
    ("mapping values are not allowed", "quote a value that contains ': ' (\"A: b\"), or check the indentation"),
    ("'\\t'", "YAML does not allow tabs for indentation; use spaces"),
    ("escape character", "in double quotes a \\ starts an escape: write \\\\ or use single quotes"),
)


def syntax_problem(error: yaml.MarkedYAMLError, file: str) -> Problem:
    """A YAML syntax error placed where the mistake most likely is, in plain words.

    PyYAML marks where it gave up (`problem_mark`) and where the construct it was reading began
    (`context_mark`). An unclosed quote or bracket, or a key without its colon, runs on until something it
    cannot take, often the end of the file, so the construct's start is where to look. A block mapping or
    list, or a value being constructed, begins at the enclosing key (line 1 for the whole file), so there
    the problem mark is the place; the start is named beside it."""
    context = (error.context or "").removeprefix("while ")
    for verb in ("scanning ", "parsing ", "constructing ", "composing "):
        context = context.removeprefix(verb)
    noun, closes = _CONSTRUCTS.get(context, (context.removeprefix("a ").removeprefix("an "), False))
    problem = error.problem or "the file cannot be read as YAML"
    hints = "".join(f"; {hint}" for phrase, hint in _HINTS if phrase in problem)
    cmark, pmark = error.context_mark, error.problem_mark
    if cmark is not None and noun and context not in ("a block mapping", "a block collection", "a mapping"):
        if pmark is None or pmark.line == cmark.line:
            what = f"in the {noun} that starts here: {problem}" + (f" (column {pmark.column + 1})" if pmark else "")
        elif closes and ("end of stream" in problem or "<stream end>" in problem):
            what = f"the {noun} that starts here is never closed (found the end of the file at line {pmark.line + 1})"
        elif closes:
            what = (f"the {noun} that starts here is never closed ({problem} at line {pmark.line + 1}, "
                    f"column {pmark.column + 1})")
        else:
            what = f"in the {noun} that starts here: {problem} (at line {pmark.line + 1})"
        return Problem(file, f"line {cmark.line + 1}", None, f"YAML syntax error: {what}{hints}")
    if cmark is not None and noun and pmark is not None and cmark.line != pmark.line:
        problem += f" (in the {noun} that starts on line {cmark.line + 1})"
    mark = pmark or cmark
    return Problem(file, f"line {mark.line + 1}" if mark else None, None, f"YAML syntax error: {problem}{hints}")


def duplicate_keys(root: yaml.Node | None, file: str) -> list[Problem]:
    """A problem for every key that a mapping sets again, at any depth: PyYAML keeps the last value without a
    word, so a key repeated by mistake would silently replace the first one."""
    found: list[Problem] = []
    seen_nodes: set[int] = set()  # an alias repeats a node (and may contain itself): visit each once

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if id(node) in seen_nodes:
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    walk(value_node, path)  # `<<: *base` may repeat: each merges, and own keys override them
                elif isinstance(key_node, yaml.ScalarNode):
                    # By tag and text: `1` and `"1"` are different keys.
                    ident = (key_node.tag, key_node.value)
                    line = key_node.start_mark.line + 1
                    if ident in first_line:
                        first = (f"on line {first_line[ident]}" if first_line[ident] != line
                                 else "earlier on this line")
                        found.append(Problem(file, f"line {line}", ".".join((*path, key_node.value)),
                                             f"is set again (also set {first}); a key may appear only once "
                                             "in a mapping, so keep one"))
                    else:
                        first_line[ident] = line
                    walk(value_node, (*path, key_node.value))
                else:
                    walk(value_node, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, str(i)))

    if root is not None:
        walk(root, ())
    return found


def node_line(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest node along `loc` (a pydantic error location) that exists. A key set twice
    is found where it is set last: that is the value the data holds."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in reversed(node.value):
                if key_node.value == part:
                    node, line = value_node, key_node.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def existing_depth(root: yaml.Node | None, loc: tuple[Any, ...]) -> int:
    """How many leading parts of `loc` (a pydantic error location) are places in the file: keys of its
    mappings, indexes of its lists. The rest are pydantic's own (a union branch's name)."""
    node = root
    for depth, part in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in reversed(node.value) if k.value == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
        else:
            return depth
        if node is None:
            return depth
    return len(loc)


def at(line: int | None) -> str | None:
    return f"line {line}" if line else None


def child(root: yaml.Node | None, key: str) -> yaml.Node | None:
    """The value node of `key` in a mapping (where it is set last, as in the data)."""
    if isinstance(root, yaml.MappingNode):
        for k, v in reversed(root.value):
            if k.value == key:
                return v
    return None
