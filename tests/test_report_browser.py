"""report.html in headless Chromium at a desktop and a phone width: nothing overflows the page outside its own
scroll box, every plot decodes, and the demo's screenshots are taken (posttrain/report.py, browser.py).

Needs chromium and chromedriver (Debian/Ubuntu: ``apt-get install chromium chromium-driver``); skipped without.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from posttrain import browser
from posttrain.metrics import MetricsLogger
from posttrain.report import write_report

pytestmark = pytest.mark.skipif(bool(browser.missing()),
                                reason=f"headless Chromium unavailable ({browser.missing()}): apt-get install chromium chromium-driver")

# elements that stick out of the viewport and are not inside an overflow-x auto/scroll box; the page's own width
LAYOUT = """
const vw = window.innerWidth, offenders = [];
for (const el of document.body.querySelectorAll('*')) {
  const r = el.getBoundingClientRect();
  if (r.width === 0 || (r.right <= vw + 0.5 && r.left >= -0.5)) continue;
  let p = el.parentElement, boxed = false;
  for (; p && p !== document.documentElement; p = p.parentElement) {
    const o = getComputedStyle(p).overflowX;
    if (o === 'auto' || o === 'scroll') { boxed = true; break; }
  }
  if (!boxed) offenders.push(el.tagName + '.' + el.className + ' right=' + Math.round(r.right));
}
const table = document.querySelector('table').parentElement;
const boxes = [...document.querySelectorAll('*')].filter(e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowX));
return {innerWidth: vw, scrollWidth: document.documentElement.scrollWidth, offenders: offenders,
        stageTable: [table.scrollWidth, table.clientWidth],
        scrolling: boxes.filter(b => b.scrollWidth > b.clientWidth).length,
        boxesFit: boxes.every(b => b.getBoundingClientRect().right <= vw + 0.5),
        images: [...document.images].map(i => [i.complete, i.naturalWidth, Math.round(i.getBoundingClientRect().width)])};
"""

STAGES = {
    "sft": {"accuracy": 0.6633, "greedy_accuracy": 0.6733, "reward_mean": 0.6633, "wall_s": 61.2, "peak_rss_mb": 476.1,
            "model_copies": 1, "copies_held": "policy 1"},
    "rm": {"pair_accuracy": 0.9883, "eval_pairs": 300, "wall_s": 39.0, "peak_rss_mb": 475.0, "model_copies": 1, "copies_held": "reward_model 1"},
    "dpo": {"accuracy": 0.95, "greedy_accuracy": 0.9933, "reward_mean": 0.95, "kl_to_ref": 0.7612, "wall_s": 37.4,
            "peak_rss_mb": 489.0, "model_copies": 2, "copies_held": "policy 1, reference 1"},
    "ppo_rm": {"accuracy": 0.64, "greedy_accuracy": 0.71, "reward_mean": 0.64, "kl_to_ref": 1.8812, "train_reward_start": 1.8,
               "train_reward": 2.7412, "wall_s": 43.0, "peak_rss_mb": 12459.2, "model_copies": 4,
               "copies_held": "actor 1, critic 1, reference 1, reward_model 1"},
    "grpo": {"accuracy": 0.9467, "greedy_accuracy": 0.9833, "reward_mean": 0.9467, "kl_to_ref": 0.4911, "train_reward_start": 0.61,
             "train_reward": 0.93, "wall_s": 29.0, "peak_rss_mb": 551.0, "model_copies": 2, "copies_held": "policy 1, reference 1"},
}


def _runs(root: Path) -> dict[str, str]:
    """Real metrics.jsonl files, written by the training runs' own logger."""
    runs = {}
    for k, name in enumerate(STAGES):
        (root / name).mkdir()
        logger = MetricsLogger(str(root / name), total_steps=40, progress=False)
        for step in range(5, 45, 5):
            values = {"loss": 2.0 / (step + k)}
            if name in ("ppo_rm", "grpo"):
                values |= {"reward": 0.5 + step / 50, "kl": step / 100, "entropy": 2.3 - step / 100}
            if name == "dpo":
                values |= {"rewards/accuracies": min(1.0, 0.5 + step / 60), "rewards/margins": step / 20}
            logger.log(step, values)
        runs[name] = str(root / name)
    return runs


def _samples() -> dict[str, list]:
    rows = [{"prompt": f"{a}+{a + 7}=", "answer": str(2 * a + 7)} for a in range(10, 22)]
    rows.append({"prompt": "1234567890" * 8 + "=", "answer": "0"})  # one unbreakable prompt far wider than a phone
    return {name: [{**row, "greedy": row["answer"], "sampled": "12\\x863" if i % 3 else row["answer"]} for i, row in enumerate(rows)]
            for name in STAGES if name != "rm"}


@pytest.fixture(scope="module")
def report_page(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    report = {"task": "arith", "eval_prompts": 300, "stages": STAGES, "total_wall_s": 209.4, "_runs": _runs(out),
              "_samples": _samples()}
    return write_report(report, out)


@pytest.fixture(scope="module")
def driver():
    driver = browser.open_chromium()
    yield driver
    driver.quit()


@pytest.mark.parametrize("width", browser.WIDTHS)
def test_report_fits_the_window_and_every_plot_decodes(report_page, driver, width):
    driver.get(report_page.resolve().as_uri())
    browser.fit_height(driver, width)
    layout = driver.execute_script(LAYOUT)
    assert layout["innerWidth"] == width
    assert layout["scrollWidth"] <= layout["innerWidth"], layout
    assert layout["offenders"] == [], layout["offenders"]
    assert layout["boxesFit"]
    images = layout["images"]
    assert len(images) == len(list((report_page.parent / "plots").glob("*.png"))) == 4  # sft, rm, dpo, rl: one per family
    for complete, natural_width, shown_width in images:
        assert complete and natural_width > 0
        assert shown_width <= width  # scaled to the page, not cropped
    if width == 400:  # the stage and sample tables are wider than a phone: they scroll inside their own boxes
        assert layout["scrolling"] >= 2
    else:  # the stage table's every column shows without scrolling (it was 1419 px in a 1368 px box)
        needed, shown = layout["stageTable"]
        assert needed <= shown, layout["stageTable"]
        assert max(shown for *_, shown in images) >= 450  # plots are not shrunk to thumbnails on a desktop


def test_report_reads_true_verdicts_and_has_no_replacement_characters(report_page, driver):
    driver.get(report_page.resolve().as_uri())
    text = driver.find_element("tag name", "body").text
    assert "ppo_rm: reward hacking" in text  # reward 1.80 → 2.74 while accuracy fell 0.663 → 0.640
    assert "grpo: improved" in text and "dpo: improved" in text
    assert "\ufffd" not in text and "12\\x863" in text
    assert "12,459" in text  # peak RSS with a thousands separator


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_screenshots_at_both_widths(report_page):
    shots = browser.screenshots(report_page, report_page.parent)
    assert [p.name for p in shots] == ["report-1400.png", "report-400.png"]
    (w1, h1), (w2, h2) = map(_png_size, shots)
    assert (w1, w2) == (1400, 400)
    assert h2 > h1 > 900  # the whole page, taller on the narrow screen
