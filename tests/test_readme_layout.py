"""The README's layout section (the block under "## Layout") names what the tree holds: every
entry exists, and a folder whose files it lists lists (or names in a line) every module."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def layout() -> dict[str, str]:
    """Path of each entry (e.g. "infmoe/layers/dense.py", "infmoe/bench/") → its line."""
    block = re.search(r"^## Layout\n\n```\n(.*?)```", README, flags=re.S | re.M).group(1)
    entries, parents = {}, []  # parents: the folder at each indentation level
    for line in block.splitlines():
        depth = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        parents[depth:] = []
        path = "".join(parents) + name
        entries[path] = line
        if name.endswith("/"):
            parents.append(name)
    return entries


def test_every_entry_exists():
    missing = [path for path in layout() if not (ROOT / path).exists()]
    assert missing == []


def test_a_folder_whose_files_are_listed_names_all_its_modules():
    entries = layout()
    for folder in [path for path in entries if path.endswith("/")]:
        section = [line for path, line in entries.items() if path.startswith(folder)]
        if len(section) == 1:
            continue  # summarised in one line, its files not listed
        text = " ".join(section)
        modules = [p.name for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py"]
        modules += [f"{p.name}/" for p in (ROOT / folder).iterdir() if (p / "__init__.py").exists()]
        unnamed = [m for m in modules if not re.search(rf"(?<![\w.]){re.escape(m)}", text)]
        assert unnamed == [], f"README layout: {folder} lists files but not {unnamed}"
