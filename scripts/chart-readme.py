#!/usr/bin/env python3
"""Regenerate the parameter tables of a chart's README.md from the `@section`/`@param` comments of its
values.yaml, so the README cannot drift from the values (tests/charts checks that every value is there).

Usage: scripts/chart-readme.py charts/tessera-curator [charts/...]

The tables run from "## Parameters" up to the first line that is neither a table, a "###" heading nor
blank; defaults already in the README are kept (some are written by hand, e.g. "see values.yaml"), new
ones are taken from values.yaml.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

SECTION = re.compile(r"^## @section (.+)$")
PARAM = re.compile(r"^\s*## @param (\S+) (.+)$")
ROW = re.compile(r"^\| `([^`]+)` \| .* \| (.+) \|$")


def lookup(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        node = node[part]
    return node


def default_of(value: Any) -> str:
    scalars = isinstance(value, list) and all(not isinstance(v, dict | list) for v in value)
    if isinstance(value, dict | list) and value and not scalars:
        return "see values.yaml"
    return f"`{json.dumps(value)}`"


def tables(chart: Path, kept: dict[str, str]) -> list[str]:
    text = (chart / "values.yaml").read_text()
    values = yaml.safe_load(text)
    out: list[str] = []
    for line in text.splitlines():
        if m := SECTION.match(line):
            out += ["", f"### {m.group(1)}", "", "| Name | Description | Default |", "|---|---|---|"]
        elif m := PARAM.match(line):
            name, description = m.groups()
            default = kept.get(name) or default_of(lookup(values, name))
            out.append(f"| `{name}` | {description} | {default} |")
    return out


def main(charts: list[str]) -> None:
    for chart in map(Path, charts):
        readme = chart / "README.md"
        lines = readme.read_text().splitlines()
        start = lines.index("## Parameters")
        end = start + 1
        while end < len(lines) and (
            not lines[end].strip() or lines[end][:1] == "|" or lines[end].startswith("### ")
        ):
            end += 1
        kept = {m.group(1): m.group(2) for line in lines[start:end] if (m := ROW.match(line))}
        # A default the values changed is regenerated; hand-written ones ("see values.yaml") are kept.
        values = yaml.safe_load((chart / "values.yaml").read_text())
        for name, default in list(kept.items()):
            try:
                current = default_of(lookup(values, name))
            except (KeyError, TypeError):
                continue
            if default != "see values.yaml" and default != current:
                del kept[name]
        body = tables(chart, kept)
        lines[start:end] = ["## Parameters", *body, ""]
        readme.write_text("\n".join(lines) + "\n")
        print(f"{readme}: {sum(1 for b in body if b.startswith('| `'))} parameters")


if __name__ == "__main__":
    main(sys.argv[1:])
