"""Headless Chromium through selenium: screenshots of report.html at a desktop and a phone width.

Optional at run time: without selenium, chromium or chromedriver, `screenshots` returns the reason and the
report is still written. Debian/Ubuntu: ``apt-get install chromium chromium-driver``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

WIDTHS = (1400, 400)
INSTALL_HINT = "apt-get install chromium chromium-driver (and pip install selenium)"


def missing() -> str:
    """Why headless Chromium cannot run here ('' when it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    if not _chromium():
        return "no chromium binary on PATH"
    if not shutil.which("chromedriver"):
        return "no chromedriver on PATH"
    return ""


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def open_chromium(width: int = WIDTHS[0], height: int = 900):
    """A headless Chromium WebDriver with a ``width`` x ``height`` window; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = _chromium()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_window_size(width, height)
    return driver


def fit_height(driver, width: int, max_height: int = 16000) -> None:
    """Resize the window to ``width`` and the whole page's height, so one screenshot shows all of it."""
    driver.set_window_size(width, 900)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(max_height, height + 16))


def screenshots(html_path: Path, out_dir: Path, widths=WIDTHS) -> list[Path] | str:
    """report-WIDTH.png of the whole page at each width, or the one-line reason none could be taken."""
    reason = missing()
    if reason:
        return f"{reason}: {INSTALL_HINT}"
    from selenium.common.exceptions import WebDriverException

    try:
        driver = open_chromium()
    except WebDriverException as error:  # a browser that will not start is no reason to lose the report
        return f"chromium did not start ({str(error).strip().splitlines()[0]})"
    try:
        driver.get(Path(html_path).resolve().as_uri())
        paths = []
        for width in widths:
            fit_height(driver, width)
            path = Path(out_dir) / f"report-{width}.png"
            driver.save_screenshot(str(path))
            paths.append(path)
        return paths
    finally:
        driver.quit()
