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
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}" if mark else None
        what = " ".join(x for x in (error.context, error.problem) if x)
        raise ManifestError([Problem(file, where, None, f"YAML syntax error: {what}")]) from None
    except yaml.YAMLError as error:
        raise ManifestError([Problem(file, None, None, f"YAML error: {error}")]) from None
    finally:
        loader.dispose()
    return data, node, duplicates


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
                        first = (f"line {first_line[ident]}" if first_line[ident] != line
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


def at(line: int | None) -> str | None:
    return f"line {line}" if line else None


def child(root: yaml.Node | None, key: str) -> yaml.Node | None:
    """The value node of `key` in a mapping (where it is set last, as in the data)."""
    if isinstance(root, yaml.MappingNode):
        for k, v in reversed(root.value):
            if k.value == key:
                return v
    return None
