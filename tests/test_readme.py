import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_python_example_runs():
    (code,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["y"].shape == (4, 128, 768)
    assert scope["logits_k8"].shape == scope["logits_mean"].shape == (2, 64, scope["model"].config.vocab_size)


def test_ci_runs_exactly_the_readme_test_command():
    readme_command = re.search(r"^(\S.*?)\s+# test$", README, flags=re.M).group(1)
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == readme_command
