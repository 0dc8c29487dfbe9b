"""``phi4mm-lora serve``: the real server process on 127.0.0.1, an HTTP client, a real browser.

The served adapter is a real PEFT run folder whose LoRA weights are random (seeded), so the
tiny model's answers differ from one recording/sentence to the next: that is what lets the
concurrency test notice an answer given to the wrong request. The answers are not parseable
(a random model), so the end-to-end tests check what the service did with whatever the model
said; how a *parsed* answer is highlighted on the page is checked by handing the page a result
that :func:`~phi4mm_lora.evaluate.score.feedback` (the server's own code) made from a given
answer. The browser is Debian's Chromium driven by selenium; its microphone is Chromium's fake
capture device playing an espeak-ng recording, so the Record button's MediaRecorder path runs.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from audio_formats import FORMATS, encode, espeak

from phi4mm_lora.config import load_config
from phi4mm_lora.evaluate.score import feedback
from phi4mm_lora.model.adapters import save_trained
from phi4mm_lora.model.load import load_model

SENTENCES = ["we call it bear", "friend help bird pig", "the cat sat on the mat", "seven small dogs", "she reads good books"]
SCORE_KEYS = {"accuracy", "fluency", "prosodic", "total"}
MAX_SECONDS, MAX_UPLOAD_MB = 8, 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def random_run(tmp_path_factory, tiny_native: Path) -> Path:
    """A training-run folder (config.yaml + adapter/) holding a seeded random LoRA adapter."""
    run = tmp_path_factory.mktemp("run")
    adapter = {"mode": "fresh", "r": 4, "alpha": 8, "dropout": 0.0}
    cfg = load_config(None, [f"model.path={tiny_native}", "precision=fp32", "model.device=cpu",
                             *(f"adapter.{k}={v}" for k, v in adapter.items())])
    loaded = load_model(cfg.model, cfg.precision, cfg.adapter)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    save_trained(loaded.model, loaded.adapters, run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"path": str(tiny_native)}, "adapter": adapter}))
    return run


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> dict[str, Path]:
    """espeak-ng speech of each sentence (WAV), and the first one in every accepted format."""
    d = tmp_path_factory.mktemp("speech")
    out = {}
    for i, s in enumerate(SENTENCES):
        x, sr = espeak(s, d / f"s{i}.wav")
        out[s] = d / f"s{i}.wav"
        if i == 0:
            for suffix in FORMATS:
                out[suffix] = encode(x, sr, d / f"s0{suffix}")
    return out


@pytest.fixture(scope="module")
def server(random_run: Path, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "phi4mm_lora", "serve", "--adapter", str(random_run), "--port", str(port),
           "--max-seconds", str(MAX_SECONDS), "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-batch", "8",
           "precision=fp32", "model.device=cpu", "eval.max_new_tokens=4", "eval.batch_size=8"]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"serve did not come up in 180 s:\n{log.read_text()}")
        time.sleep(0.5)
    yield SimpleNamespace(url=url, proc=proc, log=log, run=random_run)
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def post(url: str, audio: Path | bytes, text: str | None, name: str | None = None, **kw) -> httpx.Response:
    data = audio if isinstance(audio, bytes) else audio.read_bytes()
    files = {"audio": (name or (audio.name if isinstance(audio, Path) else "upload"), data)}
    return httpx.post(url + "/score", files=files, data={} if text is None else {"text": text}, timeout=300, **kw)


def comparable(result: dict) -> dict:
    """A result without how it was batched (the only field that may differ between runs)."""
    return {k: v for k, v in result.items() if k != "batch"}


def test_health_page_and_sentences(server) -> None:
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok"
    prov = h["provenance"]
    assert prov["adapter"] == str(server.run / "adapter") and prov["adapter_mode"] == "fresh"
    assert prov["precision"] == "fp32" and prov["phi4mm_lora_version"] and "tiny random test model" in prov["model"]
    assert prov["adapter_merged"] is True  # eval.merge_adapter: serve loads through the inference path
    assert h["accepted_formats"] == ["WAV", "FLAC", "MP3", "OGG/Opus", "WebM/Opus", "M4A"]
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for marker in ('id="record"', "MediaRecorder", 'id="file"', 'id="text"', 'list="sentences"', 'fetch("score"'):
        assert marker in page.text
    sentences = httpx.get(server.url + "/sentences").json()["sentences"]
    assert sentences and all(isinstance(s, str) and s == s.lower() for s in sentences)


def test_score_every_accepted_format(server, recordings) -> None:
    names = {".wav": "WAV", ".flac": "FLAC", ".mp3": "MP3", ".ogg": "OGG/Opus", ".webm": "WebM/Opus", ".m4a": "M4A"}
    with ThreadPoolExecutor(len(names)) as pool:
        answers = dict(zip(names, pool.map(lambda s: post(server.url, recordings[s], "We call it bear, zorblax!"),
                                            names), strict=True))
    for suffix, resp in answers.items():
        assert resp.status_code == 200, resp.text
        r = resp.json()
        assert r["audio"] == f"s0{suffix}" and r["audio_info"]["format"] == names[suffix]
        assert abs(r["audio_info"]["duration_s"] - sf.info(str(recordings[SENTENCES[0]])).duration) < 0.1
        assert set(r["scores"]) == SCORE_KEYS and r["score_scale"] == [0, 10] and set(r["score_labels"]) == SCORE_KEYS
        assert [e["word"] for e in r["expected"]] == ["we", "call", "it", "bear", "zorblax"]
        assert r["expected"][3]["phones"] == ["B", "EH", "R"]  # CMUdict, stress removed
        assert r["oov"] == ["zorblax"] and any("zorblax" in w for w in r["warnings"])  # reported, not fatal
        assert r["apa_raw"] and r["mdd_raw"] and "provenance" in r and r["error"] is None
        for k in SCORE_KEYS:  # garbage answers are reported as such, never invented scores
            assert r["scores"][k] is None or 0 <= r["scores"][k] <= 10
        assert (r["scores"]["total"] is not None) or r["apa_error"]


def test_twenty_concurrent_requests_equal_one_at_a_time(server, recordings) -> None:
    pairs = [(recordings[s], s) for s in SENTENCES]
    alone = [post(server.url, a, t).json() for a, t in pairs]
    assert all(r["batch"]["size"] == 1 for r in alone)
    assert len({(r["apa_raw"], r["mdd_raw"]) for r in alone}) >= 3, "answers must differ for the check to mean anything"
    before = httpx.get(server.url + "/health").json()
    jobs = [pairs[i % len(pairs)] for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        together = list(pool.map(lambda p: post(server.url, *p), jobs))
    for i, resp in enumerate(together):
        assert resp.status_code == 200, resp.text
        assert comparable(resp.json()) == comparable(alone[i % len(pairs)]), f"request {i} differs"
    after = httpx.get(server.url + "/health").json()
    assert after["requests"] - before["requests"] == 20
    assert after["largest_batch"] > 1 and after["batches"] - before["batches"] < 20  # really batched


def test_bad_inputs_get_4xx_json_and_the_server_survives(server, recordings) -> None:
    wav = recordings[SENTENCES[0]]
    aiff = io.BytesIO()
    sf.write(aiff, np.zeros(1600, np.float32), 16000, format="AIFF")
    nan = io.BytesIO()
    sf.write(nan, np.full(1600, np.nan, np.float32), 16000, format="WAV", subtype="FLOAT")
    long_wav = io.BytesIO()
    sf.write(long_wav, np.zeros(16000 * (MAX_SECONDS + 2), np.int16), 16000, format="WAV")
    big = io.BytesIO()
    sf.write(big, np.zeros(16000 * 40, np.int16), 16000, format="WAV")  # 1.3 MB > 1 MiB
    cases = [
        ("empty text", lambda: post(server.url, wav, ""), 422, "empty_text"),
        ("blank text", lambda: post(server.url, wav, "   \n "), 422, "empty_text"),
        ("no words", lambda: post(server.url, wav, "?!"), 422, "empty_text"),
        ("no text field", lambda: post(server.url, wav, None), 422, "empty_text"),
        ("text too long", lambda: post(server.url, wav, "word " * 200), 422, "text_too_long"),
        ("no audio field", lambda: httpx.post(server.url + "/score", data={"text": "hi"}, files={"x": ("a", b"1")}),
         400, "missing_audio"),
        ("empty audio", lambda: post(server.url, b"", "we call it bear", "a.wav"), 422, "empty_audio"),
        ("not audio", lambda: post(server.url, b"hello world" * 50, "we call it bear", "a.mp3"), 415, "unsupported_format"),
        ("aiff", lambda: post(server.url, aiff.getvalue(), "we call it bear", "a.aiff"), 415, "unsupported_format"),
        ("NaN samples", lambda: post(server.url, nan.getvalue(), "we call it bear", "nan.wav"), 422, "unreadable_audio"),
        ("too long", lambda: post(server.url, long_wav.getvalue(), "we call it bear", "long.wav"), 413, "too_long"),
        ("too large", lambda: post(server.url, big.getvalue(), "we call it bear", "big.wav"), 413, "too_large"),
        ("too large, chunked", lambda: httpx.post(server.url + "/score", content=(b"x" * 65536 for _ in range(20)),
                                                   headers={"content-type": "multipart/form-data; boundary=b"}),
         413, "too_large"),
        ("not a form", lambda: httpx.post(server.url + "/score", json={"text": "hi"}), 400, "bad_request"),
        ("broken form", lambda: httpx.post(server.url + "/score", content=b"--b\r\nbroken",
                                           headers={"content-type": "multipart/form-data; boundary=b"}), 422, "empty_text"),
        ("GET /score", lambda: httpx.get(server.url + "/score"), 405, "http_error"),
        ("unknown path", lambda: httpx.get(server.url + "/nope"), 404, "http_error"),
    ]
    for name, call, status, code in cases:
        resp = call()
        assert resp.status_code == status, (name, resp.status_code, resp.text)
        body = resp.json()
        assert body["error"] == code and len(body["message"]) > 10, (name, body)
    assert server.proc.poll() is None
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    ok = post(server.url, wav, SENTENCES[0])
    assert ok.status_code == 200 and set(ok.json()["scores"]) == SCORE_KEYS


def test_serve_refuses_bad_setup_before_loading(tmp_path: Path, capsys) -> None:
    from phi4mm_lora.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (["serve", "--adapter", str(tmp_path / "nope")], "does not exist"),
            (["serve", "--port", str(port)], "pick another with --port"),
            (["serve", "--max-seconds", "0"], "--max-seconds"),
        ]
        for argv, msg in cases:
            t = time.monotonic()
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip()
            assert msg in err and len(err.splitlines()) == 1, err
            assert time.monotonic() - t < 5  # refused before the model is loaded


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile (inductor) needs a C++ compiler")
def test_under_eval_compile_the_service_compiles_before_its_first_request(random_run: Path, recordings) -> None:
    """eval.compile: the service scores a bundled recording once before it serves, so that the
    compilation is not paid by a request; its answers are the eager service's."""
    from starlette.testclient import TestClient

    from phi4mm_lora.model.blocks import conformer_blocks, is_compiled
    from phi4mm_lora.serve.service import create_service

    small = ["precision=fp32", "model.device=cpu", "eval.max_new_tokens=4"]
    answers = []
    for extra in ([], ["eval.cache=static", "eval.compile=true"]):
        service = create_service(load_config(None, small + extra), run=random_run, sentences=[])
        with TestClient(service.app) as client:
            requests_before = service.worker.stats.requests
            resp = post_client(client, recordings[SENTENCES[1]], SENTENCES[1])
        assert resp.status_code == 200, resp.text
        answers.append(comparable(resp.json()))
        if extra:  # warmed up on the bundled recording before the app existed, outside the request counts
            assert service.warm_up_s > 0 and requests_before == 0
            assert all(is_compiled(b) for b in conformer_blocks(service.worker.loaded.model))
        else:
            assert service.warm_up_s is None
    assert answers[0] == answers[1]


def post_client(client, audio: Path, text: str):
    return client.post("/score", files={"audio": (audio.name, audio.read_bytes())}, data={"text": text})


def test_a_full_queue_is_refused_at_once() -> None:
    from phi4mm_lora.serve.worker import QueueFull, ScoringWorker

    worker = ScoringWorker(cfg=None, loaded=None, max_queue=2)  # not started: nothing leaves the queue
    for _ in range(2):
        worker.submit("a.wav", "hi", np.zeros(160, np.float32))
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        worker.submit("a.wav", "hi", np.zeros(160, np.float32))
    assert worker.waiting == 2


# --------------------------------------------------------------------------- real browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory, recordings):
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("chromium + chromium-driver are not installed (make system-deps installs them)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1000,1400", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
                 # the microphone: Chromium's fake capture device playing an espeak-ng recording
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={recordings[SENTENCES[0]]}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _highlighted(driver) -> list[tuple[int, int, str, str]]:
    from selenium.webdriver.common.by import By

    out = []
    for e in driver.find_elements(By.CSS_SELECTOR, "#sentence .phone.bad, #sentence .phone.inserted"):
        heard = e.get_attribute("data-heard") if e.get_attribute("data-kind") != "insertion" else e.text.lstrip("+")
        out.append((int(e.get_attribute("data-word-index")), int(e.get_attribute("data-position")),
                    e.get_attribute("data-kind"), heard or None))
    return sorted(out)


def _issues(result: dict) -> list[tuple[int, int, str, str]]:
    return sorted((i["word_index"], i["position"], i["kind"], i["heard"]) for i in result["mispronunciations"] or [])


def test_browser_uploads_a_recording_and_shows_the_result(server, recordings, browser, tmp_path_factory) -> None:
    """Screenshots go to the run's tmp folder ``screenshots*/`` (kept with ``--basetemp DIR`` or on failure)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    shots = tmp_path_factory.mktemp("screenshots")

    sentence = SENTENCES[1]
    expected = post(server.url, recordings[sentence], sentence).json()  # the same request, over HTTP
    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sentences option"))
    browser.find_element(By.ID, "text").send_keys(sentence)
    browser.find_element(By.ID, "file").send_keys(str(recordings[sentence]))
    browser.find_element(By.ID, "score").click()
    WebDriverWait(browser, 180).until(lambda d: d.find_element(By.ID, "result").get_attribute("data-state") in ("done", "error"))
    browser.save_screenshot(str(shots / "page-upload.png"))
    assert browser.find_element(By.ID, "result").get_attribute("data-state") == "done", \
        browser.find_element(By.ID, "error").text
    for k in SCORE_KEYS:  # what the page shows is what the API answered ("" = no readable score)
        v = expected["scores"][k]
        assert browser.find_element(By.ID, f"score-{k}").get_attribute("data-value") == ("" if v is None else str(v))
    words = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#sentence .word .w")]
    assert words == [e["word"] for e in expected["expected"]] == sentence.split()
    assert _highlighted(browser) == _issues(expected)
    assert str(server.run / "adapter") in browser.find_element(By.ID, "provenance").text
    assert (shots / "page-upload.png").stat().st_size > 10_000

    # How a parsed answer is shown: the server's own feedback() on a given answer for this
    # sentence (friend help bird pig): EH->IH in "friend", L left out of "help", AH added after "pig".
    apa = '{"accuracy": 6, "fluency": 8, "prosodic": 7, "total": 7}'
    mdd = '{"word_transcript": "frind hep bird pig", "phoneme_transcript": "F R IH N D HH EH P B ER D P IH G AH"}'
    given = {**feedback("s1.wav", sentence, apa, mdd), "provenance": expected["provenance"]}
    assert {i["kind"] for i in given["mispronunciations"]} == {"substitution", "deletion", "insertion"}
    browser.execute_script("window.phi4mm.showResult(arguments[0])", given)
    assert [browser.find_element(By.ID, f"score-{k}").get_attribute("data-value") for k in
            ("accuracy", "fluency", "prosodic", "total")] == ["6", "8", "7", "7"]
    assert _highlighted(browser) == _issues(given) == [(0, 2, "substitution", "IH"), (1, 2, "deletion", None),
                                                        (3, 3, "insertion", "AH")]
    bad_words = [e.find_element(By.CSS_SELECTOR, ".w").text for e in browser.find_elements(By.CSS_SELECTOR, "#sentence .word.has-issue")]
    assert bad_words == ["friend", "help", "pig"]
    browser.save_screenshot(str(shots / "page-highlighted.png"))


def test_browser_records_with_mediarecorder_and_scores(server, browser) -> None:
    """Record button -> MediaRecorder (Chromium: WebM/Opus) -> POST -> result, as on a phone or laptop."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    browser.find_element(By.ID, "text").send_keys(SENTENCES[0])
    browser.find_element(By.ID, "record").click()
    WebDriverWait(browser, 20).until(lambda d: "Stop" in d.find_element(By.ID, "record").text)
    time.sleep(1.5)
    browser.find_element(By.ID, "record").click()
    WebDriverWait(browser, 20).until(lambda d: "Recorded in the browser" in d.find_element(By.ID, "audio-status").text)
    browser.find_element(By.ID, "score").click()
    WebDriverWait(browser, 180).until(lambda d: d.find_element(By.ID, "result").get_attribute("data-state") in ("done", "error"))
    assert browser.find_element(By.ID, "result").get_attribute("data-state") == "done", \
        browser.find_element(By.ID, "error").text
    audio_row = browser.find_element(By.ID, "transcripts").text
    assert "WebM/Opus" in audio_row, audio_row  # what Chromium's MediaRecorder produced, decoded by the server
    seconds = float(re.search(r"WebM/Opus, ([0-9.]+) s", audio_row).group(1))
    assert 0.8 < seconds < 10, audio_row  # about the 1.5 s between Record and Stop
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#sentence .word .w")] == SENTENCES[0].split()


def test_the_service_warms_up_on_a_gpu_or_when_compiled() -> None:
    """On a GPU a process's first scoring call costs about 3x the next ones (kernels loaded,
    attention plans built: 12.4 s against 3.85 s on an H200), so the service pays it at start,
    as it does for eval.compile; on a CPU it starts serving at once."""
    import torch

    from phi4mm_lora.serve.service import warms_up

    plain, compiled = load_config(None, []), load_config(None, ["eval.cache=static", "eval.compile=true"])
    assert not warms_up(plain, torch.device("cpu"))
    assert warms_up(plain, torch.device("cuda")) and warms_up(plain, torch.device("cuda", 0)) and warms_up(plain, "cuda:1")
    assert warms_up(compiled, torch.device("cpu"))
