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


def test_trainer_example_runs(repo_root, capsys):
    readme = (repo_root / "README.md").read_text()
    section = readme.split("## Library API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    code = next(b for b in blocks if "MaSSLTrainer" in b)
    namespace: dict = {}
    exec(compile(code, "README.md:Library API (trainer)", "exec"), namespace)
    assert namespace["trainer"].global_step == 1
    assert "'loss':" in capsys.readouterr().out


def test_layout_lists_every_top_level_python_file(repo_root):
    readme = (repo_root / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    for path in sorted(repo_root.glob("*.py")):
        assert f"`{path.name}`" in layout, f"{path.name} missing from the README's layout"
