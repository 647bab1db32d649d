"""docs/api.md runs as written: every python block, in order, in one namespace, in a fresh folder."""

import contextlib
import io
import os
import re

from tests.conftest import REPO


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_api_snippets_run(tmp_path, monkeypatch):
    blocks = python_blocks((REPO / "docs" / "api.md").read_text())
    assert len(blocks) >= 7
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        for block in blocks:
            exec(compile(block, "docs/api.md", "exec"), namespace)
    out = printed.getvalue()
    assert "features/digits/train/efficientnet_lite0.h5 30 written" in out
    assert "(30, 1280) float32" in out and "torch.Size([16, 1280]) torch.int64" in out
    assert "(3, 1280) float32" in out and out.rstrip().endswith("True 1.0")
    assert namespace["probabilities"].shape == (20, 10)
    assert os.path.isfile("heads/digits/head.h5")
    assert "True 20\n" in out and os.path.isfile("heads/digits/finetuned/trunks/efficientnet_lite0.pt")


def test_the_readme_tree_is_the_package():
    text = (REPO / "README.md").read_text()
    tree = text[text.index("## Layout"):].split("```text\n", 1)[1].split("```", 1)[0]
    listed, folders = set(), []
    for line in tree.splitlines():
        name = line.strip().split()[0]
        depth = (len(line) - len(line.lstrip())) // 2
        folders = folders[:depth]
        if name.endswith("/"):
            folders.append(name)
            listed.add("".join(folders) + "__init__.py")  # a folder line stands for its package module
        elif name.endswith(".py"):
            listed.add("".join(folders) + name)
    listed = {path for path in listed if path.startswith("featurekit/")}
    assert listed == {str(p.relative_to(REPO)) for p in (REPO / "featurekit").rglob("*.py")}
