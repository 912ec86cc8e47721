"""Drive a real OpenWebUI with Debian's headless Chromium (selenium + chromedriver) like a person would: load the
page, get past sign-in (WEBUI_AUTH=False: the page signs itself in), pick the served model in the model selector,
send a message, wait for the assistant's finished reply; return its text and keep a screenshot.

A helper for the rig's e2e tests, not a test. Needs `apt-get install chromium chromium-driver` (one Debian source
package, so driver and browser always match) and `pip install selenium` (the test extra). Selenium is given both
paths, so Selenium Manager downloads nothing. The DOM hooks are OpenWebUI 0.6.x's own ids and classes
(src/lib/components/chat: #model-selector-0-button, #model-search-input, [aria-roledescription=model-item]
[data-value=ID], #chat-input, #send-message-button, .chat-assistant #response-content-container, and the
assistant message's .copy-response-button, which OpenWebUI renders only once the reply is done).

    reply = chat("http://10.77.0.11:3000", "tiny-chat", "Hello", "artifacts/openwebui.png")
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--no-proxy-server", "--window-size=1280,900", "--lang=en-US")
DONE = 'div[id^="message-"]:has(.chat-assistant) .copy-response-button'   # rendered once message.done


class WebUIError(RuntimeError):
    """The page did not do what a person would see it do; the message says which step, the screenshot shows it."""


def _wait(driver, what: str, fn, timeout: float, interval: float = 0.5):
    """Poll fn(driver) until it returns something truthy; WebUIError naming `what` after `timeout` seconds."""
    from selenium.common.exceptions import WebDriverException
    end = time.monotonic() + timeout
    last = None
    while True:
        try:
            got = fn(driver)
            if got:
                return got
        except WebDriverException as e:   # stale or not-yet-there elements while the page renders
            last = e
        if time.monotonic() > end:
            raise WebUIError(f"{what}: not seen within {timeout:.0f}s at {driver.current_url}"
                             + (f" (last: {type(last).__name__})" if last else ""))
        time.sleep(interval)


def _one(driver, css: str):
    from selenium.webdriver.common.by import By
    found = [e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]
    return found[-1] if found else None


def _dismiss_dialogs(driver) -> None:
    """First visit as admin: OpenWebUI's "What's New" changelog dialog; close it as a person would."""
    from selenium.webdriver.common.by import By
    for b in driver.find_elements(By.XPATH, "//button[normalize-space()=\"Okay, Let's Go!\"]"):
        if b.is_displayed():
            b.click()


def _click(driver, what: str, css: str, timeout: float):
    """Click the last visible `css` once it is there; a dialog in the way is closed and the click tried again."""
    def attempt(d):
        el = _one(d, css)
        if el is None:
            return None
        try:
            el.click()
        except Exception:
            _dismiss_dialogs(d)
            raise
        return el
    return _wait(driver, what, attempt, timeout)


def _select_model(driver, model: str, timeout: float) -> None:
    from selenium.webdriver.common.by import By
    _click(driver, "the model selector (#model-selector-0-button)", "#model-selector-0-button", timeout)
    search = _wait(driver, "the model search box", lambda d: _one(d, "#model-search-input"), timeout)
    search.send_keys(model)
    css = f'button[aria-roledescription="model-item"][data-value="{model}"]'
    _click(driver, f"{model!r} in OpenWebUI's model list", css, timeout)
    _wait(driver, f"{model!r} selected", lambda d: model in d.find_element(
        By.CSS_SELECTOR, "#model-selector-0-button").text, timeout)


def chat(url: str, model: str, message: str, screenshot: str, *, timeout: float = 300,
         chromium: str = CHROMIUM, chromedriver: str = CHROMEDRIVER, log: str | None = None) -> str:
    """The assistant's reply text to `message` sent to `model` through OpenWebUI at `url`. The screenshot (PNG) is
    written in any case, also when a step fails (WebUIError names the step). `log`: chromedriver's log file."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    for path in (chromium, chromedriver):
        if not os.access(path, os.X_OK):
            raise WebUIError(f"{path} is missing: apt-get install chromium chromium-driver")
    profile = tempfile.mkdtemp(prefix="webui-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")     # never let Selenium Manager look for a driver online
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=chromedriver, log_output=log))
    try:
        driver.set_page_load_timeout(timeout)
        driver.get(url.rstrip("/") + "/")
        # no login: /auth signs in by itself (config.features.auth is false) and lands on the chat page
        _wait(driver, "the chat input (#chat-input) after the automatic sign-in", lambda d: _one(d, "#chat-input"),
              timeout)
        _dismiss_dialogs(driver)
        _select_model(driver, model, timeout)
        box = _click(driver, "the chat input", "#chat-input", timeout)
        box.send_keys(message)
        _click(driver, "the send button", "#send-message-button", timeout)
        _wait(driver, "the assistant's finished reply", lambda d: _one(d, DONE), timeout)
        replies = driver.find_elements(By.CSS_SELECTOR, ".chat-assistant #response-content-container")
        text = replies[-1].text.strip() if replies else ""
        if not text:
            raise WebUIError("the assistant's reply is empty")
        return text
    finally:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(screenshot)), exist_ok=True)
            driver.save_screenshot(screenshot)
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":   # python3 tests/e2e/webui_browser.py URL MODEL MESSAGE SCREENSHOT
    import sys
    if len(sys.argv) != 5:
        sys.exit("usage: webui_browser.py URL MODEL MESSAGE SCREENSHOT")
    try:
        print(chat(*sys.argv[1:5]))
    except Exception as e:  # noqa: BLE001 - one line for a person; WebDriver messages carry a native stack
        sys.exit(f"webui_browser: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
