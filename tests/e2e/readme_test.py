"""The README's commands are the ones that run: its main command trains, CI runs its test line."""

import json
import re
import shlex
import subprocess
import sys

from tests.conftest import REPO


def _setup_commands():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```\n(.*?)```", text, flags=re.S)
    return [b.strip() for b in blocks if b.strip().startswith("pip install")]


def test_readme_has_exactly_two_setup_commands():
    commands = _setup_commands()
    assert len(commands) == 2, commands
    assert "python -m bigtrain.main --config configs/mnist1d.py" in commands[0]
    assert "pytest" in commands[1]
    ci = (REPO / ".ci/run").read_text()
    assert "<!-- test-command -->" in ci and "eval" in ci
    # What CI really extracts and runs is the README's test command.
    printed = subprocess.run(
        ["bash", str(REPO / ".ci/run"), "--print-command"], capture_output=True, text=True
    )
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip() == commands[1]


def test_readme_main_command_trains(tmp_path):
    """Runs the README's training command as written, shortened with a config override."""
    install, train = (part.strip() for part in _setup_commands()[0].split("&&"))
    assert install == "pip install -e ."
    argv = shlex.split(train)
    assert argv[:3] == ["python", "-m", "bigtrain.main"]
    argv[argv.index("--workdir") + 1] = str(tmp_path / "run")
    argv = [sys.executable, *argv[1:], "--config.total_steps=300", "--config.eval_every=300"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 300 and rows[-1]["eval/accuracy"] > 0.6
    assert re.search(r"^done: .*eval/accuracy=", proc.stdout, flags=re.M)
