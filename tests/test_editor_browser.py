"""``cycle-encoding ui`` in a real browser: Debian's headless chromium driven by Selenium through chromium-driver (no
browser download). The editor starts on a free local port with the shipped Fashion-MNIST models; the test uploads a
test image, waits for the tuned reconstruction, drags a slider, checks the picture shown changed and is
``Editor.render`` of that strength (with the downloaded generator and codes), downloads the three files and loads them
back, sees the page refuse a text file and a too-large file, and keeps editing afterwards. Every request the page made
went to the local server.

``CYCLE_ENCODING_SCREENSHOT=docs/images/editor.png`` saves a screenshot of the page (the README's picture)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "fashion-mnist"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

selenium = pytest.importorskip("selenium", reason="selenium is not installed (requirements.txt)")
pytest.importorskip("gradio", reason="gradio is not installed (requirements.txt; the 'ui' extra)")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (Path(CHROMIUM).is_file() and Path(DRIVER).is_file()),
        reason="chromium / chromium-driver are not installed (Debian packages, scripts/apt-packages-test.txt)",
    ),
]

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

LIMIT_MB = 0.2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what, timeout: float, message: str, every: float = 0.2):
    end = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s: {message}")
        time.sleep(every)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``cycle-encoding ui`` in its own process on a free port: 5 tuning steps, one direction file, 2 SeFa and 2
    GANSpace directions, an upload limit of 0.2 MB."""
    import torch

    from cycle_encoding.checkpoints.generator import load_generator
    from cycle_encoding.editing import interfacegan_direction, save_directions

    tmp = tmp_path_factory.mktemp("ui")
    G = load_generator("fmnist-generator")
    v = torch.nn.functional.normalize(torch.randn(G.w_dim, generator=torch.Generator().manual_seed(11)), dim=0)
    direction = tmp / "wider.safetensors"
    save_directions(interfacegan_direction(v, name="wider"), direction)
    # a finished run of two test images (encoder -> 3 tuning steps), for the page to open
    from cycle_encoding.inversion import Inverter

    (tmp / "pair").mkdir()
    for name in ("test-00000-ankle-boot.png", "test-00010-coat.png"):
        shutil.copy(EXAMPLES / name, tmp / "pair" / name)
    inv = Inverter("fmnist-generator", "fmnist-encoder", stages=("encoder", "tune"), perceptual="fmnist-features",
                   device="cpu", tune={"steps": 3})  # fmt: skip
    inv.run(tmp / "pair", tmp / "run", log=lambda s: None)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CYCLE_ENCODING_CACHE": str(tmp / "cache"), "GRADIO_TEMP_DIR": str(tmp / "gradio"),
           "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}  # fmt: skip
    log = open(tmp / "server.log", "w")
    cmd = [sys.executable, "-m", "cycle_encoding.cli", "ui", "--port", str(port), "--device", "cpu",
           "--directions", str(direction), "--components", "2", "--tune-steps", "5",
           "--max-upload-mb", str(LIMIT_MB)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the editor exited ({proc.returncode}): {(tmp / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(up, 180, "the editor did not start")
        yield {"url": url, "tmp": tmp, "direction": direction, "log": tmp / "server.log", "run": tmp / "run"}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(server):
    downloads = server["tmp"] / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={server['tmp'] / 'profile'}",
              "--window-size=1400,1100"):  # fmt: skip
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    d.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    d.downloads = downloads  # type: ignore[attr-defined]
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture
def page(server, browser):
    """The browser; when the test fails, the page's text, a screenshot and the server's log are kept for the report."""
    yield browser
    # (runs after the test; pytest shows what is printed here for a failing test)
    shot = server["tmp"] / f"page-{int(time.time())}.png"
    try:
        browser.save_screenshot(str(shot))
        body = browser.find_element(By.TAG_NAME, "body").text
    except Exception as e:  # the browser itself may be the failure
        body = f"(no page: {e})"
    print(f"--- page text ---\n{body[:3000]}\n--- screenshot: {shot}\n--- server log (end) ---")
    print(server["log"].read_text()[-3000:])


def open_editor(d, url: str) -> None:
    """Load the page and wait for every block the tests read: Gradio renders them one after another, so on a busy
    machine the upload box can be there before the buttons and the status line."""
    d.get(url)
    needed = ("#upload input[type=file]", "#invert", "#status", "#render-info")
    wait_for(lambda: all(d.find_elements(By.CSS_SELECTOR, c) for c in needed), 120, "the page did not load")


def enter_number(d, box, text: str) -> None:
    """Put ``text`` into a slider's number box as one edit, then press Enter. Typed key by key at Selenium's speed, an
    intermediate string that is no number ("-", "-3.") raced Gradio's binding of the box on a loaded machine (the
    full suite once rendered -3 for a typed -3.7); a person's typing is what this stands for, the Enter is real."""
    d.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input', {bubbles: true}));", box, text
    )
    box.send_keys(Keys.ENTER)


def text_of(d, elem_id: str) -> str:
    return d.find_element(By.ID, elem_id).text


def image_src(d, elem_id: str) -> str | None:
    imgs = d.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
    return imgs[0].get_attribute("src") if imgs else None


def fetch_image(src: str) -> np.ndarray:
    assert src.startswith("http://127.0.0.1:"), src
    with urllib.request.urlopen(src, timeout=600) as r:
        return np.asarray(Image.open(BytesIO(r.read())).convert("L"))


def upload(d, path: Path) -> None:
    d.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))


def clear_upload(d) -> None:
    """Remove the file shown in the upload box (its clear button), so that the next upload is a new one."""
    for b in d.find_elements(By.CSS_SELECTOR, "#upload button"):
        if (b.get_attribute("aria-label") or "").lower() in ("clear", "remove"):
            b.click()
            time.sleep(0.5)
            return


def download(d, elem_id: str, name: str) -> Path:
    target = d.downloads / name
    target.unlink(missing_ok=True)
    d.find_element(By.ID, elem_id).click()
    return wait_for(lambda: target if target.is_file() and target.stat().st_size > 0 else None, 120,
                    f"{name} was not downloaded")  # fmt: skip


def test_upload_invert_edit_download_and_bad_uploads(server, page):
    import torch

    from cycle_encoding.checkpoints.generator import load_generator
    from cycle_encoding.editing.editor import Editor

    d = page
    open_editor(d, server["url"])
    assert d.title == "cycle-encoding editor"
    assert d.find_element(By.ID, "invert").text == "Invert"  # nothing was inverted yet
    # one slider per direction: the file's, then 2 SeFa and 2 GANSpace ones
    wait_for(lambda: len(d.find_elements(By.CSS_SELECTOR, "[id^=dir-] input[type=range]")) == 5, 30, "no sliders")
    labels = [e.text for e in d.find_elements(By.CSS_SELECTOR, "[id^=dir-] [data-testid=block-info]")]
    assert labels == ["wider", "SeFa 0", "SeFa 1", "GANSpace 0 (std)", "GANSpace 1 (std)"]

    # upload: the pivot appears, then the tuned reconstruction, the edit (strength 0) and the downloads
    upload(d, EXAMPLES / "test-00016-pullover.png")
    wait_for(lambda: "inverted with encoder, tune" in text_of(d, "status"), 240,
             f"no reconstruction; status: {text_of(d, 'status')!r}")  # fmt: skip
    for elem in ("im-input", "im-pivot", "im-recon", "im-edit"):
        assert image_src(d, elem), f"{elem} shows no image"
    assert d.find_element(By.ID, "invert").text == "Invert again"
    recon = fetch_image(image_src(d, "im-recon"))
    before = fetch_image(image_src(d, "im-edit"))
    np.testing.assert_array_equal(before, recon)  # all sliders at 0: the edit is the reconstruction
    assert not np.array_equal(fetch_image(image_src(d, "im-pivot")), recon)  # tuning changed the picture

    # drag the first slider (the direction file) to the right; the edit renders on release
    src0 = image_src(d, "im-edit")
    rng = d.find_element(By.CSS_SELECTOR, "#dir-0 input[type=range]")
    ActionChains(d).click_and_hold(rng).move_by_offset(rng.size["width"] // 4, 0).release().perform()
    num = d.find_element(By.CSS_SELECTOR, "#dir-0 input[type=number]")
    strength = round(float(num.get_attribute("value")), 6)
    assert strength > 0
    wait_for(lambda: f"wider {strength:+g}" in text_of(d, "render-info") and image_src(d, "im-edit") != src0, 120,
             f"no render for strength {strength}; shown: {text_of(d, 'render-info')!r}")  # fmt: skip
    assert "rendered in" in text_of(d, "render-info")
    shown = fetch_image(image_src(d, "im-edit"))
    assert not np.array_equal(shown, before)

    # the downloads load back (named for the image and the edit), and Editor.render of that strength is the picture
    png = download(d, "dl-png", f"test-00016-pullover_wider{strength:+g}.png")
    npz = download(d, "dl-npz", f"test-00016-pullover_wider{strength:+g}.npz")
    gen = download(d, "dl-gen", "test-00016-pullover_tuned-generator.safetensors")
    with Image.open(png) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("L")), shown)
    with np.load(npz, allow_pickle=False) as z:
        w, pivot = z["w"], z["pivot"]
    G = load_generator(gen)
    assert w.shape == (1, G.num_ws, G.w_dim) and w.dtype == np.float32
    ed = Editor("fmnist-generator", None, directions=[server["direction"]], components=2)
    ed.set_codes(pivot, G)
    np.testing.assert_array_equal(np.asarray(ed.render({"wider": strength}).convert("L")), shown)
    with torch.no_grad():  # and the codes of the .npz are that edit
        y = G.synthesis(torch.from_numpy(w), noise_mode="const")
    np.testing.assert_array_equal(((y.clamp(-1, 1) + 1) * 127.5).round().byte()[0, 0].numpy(), shown)

    if os.environ.get("CYCLE_ENCODING_SCREENSHOT"):
        d.save_screenshot(os.environ["CYCLE_ENCODING_SCREENSHOT"])

    # a failure during the inversion (tuning without a pivot stage): said in the page; the pictures of the image
    # being edited come back
    input_before = fetch_image(image_src(d, "im-input"))
    d.find_element(By.XPATH, "//*[@id='stages']//label[.//*[text()='encoder']]").click()
    d.find_element(By.ID, "invert").click()
    wait_for(lambda: "needs a pivot" in text_of(d, "status"), 120, f"no error shown: {text_of(d, 'status')!r}")
    wait_for(lambda: image_src(d, "im-recon"), 10, "the reconstruction did not come back")
    np.testing.assert_array_equal(fetch_image(image_src(d, "im-input")), input_before)
    np.testing.assert_array_equal(fetch_image(image_src(d, "im-recon")), recon)
    d.find_element(By.XPATH, "//*[@id='stages']//label[.//*[text()='encoder']]").click()  # ticked again

    # a text file: refused with a message in the page; the image being edited stays
    notes = server["tmp"] / "notes.txt"
    notes.write_text("this is not an image\n" * 20)
    clear_upload(d)
    upload(d, notes)
    wait_for(lambda: "not an image" in text_of(d, "status"), 120, f"no error shown: {text_of(d, 'status')!r}")
    assert "Error" in text_of(d, "status")
    # a file over the size limit: refused too
    big = server["tmp"] / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > LIMIT_MB * 1e6
    clear_upload(d)
    upload(d, big)
    wait_for(lambda: "over the upload limit of 0.2 MB" in text_of(d, "status"), 120,
             f"no size error shown: {text_of(d, 'status')!r}")  # fmt: skip

    # still working: the next slider move renders with the same image
    src1 = image_src(d, "im-edit")
    rng = d.find_element(By.CSS_SELECTOR, "#dir-1 input[type=range]")
    ActionChains(d).click_and_hold(rng).move_by_offset(-rng.size["width"] // 5, 0).release().perform()
    s1 = round(float(d.find_element(By.CSS_SELECTOR, "#dir-1 input[type=number]").get_attribute("value")), 6)
    wait_for(lambda: image_src(d, "im-edit") != src1, 120, "no render after the bad uploads")
    np.testing.assert_array_equal(
        fetch_image(image_src(d, "im-edit")),
        np.asarray(ed.render({"wider": strength, "sefa:0": s1}).convert("L")),
    )

    # a value typed beyond the slider's range and entered with Enter: clamped, rendered, shown in the slider, and
    # the download is that edit
    num = d.find_element(By.CSS_SELECTOR, "#dir-0 input[type=number]")
    limit = float(num.get_attribute("max"))
    src2 = image_src(d, "im-edit")
    enter_number(d, num, f"{3 * limit:g}")
    wait_for(lambda: "clamped" in text_of(d, "render-info") and image_src(d, "im-edit") != src2, 120,
             f"no render of the clamped value; shown: {text_of(d, 'render-info')!r}")  # fmt: skip
    assert float(num.get_attribute("value")) == limit
    want = np.asarray(ed.render({"wider": limit, "sefa:0": s1}).convert("L"))
    np.testing.assert_array_equal(fetch_image(image_src(d, "im-edit")), want)
    png = download(d, "dl-png", f"test-00016-pullover_wider{limit:+g}_sefa-0{s1:+g}.png")
    with Image.open(png) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("L")), want)
    # Enter renders a value inside the range too
    src3 = image_src(d, "im-edit")
    enter_number(d, num, f"{-limit / 2:g}")
    wait_for(lambda: f"wider {-limit / 2:+g}" in text_of(d, "render-info") and image_src(d, "im-edit") != src3, 120,
             f"Enter rendered nothing; shown: {text_of(d, 'render-info')!r}")  # fmt: skip
    want = np.asarray(ed.render({"wider": -limit / 2, "sefa:0": s1}).convert("L"))
    np.testing.assert_array_equal(fetch_image(image_src(d, "im-edit")), want)
    assert "Error" not in text_of(d, "status")  # the bad uploads' message has gone

    # no request left this machine
    urls = []
    for entry in d.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    outside = [u for u in urls if not u.startswith((server["url"], "data:", "blob:", "chrome:", "chrome-"))]
    assert urls and not outside, outside[:5]


def test_open_a_run_folder_and_browse_its_images(server, page):
    from cycle_encoding.editing.editor import Editor

    d = page
    open_editor(d, server["url"])
    # an image inverted first: after the run opens, the upload box no longer shows it
    upload(d, EXAMPLES / "test-00006-coat.png")
    wait_for(lambda: "inverted with" in text_of(d, "status"), 240, f"not inverted: {text_of(d, 'status')!r}")
    assert "test-00006-coat" in text_of(d, "upload")
    header = wait_for(lambda: d.find_elements(By.XPATH, "//*[text()='Open a run folder']"), 120, "no page")
    header[0].click()  # the accordion holding the run folder box
    wait_for(lambda: d.find_elements(By.ID, "open-run"), 10, "the accordion did not open")
    run = server["run"]
    box = wait_for(lambda: [e for e in d.find_elements(By.CSS_SELECTOR, "#run-path textarea, #run-path input")
                            if e.is_displayed()], 10, "no run folder box")[0]  # fmt: skip
    box.send_keys(str(run))
    d.find_element(By.ID, "open-run").click()
    names = ["test-00000-ankle-boot", "test-00010-coat"]
    wait_for(lambda: f"run/{names[0]}" in text_of(d, "status"), 120, f"run not opened: {text_of(d, 'status')!r}")
    wait_for(lambda: "test-00006-coat" not in text_of(d, "upload"), 30, "the upload box still shows the old file")
    assert d.find_element(By.ID, "invert").text == "Invert"

    def recon_of(name: str) -> np.ndarray:
        with Image.open(run / "images" / name / "recon_tune.png") as im:
            return np.asarray(im.convert("L"))

    # the first image: its tuned generator, rebuilt from the stored change, renders the run's reconstruction
    np.testing.assert_array_equal(fetch_image(image_src(d, "im-recon")), recon_of(names[0]))
    np.testing.assert_array_equal(fetch_image(image_src(d, "im-edit")), recon_of(names[0]))
    # the gallery shows the run's images; choosing the second opens it
    thumbs = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#run-gallery button img"), 30, "no gallery")
    assert len(thumbs) == 2
    thumbs[1].click()
    wait_for(lambda: f"run/{names[1]}" in text_of(d, "status"), 120, f"not opened: {text_of(d, 'status')!r}")
    np.testing.assert_array_equal(fetch_image(image_src(d, "im-recon")), recon_of(names[1]))
    # and it edits like Editor.open_run on that image
    src0 = image_src(d, "im-edit")
    rng = d.find_element(By.CSS_SELECTOR, "#dir-3 input[type=range]")
    ActionChains(d).click_and_hold(rng).move_by_offset(rng.size["width"] // 3, 0).release().perform()
    a = round(float(d.find_element(By.CSS_SELECTOR, "#dir-3 input[type=number]").get_attribute("value")), 6)
    wait_for(lambda: image_src(d, "im-edit") != src0, 120, "no render")
    ed = Editor.open_run(run, names[1], directions=[server["direction"]], components=2)
    want = np.asarray(ed.render({"ganspace:0": a}).convert("L"))
    np.testing.assert_array_equal(fetch_image(image_src(d, "im-edit")), want)


def cancelled_in_log(server) -> list[tuple[int, int]]:
    """(steps done, steps asked) of each inversion the server's log says was cancelled."""
    import re

    text = server["log"].read_text()
    return [(int(a), int(b)) for a, b in re.findall(r"inversion cancelled after (\d+) of (\d+) tune steps", text)]


def set_tune_steps(d, n: int) -> None:
    box = d.find_element(By.CSS_SELECTOR, "#tune-steps input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(n), Keys.TAB)


def test_cancel_and_a_closed_page_stop_an_inversion(server, page):
    d = page
    open_editor(d, server["url"])
    # a colour photo for this 1-channel generator: inverted, with a note that it was made grey
    with Image.open(EXAMPLES / "test-00016-pullover.png") as im:
        grey = np.asarray(im.convert("L"), np.float32)
    colour = server["tmp"] / "red-pullover.png"
    Image.fromarray(np.stack([grey, grey * 0.5, grey * 0.2], -1).astype(np.uint8)).save(colour)
    upload(d, colour)
    wait_for(lambda: "inverted with" in text_of(d, "status"), 240, f"not inverted: {text_of(d, 'status')!r}")
    assert "is a colour image" in text_of(d, "status")
    recon = fetch_image(image_src(d, "im-recon"))

    # more tuning steps than the bound: refused in the status line
    set_tune_steps(d, 5000)
    d.find_element(By.ID, "invert").click()
    wait_for(lambda: "must be 0-3500" in text_of(d, "status"), 60, f"no bound: {text_of(d, 'status')!r}")
    # a long inversion: the old error goes at once; Cancel stops it between two steps
    set_tune_steps(d, 3000)
    d.find_element(By.ID, "invert").click()
    wait_for(lambda: "inverting" in text_of(d, "status") and "Error" not in text_of(d, "status"), 60,
             f"the old error stayed: {text_of(d, 'status')!r}")  # fmt: skip
    wait_for(lambda: "encoder: MSE" in text_of(d, "status"), 240, f"no pivot: {text_of(d, 'status')!r}")
    d.find_element(By.ID, "cancel").click()  # during the tuning
    wait_for(lambda: "cancelled" in text_of(d, "status"), 120, f"not cancelled: {text_of(d, 'status')!r}")
    done = wait_for(lambda: cancelled_in_log(server), 120, "the server did not stop the inversion")
    assert done[-1][0] < done[-1][1] == 3000
    wait_for(lambda: image_src(d, "im-recon"), 30, "the reconstruction did not come back")
    np.testing.assert_array_equal(fetch_image(image_src(d, "im-recon")), recon)

    # a page closed during its inversion: the server stops it, and the next visitor is served
    first = d.current_window_handle
    d.switch_to.new_window("tab")
    open_editor(d, server["url"])
    set_tune_steps(d, 3000)
    upload(d, EXAMPLES / "test-00010-coat.png")
    wait_for(lambda: "encoder: MSE" in text_of(d, "status"), 240, f"no pivot: {text_of(d, 'status')!r}")
    d.close()  # during the tuning
    d.switch_to.window(first)
    wait_for(lambda: len(cancelled_in_log(server)) == len(done) + 1, 120, "the closed page's inversion went on")
    steps, asked = cancelled_in_log(server)[-1]
    assert steps < asked == 3000
    d.find_element(By.XPATH, "//*[@id='stages']//label[.//*[text()='tune']]").click()  # encoder only
    d.find_element(By.ID, "invert").click()
    wait_for(lambda: "inverted with encoder in" in text_of(d, "status"), 120, f"not served: {text_of(d, 'status')!r}")
