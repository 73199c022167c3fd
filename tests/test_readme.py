"""The README's promises that can drift: the tensor contract table and the two opening commands."""
from __future__ import annotations

import re

from clipmatch.contract import COMPONENTS

from .conftest import REPO

README = (REPO / "README.md").read_text()


def test_contract_table_matches_the_contract():
    rows = re.findall(r"^\| (\w+) \| (\w+) \| (in|out) \| (\w+) \| ([\w, ]+) \|$", README, re.M)
    documented = {(m, t, d, dt, len(shape.split(","))) for m, t, d, dt, shape in rows}
    actual = {(c.name, t.name, d, t.dtype, len(t.dims))
              for c in COMPONENTS.values() for d, specs in (("in", c.inputs), ("out", c.outputs)) for t in specs}
    assert documented == actual


def test_opening_commands_exist():
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    scripts = re.findall(r"bash (scripts/\S+\.sh)", first_block)
    assert scripts == ["scripts/demo.sh", "scripts/test.sh"]
    for s in scripts:
        assert (REPO / s).is_file()
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()
