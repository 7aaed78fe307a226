"""The repository as a new reader meets it: a README that starts with where to read, and a train.py made of
short, named steps."""
import ast
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
