"""`genesis serve` and `genesis plot`: a real server on loopback, a real tiny run with a real branch, a real browser.

The server is started as users start it (`genesis serve` in its own process) and spoken to over HTTP.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from genesis.config import REPO_ROOT as REPO
from genesis_model.launch import free_port

TINY_BRANCH = REPO / "configs" / "branch" / "tiny.yaml"
MILESTONE = "step_00000150"
# The branch here only has to exist as real SFT and DPO model directories with an eval.json: a few steps each.
QUICK_BRANCH = ["sft.max_steps=4", "dpo.max_steps=2", "eval.max_prompts=2", "eval.max_pairs=8",
                "eval.max_new_tokens=8", "eval.samples=1"]


class Server:
    """`genesis serve` in a subprocess, stopped at the end."""

    def __init__(self, run_dir: Path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--run-dir", str(run_dir), "--port", str(self.port),
             "--device", "cpu", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stdout.read()
            try:
                httpx.get(self.url + "/api/status", timeout=2)
                return
            except httpx.TransportError:
                time.sleep(0.3)
        raise AssertionError("genesis serve did not answer within 120 s")

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def generate(self, timeout: float = 120, **body) -> tuple[int, list[tuple[str, dict]]]:
        """POST /api/generate; (status, [(event, data), ...]) read as the events arrive."""
        events = []
        with httpx.stream("POST", self.url + "/api/generate", json=body, timeout=timeout) as response:
            if response.status_code != 200:
                response.read()
                return response.status_code, [("error", response.json())]
            events = list(read_events(response))
        return 200, events

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def read_events(response: httpx.Response):
    kind = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield kind, json.loads(line.removeprefix("data: "))


@pytest.fixture(scope="module")
def served_run(tiny_trunk, tmp_path_factory) -> Path:
    """A copy of the tiny trunk (checkpoints 50 and 100, milestone 150) with a real SFT → DPO branch off 150."""
    run_dir = tmp_path_factory.mktemp("served") / "trunk"
    shutil.copytree(tiny_trunk, run_dir, ignore=shutil.ignore_patterns("*.lock"))
    branch = subprocess.run(
        [sys.executable, "-m", "cli.main", "branch", "--milestone", str(run_dir / "milestones" / MILESTONE),
         "--config", str(TINY_BRANCH), "--out", str(run_dir / "branches" / MILESTONE), *QUICK_BRANCH],
        capture_output=True, text=True, timeout=900, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert branch.returncode == 0, branch.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def server(served_run):
    server = Server(served_run, "--queue-size", "1", "--max-new-tokens", "300", "--max-prompt-chars", "500")
    yield server
    server.stop()


# ---------------------------------------------------------------------------------------------------------------
# Watching


@pytest.mark.slow
@pytest.mark.integration
def test_status_shows_the_trainers_progress_and_its_newest_metrics(server, served_run):
    latest = json.loads((served_run / "latest.json").read_text())
    last_logged = [json.loads(line) for line in (served_run / "metrics.jsonl").read_text().splitlines()][-1]
    status = server.get("/api/status").json()
    assert status["problem"] is None
    assert (status["step"], status["target_step"], status["state"]) == (150, 150, latest["status"])
    assert status["progress"] == 1.0
    # latest.json of a finished run holds no loss; the page takes it from the last logged step.
    assert status["loss"] == pytest.approx(last_logged["loss"])
    assert status["lr"] == pytest.approx(last_logged["lr"]) and status["grad_norm"] == pytest.approx(last_logged["grad_norm"])
    assert status["tokens_per_s"] > 0
    assert status["last_milestone"] == "milestone step 150"
    assert set(status["val_loss"]) >= {"prose", "dialog", "all"}
    assert str(served_run) not in json.dumps(status), "the page must not show absolute paths"


@pytest.mark.slow
@pytest.mark.integration
def test_curves_give_every_logged_step_and_only_newer_ones_when_asked(server, served_run):
    rows = [json.loads(line) for line in (served_run / "metrics.jsonl").read_text().splitlines()]
    curves = server.get("/api/curves").json()
    assert [step for step, _ in curves["train"]["loss"]] == [row["step"] for row in rows]
    for key in ("lr", "grad_norm", "tokens_per_s"):
        assert len(curves["train"][key]) == len(rows)
    assert set(curves["val"]) >= {"prose", "dialog", "all"}
    assert [step for step, _ in curves["val"]["all"]] == [row["step"] for row in rows if "val_loss/all" in row]
    newer = server.get("/api/curves?since=100").json()
    assert [step for step, _ in newer["train"]["loss"]] == [row["step"] for row in rows if row["step"] > 100]
    assert server.get("/api/curves?since=150").json()["train"] == {}


@pytest.mark.slow
@pytest.mark.integration
def test_the_tree_shows_milestones_with_their_branch_and_its_evaluation(server, served_run):
    tree = server.get("/api/tree").json()
    assert [m["step"] for m in tree["milestones"]] == [150]
    branch = tree["milestones"][0]["branch"]
    assert branch["sft"] and branch["dpo"] and not branch["in_progress"]
    evaluation = json.loads((served_run / "branches" / MILESTONE / "eval.json").read_text())
    for stage in ("sft", "dpo"):
        assert branch["eval"][stage]["preference_accuracy"] == evaluation[stage]["preference_accuracy"]
    # Step 150 was saved as a milestone, not also as a rolling checkpoint.
    assert tree["checkpoints"] == ["step_00000050", "step_00000100"]
    models = [m["id"] for m in server.get("/api/models").json()["models"]]
    assert models == ["checkpoint/step_00000050", "checkpoint/step_00000100", f"milestone/{MILESTONE}",
                      f"branch/{MILESTONE}/sft", f"branch/{MILESTONE}/dpo"]


@pytest.mark.slow
def test_plot_writes_a_png_of_the_runs_curves_and_refuses_a_run_with_nothing_logged(served_run, tmp_path):
    out = tmp_path / "curves.png"
    done = subprocess.run([sys.executable, "-m", "cli.main", "plot", "--run-dir", str(served_run), "-o", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    empty = subprocess.run([sys.executable, "-m", "cli.main", "plot", "--run-dir", str(tmp_path), "-o",
                            str(tmp_path / "none.png")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert empty.returncode != 0 and "nothing logged yet" in empty.stderr and len(empty.stderr.splitlines()) == 1
    assert not (tmp_path / "none.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# Trying


@pytest.mark.slow
@pytest.mark.integration
def test_generation_streams_the_same_text_as_the_cli(server, served_run):
    model = f"branch/{MILESTONE}/dpo"
    status, events = server.generate(model=model, prompt="Why do leaves change colour?", chat=True,
                                     temperature=0, max_new_tokens=40)
    assert status == 200
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("token") >= 2
    assert "Be helpful" in events[0][1]["system_prompt"] or "helpful" in events[0][1]["system_prompt"]
    streamed = "".join(data["text"] for kind, data in events if kind == "token")
    done = events[-1][1]
    assert done["tokens"] >= 1 and done["stopped"] in ("stop_token", "length")
    cli = subprocess.run([sys.executable, "-m", "cli.main", "generate", "--hf",
                          str(served_run / "branches" / MILESTONE / "dpo"), "--chat", "--prompt",
                          "Why do leaves change colour?", "--temperature", "0", "--max-new-tokens", "40"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.rstrip("\n") == streamed


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("body, status, message", [
    ({"prompt": "x" * 501}, 400, "over the limit of 500"),
    ({"max_new_tokens": 301}, 400, "max_new_tokens: 301 is over the limit of 300"),
    ({"prompt": "   "}, 400, "prompt: empty"),
    ({"temperature": -1}, 400, "temperature"),
    ({"seed": 2**64}, 400, "request field seed"),  # used to overflow torch's manual_seed mid-stream
    ({"colour": "blue"}, 400, "colour"),
    ({"model": "milestone/step_00000999"}, 404, "not in this run"),
])
def test_requests_outside_the_limits_are_refused_with_one_line(server, body, status, message):
    request = {"model": f"milestone/{MILESTONE}", "prompt": "Hello", "chat": False, **body}
    response = httpx.post(server.url + "/api/generate", json=request, timeout=30)
    assert response.status_code == status
    assert message in response.json()["error"] and "\n" not in response.json()["error"]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("model", [
    "../../../../etc/passwd", "/etc/passwd", f"milestone/{MILESTONE}/../../../../etc/passwd",
    f"branch/{MILESTONE}/../../config.yaml", "checkpoint/step_00000050/", "registry/../../x/1", "milestone/step_150",
])
def test_models_are_chosen_only_from_the_catalogue_never_by_path(server, model):
    response = httpx.post(server.url + "/api/generate", json={"model": model, "prompt": "Hello"}, timeout=30)
    assert response.status_code == 404 and "/api/models" in response.json()["error"]


@pytest.mark.slow
@pytest.mark.integration
def test_static_files_do_not_reach_outside_their_folder(server):
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/%2e%2e%2f%2e%2e%2fcli.py"):
        response = httpx.get(server.url + path, timeout=10)
        assert response.status_code == 404, path
        assert "create_app" not in response.text
    assert "<title>Genesis</title>" in server.get("/").text
    assert server.get("/static/app.js").status_code == 200


@pytest.mark.slow
@pytest.mark.integration
def test_a_full_line_answers_429_and_every_other_request_finishes(server):
    """Queue size 1: one generating and one waiting per model. A burst of 12 on a model not loaded yet (its
    load keeps the first request in line) gets the rest refused at once."""
    body = {"model": "checkpoint/step_00000050", "prompt": "The", "chat": False, "max_new_tokens": 20, "seed": 1}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: server.generate(timeout=120, **body), range(12)))
    statuses = sorted(status for status, _ in results)
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1 and set(statuses) == {200, 429}
    for status, events in results:
        if status == 200:
            assert events[-1][0] == "done"
        else:
            assert "try again shortly" in events[0][1]["error"]
    assert server.get("/api/models").json()["models"][0]["in_line"] == 0


@pytest.mark.slow
@pytest.mark.integration
def test_a_client_that_goes_away_stops_its_generation_and_frees_its_place(server):
    before = server.get("/api/stats").json()
    # Greedy plain text from the base model runs to the length limit (~250 tokens, a second or more on CPU).
    body = {"model": f"milestone/{MILESTONE}", "prompt": "The", "chat": False, "max_new_tokens": 250, "temperature": 0}
    with httpx.stream("POST", server.url + "/api/generate", json=body, timeout=60) as response:
        events = read_events(response)
        assert next(events)[0] == "start"
        assert next(events)[0] == "token"
    # Leaving the block closed the connection after the first token.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = server.get("/api/stats").json()
        if stats.get("cancelled", 0) > before.get("cancelled", 0):
            break
        time.sleep(0.1)
    assert stats.get("cancelled", 0) == before.get("cancelled", 0) + 1
    assert stats.get("answered", 0) == before.get("answered", 0)
    model = next(m for m in server.get("/api/models").json()["models"] if m["id"] == body["model"])
    assert model["in_line"] == 0


# ---------------------------------------------------------------------------------------------------------------
# A run that is not in shape


@pytest.mark.slow
@pytest.mark.integration
def test_a_run_with_no_checkpoints_a_corrupt_latest_json_and_a_broken_model_keeps_the_page_working(served_run, tmp_path):
    run_dir = tmp_path / "young"
    run_dir.mkdir()
    server = Server(run_dir)
    try:
        status = server.get("/api/status").json()
        assert "no latest.json yet" in status["problem"] and status["step"] is None
        assert server.get("/api/models").json()["models"] == []
        assert server.get("/api/tree").json()["milestones"] == []
        assert server.get("/api/curves").json()["train"] == {}

        # The run starts: one logged step and a good latest.json, then a half-written one.
        latest = json.loads((served_run / "latest.json").read_text()) | {"status": "training", "step": 60}
        (run_dir / "latest.json").write_text(json.dumps(latest))
        first = [line for line in (served_run / "metrics.jsonl").read_text().splitlines()][0]
        (run_dir / "metrics.jsonl").write_text(first + "\n" + first[: len(first) // 2])
        assert server.get("/api/status").json()["step"] == 60
        (run_dir / "latest.json").write_text(json.dumps(latest)[:40])
        status = server.get("/api/status").json()
        assert "could not be read" in status["problem"] and status["step"] == 60
        assert len(server.get("/api/curves").json()["train"]["loss"]) == 1, "the half-written line is not read"

        # A checkpoint whose weights are damaged: 503 with the reason, and the server goes on.
        shutil.copytree(served_run / "checkpoints" / "step_00000050", run_dir / "checkpoints" / "step_00000050")
        for shard in (run_dir / "checkpoints" / "step_00000050").glob("*.distcp"):
            shard.write_bytes(shard.read_bytes()[:100])
        response = httpx.post(server.url + "/api/generate", timeout=60,
                              json={"model": "checkpoint/step_00000050", "prompt": "Hi", "chat": False})
        assert response.status_code == 503 and "could not be loaded" in response.json()["error"]
        assert server.get("/api/status").status_code == 200
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------------------------
# A real browser


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed (.ci/run installs it; CI fails without it)")
def test_the_page_in_chromium_shows_progress_and_curves_and_streams_a_generation(server, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium is missing: .ci/run installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1200})
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('progress-bar').dataset.progress === '1.0000'")
            assert "step 150 of 150" in page.inner_text("#progress-text")
            page.wait_for_selector("#chart-loss path[data-series='train']")
            assert page.locator("#chart-loss path[data-series^='val']").count() >= 2
            page.wait_for_selector("[data-branch='150-dpo']")
            page.wait_for_function("document.getElementById('model-select').options.length === 5")
            # Count how many times the reply grows: a stream arrives in several pieces, a plain response in one.
            page.evaluate("""() => { window.replyUpdates = 0;
                new MutationObserver(() => window.replyUpdates++).observe(
                    document.getElementById('output'), {subtree: true, childList: true, characterData: true}); }""")
            page.select_option("#model-select", f"branch/{MILESTONE}/dpo")
            page.fill("#prompt", "What makes a good question?")
            page.click("summary")
            page.fill("#temperature", "0")
            page.fill("#max-new-tokens", "60")
            page.click("#generate")
            page.wait_for_selector("#output[data-done]", timeout=120_000)
            reply = page.inner_text("#reply")
            assert reply.strip()
            assert page.evaluate("window.replyUpdates") >= 3
            assert "tokens in" in page.inner_text("#gen-status")
            page.screenshot(path=str(tmp_path / "genesis-serve.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "genesis-serve.png").stat().st_size > 30_000


@pytest.mark.slow
@pytest.mark.integration
def test_with_a_tracking_uri_registered_models_join_the_tree_and_can_be_tried(served_run, tmp_path):
    from lineage.record import record_milestone
    from lineage.registry import connect

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = record_milestone(connect(uri), served_run / "milestones" / MILESTONE)
    server = Server(served_run, "--tracking-uri", uri)
    try:
        registry = server.get("/api/tree").json()["registry"]
        assert registry == [{"name": "genesis-base", "version": int(version), "step": 150, "parent": None}]
        model = f"registry/genesis-base/{version}"
        assert model in [m["id"] for m in server.get("/api/models").json()["models"]]
        status, events = server.generate(model=model, prompt="The", chat=False, max_new_tokens=12, temperature=0)
        assert status == 200 and events[-1][0] == "done"
        assert "models:/" not in json.dumps(server.get("/api/models").json())
    finally:
        server.stop()
