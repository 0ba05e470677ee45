"""Every ```python block of docs/frameworks.md runs as written (each in a fresh namespace)."""
import pathlib
import re

import pytest
from conftest import ROOT

DOC = pathlib.Path(ROOT) / "docs" / "frameworks.md"


def _blocks() -> list[tuple[str, str]]:
  """``(id, code)`` of each python block, named after the section it is in."""
  text = DOC.read_text()
  out, section = [], "top"
  for m in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```", text, re.M | re.S):
    if m.group(1):
      section = re.sub(r"\W+", "_", m.group(1).strip()).strip("_").lower()
    else:
      out.append((f"{section}_{sum(s.startswith(section) for s, _ in out)}", m.group(2)))
  return out


BLOCKS = _blocks()


def test_there_is_an_example_per_framework():
  names = {name.rsplit("_", 1)[0] for name, _ in BLOCKS}
  assert {"flax_linen", "flax_nnx", "equinox", "haiku", "a_raw_pytree"} <= names


@pytest.mark.usefixtures("fast_compile")
@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[n for n, _ in BLOCKS])
def test_block_runs(code):
  exec(compile(code, str(DOC), "exec"), {"__name__": "docs_frameworks"})
