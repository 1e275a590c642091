"""README's "Using it" works as written: every ```bash block marked ``<!-- readme-test -->`` is
run verbatim with bash (``-e -o pipefail``: any command that fails fails the test), in order, in a
fresh copy of the work tree's code, with ``.venv`` pointing at the running interpreter's
environment. MLflow, Ray's temp files, data and runs all stay in that copy.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- readme-test -->"
CODE = ("jobs", "pipeline", "models", "infra")  # what the commands run, copied
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


def using_it() -> str:
    """The text of README's "Using it" section."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Using it\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def marked_blocks(section: str) -> list[str]:
    """The ```bash blocks right after a ``MARK`` line, in order."""
    pattern = re.escape(MARK) + r"\s*\n```bash\n(.*?)\n```"
    return re.findall(pattern, section, flags=re.S)


def test_the_section_has_runnable_blocks_without_placeholders():
    blocks = marked_blocks(using_it())
    assert blocks, f"no ```bash block marked {MARK} in README's 'Using it'"
    for block in blocks:
        code = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("#"))
        assert not re.search(r"<[a-z_ -]+>|\[--", code), f"a placeholder in a runnable block:\n{block}"


def run_block(block: str, cwd: Path, env: dict[str, str], timeout_s: float) -> tuple[int, str]:
    """Run ``block`` with bash in its own process group (stopped whole if it overruns); its exit
    status and its output (stdout and stderr)."""
    proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", block], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1500)  # 2-3 min on 2 idle cores; much more when the machine is loaded
def test_readme_using_it_commands_run(tmp_path):
    blocks = marked_blocks(using_it())
    # short: Ray's socket paths under <tree>/ray_tmp must stay under 107 bytes
    tree = Path(tempfile.mkdtemp(prefix="readme-"))
    try:
        for name in CODE:
            shutil.copytree(ROOT / name, tree / name, ignore=SKIP)
        shutil.copy(ROOT / "pyproject.toml", tree)
        (tree / ".venv").symlink_to(sys.prefix, target_is_directory=True)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MLFLOW_", "RAY_", "AWS_"))}
        env["PYTHONPATH"] = str(tree)  # the copy's code, not the installed work tree's
        outs = []
        for i, block in enumerate(blocks):
            status, out = run_block(block, tree, env, timeout_s=1400)
            (tmp_path / f"block{i}.log").write_text(out)
            assert status == 0, f"block {i} exited {status}:\n{block}\n{out[-4000:]}"
            outs.append(out)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    assert_quiet_output("\n".join(outs))


EPOCH_LINE = re.compile(r"\[train\] epoch (\d+)/(\d+): train loss")


def assert_quiet_output(out: str) -> None:
    """What the jobs print by default (stdout and stderr, as in a log file): their own lines,
    one per epoch from rank 0 with the elapsed time, the summary; no colour codes, no Ray
    (Data / Train) INFO lines, no deprecation warnings. (``--verbose``'s wiring:
    tests/jobs/test_train_logs.py.)"""
    epochs = [int(m.group(1)) for m in EPOCH_LINE.finditer(out)]
    assert epochs == [1, 2, 1, 2], out  # training, then retraining: 2 epochs each, once each
    assert re.search(r"elapsed \d+ s", out), "the epoch line gives the elapsed time"
    assert "val accuracy" in out and "bytes read per sample" in out  # the training summary
    assert "Reporting training result" not in out
    assert "\x1b[" not in out, "colour codes in a log that is not a terminal"
    assert "streaming_executor" not in out, "Ray Data's INFO lines"
    assert "Deprecat" not in out, out
    assert "Failed to query Ray Train Controller" not in out  # once a second without the hook
    # the jobs' own lines, Ray's warnings and errors; not hundreds of Ray lines. (With another
    # Ray instance on the machine, Ray Train's placement group cleaner dies with "Found
    # multiple active Ray instances", a traceback of 28 lines: Ray's, left out.)
    lines = [x for x in out.splitlines() if not x.startswith("(PlacementGroupCleaner")]
    assert len(lines) < 90, out
