"""The benchmark scripts refuse a bad flag before any work: one `error:` line naming the flag, exit
status 2 (gemma2.cli), nothing on stdout, no file written. "Before any work" is held by a timeout
(each run below would otherwise take minutes, or for bench_distill_loss.py fail in a worker with
status 1) and by a file size limit of 0 bytes: a script that began writing (bench_tokenize.py's
corpus) fails with "File too large" instead of the flag's message."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parents[1] / "scripts"


def refused(script: str, *argv: str) -> str:
    """Run `script` with `argv`; assert it was refused as a user error; return its one line."""

    def no_writes() -> None:  # a write then fails with EFBIG (an ignored SIGXFSZ) rather than killing
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    out = subprocess.run([sys.executable, "-B", str(SCRIPTS / script), *argv], capture_output=True, text=True,
                         timeout=60, preexec_fn=no_writes)  # fmt: skip
    assert (out.returncode, out.stdout) == (2, ""), (out.returncode, out.stdout, out.stderr)
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    return out.stderr


@pytest.mark.parametrize("argv, message", [
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--json", "{dir}"], "--json {dir} is a directory; pass a file path"),
    (["--json", "{dir}", "--overwrite"], "--json {dir} is a directory; pass a file path"),
    (["--json", "{dir}/missing/figures.json"], "the directory {dir}/missing does not exist"),
    (["--overwrite"], "--overwrite replaces an existing --json file"),
])  # fmt: skip
def test_benchmark_refuses_bad_flags_before_any_work(tmp_path, argv, message):
    argv = [a.format(dir=tmp_path) for a in argv]
    assert message.format(dir=tmp_path) in refused("benchmark.py", "--quick", *argv)


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads 0: pass 1 or more"),
    (["--tokens", "0"], "--tokens must be >= 1, got 0"),
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--variants", "naive,chunkd"], "--variants 'naive,chunkd': pass naive or chunked"),
])  # fmt: skip
def test_bench_distill_loss_checks_every_flag_in_the_parent(argv, message):
    # Small sizes: a worker that ran anyway would finish at once and be seen.
    small = ["--vocab", "64", "--hidden", "8", "--teacher-hidden", "8", "--tokens", "16"]
    assert message in refused("bench_distill_loss.py", *small, *argv)


@pytest.mark.parametrize("argv, message", [
    (["--mb", "0"], "--mb must be >= 1, got 0"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--tokenizer", "nope.model"], "tokenizer model not found: nope.model"),
])  # fmt: skip
def test_bench_tokenize_checks_its_flags_before_writing_the_corpus(argv, message):
    assert message in refused("bench_tokenize.py", "--mb", "1", *argv)
