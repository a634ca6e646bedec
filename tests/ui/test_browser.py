"""``splitlearn ui`` in a real browser (headless Chromium): the chat, its panel, and the server's status page.

Skipped only when no Chromium and chromedriver are installed (``make browser`` installs
them; ``.ci/run`` does so first). Screenshots go to ``artifacts/screenshots/``; with
``SPLITLEARN_README_SCREENSHOTS=1`` they are also copied to ``docs/images/`` for the README.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
PROMPT = "Write a long story about a dragon who learns to read."

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or DRIVER is None,
        reason="no headless browser: install Chromium and chromedriver with `make browser` (CI does)",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"`splitlearn ui` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=5).read()
            return
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def ui(tmp_path):
    port, metrics = _free_port(), _free_port()
    log = tmp_path / "ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitlearn_async", "ui", "--port", str(port), "--metrics-port", str(metrics)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        _wait_for(f"http://127.0.0.1:{port}/", proc, log, timeout_s=420)
        yield f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{metrics}/status"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # SIGTERM stopped the trunk server the UI started too: its status page is gone
    with pytest.raises(OSError):
        for _ in range(60):  # it drains first: up to --drain-s
            urllib.request.urlopen(f"http://127.0.0.1:{metrics}/status", timeout=5).read()
            time.sleep(0.5)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _expected_answer() -> str:
    """What ``generate_text`` answers in-process for the same prompt and the UI's default settings."""
    import asyncio

    import torch

    from splitlearn_async import LocalTrunk, SplitPipeline, load_stages
    from splitlearn_async.models.default import default_bundle, load_tokenizer

    torch.set_num_threads(1)
    bundle = default_bundle((3, 27))
    bottom, trunk, top = load_stages(bundle)

    async def run() -> str:
        async with LocalTrunk(trunk) as local, SplitPipeline(bottom, local, top, load_tokenizer(bundle)) as p:
            return await p.generate_text([{"role": "user", "content": PROMPT}], max_new_tokens=64, do_sample=False)

    return asyncio.run(run())


def _shot(driver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / name))
    import os

    if os.environ.get("SPLITLEARN_README_SCREENSHOTS") == "1":
        shutil.copy(ARTIFACTS / name, ROOT / "docs" / "images" / name)


def test_the_chat_streams_the_answer_of_generate_text_and_the_status_page_sees_its_session(ui, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page, status = ui
    expected = _expected_answer()
    driver = browser
    driver.get(page)
    wait = WebDriverWait(driver, 120)
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#message textarea"))
    box.send_keys(PROMPT)
    driver.find_element(By.ID, "send").click()
    chat_tab = driver.current_window_handle

    # while the answer streams, the server's status page shows its one session
    driver.switch_to.new_window("tab")
    seen = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        driver.get(status)
        seen = driver.find_element(By.ID, "sessions_open").text
        if seen == "1":
            break
        time.sleep(0.2)
    assert seen == "1", f"the status page never showed the answer's session (last: {seen!r})"
    _shot(driver, "ui-status-page.png")
    driver.switch_to.window(chat_tab)

    def answer(d) -> str:
        return d.find_element(By.CSS_SELECTOR, "#answer-raw textarea").get_attribute("value") or ""

    try:
        WebDriverWait(driver, 300, poll_frequency=0.5).until(lambda d: answer(d) == expected)
    except Exception:
        _shot(driver, "ui-chat-failed.png")
        raise AssertionError(f"the UI's answer {answer(driver)!r} is not generate_text's {expected!r}") from None
    for stage in ("bottom", "trunk", "top"):
        ms = float(driver.find_element(By.ID, f"{stage}-ms").text.replace(",", ""))
        assert ms > 0, f"the panel shows no time for the {stage}"
    assert int(driver.find_element(By.ID, "tokens").text) >= 1
    assert driver.find_element(By.ID, "left").text.count("hidden-state tensor") == 2
    assert PROMPT not in driver.find_element(By.ID, "left").text  # no text in what left the client
    time.sleep(1.0)  # let the latency plot draw its last update before the picture
    _shot(driver, "ui-chat.png")

    # the training tab: a few LoRA steps, a live loss curve, the answers before and after
    driver.find_element(By.XPATH, "//button[@role='tab' and normalize-space()='Training']").click()
    wait.until(lambda d: d.find_element(By.ID, "train").is_displayed())
    driver.find_element(By.ID, "train").click()
    WebDriverWait(driver, 600, poll_frequency=1.0).until(lambda d: d.find_elements(By.ID, "held-out-after"))
    after = driver.find_element(By.CSS_SELECTOR, "#answer-after textarea").get_attribute("value")
    before = driver.find_element(By.CSS_SELECTOR, "#answer-before textarea").get_attribute("value")
    assert after and before
    assert float(driver.find_element(By.ID, "held-out-after").text) > 0
    time.sleep(1.0)
    _shot(driver, "ui-training.png")
