"""The README cannot rot: every command it shows is parsed by its script's own parser, values
included (a launcher in front, such as torchrun, by the launcher's parser too).

The commands themselves run elsewhere: the test command is CI's, the demo runs reduced in
test_demo.py, generate/convert/distill run end to end in their own tests.
"""

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from gemma2.dtypes import to_dtype

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


class _Parsed(BaseException):  # not an Exception: no script's error handling may swallow it
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def parse_with_script(script: Path, args: list[str], monkeypatch) -> argparse.Namespace:
    """Run `script` as __main__ with `args` until its parser returns: the namespace it got."""
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **k):
        raise _Parsed(parse(self, *a, **k))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    try:
        runpy.run_path(str(script), run_name="__main__")
    except _Parsed as done:
        return done.namespace
    except SystemExit as e:  # argparse refused the command line: its message is on stderr
        pytest.fail(f"{script.name} {' '.join(args)}: exit {e.code} while parsing")
    pytest.fail(f"{script.name} never parsed its arguments")


def test_readme_has_the_commands():
    scripts = {next(w for w in c if w.startswith("scripts/")) for c in COMMANDS}
    assert {"scripts/demo.py", "scripts/generate.py", "scripts/distill.py", "scripts/convert_checkpoint.py"} <= scripts
    assert any(c[0] == "torchrun" for c in COMMANDS)


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_parses(words, monkeypatch):
    at = next(i for i, w in enumerate(words) if w.startswith("scripts/"))
    script = ROOT / words[at]
    assert script.exists(), script
    if words[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        launcher = get_args_parser().parse_args(words[1:])
        assert launcher.training_script == words[at]
    args = parse_with_script(script, words[at + 1 :], monkeypatch)
    for name in ("dtype", "teacher_dtype"):  # scripts that check a dtype after parsing: the same names
        value = getattr(args, name, None)
        if value not in (None, "auto"):
            to_dtype(value)


def test_a_bad_value_fails_the_parse(monkeypatch, capsys):
    """The check above can fail: a value the script refuses stops the parse."""
    with pytest.raises(pytest.fail.Exception, match="exit 2"):
        parse_with_script(ROOT / "scripts/distill.py", ["--student", "tiny", "--out", "x", "--teacher-dtype", "fp16"],
                          monkeypatch)  # fmt: skip
    assert "Gemma 2's activations overflow float16" in capsys.readouterr().err
