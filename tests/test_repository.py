"""The repository as a new reader meets it: a README that starts with where to read, and a train.py made of
short, named steps."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_readme_shows_the_reading_path_on_its_first_screen():
    readme = (ROOT / "README.md").read_text()
    first_screen = "\n".join(readme.splitlines()[:50])
    assert "## How to read this repository" in first_screen and "python -m pytest" in first_screen


def function_lengths(path):
    functions = [node for node in ast.walk(ast.parse((ROOT / path).read_text())) if isinstance(node, ast.FunctionDef)]
    return {node.name: node.end_lineno - node.lineno + 1 for node in functions}


def test_train_py_is_short_named_steps():
    lengths = function_lengths("train.py")
    assert lengths["main"] <= 50, lengths["main"]
    long = {name: n for name, n in lengths.items() if n > 50 and name != "get_parser"}  # the flag list may be long
    assert not long, long


def test_data_py_is_short_named_steps_and_train_py_reads_one_step_in_a_screen():
    long = {name: n for name, n in function_lengths("data.py").items() if n > 50}
    assert not long, long
    lengths = function_lengths("train.py")  # a training step: the loop and the helpers it calls
    step = ["train_one_epoch", "reseed", "epoch_lr", "lr_at", "checked", "count_unreadable", "sum_over_processes",
            "stop_if_not_finite", "batch_on_device"]
    assert sum(lengths[name] for name in step) <= 120, {name: lengths[name] for name in step}


def test_the_readme_counts_the_noah_class_as_it_is():
    source = (ROOT / "noah.py").read_text()
    noah_class = next(node for node in ast.walk(ast.parse(source))
                      if isinstance(node, ast.ClassDef) and node.name == "NOAH")
    docstrings = set()
    for node in ast.walk(noah_class):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node) is not None:
            docstrings.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    lines = source.splitlines()
    code = [number for number in range(noah_class.lineno, noah_class.end_lineno + 1)
            if lines[number - 1].strip() and not lines[number - 1].strip().startswith("#") and number not in docstrings]
    said = re.search(r"`NOAH`, the paper's idea \((\d+) lines, (\d+) of them code\)", (ROOT / "README.md").read_text())
    assert said, "the README no longer counts the NOAH class's lines"
    assert (int(said[1]), int(said[2])) == (noah_class.end_lineno - noah_class.lineno + 1, len(code))
