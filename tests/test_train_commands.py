"""`python -m moga.train COMMAND`: commands are looked up in moga.train.commands' table and imported only when
they run, so help answers without torch and moga.train never imports moga.demo (imports point down)."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moga.train import commands

ROOT = Path(__file__).resolve().parents[1]


def _run(code):
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("argv", [["--help"], ["wan", "--help"], ["prepare", "--help"]])
def test_help_imports_neither_torch_nor_the_demo(argv):
    code = ("import runpy, sys\n"
            f"sys.argv = ['moga.train'] + {argv!r}\n"
            "try:\n    runpy.run_module('moga.train', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print(sorted(m for m in ('torch', 'moga.demo') if m in sys.modules))\n")
    out = _run(code).splitlines()
    assert out[-1] == "[]", out
    assert "usage:" in out[0]
    if argv == ["--help"]:
        assert all(f"  {name} " in "\n".join(out) for name in ("demo", "wan", "prepare"))


def test_the_demo_command_still_runs_from_its_own_package():
    out = _run("import runpy, sys\nsys.argv = ['moga.train', 'demo', '--help']\n"
               "try:\n    runpy.run_module('moga.train', run_name='__main__')\nexcept SystemExit as e:\n"
               "    assert e.code in (0, None)\nprint('moga.demo.training' in sys.modules)\n")
    assert "usage: python -m moga.train demo" in out and out.splitlines()[-1] == "True"


def test_no_module_of_moga_train_imports_the_demo():
    """The table names the demo by a string; no import statement under moga/train reaches moga.demo."""
    found = []
    for path in sorted((ROOT / "moga" / "train").rglob("*.py")):
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                module = ".".join(p for p in (base, node.module or "") if p)
                names = [module] + [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            found += [f"{path.name}:{node.lineno} {n}" for n in names if n == "moga.demo" or n.startswith("moga.demo.")]
    assert found == []


def test_register_and_run_dispatch_by_table(monkeypatch, capsys):
    monkeypatch.setattr(commands, "COMMANDS", dict(commands.COMMANDS))
    commands.register("count", "operator:length_hint", "how many arguments follow")
    assert commands.run(["count", "a", "b", "c"]) == 3
    assert "  count " in commands.usage() and "how many arguments follow" in commands.usage()
    commands.register("quiet", "builtins:print")  # returns None: exit 0
    assert commands.run(["quiet", "x"]) == 0
    with pytest.raises(ValueError, match="package.module:function"):
        commands.register("bad", "operator.length_hint")
    capsys.readouterr()
    assert commands.run(["nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'nope'" in err and "demo, wan, prepare" in err
    assert commands.run([]) == 2 and commands.run(["--help"]) == 0


def test_wan_errors_keep_their_exit_status(tmp_path, capsys):
    from moga.train.__main__ import main
    assert main(["wan", "--model", str(tmp_path / "m.safetensors"), "--data", str(tmp_path), "--out",
                 str(tmp_path / "run"), "--steps", "0"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
