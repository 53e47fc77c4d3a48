"""The console (workbench/core/console.py): library code tells its user through one logger per module, never print(),
on stderr (stdout is a command's output); --verbose and --quiet set how much shows, here and in a sweep's kernels."""

import ast
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workbench import __main__ as cli
from workbench.core import console

PACKAGE = Path(__file__).resolve().parents[1] / "workbench"


@pytest.fixture
def restore_console():
    root = logging.getLogger(console.ROOT)
    level, env = root.level, os.environ.get(console.ENV)
    yield
    root.setLevel(level)
    if env is None:
        os.environ.pop(console.ENV, None)
    else:
        os.environ[console.ENV] = env


def test_library_code_logs_and_never_prints():
    """print() is left to the command line's own output (tables, paths, a config) and the console's handler."""
    def prints(path):
        return any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"
                   for n in ast.walk(ast.parse(path.read_text())))

    printing = {p.name for p in PACKAGE.rglob("*.py") if prints(p)}
    assert printing <= {"__main__.py", "console.py"}, f"modules that print instead of logging: {sorted(printing)}"
    for p in PACKAGE.rglob("*.py"):
        text = p.read_text()
        if "log.info(" in text or "log.warning(" in text:
            assert "log = console.logger(__name__)" in text, f"{p.name} logs through a logger not its own"


def test_lines_go_to_stdout_warnings_to_stderr_and_the_level_filters(capsys, restore_console):
    log = console.logger("workbench.test_console")
    console.configure("info")
    log.debug("hidden")
    log.info("[test] shown")
    log.warning("[test] a warning")
    out, err = capsys.readouterr()
    assert out == "" and err == "[test] shown\n[test] a warning\n", "stdout is left to what a command outputs"
    console.configure("warning")
    log.info("[test] quiet now")
    console.progress(log, "[test] quiet progress")
    assert capsys.readouterr() == ("", "")
    console.configure("debug")
    log.debug("[test] debug")
    assert capsys.readouterr().err == "[test] debug\n"
    with pytest.raises(ValueError, match="use one of"):
        console.configure("loud")


def test_verbose_and_quiet_set_the_level_here_and_for_the_kernels(capsys, restore_console):
    assert cli.main(["--quiet", "train", "dpo", "--print-config"]) == 0
    assert logging.getLogger(console.ROOT).level == logging.WARNING and os.environ[console.ENV] == "warning"
    assert '"method": "dpo"' in capsys.readouterr().out, "the command's own output still shows"
    assert cli.main(["train", "dpo", "--verbose", "--print-config"]) == 0
    assert logging.getLogger(console.ROOT).level == logging.DEBUG and os.environ[console.ENV] == "debug"


def test_a_process_reads_the_verbosity_from_the_environment():
    code = ("from workbench.core import console; log = console.logger('workbench.x'); "
            "log.info('[x] info'); log.warning('[x] warning')")
    for verbosity, err in (("warning", "[x] warning\n"), ("info", "[x] info\n[x] warning\n")):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, console.ENV: verbosity})
        assert p.returncode == 0, p.stderr
        assert p.stdout == "" and p.stderr == err, (verbosity, p.stdout, p.stderr)
