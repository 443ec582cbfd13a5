"""The first ten minutes (#26): `genesis --version`, an example in every command's help, and (slow) every command
`genesis demo` prints, run as printed."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PLAIN_SHELL_DROPS, REPO


def test_version_names_the_package_the_git_commit_and_torch():
    done = subprocess.run([sys.executable, "-m", "cli.main", "--version"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    assert re.fullmatch(r"genesis \d+\.\d+\.\d+\S* \(git [0-9a-f]{12}(-dirty)?\), torch \S+, Python \S+", line), line
    assert commit in line


def test_every_command_help_ends_with_examples_of_that_command_which_parse():
    from cli.main import build_parser, subparsers

    parser = build_parser()
    commands = list(subparsers(parser))
    assert {" ".join(words) for words, _ in commands} >= {
        "train", "export-hf", "export-gguf", "import-hf", "generate", "data", "data prepare", "data verify",
        "tokenizer", "tokenizer train", "tokenizer hf", "branch", "lineage", "promote", "demo", "serve", "plot"}
    for words, command in commands:
        help_text = command.format_help()
        block = help_text.split("\nexample:\n" if "\nexample:\n" in help_text else "\nexamples:\n")
        assert len(block) == 2, f"genesis {' '.join(words)} --help has no example block"
        lines = [line.strip() for line in block[1].splitlines() if line.strip()]
        assert lines and all(line.startswith("genesis ") for line in lines), (words, lines)
        for line in lines:
            argv = shlex.split(line)[1:]
            assert argv[:len(words)] == words, f"{line!r} is not an example of genesis {' '.join(words)}"
            parsed = parser.parse_args(argv)  # the example is a command the parser takes as written
            assert parsed.handler is not None


def test_trl_figures_become_one_genesis_line_per_logging_step():
    from branch.training import log_line

    logs = {"epoch": "0.4348", "loss": "5.664", "grad_norm": "0.8496", "learning_rate": "0.0009527", "entropy": "5.897",
            "num_tokens": "1.276e+04"}
    assert log_line("sft", 10, 46, logs) == ("sft step 10/46: loss 5.6640, grad_norm 0.850, learning_rate 9.53e-04, "
                                             "epoch 0.43, entropy 5.897, num_tokens 1.276e+04")


def test_the_readmes_training_runs_have_run_dirs_of_their_own_not_the_demos_trunk():
    from genesis.config import TrainConfig, load_config

    demo_trunk = load_config(TrainConfig, REPO / "configs" / "train" / "tiny-demo.yaml").run_dir
    readme = (REPO / "README.md").read_text()
    trains = [shlex.split(line.split("   #")[0])[1:] for line in readme.splitlines()
              if line.startswith(".venv/bin/genesis train ")]
    assert trains
    for argv in trains:
        config = Path(argv[argv.index("--config") + 1])
        overrides = [word for word in argv if "=" in word and not word.startswith("-")]
        run_dir = load_config(TrainConfig, REPO / config, overrides).run_dir
        assert run_dir.resolve() != demo_trunk.resolve(), (argv, run_dir)


def test_with_the_projects_registry_the_demos_commands_need_no_tracking_uri(monkeypatch):
    """`genesis demo` registers into the project's store (runs/mlflow), where a bare `genesis lineage` looks; a store
    or Prefect home set through the environment is written into the commands instead."""
    from flows.demo import _program, next_commands
    from lineage.registry import default_tracking_uri

    for name in PLAIN_SHELL_DROPS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(REPO)
    genesis, prefect = _program("genesis"), _program("prefect")
    assert genesis == ".venv/bin/genesis" or Path(genesis).is_absolute()  # from the repository root, or anywhere
    commands = [command for command, _ in next_commands(default_tracking_uri(), REPO / "runs/demo/trunk",
                                                        "models:/genesis-dpo@latest")]
    assert commands[0] == f"{genesis} lineage"
    assert commands[1].startswith(f"{genesis} generate --model models:/genesis-dpo@latest --chat")
    assert commands[4] == f"{prefect} server start"
    monkeypatch.setenv("PREFECT_HOME", "/tmp/p h")
    other = [command for command, _ in next_commands("sqlite:////tmp/x/mlflow.db", REPO / "runs/demo/trunk", "m")]
    assert other[0] == f"{genesis} lineage --tracking-uri sqlite:////tmp/x/mlflow.db"
    assert other[4] == f"PREFECT_HOME='/tmp/p h' {prefect} server start"


# ---------------------------------------------------------------------------------------------------------------
# `genesis demo`, once per session (--quick: the same tree and the same printed commands, smaller)

# What a flow's log is not for: libraries' progress bars, raw trainer dicts, warnings and start-up chatter.
NOISE = {
    "progress bars": re.compile(r"\d+%\|| it/s\]|examples/s\]"),
    "raw trainer dicts": re.compile(r"^\{'(loss|train_runtime|train_loss|eval_)"),
    "warnings": re.compile(r"Warning: |warnings\.warn\(| \| WARNING |^W\d{4} "),
    "library chatter": re.compile(r"(^|\| )distributed\.|mlflow\.(system_metrics|store\.db)|temporary server|"
                                  r"prefect\.io/docs|prefect\.task_runner\.dask|huggingface_hub|Repo card metadata"),
    "tracebacks and lost logs": re.compile(r"^Traceback |Error logging to API|All connection attempts failed"),
}


def noise_lines(text: str) -> dict[str, list[str]]:
    found = {kind: [] for kind in NOISE}
    after_warning = False
    for line in text.splitlines():
        if after_warning and line.startswith("  "):  # the source line Python prints under a warning
            found["warnings"].append(line)
            continue
        after_warning = bool(re.search(r"\w+Warning: ", line))
        for kind, pattern in NOISE.items():
            if pattern.search(line):
                found[kind].append(line)
                break
    return found


def printed_commands(output: str) -> list[tuple[str, str]]:
    """(command, the comment line above it) for each command of the demo's "Next (paste into a shell in ...):"."""
    block = output.split("\nNext (paste into a shell in ", 1)[1].splitlines()[1:]
    commands, comment = [], ""
    for line in block:
        if not line.startswith("  "):
            break
        if line.strip().startswith("#"):
            comment = line.strip().lstrip("# ")
        else:
            commands.append((line.strip(), comment))
    return commands


def _while_serving(command: str, url: str, env: dict, check, timeout: float = 180):
    """Start a server command as printed, wait for `url` to answer, return `check(page text)`, stop the server."""
    import os
    import signal
    import socket
    import time
    import urllib.request
    from urllib.parse import urlparse

    port = urlparse(url).port
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            pytest.fail(f"port {port} is taken on this machine; cannot run {command!r} as printed")
    server = subprocess.Popen(["bash", "-c", command], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert server.poll() is None, f"{command!r} exited {server.returncode}: {server.stdout.read()[-3000:]}"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return check(response.read().decode("utf-8", "replace"))
            except OSError:
                time.sleep(0.25)  # a server that answers is asked at once (each wait here used to cost ~0.5 s)
        pytest.fail(f"{command!r}: {url} did not answer within {timeout:.0f} s")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _prefect_flows(base: str) -> set[str]:
    """The names of the flows with runs on the Prefect server at `base`."""
    import json
    import urllib.request

    request = urllib.request.Request(f"{base.rstrip('/')}/api/flows/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return {flow["name"] for flow in json.loads(response.read())}


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(1800)  # the first of these runs the session's demo
def test_every_command_the_demo_prints_works_pasted_into_a_plain_shell(demo_run):
    import os

    commands = printed_commands(demo_run["stdout"])
    assert [command for command, _ in commands] == demo_run["summary"]["commands"]
    assert len(commands) == 5, commands
    plain = {key: value for key, value in os.environ.items() if key not in PLAIN_SHELL_DROPS}
    for command, comment in commands:
        words = shlex.split(command)
        url = re.search(r"http://127\.0\.0\.1:\d+/?", comment)
        if url:  # a server: started as printed, its page asked for, stopped
            url = url.group(0)
            if words[-2:] == ["server", "start"]:  # Prefect: the demo's runs are in the database it reads
                flows = _while_serving(command, url.rstrip("/") + "/api/health", plain,
                                       lambda page: _prefect_flows(url))
                assert {"genesis-flow", "data-flow", "branch-flow"} <= flows, flows
            else:
                page = _while_serving(command, url, plain, lambda page: page)
                assert "<html" in page.lower() or page.strip(), command
            continue
        done = subprocess.run(["bash", "-c", command], cwd=REPO, env=plain, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{command!r} as printed: {done.stderr[-3000:]}"
        if "lineage" in words:  # the tree the demo registered, not "nothing registered yet"
            assert "nothing registered" not in done.stdout
            assert "genesis-dpo" in done.stdout and "step      30" in done.stdout and "step      60" in done.stdout, \
                done.stdout
        if "generate" in words:  # (the quick tree's models may well say nothing yet: it ran, and loaded the model)
            assert "error" not in done.stderr.lower(), done.stderr[-2000:]
    assert {shlex.split(c)[1] for c, _ in commands if Path(shlex.split(c)[0]).name == "genesis"} == \
        {"lineage", "generate", "serve"}


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(1800)  # the first of these runs the session's demo
def test_the_demo_ends_with_a_stage_summary_and_keeps_library_noise_out_of_its_log(demo_run):
    output, summary = demo_run["output"], demo_run["summary"]
    work = demo_run["work"]
    noise = noise_lines(output)
    assert not any(noise.values()), {kind: lines[:3] for kind, lines in noise.items() if lines}
    # TRL's figures: one Genesis line per logging step (sft.logging_steps=2 of 4 steps, dpo every step of 2).
    assert len(re.findall(r"sft step \d+/4: loss ", output)) == 2 * 2, output[-3000:]
    assert len(re.findall(r"dpo step \d+/2: loss ", output)) == 2 * 2

    table = output.split("genesis demo: done in ", 1)[1]
    assert [s["flow"] for s in summary["stages"]] == ["data-flow", "trunk", "branch-flow", "branch-flow"]
    for label, path in (("data", work / "demo" / "data"), ("trunk (pretrain)", work / "demo" / "trunk"),
                        ("branch step_00000030", work / "demo" / "trunk" / "branches" / "step_00000030"),
                        ("branch step_00000060", work / "demo" / "trunk" / "branches" / "step_00000060")):
        row = re.search(rf"^{re.escape(label)} +(\d+ s|\d+ min \d+ s)   (\S+)", table, re.M)
        assert row and Path(row.group(2)) == path.resolve() and path.is_dir(), (label, table[:2000])
    assert str(work / "mlflow" / "mlflow.db") in table
