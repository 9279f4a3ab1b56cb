"""The reader's path (issue 17): common.py holds the paper's nouns and never the machinery, loop.py the loop,
support/ the machinery; imports run one way, and no function on the reader's path is longer than a screen."""
import ast
import subprocess
import sys

import pytest

from conftest import ROOT

READER_PATH = ["byol.py", "byol_uniformity.py", "byol_mhe.py", "simclr.py", "sfrik.py", "msbreg.py", "common.py",
               "loop.py"]


def test_common_imports_neither_the_loop_nor_the_command_line_nor_the_batched_views():
    code = "import sys, common; print(' '.join(sorted(sys.modules)))"  # a fresh interpreter: nothing loaded before
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = set(proc.stdout.split())
    assert "common" in loaded and not loaded & {"loop", "support.cli", "support.batched_views"}, loaded


def imports_of(path):
    """Every module an `import` statement of the file names, wherever it stands (also inside a function)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("name", ["errors", "distributed", "runs", "cli", "batched_views"])
def test_support_never_imports_the_loop(name):
    assert not {"loop", "support.loop"} & imports_of(ROOT / "support" / f"{name}.py")


def test_imports_of_sees_every_form_of_import(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import loop\nfrom support import cli\ndef f():\n    from loop import pretrain\n")
    assert {"loop", "support.cli"} <= imports_of(path)


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
