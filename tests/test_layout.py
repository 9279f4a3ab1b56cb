"""The reader's path (issue 17): common.py holds the paper's nouns and never the machinery, loop.py the loop,
support/ the machinery; imports run one way, and no function on the reader's path is longer than a screen."""
import ast
import subprocess
import sys

import pytest

from conftest import ROOT

READER_PATH = ["byol.py", "byol_uniformity.py", "byol_mhe.py", "simclr.py", "sfrik.py", "msbreg.py", "common.py",
               "loop.py"]


def imported_after(module):
    """The modules of this repository that importing `module` in a fresh interpreter loads."""
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(proc.stdout.split())


def test_common_imports_neither_the_loop_nor_the_command_line_nor_the_batched_views():
    loaded = imported_after("common")
    assert not loaded & {"loop", "support.cli", "support.batched_views"}, loaded


@pytest.mark.parametrize("module", ["support.errors", "support.distributed", "support.runs", "support.cli",
                                    "support.batched_views"])
def test_support_never_imports_the_loop(module):
    assert "loop" not in imported_after(module)


def body_lines(function):
    """Lines of a function's body, its docstring left out."""
    body = function.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1


@pytest.mark.parametrize("name", READER_PATH)
def test_no_function_on_the_readers_path_is_over_60_lines(name):
    tree = ast.parse((ROOT / name).read_text())
    long = {f.name: body_lines(f) for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef) and f.name != "build_parser" and body_lines(f) > 60}  # flags excepted
    assert not long, long


def test_body_lines_counts_code_not_the_docstring():
    function = ast.parse('def f():\n    """doc\n    string"""\n    a = 1\n    return a\n').body[0]
    assert body_lines(function) == 2
