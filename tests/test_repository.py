"""The repository as a new reader meets it: a README that fits in one sitting and starts with where to read,
and a train.py made of short, named steps."""
import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_readme_is_at_most_16_kb_and_shows_the_reading_path_on_its_first_screen():
    readme = (ROOT / "README.md").read_bytes()
    assert len(readme) <= 16_000, len(readme)
    first_screen = "\n".join(readme.decode().splitlines()[:50])
    assert "## How to read this repository" in first_screen and "python -m pytest" in first_screen


def test_train_py_is_short_named_steps():
    tree = ast.parse((ROOT / "train.py").read_text())
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in functions}
    assert lengths["main"] <= 50, lengths["main"]
    long = {name: n for name, n in lengths.items() if n > 60 and name != "get_parser"}  # the flag list may be long
    assert not long, long
