"""Runs an operator can read: names, a killed run marked Crashed by the next, progress and
results by outcome, per-output artifacts; checked through the API and in the real UI.

One scenario serves every test: a bulk run over a dataset with a bad row is SIGKILLed, the
same command runs again (`python -m flows.bulk`'s `main`), then once more (all cached).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import flow
from prefect.states import Running

from fastvideo.pipelines.stages.decoding import DecodingStage
from flows.bulk import bulk, main
from tasks.runs import (
    HEARTBEAT_LABEL,
    HOST_LABEL,
    OUTPUT_TAG,
    PROCESS_LABEL,
    find_lineage,
    output_key,
    process_id,
    process_labels,
)
from tests.flows.helpers import PROMPTS, REPO, TINY, PrefectServer, stop_group, write_dataset

ROWS = [{"item_id": "cat", "prompt": PROMPTS[0]}, {"item_id": "car", "prompt": PROMPTS[1]},
        {"item_id": "bad", "prompt": PROMPTS[2]}]


def _decode_fails_for_bad(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding item `bad` fails (in this process), every time."""
    real_forward = DecodingStage.forward

    def forward(self, batch, fastvideo_args):
        if batch.prompt == [PROMPTS[2]]:
            raise RuntimeError("injected decode failure")
        return real_forward(self, batch, fastvideo_args)

    monkeypatch.setattr(DecodingStage, "forward", forward)


@dataclass
class Scenario:
    output: Path
    key: str
    killed: Any
    """The killed run, as the API returns it after the second run."""
    second: Any
    third: Any
    cli_output: str


def _runs(tag: str) -> list[Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC)


def _artifacts(flow_run_id: UUID) -> dict[str, Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in artifacts}


def _logs(flow_run_id: UUID) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]


@pytest.fixture(scope="module")
def scenario(prefect_server: PrefectServer, tiny_wan_path: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    folder = tmp_path_factory.mktemp("run-record")
    dataset = write_dataset(folder / "clips.jsonl", ROWS)
    output = folder / "night-1"
    tag = OUTPUT_TAG + output_key(str(output))
    argv = ["--dataset", str(dataset), "--output", str(output), "--model-path",
            str(tiny_wan_path), *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]]

    # Killed as soon as it has recorded its process: before any item is made.
    env = {**os.environ, **prefect_server.settings_env(), "PYTHONPATH": str(REPO)}
    with open(folder / "killed.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flows.bulk", *argv], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not [r for r in _runs(tag) if PROCESS_LABEL in r.labels]:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    (folder / "killed.log").read_text()[-3000:]
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            stop_group(proc)
    (killed,) = _runs(tag)
    assert killed.state.name == "Running"  # what Prefect shows of a killed run by itself

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch:
        _decode_fails_for_bad(monkeypatch)
        with contextlib.redirect_stdout(printed):
            assert main(argv) == 1
        third = bulk(dataset=str(dataset), output=str(output), model_path=str(tiny_wan_path),
                     return_state=True, **TINY)
    assert third.is_failed()
    killed, second, third = _runs(tag)
    return Scenario(output=output, key=output_key(str(output)), killed=killed, second=second,
                    third=third, cli_output=printed.getvalue())


def test_killed_run_is_crashed_and_the_next_run_continues_it(scenario: Scenario) -> None:
    killed, second = scenario.killed, scenario.second
    assert killed.name == second.name == "bulk-clips-to-night-1"
    assert killed.state.name == "Crashed"
    assert "is gone" in killed.state.message and str(second.id) in killed.state.message
    logs = _logs(second.id)
    assert any(line.startswith(f"marked run bulk-clips-to-night-1 ({killed.id}) Crashed: "
                               "its process (") and line.endswith("is gone") for line in logs)
    assert f"this run continues run bulk-clips-to-night-1 ({killed.id}, Crashed)" in logs
    summary = _artifacts(second.id)[f"{scenario.key}-summary"].data
    assert f"| continues | [bulk-clips-to-night-1](/runs/flow-run/{killed.id}) (Crashed) |" \
        in summary
    assert f"| marked Crashed | [bulk-clips-to-night-1](/runs/flow-run/{killed.id})" in summary
    third_summary = _artifacts(scenario.third.id)[f"{scenario.key}-summary"].data
    assert f"[bulk-clips-to-night-1](/runs/flow-run/{second.id}) (Failed)" in third_summary


def test_progress_and_results_count_outcomes_apart(scenario: Scenario) -> None:
    assert ("2/3 items succeeded (2 made in this run, 0 cached from earlier runs), 1 failed"
            in scenario.cli_output)
    second = _artifacts(scenario.second.id)
    progress = second[f"{scenario.key}-progress"]
    # Failed items keep progress under 100%: it is the share of items with a video.
    assert progress.data == pytest.approx(200 / 3)
    assert progress.description.endswith("clips.jsonl: 2 of 3 videos (2 made in this run, "
                                         "0 cached from earlier runs), 1 failed, 0 to go")
    table = json.loads(second[f"{scenario.key}-results"].data)
    assert list(table[0])[:2] == ["status", "error"]
    assert (table[0]["status"], table[0]["item_id"]) == ("failed", "bad")
    assert "injected decode failure" in table[0]["error"]
    for row in table[1:]:
        assert row["video"].startswith("[") and "](file://" in row["video"]
        assert row["seconds"] == round(row["seconds"], 1)

    # Made by the second run, cached for the third; the bad row fails again.
    third = _artifacts(scenario.third.id)[f"{scenario.key}-progress"]
    assert third.description.endswith("2 of 3 videos (0 made in this run, 2 cached from "
                                      "earlier runs), 1 failed, 0 to go")


def test_lineage_marks_only_runs_whose_process_is_gone(prefect_server, tmp_path: Path) -> None:
    from prefect import get_client

    @flow(name="lineage-probe")
    def probe(output: str) -> None:
        return None

    output, elsewhere = str(tmp_path / "out"), str(tmp_path / "other")
    dead = subprocess.Popen(["sleep", "60"])
    dead_process = process_id(dead.pid)
    dead.kill()
    dead.wait()
    foreign = "another-boot/pid:[1]/7/1"
    labelled = {
        "dead here": ({PROCESS_LABEL: dead_process, HOST_LABEL: "here pid 7"}, output),
        "alive here": (process_labels(), output),
        "silent elsewhere": ({PROCESS_LABEL: foreign, HEARTBEAT_LABEL: "30"}, output),
        "elsewhere, no heartbeats": ({PROCESS_LABEL: foreign}, output),
        "dead here, other output": ({PROCESS_LABEL: dead_process}, elsewhere),
    }
    runs = {}
    with get_client(sync_client=True) as client:
        for name, (labels, out) in labelled.items():
            run = client.create_flow_run(probe, name=name, parameters={"output": out},
                                         tags=[OUTPUT_TAG + output_key(out)], state=Running())
            client.update_flow_run_labels(run.id, labels)
            runs[name] = run.id
        me = client.create_flow_run(probe, name="me", parameters={"output": output},
                                    state=Running())
        # Four intervals later: the silent run elsewhere missed its heartbeats.
        later = datetime.now(timezone.utc) + timedelta(seconds=120)
        lineage = find_lineage(client, me.id, output, now=later)
        states = {name: client.read_flow_run(run_id).state for name, run_id in runs.items()}
    assert {name: s.name for name, s in states.items()} == {
        "dead here": "Crashed", "alive here": "Running", "silent elsewhere": "Crashed",
        "elsewhere, no heartbeats": "Running", "dead here, other output": "Running"}
    assert "its process (here pid 7) is gone" in states["dead here"].message
    assert "sent no heartbeat since" in states["silent elsewhere"].message
    assert sorted(r.name for r in lineage.crashed) == ["dead here", "silent elsewhere"]
    assert sorted(r.name for r in lineage.running) == ["alive here", "elsewhere, no heartbeats"]
    assert (lineage.continues.name, lineage.continues.state) == ("silent elsewhere", "Crashed")


# ------------------------------------------------------------------ in the browser

def _browser() -> Any:
    """Headless Debian chromium driven by Selenium (no browser download)."""
    from selenium import webdriver  # in the dev extras: missing means a broken install
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(apt-get install chromium chromium-driver; .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(driver))


def test_the_ui_shows_what_an_operator_needs(scenario: Scenario,
                                             prefect_server: PrefectServer) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    seen: list[str] = []

    def page_shows(*texts: str) -> str:
        """The page's text once it holds every one of `texts` (the UI loads in steps)."""
        def ready(_: Any) -> bool:
            seen[:] = [browser.find_element(By.TAG_NAME, "body").text]
            return all(t in seen[0] for t in texts)
        try:
            WebDriverWait(browser, 30, poll_frequency=0.25).until(ready)
        except Exception as exc:
            raise AssertionError(f"{browser.current_url} lacks one of {texts}:\n"
                                 f"{seen[0][-3000:]}") from exc
        return seen[0]

    def open_tab(name: str) -> None:
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(
            By.XPATH, f"//li[normalize-space(.)='{name}']"))[0].click()

    ui, key, second = prefect_server.ui_url, scenario.key, scenario.second
    artifacts = _artifacts(second.id)
    try:
        browser.get(f"{ui}/runs/flow-run/{second.id}")
        page_shows("bulk-clips-to-night-1", "Failed",
                   f"this run continues run bulk-clips-to-night-1 ({scenario.killed.id}, "
                   "Crashed)")
        open_tab("Task Runs")
        text = page_shows("decode-shard-00002-bad", "write-video-shard-00000-cat",
                          "write-video-shard-00001-car")
        assert "Failed" in text and "Completed" in text
        open_tab("Artifacts")
        page_shows(f"{key}-progress", f"{key}-results", f"{key}-summary",
                   "2 of 3 videos (2 made in this run, 0 cached from earlier runs), 1 failed")

        browser.get(f"{ui}/artifacts/artifact/{artifacts[f'{key}-results'].id}")
        text = page_shows("status", "error", "bad", "injected decode failure")
        assert text.index("status") < text.index("error") < text.index("item_id")
        links = browser.find_elements(By.XPATH, "//a[contains(@href, 'file://')]")
        assert sorted(a.text for a in links if a.text.endswith(".mp4"))[:1], \
            "the videos are not links"

        browser.get(f"{ui}/artifacts/artifact/{artifacts[f'{key}-progress'].id}")
        page_shows("Progress: 66%", "1 failed")
        browser.get(f"{ui}/artifacts/artifact/{artifacts[f'{key}-summary'].id}")
        page_shows("continues", "bulk-clips-to-night-1 (Crashed)", "marked Crashed")

        browser.get(f"{ui}/runs/flow-run/{scenario.killed.id}")
        page_shows("bulk-clips-to-night-1", "Crashed")
        # Keyed, so listed for a command-line run; each key's page (the shared test server's
        # list has every test's artifacts, paged).
        for name in (f"{key}-progress", f"{key}-results", f"{key}-summary"):
            browser.get(f"{ui}/artifacts/key/{name}")
            page_shows(name)
    finally:
        browser.quit()
