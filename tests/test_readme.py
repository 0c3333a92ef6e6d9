"""The README stays true: its CLI reference is what argparse prints, and its examples run.

Regenerate the reference after changing an option:  python tests/test_readme.py --update
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"


def generated_reference() -> str:
    from qpack.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width
    parser = build_parser()
    parts = ["```", parser.format_help().rstrip(), "```"]
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, command in sub.choices.items():
        parts += ["", f"#### qpack {name}", "", "```", command.format_help().rstrip(), "```"]
    return "\n".join(parts)


def readme_reference() -> str:
    text = README.read_text()
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def test_cli_reference_is_in_sync(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert readme_reference() == generated_reference(), "run: python tests/test_readme.py --update"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_inference_example_runs(tmp_path, monkeypatch):
    # the API section's example, run as written against a model packed here
    block = next(b for b in _python_blocks() if "load_into" in b and "torch.no_grad" in b)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    from qpack.demo.net import SeedNet

    import qpack

    qpack.pack(SeedNet().state_dict(), "model.qpk", bits=8)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["logits"].shape == (1, 10)


def test_shell_examples_run(tmp_path, small_net):
    # the "Use" section, line by line, in a folder holding model.pt
    text = README.read_text().split("## Use", 1)[1]
    block = re.search(r"```\n(.*?)```", text, flags=re.S).group(1)
    torch.save(small_net.state_dict(), tmp_path / "model.pt")
    for line in block.splitlines():
        command = line.split("#", 1)[0].split()
        if not command:
            continue
        assert command[0] == "qpack"
        proc = subprocess.run([sys.executable, "-m", "qpack", *command[1:]], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (line, proc.stderr)


if __name__ == "__main__":
    if "--update" in sys.argv:
        text = README.read_text()
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        README.write_text(f"{head}{START}\n{generated_reference()}\n{END}{tail}")
        print("README.md CLI reference updated")
    else:
        sys.exit(pytest.main([__file__, "-q"]))


def test_sensitivity_example_runs(tmp_path, monkeypatch):
    block = next(b for b in _python_blocks() if "measure_sensitivity" in b)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    from qpack.demo.net import SeedNet

    import qpack

    loader = [(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))) for _ in range(10)]
    namespace: dict = {"model": SeedNet(), "loader": loader}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    options = qpack.info("model.qpk").metadata["qpack.options"]
    assert '"max_error": 0.05' in options
