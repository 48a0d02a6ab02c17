"""The README's library example runs as written."""
import re


def test_library_api_example_runs(repo_root):
    readme = (repo_root / "README.md").read_text()
    section = readme.split("## Library API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md:Library API", "exec"), namespace)
    assert namespace["student"].grad is not None  # backward reached the student
    assert int(namespace["memory"].ptr) == 64
