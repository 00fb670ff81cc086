"""The README cannot rot: every script it runs exists and accepts every flag it is given.

The commands themselves run elsewhere: the test command is CI's, the demo runs reduced in
test_demo.py, generate/convert/distill run end to end in their own tests.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def readme_commands() -> list[list[str]]:
    text = ROOT.joinpath("README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if any(w.startswith("scripts/") for w in words):
                commands.append(words)
    return commands


COMMANDS = readme_commands()


def test_readme_has_the_commands():
    scripts = {next(w for w in c if w.startswith("scripts/")) for c in COMMANDS}
    assert {"scripts/demo.py", "scripts/generate.py", "scripts/distill.py", "scripts/convert_checkpoint.py"} <= scripts


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_uses_real_flags(words):
    at = next(i for i, w in enumerate(words) if w.startswith("scripts/"))
    script = ROOT / words[at]
    assert script.exists(), script
    helptext = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert helptext.returncode == 0, helptext.stderr
    for flag in (w.split("=")[0] for w in words[at + 1 :] if w.startswith("--")):
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", helptext.stdout), f"{script.name} has no {flag}"
