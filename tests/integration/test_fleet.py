"""A fleet on loopback: two controller replicas sharing a real redis-server, two real workers.

Worker ``inst-1`` reports to replica A, ``inst-2`` to replica B. Both replicas
answer the same lookups and routes; the admin page of B is driven in a real
headless Chromium (Debian's chromium + chromium-driver, through selenium):
token, lookup, pin and clear with their confirmations, and a screenshot. Then
A is killed with SIGKILL and started again: nothing is lost. The tests run in
order and share the fleet.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from kvstacks.testing import free_port, require, require_executable, wait_for

from .test_cluster import ADMIN, WORKER, WORKER_SCRIPT, _env

PROMPT_1 = list(range(2000, 2040))  # 10 chunks of 4
PROMPT_2 = list(range(3000, 3024))  # 6 chunks of 4
CHUNK = 4
HEARTBEAT = 0.3
#: Longer than a replica's restart (which imports torch): inst-1 cannot heartbeat while its replica is down.
#: 20 s was too short at load average 12-16 (inst-1 was taken for dead and left /lookup).
TIMEOUT = 90.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


class Fleet:
    def __init__(self, tmp: Path, index_url: str) -> None:
        self.tmp = tmp
        self.index_url = index_url
        self.ports = {"a": free_port(), "b": free_port()}
        self.controllers: dict[str, subprocess.Popen] = {}
        self.workers: dict[str, subprocess.Popen] = {}
        self.addresses: dict[str, str] = {}
        self.http = {
            name: httpx.Client(
                base_url=self.url(name), headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10, trust_env=False
            )
            for name in self.ports
        }

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start_controller(self, name: str) -> None:
        cmd = [
            sys.executable, "-c", "from kvstacks.cli import main; main()", "controller",
            "--port", str(self.ports[name]), "--index", self.index_url,
            "--heartbeat-timeout", str(TIMEOUT), "--log-level", "warning",
        ]  # fmt: skip
        log = open(self.tmp / f"controller-{name}.log", "ab")
        self.controllers[name] = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=log)

    def wait_controller(self, name: str) -> None:
        self.wait(lambda: self.http[name].get("/health").status_code == 200, f"controller {name}", timeout=60)

    def start_worker(self, instance: str, controller: str, prompts: list[list[int]], seed: int) -> None:
        stack = {
            "model": "test-model",
            "chunk_size": CHUNK,
            "stack": [
                {"backend": "cpu", "capacity": "4MiB"},
                {"backend": "disk", "path": str(self.tmp / instance), "capacity": "16MiB"},
            ],
            "controller": {
                "url": self.url(controller),
                "instance_id": instance,
                "heartbeat_interval": HEARTBEAT,
                "flush_interval": 0.01,
            },
        }
        spec = json.dumps({"stack": stack, "prompts": prompts, "seed": seed})
        self.workers[instance] = subprocess.Popen(
            [sys.executable, "-c", WORKER_SCRIPT, spec],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=open(self.tmp / f"{instance}.log", "ab"),
            text=True,
        )

    def worker_ready(self, instance: str) -> None:
        line = self.workers[instance].stdout.readline()
        if not line:
            raise AssertionError(f"worker {instance} died: {(self.tmp / f'{instance}.log').read_text()[-3000:]}")
        self.addresses[instance] = json.loads(line)["address"]

    def tiers(self, instance: str, tokens: list[int]) -> dict[str, int]:
        r = httpx.post(
            f"http://{self.addresses[instance]}/command",
            json={"op": "lookup_tiers", "args": {"tokens": tokens}},
            headers={"Authorization": f"Bearer {WORKER}"},
            timeout=10,
            trust_env=False,
        )
        assert r.status_code == 200, r.text
        return r.json()["tiers"]

    def lookup(self, name: str, tokens: list[int]) -> dict:
        r = self.http[name].post("/lookup", json={"tokens": tokens})
        assert r.status_code == 200, r.text
        return r.json()["layout_info"]

    def route(self, name: str, tokens: list[int]) -> list:
        r = self.http[name].post("/route", json={"tokens": tokens})
        assert r.status_code == 200, r.text
        return [(e["instance_id"], e["matched_tokens"], e["tiers"]) for e in r.json()["instances"]]

    def wait(self, predicate, what: str, timeout: float = 15.0):
        return wait_for(predicate, what, timeout, retry_on=(httpx.HTTPError, AssertionError))

    def close(self) -> None:
        for proc in [*self.workers.values(), *self.controllers.values()]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for client in self.http.values():
            client.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, redis_server):
    require("redis", "pip install 'kvstacks-controller[redis]'")
    require("kvstacks_cpu", "pip install -e plugins/cpu")
    require("kvstacks_disk", "pip install -e plugins/disk")
    f = Fleet(tmp_path_factory.mktemp("fleet"), f"{redis_server.url}?prefix=fleet-{os.getpid()}:")
    try:
        f.start_controller("a")
        f.start_controller("b")
        f.start_worker("inst-1", "a", [PROMPT_1], seed=1)
        f.start_worker("inst-2", "b", [PROMPT_1[:16], PROMPT_2], seed=2)
        f.wait_controller("a")
        f.wait_controller("b")
        f.worker_ready("inst-1")
        f.worker_ready("inst-2")
        yield f
    finally:
        f.close()


EXPECTED_1 = {"inst-1": ["cpu", 40], "inst-2": ["cpu", 16]}


def test_both_replicas_answer_the_same_lookups_and_routes(fleet):
    for name in ("a", "b"):
        fleet.wait(lambda name=name: fleet.lookup(name, PROMPT_1) == EXPECTED_1, f"both workers indexed at {name}")
    assert fleet.lookup("a", PROMPT_2) == fleet.lookup("b", PROMPT_2) == {"inst-2": ["cpu", 24]}
    assert fleet.route("a", PROMPT_1) == fleet.route("b", PROMPT_1)
    assert fleet.route("a", PROMPT_1)[0][:2] == ("inst-1", 40)
    health = [fleet.http[name].get("/health").json() for name in ("a", "b")]
    assert health[0]["healthy_workers"] == health[1]["healthy_workers"] == 2


def test_a_command_sent_to_one_replica_reaches_a_worker_reporting_to_the_other(fleet):
    body = {"instance_id": "inst-1", "location": "cpu", "tokens": PROMPT_1}
    r = fleet.http["b"].post("/pin", json=body)
    assert r.status_code == 200 and r.json()["num_tokens"] == 40, r.text
    r = fleet.http["b"].post("/unpin", json=body)
    assert r.status_code == 200, r.text


def _browser(tmp: Path):
    require("selenium", "pip install selenium")
    chromium = require_executable("chromium", "apt-get install -y chromium chromium-driver")
    driver_path = require_executable("chromedriver", "apt-get install -y chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1366,900", f"--user-data-dir={tmp / 'chromium-profile'}"):  # fmt: skip
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver_path, log_output=str(tmp / "chromedriver.log")), options=options)


def test_admin_page_in_a_real_browser(fleet):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser(fleet.tmp)

    def click(selector: str) -> None:
        # The panel is replaced every few seconds: a button found just before may be gone.
        for _ in range(5):
            try:
                return driver.find_element(By.CSS_SELECTOR, selector).click()
            except StaleElementReferenceException:
                time.sleep(0.1)
        raise AssertionError(f"{selector} kept going stale")

    try:
        wait = WebDriverWait(driver, 30)
        driver.get(fleet.url("b") + "/")
        assert "Enter the admin token" in driver.page_source  # nothing of the fleet without the token
        driver.find_element(By.ID, "token").send_keys(ADMIN)
        driver.find_element(By.CSS_SELECTOR, "#token-form button").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, 'article[data-instance="inst-1"]'))
        assert driver.find_element(By.ID, "healthy-workers").text == "2"

        # Lookup box: the prefix each instance holds.
        driver.find_element(By.ID, "lookup-tokens").send_keys(", ".join(map(str, PROMPT_1)))
        driver.find_element(By.CSS_SELECTOR, "#lookup-form button").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "lookup-result"), "inst-1: 40 of 40 tokens, in cpu"))
        assert "inst-2: 16 of 40 tokens, in cpu" in driver.find_element(By.ID, "lookup-result").text

        clear = 'button[data-action="clear"][data-instance="inst-1"][data-location="cpu"]'
        # Cancelled confirmation: nothing is sent.
        click(clear)
        alert = wait.until(ec.alert_is_present())
        assert "Clear cpu of inst-1?" in alert.text
        alert.dismiss()
        time.sleep(0.3)
        assert driver.find_element(By.ID, "action-result").text == ""
        assert fleet.tiers("inst-1", PROMPT_1)["cpu"] == 40

        # Pin, confirmed.
        driver.find_element(By.ID, "pin-instance").send_keys("inst-2")
        driver.find_element(By.ID, "pin-tokens").send_keys(" ".join(map(str, PROMPT_2)))
        driver.find_element(By.CSS_SELECTOR, "#pin-form button").click()
        alert = wait.until(ec.alert_is_present())
        assert "Pin 24 tokens at cpu of inst-2?" in alert.text
        alert.accept()
        wait.until(ec.text_to_be_present_in_element((By.ID, "action-result"), "pinned 24 tokens"))

        # Clear, confirmed: the worker's cpu tier is emptied; both replicas see it at once.
        click(clear)
        wait.until(ec.alert_is_present()).accept()
        wait.until(ec.text_to_be_present_in_element((By.ID, "action-result"), "cleared cpu of inst-1"))
        assert fleet.tiers("inst-1", PROMPT_1)["cpu"] == 0
        for name in ("a", "b"):
            assert fleet.lookup(name, PROMPT_1)["inst-1"] == ["disk", 40]

        # The page refreshes itself: the cleared tier shows no indexed chunk, events list the actions.
        cell = 'article[data-instance="inst-1"] td.indexed[data-tier="cpu"]'
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, cell).text == "0")
        events = driver.find_element(By.CSS_SELECTOR, "table.events").text
        assert "clear" in events and "pin" in events
        shot = Path(os.environ.get("KVSTACKS_SCREENSHOTS", fleet.tmp)) / "admin-page.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"admin page screenshot: {shot}")
        # Expected: the 401 of the first panel fetch, before the token was typed.
        browser_errors = [
            e["message"]
            for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "status of 401" not in e["message"]
        ]
        assert not browser_errors, browser_errors
    finally:
        driver.quit()


def test_a_replica_killed_and_restarted_loses_nothing(fleet):
    before = {tuple(p): fleet.lookup("a", p) for p in (PROMPT_1, PROMPT_2)}
    routes = fleet.route("a", PROMPT_1)
    victim = fleet.controllers["a"]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    # The other replica answers for the whole fleet meanwhile, inst-1 included.
    for prompt, layout in before.items():
        assert fleet.lookup("b", list(prompt)) == layout
    fleet.start_controller("a")
    fleet.wait_controller("a")
    for prompt, layout in before.items():
        assert fleet.lookup("a", list(prompt)) == layout  # at once: nothing to rebuild
    assert fleet.route("a", PROMPT_1) == routes
    # inst-1's agent, having lost its controller (and maybe reports), registers again and
    # resyncs through the restarted replica: the view is whole again on both.
    for name in ("a", "b"):
        for prompt, layout in before.items():
            fleet.wait(lambda name=name, p=prompt, lay=layout: fleet.lookup(name, list(p)) == lay, "resync")
    assert fleet.http["a"].get("/health").json()["healthy_workers"] == 2
