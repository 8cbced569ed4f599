"""The chat page at `/`, driven in a real headless Chromium (Selenium with the system chromedriver) against a
real `openelm-mlx serve` process on the demo model. Without /usr/bin/chromium, chromedriver or selenium the
browser tests skip; the header and --no-web checks need no browser."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_server import SERVE, free_port

from openelm_mlx.serve import web

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
KEY = "page-key"
WEB = Path(web.__file__).parent / "web"
STORE = "openelm-mlx.conversations"
# Model text a page must show, never run: each sets window.__xss if it ever executes.
PAYLOADS = [
    "<script>window.__xss=1</script>",
    '<img src=x onerror="window.__xss=1">',
    '<svg onload="window.__xss=1"><circle r="5"/></svg>',
    '<iframe src="javascript:window.__xss=1"></iframe>',
    "[x](javascript:window.__xss=1)",
    "[y](JaVaScRiPt:window.__xss=1)",
    "[z](data:text/html,<script>window.__xss=1</script>)",
    '[<img src=x onerror="window.__xss=1">](https://example.com/)',
    '[w](https://example.com/"onmouseover="window.__xss=1)',
    "**<img src=x onerror=window.__xss=1>** and *<script>window.__xss=1</script>*",
    "`<script>window.__xss=1</script>`\n\n```html\n<img src=x onerror=window.__xss=1>\n```",
    "> <a href=javascript:window.__xss=1>quoted</a>\n- <b onclick=window.__xss=1>item</b>",
]


def start(log: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """A `serve` process on the demo model (its stderr, with the debug request log, in `log`) once it answers."""
    port = free_port()
    cmd = [sys.executable, "-c", SERVE, "serve", "--port", str(port), "--log-level", "debug", *args]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    proc, url = start(log)
    yield url, log
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory) -> Iterator[str]:
    proc, url = start(tmp_path_factory.mktemp("serve") / "stderr.log", "--api-key", KEY)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def browser(tmp_path) -> Iterator[Any]:
    """A fresh headless Chromium (new profile: empty storage); its last view is saved as tmp_path/page.png."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"no browser: needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("no browser: needs selenium (pip install selenium)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=900,800"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads")})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()


# ---------------------------------------------------------------- helpers


def wait_for(check: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def open_page(driver: Any, url: str) -> None:
    driver.get(url + "/")
    wait_for(lambda: driver.execute_script("return document.readyState === 'complete' && !!window.renderMarkdown"))


def by_id(driver: Any, name: str) -> Any:
    return driver.find_element("id", name)


def settings(driver: Any, **values: Any) -> None:
    """Type into the settings fields (opened first), firing their change events."""
    if not by_id(driver, "settings").is_displayed():
        by_id(driver, "toggle-settings").click()
    for name, value in values.items():
        field = by_id(driver, name.replace("_", "-"))
        field.clear()
        field.send_keys(str(value))
        driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)


def send(driver: Any, text: str) -> None:
    """Type `text` (its new lines with Shift+Enter) and press Enter."""
    from selenium.webdriver.common.keys import Keys

    box = by_id(driver, "input")
    for i, line in enumerate(text.split("\n")):
        box.send_keys(*((Keys.SHIFT, Keys.ENTER, Keys.NULL) if i else ()), line)
    box.send_keys(Keys.ENTER)


def stored(driver: Any) -> list[dict[str, Any]]:
    return json.loads(driver.execute_script(f"return localStorage.getItem('{STORE}')") or "[]")


def messages(driver: Any) -> list[dict[str, Any]]:
    current = driver.execute_script("return localStorage.getItem('openelm-mlx.current')")
    return next(c for c in stored(driver) if c["id"] == current)["messages"]


def messages_or_none(driver: Any) -> list[dict[str, Any]] | None:
    current = driver.execute_script("return localStorage.getItem('openelm-mlx.current')")
    found = [c for c in stored(driver) if c["id"] == current and c["messages"]]
    return found[0]["messages"] if found else None


def wait_answer(driver: Any, timeout: float = 30) -> dict[str, Any]:
    """The last stored message once no answer is streaming (the page saves it when the stream ends)."""

    def done() -> Any:
        running = driver.execute_script("return document.body.classList.contains('running')")
        stats = driver.find_elements("css selector", ".message.assistant:last-child .stats")
        return not running and stats and "finish:" in stats[-1].text

    wait_for(done, timeout, "the answer to finish")
    return messages(driver)[-1]


def api_chat(url: str, messages: list[dict[str, str]], key: str | None = None, **kw: Any) -> dict[str, Any]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    body = json.dumps({"messages": messages, "temperature": 0, **kw}).encode()
    with urllib.request.urlopen(urllib.request.Request(url + "/v1/chat/completions", body, headers)) as r:
        return json.loads(r.read())


def metrics(url: str) -> dict[str, Any]:
    return json.loads(urllib.request.urlopen(url + "/metrics").read())


def request_log(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "openelm_mlx.serve.requests: chat request" in line]


# ---------------------------------------------------------------- without a browser


def test_page_headers_assets_and_no_web(server, tmp_path):
    url, _ = server
    for path, (name, media_type) in web.FILES.items():
        with urllib.request.urlopen(url + path) as r:
            assert r.headers["Content-Type"] == media_type and r.read() == (WEB / name).read_bytes()
            csp = r.headers["Content-Security-Policy"]
            assert r.headers["X-Content-Type-Options"] == "nosniff"
        policy = dict(part.strip().split(" ", 1) for part in csp.split(";"))
        assert policy["script-src"] == "'self'" and policy["connect-src"] == "'self'"
        assert policy["object-src"] == policy["base-uri"] == policy["frame-ancestors"] == "'none'"
        assert "unsafe" not in csp
    # Nothing from elsewhere, no HTML built from strings.
    for file in WEB.iterdir():
        text = file.read_text()
        assert not re.search(r"(src|href)=\"?(https?:)?//|@import|url\(|fetch\(\"http", text), file.name
        if file.suffix == ".js":
            assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|Function\(", text)
    proc, off = start(tmp_path / "stderr.log", "--no-web")
    try:
        for path in web.FILES:
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(off + path)
            assert e.value.code == 404
        assert urllib.request.urlopen(off + "/v1/models").status == 200
    finally:
        proc.terminate()
        proc.wait(10)


def test_metrics_shows_limits_and_load(server):
    url, _ = server
    m = metrics(url)
    assert m["active"] == 0 and m["queued"] == 0
    assert m["max_tokens_limit"] == 4096 and m["context_length"] == 512  # the CLI default, the demo's config


def test_api_continues_a_final_assistant_message(server):
    """`continue_final_message` (the page's Continue): a cut answer continued equals the uncut one (greedy)."""
    url, _ = server
    asked = [{"role": "user", "content": "Who are you?"}]
    whole = api_chat(url, asked, max_tokens=24)["choices"][0]["message"]["content"]
    part = api_chat(url, asked, max_tokens=9)["choices"][0]["message"]["content"]
    rest = api_chat(url, [*asked, {"role": "assistant", "content": part}], max_tokens=15, continue_final_message=True)
    assert part + rest["choices"][0]["message"]["content"] == whole
    closed = api_chat(url, [*asked, {"role": "assistant", "content": part}], max_tokens=15)
    assert part + closed["choices"][0]["message"]["content"] != whole  # without it the turn is closed
    for value, bad in ((True, asked), ("yes", [*asked, {"role": "assistant", "content": part}])):
        with pytest.raises(urllib.error.HTTPError) as e:
            api_chat(url, bad, max_tokens=2, continue_final_message=value)
        message = json.loads(e.value.read())["error"]["message"]
        assert e.value.code == 400 and message.startswith(("messages: ", "continue_final_message: ")), message


# ---------------------------------------------------------------- in the browser


def test_streamed_answer_equals_the_api(browser, server, tmp_path):
    url, log = server
    open_page(browser, url)
    settings(browser, temperature=0, max_tokens=40)
    send(browser, "Tell me of the king.")
    answer = wait_answer(browser)
    api = api_chat(url, [{"role": "user", "content": "Tell me of the king."}], max_tokens=40)
    assert answer["content"] == api["choices"][0]["message"]["content"] and answer["content"]
    shown = browser.find_element("css selector", ".message.assistant .content").text
    assert shown.split() == answer["content"].split()
    stats = browser.find_element("css selector", ".message.assistant .stats").text
    assert re.fullmatch(r"40 tokens · [\d.]+ tokens/s · finish: length", stats), stats
    assert "stream=True" in request_log(log)[-2]  # the page's request streamed (the last line is the API's)
    if target := os.environ.get("OPENELM_MLX_SCREENSHOT"):  # the README's picture: a run on the demo model
        browser.save_screenshot(target)


def test_stop_ends_generation_and_frees_the_row(browser, server):
    url, _ = server
    open_page(browser, url)
    settings(browser, temperature=0, max_tokens=4096)
    cancelled = metrics(url)["cancelled"]
    send(browser, "Tell me a long story.")
    wait_for(lambda: metrics(url)["active"] == 1, what="the row to start")
    wait_for(lambda: len(browser.find_element("css selector", ".message.assistant .content").text) > 20)
    by_id(browser, "stop").click()
    stopped = time.time()
    wait_for(lambda: metrics(url)["active"] == 0, timeout=5, what="the row to be freed")
    freed = time.time() - stopped
    m = metrics(url)
    assert m["cancelled"] == cancelled + 1 and m["queued"] == 0
    answer = wait_answer(browser)
    assert answer["finish"] == "stopped" and answer["content"]
    assert browser.find_element("css selector", ".message.assistant .continue").is_displayed()
    print(f"row freed {freed:.2f} s after Stop, {len(answer['content'])} characters shown")


def test_system_prompt_and_settings_reach_the_server(browser, server):
    url, log = server
    open_page(browser, url)
    system = "You are a pirate, WEBCHAT-MARKER."
    settings(browser, system_prompt=system, temperature=0.5, top_p=0.8, max_tokens=9, repetition_penalty=1.3)
    send(browser, "Hi there")
    answer = wait_answer(browser)
    line = request_log(log)[-1]
    assert "stream=True" in line and "max_tokens=9, temp=0.5, top_p=0.8" in line
    assert "repetition_penalty=1.3," in line
    assert f"[{{'role': 'system', 'content': '{system}'}}, {{'role': 'user', 'content': 'Hi there'}}]" in line
    assert answer["tokens"] <= 9
    browser.refresh()  # the settings are kept, the system prompt with its conversation
    open_page(browser, url)
    assert by_id(browser, "temperature").get_attribute("value") == "0.5"
    assert by_id(browser, "system-prompt").get_attribute("value") == system


def test_injected_html_does_not_run(browser, server):
    url, _ = server
    open_page(browser, url)
    chat = [{"role": "user" if i % 2 else "assistant", "content": p} for i, p in enumerate(PAYLOADS)]
    chat = [{"id": "evil", "title": PAYLOADS[0], "system": PAYLOADS[1], "messages": chat}]
    browser.execute_script(
        "localStorage.setItem(arguments[0], arguments[1]); localStorage.setItem('openelm-mlx.current', 'evil')",
        STORE,
        json.dumps(chat),
    )
    browser.refresh()
    open_page(browser, url)
    time.sleep(0.5)  # time for an onerror/onload to fire
    assert browser.execute_script("return window.__xss") is None
    shown = by_id(browser, "messages").text
    assert "<script>window.__xss=1</script>" in shown and '<img src=x onerror="window.__xss=1">' in shown
    assert "[x](javascript:window.__xss=1)" in shown
    tags = browser.execute_script(
        "return [...document.querySelectorAll('#messages *')].map(e => e.tagName.toLowerCase())"
    )
    allowed = {"div", "span", "button", "p", "a", "strong", "em", "code", "pre", "ul", "ol", "li", "blockquote", "hr"}
    assert set(tags) <= allowed | {"h3", "h4", "h5", "h6"}, set(tags)
    links = browser.execute_script("return [...document.querySelectorAll('#messages a')].map(a => [a.href, a.rel])")
    assert links and all(href.startswith("https://example.com/") and "noopener" in rel for href, rel in links)
    by_id(browser, "new-chat").click()  # and typed by the user (the whole list is past the demo's context)
    settings(browser, max_tokens=8)
    send(browser, "\n".join(PAYLOADS[:5]))
    wait_answer(browser)
    time.sleep(0.5)
    assert browser.execute_script("return window.__xss") is None
    assert by_id(browser, "messages").text.startswith("\n".join(PAYLOADS[:5]))
    # Were HTML ever to reach the DOM, the policy still forbids inline script and handlers.
    browser.execute_script(
        "const s = document.createElement('script'); s.textContent = 'window.__csp = 1'; document.body.append(s);"
        "document.body.insertAdjacentHTML('beforeend', '<img src=x onerror=\"window.__csp = 2\">');"
    )
    time.sleep(0.5)
    assert browser.execute_script("return window.__csp") is None


def test_markdown_renderer(browser, server):
    url, _ = server
    open_page(browser, url)

    def html(text: str) -> str:
        script = "const d = document.createElement('div'); d.append(renderMarkdown(arguments[0])); return d.innerHTML"
        return browser.execute_script(script, text)

    assert html("the __init__ method, snake_case_name and __x__") == (
        "<p>the __init__ method, snake_case_name and __x__</p>"
    )
    assert (
        html("**bold** and *it* and `a<b>`")
        == "<p><strong>bold</strong> and <em>it</em> and <code>a&lt;b&gt;</code></p>"
    )
    assert (
        html("# Title\n- a\n- b\n\n1. x\n2. y")
        == "<h3>Title</h3><ul><li>a</li><li>b</li></ul><ol><li>x</li><li>y</li></ol>"
    )
    assert html("```py\nif a < b:\n    pass\n```") == '<pre><code data-lang="py">if a &lt; b:\n    pass</code></pre>'
    assert html("[docs](https://example.com/a?b=1)") == (
        '<p><a href="https://example.com/a?b=1" rel="noopener noreferrer nofollow" target="_blank">docs</a></p>'
    )
    assert html("> quoted\n\n---") == "<blockquote><p>quoted</p></blockquote><hr>"


def test_regenerate_edit_and_continue(browser, server):
    url, _ = server
    asked = [{"role": "user", "content": "Who are you?"}]
    open_page(browser, url)
    settings(browser, temperature=0, max_tokens=6)
    send(browser, "Who are you?")
    first = wait_answer(browser)
    assert first["finish"] == "length"
    browser.find_element("css selector", ".message.assistant .continue").click()
    continued = wait_answer(browser)
    assert continued["content"] == api_chat(url, asked, max_tokens=12)["choices"][0]["message"]["content"]
    assert continued["tokens"] == 12 and len(messages(browser)) == 2
    browser.find_element("css selector", ".message.assistant .regenerate").click()
    again = wait_answer(browser)
    assert again["content"] == first["content"] and len(messages(browser)) == 2
    browser.find_element("css selector", ".message.user .edit").click()
    edit = browser.find_element("css selector", ".message.user .edit-input")
    edit.clear()
    edit.send_keys("Hello")
    browser.find_element("css selector", ".message.user .resend").click()
    wait_answer(browser)
    hello = api_chat(url, [{"role": "user", "content": "Hello"}], max_tokens=6)["choices"][0]["message"]["content"]
    assert [m["content"] for m in messages(browser)] == ["Hello", hello] and hello != first["content"]


def test_conversation_survives_reload_new_delete_export(browser, server, tmp_path):
    from selenium.webdriver.common.keys import Keys

    url, _ = server
    open_page(browser, url)
    settings(browser, temperature=0, max_tokens=8)  # greedy: the same answer each run
    by_id(browser, "input").send_keys("first line", Keys.SHIFT, Keys.ENTER, Keys.NULL, "second line")
    assert messages_or_none(browser) is None  # Shift+Enter did not send
    by_id(browser, "input").send_keys(Keys.ENTER)  # Enter did
    answer = wait_answer(browser)
    chat = messages(browser)
    assert chat[0]["content"] == "first line\nsecond line"
    browser.refresh()
    open_page(browser, url)
    shown = [e.text for e in browser.find_elements("css selector", ".message .content")]
    assert shown[0] == "first line\nsecond line" and shown[1].split() == answer["content"].split()
    assert messages(browser) == chat
    by_id(browser, "export-chat").click()
    exported = wait_for(lambda: list((tmp_path / "downloads").glob("chat-*.json")), what="the export")
    assert json.loads(exported[0].read_text())["messages"] == chat
    by_id(browser, "new-chat").click()
    assert browser.find_elements("css selector", ".message") == [] and len(stored(browser)) == 2
    by_id(browser, "delete-chat").click()
    assert len(stored(browser)) == 1 and messages(browser) == chat  # back on the first one
    by_id(browser, "delete-chat").click()
    browser.refresh()
    open_page(browser, url)
    assert browser.find_elements("css selector", ".message") == []


def test_api_key_field(browser, keyed):
    open_page(browser, keyed)
    assert wait_for(lambda: by_id(browser, "api-key-row").is_displayed(), what="the key field")
    send(browser, "Hello")
    error = wait_for(lambda: by_id(browser, "error").is_displayed() and by_id(browser, "error").text)
    assert "401" in error and "API key" in error
    settings(browser, api_key=KEY, temperature=0, max_tokens=5)
    browser.find_element("css selector", ".message.user .edit").click()
    browser.find_element("css selector", ".message.user .resend").click()
    answer = wait_answer(browser)
    expected = api_chat(keyed, [{"role": "user", "content": "Hello"}], key=KEY, max_tokens=5)
    assert answer["content"] == expected["choices"][0]["message"]["content"]
    assert KEY not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('openelm-mlx.api-key')") == KEY
    assert KEY not in json.dumps(browser.execute_script("return {...localStorage}"))
    browser.refresh()  # the key stays for the tab
    open_page(browser, keyed)
    assert by_id(browser, "api-key").get_attribute("value") == KEY
    by_id(browser, "toggle-settings").click()
    assert wait_for(lambda: by_id(browser, "api-key-row").is_displayed(), what="the key field after a reload")


def test_phone_width_and_dark_theme(browser, server):
    url, _ = server
    browser.set_window_size(390, 844)
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    )
    open_page(browser, url)
    assert not by_id(browser, "sidebar").is_displayed() and by_id(browser, "toggle-sidebar").is_displayed()
    settings(browser, max_tokens=8)
    send(browser, "Hi")
    wait_answer(browser)
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    background = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(21, 23, 26)"  # the dark palette
    by_id(browser, "toggle-sidebar").click()
    assert by_id(browser, "sidebar").is_displayed()
    by_id(browser, "close-sidebar").click()
    assert not by_id(browser, "sidebar").is_displayed()
