"""gemma2.data_args: the data flags that do not go together are refused, naming the flags given."""

from __future__ import annotations

import argparse

import pytest

from gemma2.data_args import add_data_arguments, check_data_args


def parse(*args: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_data_arguments(p)
    return p.parse_args(args)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompts", "p.jsonl", "--seq-len", "64"], r"--eval-prompts: drop --seq-len$"),
        (["--prompts", "p.jsonl", "--eval-data", "d.txt"], r"--eval-prompts: drop --eval-data$"),
        (["--prompts", "p.jsonl", "--seq-len", "64", "--eval-data", "d.txt"], r"drop --seq-len and --eval-data$"),
        (["--data", "d.txt", "--eval-prompts", "p.jsonl"], "--eval-prompts goes with --prompts"),
        (["--data", "d.txt", "--eval-data", "e.txt", "--holdout-fraction", "0.1"], "pass one or the other"),
    ],
)
def test_flags_that_do_not_go_together_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        check_data_args(parse(*args))


def test_flags_that_go_together_pass():
    for args in (["--prompts", "p.jsonl", "--eval-prompts", "q.jsonl"], ["--data", "d.txt", "--seq-len", "64"], []):
        check_data_args(parse(*args))
