"""The suite's own guard (conftest.py): a test that leaves a child process running fails the
run, also when it ran in a pytest-xdist worker (pytest.ini runs the files in parallel) and the
finding has to reach the controller."""
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

LEAKING_TEST = '''
import multiprocessing, time

def _sleep():
    time.sleep(600)

def test_leaves_a_child_running():
    multiprocessing.get_context("fork").Process(target=_sleep, name="planted-sleeper").start()
'''


def test_a_leftover_child_process_in_an_xdist_worker_fails_the_run(tmp_path):
    (tmp_path / "test_leak.py").write_text(LEAKING_TEST)
    # The repo's conftest loaded as a plugin on a folder outside the suite.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-n", "2",
         "-p", "no:cacheprovider", "test_leak.py"],
        cwd=tmp_path, env={"PYTHONPATH": str(TESTS), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "1 passed" in output, output
    assert "error: tests left child process(es) running: planted-sleeper" in output, output
