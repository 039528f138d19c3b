"""The command line without the serving / planning extras (as on a bare GPU image): the
subcommands that need no extra still run, and one that does says which package is missing."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCK = "import sys\nfor m in ('pulp', 'ray', 'pydantic', 'fastapi', 'uvicorn', 'httpx'): sys.modules[m] = None\n"


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_latency_profiling_needs_no_extras(tmp_path):
    result = run("from dilaserve.cli import main\n"
                 f"sys.exit(main(['profile', 'latency', '--shape', 'tiny', '--device', 'cpu', '--batch-sizes', '1', "
                 f"'--chunks', '4', '--contexts', '16', '--phases', 'reuse', '--out', {str(tmp_path)!r}]))")
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(tmp_path.glob("latency_tiny-random_cpu.json"))


def test_a_subcommand_whose_package_is_missing_says_so():
    result = run("from dilaserve.cli import main\nsys.exit(main(['demo']))")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "needs the Python package 'httpx'" in result.stderr


def test_serve_without_its_packages_says_which_is_missing():
    """`serve` registers without its extras (its parser imports none); running it must still
    end in a message naming the package, not a traceback."""
    result = run("from dilaserve.cli import main\nsys.exit(main(['serve']))")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "needs the Python package 'pydantic'" in result.stderr or "needs the Python package 'ray'" in result.stderr
