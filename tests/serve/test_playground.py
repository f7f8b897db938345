"""The playground page at / of ``gpt2-scratch serve``, in a real browser: Debian's chromium, driven by Selenium
through chromedriver, headless. It types a prompt, sees the text stream in, and reads a token's probability from the
hover tip; the text is the server's own greedy completion. Skipped, with the reason, where the browser, its driver or
Selenium cannot be found (.ci/run installs them where it can)."""

from __future__ import annotations

import math
import shutil
from typing import Any

import pytest
import torch
from conftest import TINY, Server, save_model, skip_without

from gpt2scratch.config.commands import SamplingConfig
from gpt2scratch.inference.load import for_inference
from gpt2scratch.inference.text import generate_text
from gpt2scratch.model import GPT

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    skip_without("fastapi"),
    skip_without("uvicorn"),
    skip_without("selenium"),
    pytest.mark.skipif(BROWSER is None or DRIVER is None,
                       reason="needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)"),
]  # fmt: skip
PROMPT = "The sky is"


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(the server, a headless browser on its page, the served model in this process)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    folder = tmp_path_factory.mktemp("playground")
    model_dir = save_model(folder / "tiny", TINY)
    server = Server(model_dir, folder / "serve.log", "--dtype", "float64").wait_ready()
    options = webdriver.ChromeOptions()
    options.binary_location = str(BROWSER)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=DriverService(executable_path=str(DRIVER)), options=options)
    try:
        browser.set_page_load_timeout(60)
        browser.get(server.url + "/")
        yield server, browser, for_inference(GPT.from_pretrained(model_dir), torch.device("cpu"), torch.float64)
    finally:
        browser.quit()
        server.stop()


def wait_for(browser: Any, condition: Any, timeout: float = 60) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(condition)


def fill(browser: Any, field: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    element = browser.find_element(By.ID, field)
    element.clear()
    element.send_keys(value)


def test_the_page_streams_a_completion_and_shows_each_token_s_probability(page: Any) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    _, browser, model = page
    wait_for(browser, lambda b: "context 64 tokens" in b.find_element(By.ID, "model").text)
    fill(browser, "prompt", PROMPT)
    fill(browser, "max_tokens", "12")
    fill(browser, "temperature", "0")
    browser.find_element(By.ID, "generate").click()
    status = browser.find_element(By.ID, "status")
    wait_for(browser, lambda b: status.text.startswith("done"))
    assert int(status.get_attribute("data-chunks")) > 1  # streamed: token by token, not one reply
    tokens = browser.find_elements(By.CSS_SELECTOR, "#output .token")
    text = "".join(token.get_attribute("textContent") for token in tokens)
    expected = generate_text(model, PROMPT, SamplingConfig(num_samples=1, max_new_tokens=12, temperature=0,
                                                           stop_at_eot=True))[0][len(PROMPT) :]  # fmt: skip
    assert text == expected and len(tokens) >= 1
    ActionChains(browser).move_to_element(tokens[0]).perform()
    tip = browser.find_element(By.ID, "tip")
    wait_for(browser, lambda b: tip.is_displayed())
    p = float(tokens[0].get_attribute("data-p"))
    assert f"p = {p:.4f}" in tip.text and 0 < p <= 1
    logprob = float(tokens[0].get_attribute("data-logprob"))
    assert math.isclose(math.exp(logprob), p, abs_tol=1e-4)
    assert browser.find_element(By.ID, "error").text == ""


def test_the_page_says_what_the_server_refused(page: Any) -> None:
    from selenium.webdriver.common.by import By

    _, browser, _ = page
    fill(browser, "max_tokens", "100000")
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    wait_for(browser, lambda b: "context" in error.text)
    assert browser.find_element(By.ID, "status").text == "failed"


def test_the_page_is_one_file_with_nothing_from_elsewhere() -> None:
    from gpt2scratch.serve.app import PLAYGROUND

    html = PLAYGROUND.read_text()
    assert "<script src" not in html and "http://" not in html and "https://" not in html and "@import" not in html
