"""Tests of `lite chat` (tui/): the Textual app driven by a pilot with the real tiny text model on
the reference backend, the conversation store, `/copy`'s OSC 52 payload, a layout snapshot, and
the plain REPL (in process and as a subprocess with piped stdin)."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from textual import events

from tui.app import AssistantMessage, ChatApp, HistoryScreen, Note, SettingsScreen, UserMessage
from tui.chat import Settings, code_blocks, osc52, parse_command
from tui.screenshot import DEMO, open_first_conversation, seed_store
from tui.store import Conversation, Store

ROOT = Path(__file__).resolve().parent.parent


def make_app(path, tmp_path, n_ctx=None, **settings) -> ChatApp:
    s = Settings(**{"temperature": 0.0, "max_tokens": 24, **settings})
    return ChatApp(path, {"backend": "reference", "n_ctx": n_ctx}, s, store=Store(tmp_path / "conv"))


async def ready(pilot) -> None:
    app = pilot.app
    for _ in range(500):
        if app.model is not None and app.screen is app.screen_stack[0]:
            return
        await pilot.pause(0.02)
    raise AssertionError("the model did not load")


async def wait_until(pilot, cond, timeout=60.0, what="condition") -> None:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def wait_idle(pilot) -> None:
    await wait_until(pilot, lambda: not pilot.app.generating, what="the answer to finish")
    await pilot.pause()


async def send(pilot, text: str) -> None:
    """Type `text` and press Enter; returns once the app has taken it (the prompt is cleared)."""
    pilot.app.prompt.text = text
    await pilot.press("enter")
    await wait_until(pilot, lambda: pilot.app.prompt.text == "", timeout=10, what=f"{text!r} to be taken")
    await pilot.pause()


async def key(pilot, name: str, char: str | None = None) -> None:
    """Post a key event as the terminal driver does, without waiting for the app to go idle."""
    pilot.app.post_message(events.Key(name, char))
    await pilot.pause(0)


def notes(app) -> str:
    return "\n".join(n.plain for n in app.log_view.query(Note))


def run(coro) -> None:
    asyncio.run(coro)


# ------------------------------------------------------------------------------- chat in the app

def test_send_streams_answer_into_log(text_model_path, tmp_path):
    async def go():
        app = make_app(text_model_path, tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await send(pilot, "write a function")
            await wait_idle(pilot)
            msgs = app.conv.messages
            assert [m["role"] for m in msgs] == ["user", "assistant"]
            assert msgs[1]["content"] and app.last_result.finish_reason in ("stop", "length")
            # streamed: the answer arrived as several pieces into one Markdown widget
            assert app._n_pieces > 1
            assert msgs[1]["content"] == app.last_result.text
            assert len(app.log_view.query(UserMessage)) == 1
            assert len(app.log_view.query(AssistantMessage)) == 1
            assert app.prompt.text == ""
            # the status bar shows a measured rate and the context in use
            status = app.status_text()
            assert re.search(r"\b\d+\.\d tok/s", status), status
            assert app.tok_s and app.tok_s > 0
            assert f"ctx {app.model.stats['context_used']}/{app.model.n_ctx}" in status
            assert "reference" in status and app.model.name in status
    run(go())


def test_status_bar_shows_expert_cache(text_model_path, tmp_path):
    async def go():
        app = ChatApp(text_model_path, {"backend": "reference", "ram_budget": "1MB"},
                      Settings(temperature=0.0, max_tokens=8), store=Store(tmp_path / "conv"))
        async with app.run_test(size=(120, 30)) as pilot:
            await ready(pilot)
            await send(pilot, "hi")
            await wait_idle(pilot)
            st = app.model.stats
            status = app.status_text()
            hit = 100 * st["expert_hits"] / (st["expert_hits"] + st["expert_misses"])
            assert f"experts {hit:.0f}% hit" in status, status
            assert re.search(r"RAM [\d.]+ \w+/977 KiB", status), status
    run(go())


def test_enter_sends_shift_enter_and_ctrl_j_insert_newline(text_model_path, tmp_path):
    async def go():
        app = make_app(text_model_path, tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await pilot.press("a", "ctrl+j", "b", "shift+enter", "c")
            assert app.prompt.text == "a\nb\nc"
            assert app.conv.messages == []
            await pilot.press("enter")
            await wait_idle(pilot)
            assert app.conv.messages[0] == {"role": "user", "content": "a\nb\nc"}
    run(go())


def test_escape_cancels_mid_stream_and_keeps_text(text_model_path, tmp_path, slow_steps):
    async def go():
        app = make_app(text_model_path, tmp_path, n_ctx=2048, max_tokens=1500)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            slow_steps(app.model, 0.005)
            app.prompt.text = "hello"
            await key(pilot, "enter")
            await wait_until(pilot, lambda: app._n_pieces >= 3, what="the first pieces")
            assert app.generating
            await key(pilot, "escape")
            await wait_until(pilot, lambda: app.cancel_event.is_set(), timeout=5, what="Escape")
            shown = "".join(app._answer_parts)     # frozen from here on
            await wait_idle(pilot)
            r = app.last_result
            assert r.finish_reason == "cancelled"
            assert r.completion_tokens < 200
            # what was on screen when Escape was pressed is what the conversation keeps
            assert app.conv.messages[-1] == {"role": "assistant", "content": shown}
            assert "(stopped)" in notes(app)
            # the model is free again: a new prompt runs
            app.settings.max_tokens = 4
            await send(pilot, "again")
            await wait_idle(pilot)
            assert app.last_result.finish_reason in ("stop", "length")
    run(go())


def test_typing_lands_while_answer_streams(text_model_path, tmp_path, slow_steps):
    """Keystrokes reach the prompt before the answer ends: model code is off the UI thread.
    Keys are posted the way the terminal driver posts them (pilot.press would also wait for the
    process to go idle, which it does not while the model computes)."""
    async def go():
        app = make_app(text_model_path, tmp_path, n_ctx=2048, max_tokens=1500)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            slow_steps(app.model, 0.005)
            app.prompt.text = "hello"
            await key(pilot, "enter")
            await wait_until(pilot, lambda: app._n_pieces >= 1, what="the first piece")
            for ch in "next":
                await key(pilot, ch, ch)
            await wait_until(pilot, lambda: app.prompt.text == "next", timeout=10, what="the keystrokes")
            assert app.generating, "the answer finished before the keystrokes landed"
            during = app._n_pieces
            await wait_until(pilot, lambda: app._n_pieces > during + 2, what="more pieces")
            # Enter while answering does not send; the typed text stays
            await key(pilot, "enter")
            await pilot.pause(0.1)
            assert app.prompt.text == "next" and len(app.conv.messages) == 1
            await key(pilot, "escape")
            await wait_idle(pilot)
            assert app.last_result.finish_reason == "cancelled"
            assert during < app.last_result.completion_tokens < 1500
    run(go())


def test_clear_starts_new_conversation(text_model_path, tmp_path):
    async def go():
        app = make_app(text_model_path, tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await send(pilot, "/system be brief")
            await send(pilot, "hi")
            await wait_idle(pilot)
            old_id = app.conv.id
            assert app.model.stats["context_used"] > 0
            await send(pilot, "/clear")
            assert app.conv.messages == [] and app.conv.id != old_id and app.conv.system == ""
            assert not app.log_view.query(UserMessage) and not app.log_view.query(AssistantMessage)
            assert app.model.stats["context_used"] == 0
            saved = json.loads((app.store.root / f"{old_id}.json").read_text())
            assert saved["system"] == "be brief" and len(saved["messages"]) == 2
    run(go())


def test_retry_regenerates_last_answer(text_model_path, tmp_path):
    async def go():
        app = make_app(text_model_path, tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await send(pilot, "/retry")
            assert "no answer to regenerate" in notes(app)
            await send(pilot, "write a function")
            await wait_idle(pilot)
            first = app.conv.messages[-1]["content"]
            await send(pilot, "/retry")
            await wait_idle(pilot)
            assert [m["role"] for m in app.conv.messages] == ["user", "assistant"]
            assert len(app.log_view.query(AssistantMessage)) == 1
            assert app.conv.messages[-1]["content"] == first   # greedy: the same answer again
            # with sampling, a retry draws a new answer
            app.settings = Settings(temperature=1.0, max_tokens=24, seed=None)
            seen = {first}
            for _ in range(2):
                await send(pilot, "/retry")
                await wait_idle(pilot)
                seen.add(app.conv.messages[-1]["content"])
            assert len(seen) > 1 and len(app.conv.messages) == 2
    run(go())


def test_system_prompt_reaches_the_model(text_model_path, tmp_path):
    async def go():
        app = make_app(text_model_path, tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await send(pilot, "hi")
            await wait_idle(pilot)
            plain = app.last_result.prompt_tokens
            await send(pilot, "/clear")
            await send(pilot, "/system You answer in Python only.")
            assert app.conv.system == "You answer in Python only."
            await send(pilot, "hi")
            await wait_idle(pilot)
            with_system = app.conv.prompt_messages()
            assert with_system[0] == {"role": "system", "content": "You answer in Python only."}
            assert app.last_result.prompt_tokens > plain
            await send(pilot, "/system")
            assert app.conv.system == "" and "System prompt cleared" in notes(app)
    run(go())


def test_file_attaches_fenced_block(text_model_path, tmp_path):
    src = tmp_path / "util.py"
    src.write_text("def add(a, b):\n    return a + b\n")
    big = tmp_path / "big.txt"
    big.write_text("x" * (70 * 1024))
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)

    async def go():
        app = make_app(text_model_path, tmp_path, max_tokens=4)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await send(pilot, f"/file {big}")
            assert "at most 64 KB" in notes(app) and app.attachments == []
            await send(pilot, f"/file {tmp_path / 'missing.py'}")
            assert "no such file" in notes(app)
            await send(pilot, f"/file {binary}")
            assert "not UTF-8 text" in notes(app) and app.attachments == []
            await send(pilot, f"/file {src}")
            assert len(app.attachments) == 1 and "util.py" in str(app.attach_bar.render())
            await send(pilot, "explain this")
            await wait_idle(pilot)
            user = app.conv.messages[0]["content"]
            assert user.startswith("explain this\n\nutil.py:\n```python\ndef add(a, b):\n")
            assert user.endswith("    return a + b\n```")
            assert code_blocks(user) == ["def add(a, b):\n    return a + b\n"]
            assert app.attachments == [] and not app.attach_bar.has_class("shown")
    run(go())


def test_copy_emits_osc52(text_model_path, tmp_path):
    conv = Conversation(id="c1", messages=[
        {"role": "user", "content": "two blocks please"},
        {"role": "assistant", "content": "First:\n\n```python\nprint(1)\n```\n\nSecond:\n\n"
                                         "```sh\necho ü\n```\n"}])
    seed_store(tmp_path / "conv", conv)

    async def go():
        app = make_app(text_model_path, tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            written: list[str] = []
            app._driver.write = written.append          # what goes to the terminal
            await send(pilot, "/copy")
            assert "no answer yet" in notes(app)
            await send(pilot, "/history 1")
            await send(pilot, "/copy")
            payload = "\x1b]52;c;" + base64.b64encode("echo ü\n".encode()).decode() + "\x07"
            assert payload in written and app.clipboard == "echo ü\n"
            await send(pilot, "/copy 1")
            assert written[-1] == osc52("print(1)\n") and app.clipboard == "print(1)\n"
            await send(pilot, "/copy 3")
            assert "has 2 code block(s)" in notes(app)
    run(go())


def test_settings_modal(text_model_path, tmp_path):
    async def go():
        app = make_app(text_model_path, tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await send(pilot, "/settings")
            await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen), what="the modal")
            modal = app.screen
            modal.query_one("#temperature").value = "0.7"
            modal.query_one("#top_p").value = "0.9"
            modal.query_one("#max_tokens").value = "0"
            modal.query_one("#save").press()
            error = modal.query_one("#settings-error")
            await wait_until(pilot, lambda: "at least 1" in str(error.render()), what="the refusal")
            assert app.screen is modal and app.settings.max_tokens == 24     # refused: max tokens 0
            modal.query_one("#max_tokens").value = "64"
            modal.query_one("#save").press()
            await wait_until(pilot, lambda: not isinstance(app.screen, SettingsScreen), what="the modal to close")
            assert (app.settings.temperature, app.settings.top_p, app.settings.max_tokens) == (0.7, 0.9, 64)
            assert "T 0.7 · top-p 0.9 · max 64" in app.status_text()
            await send(pilot, "/settings")
            await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen), what="the modal")
            await pilot.press("escape")
            await wait_until(pilot, lambda: not isinstance(app.screen, SettingsScreen), what="the modal to close")
            assert app.settings.max_tokens == 64
    run(go())


def test_help_and_unknown_command(text_model_path, tmp_path):
    async def go():
        app = make_app(text_model_path, tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await send(pilot, "/help")
            assert "/file PATH" in app.log_view.query_one(".help").source
            await send(pilot, "/frobnicate")
            assert "Unknown command /frobnicate" in notes(app)
    run(go())


# ------------------------------------------------------------------------------- history

def test_history_saves_and_reopens(text_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))

    async def first():
        app = ChatApp(text_model_path, {"backend": "reference"}, Settings(temperature=0.0, max_tokens=12))
        assert app.store.root == tmp_path / "xdg" / "lite" / "conversations"
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await send(pilot, "/system be terse")
            await send(pilot, "write a function")
            await wait_idle(pilot)
            return app.conv

    saved = asyncio.run(first())
    files = list((tmp_path / "xdg" / "lite" / "conversations").glob("*.json"))
    assert [f.stem for f in files] == [saved.id]

    async def second():
        app = ChatApp(text_model_path, {"backend": "reference"}, Settings(temperature=0.0, max_tokens=12))
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await send(pilot, "/history")
            await wait_until(pilot, lambda: isinstance(app.screen, HistoryScreen), what="the history list")
            await pilot.press("enter")
            await wait_until(pilot, lambda: not isinstance(app.screen, HistoryScreen), what="the list to close")
            await pilot.pause()
            assert app.conv.id == saved.id and app.conv.messages == saved.messages
            assert app.conv.system == "be terse"
            assert len(app.log_view.query(UserMessage)) == 1 and len(app.log_view.query(AssistantMessage)) == 1
            # continuing the reopened conversation appends to the same file
            await send(pilot, "more")
            await wait_idle(pilot)
            data = json.loads(files[0].read_text())
            assert [m["role"] for m in data["messages"]] == ["user", "assistant", "user", "assistant"]
    asyncio.run(second())


def test_corrupt_history_file_is_set_aside(text_model_path, tmp_path):
    root = tmp_path / "conv"
    seed_store(root, DEMO)
    (root / "broken.json").write_text('{"messages": [')
    (root / "wrong.json").write_text('{"id": "wrong", "messages": [{"role": "robot", "content": 1}]}')

    async def go():
        app = make_app(text_model_path, tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            await send(pilot, "/history")
            await wait_until(pilot, lambda: isinstance(app.screen, HistoryScreen), what="the history list")
            assert len(app.screen.conversations) == 1
            await pilot.press("escape")
            await wait_until(pilot, lambda: not isinstance(app.screen, HistoryScreen), what="the list to close")
            text = notes(app)
            assert "broken.json" in text and "invalid JSON" in text and "broken.json.corrupt" in text
            assert "wrong.json" in text and "message 0" in text
    run(go())
    assert (root / "broken.json.corrupt").read_text() == '{"messages": ['   # kept, byte for byte
    assert (root / "wrong.json.corrupt").exists() and not (root / "broken.json").exists()
    assert (root / "demo.json").exists()


def test_store_round_trip_and_unreadable(tmp_path):
    store = Store(tmp_path)
    c = Conversation(system="sys", messages=[{"role": "user", "content": "héllo\n```x```"},
                                             {"role": "assistant", "content": ""}])
    store.save(c)
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe not utf8")
    convs, problems = store.list()
    assert [(x.id, x.system, x.messages, x.title) for x in convs] == [(c.id, "sys", c.messages, "héllo")]
    assert len(problems) == 1 and "not UTF-8" in problems[0].message()
    assert (tmp_path / "bad.json.corrupt").exists()
    (tmp_path / "bad.json").write_text("[]")
    _, problems = store.list()
    assert problems[0].moved_to == tmp_path / "bad.json.corrupt1"   # never overwrites an earlier one


def test_parse_command():
    assert parse_command("hello") is None and parse_command("//not a command") is None
    c = parse_command("  /system You are helpful. ")
    assert (c.name, c.arg) == ("system", "You are helpful.")
    assert (parse_command("/COPY 2").name, parse_command("/copy").arg) == ("copy", "")


# ------------------------------------------------------------------------------- snapshot, screenshot

def test_layout_snapshot(snap_compare, text_model_path, tmp_path):
    """A reopened conversation with a highlighted Python block, the prompt and the status bar."""
    store = seed_store(tmp_path / "conv", DEMO)
    app = ChatApp(text_model_path, {"backend": "reference"}, Settings(), store=store)
    assert snap_compare(app, terminal_size=(100, 32), run_before=open_first_conversation)


def test_screenshot_export(text_model_path, tmp_path):
    from tui.screenshot import export
    out = tmp_path / "chat.svg"
    export(str(text_model_path), str(out), backend="reference")
    svg = out.read_text()
    assert svg.startswith("<svg") and "lite&#160;chat" in svg and "fib" in svg and "Fibonacci" in svg


# ------------------------------------------------------------------------------- loading and REPL

def test_bad_model_file_in_app(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")

    async def go():
        app = ChatApp(bad, {"backend": "reference"}, Settings(), store=Store(tmp_path / "c"))
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_until(pilot, lambda: app.load_error is not None, what="the load error")
        assert app.return_code == 1 and "bad.gguf" in app.load_error
    run(go())


def _main_cmd(path, **kw) -> list[str]:
    args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    return [sys.executable, "-c", f"import sys, tui; sys.exit(tui.main({str(path)!r}, {args}))"]


def _env(tmp_path) -> dict:
    return {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg"), "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("kind", ["missing", "invalid"])
def test_bad_model_path_exits_cleanly(tmp_path, kind):
    path = tmp_path / "model.gguf"
    if kind == "invalid":
        path.write_bytes(b"GGUF" + b"\x00" * 20)
    p = subprocess.run(_main_cmd(path, backend="reference"), input="hi\n", capture_output=True, text=True,
                       cwd=ROOT, env=_env(tmp_path), timeout=120)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr and "lite chat: error:" in p.stderr and str(path) in p.stderr
    if kind == "missing":
        assert "not found" in p.stderr


def test_repl_subprocess(text_model_path, tmp_path):
    """stdout is a pipe: a plain REPL reads lines, streams answers, and /clear resets."""
    script = "hi\n/clear\nhi\n/system be brief\n/help\n"
    p = subprocess.run(_main_cmd(text_model_path, backend="reference", temperature=0.0, max_tokens=16),
                       input=script, capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path), timeout=120,
                       encoding="utf-8", errors="replace")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    half = len(p.stdout) // 2
    assert p.stdout[:half] == p.stdout[half:] and p.stdout.endswith("\n") and half > 1
    assert "new conversation" in p.stderr and "system prompt set" in p.stderr and "/file PATH" in p.stderr


def test_repl_in_process(text_model_path, tmp_path):
    import lite
    from tui.repl import run_repl
    m = lite.load(text_model_path, backend="reference")
    s = Settings(temperature=0.0, max_tokens=16)

    def chat(script: str) -> tuple[str, str]:
        m.reset()
        out, err = io.StringIO(), io.StringIO()
        assert run_repl(m, s, io.StringIO(script), out, err) == 0
        return out.getvalue(), err.getvalue()

    plain, _ = chat("hi\n")
    with_system, _ = chat("/system You answer in Python only.\nhi\n")
    cleared, _ = chat("/system You answer in Python only.\n/clear\nhi\n")
    assert with_system != plain and cleared == plain
    src = tmp_path / "a.py"
    src.write_text("x = 1\n")
    _, err = chat(f"/file {src}\n/file {tmp_path / 'nope'}\n")
    assert "attached" in err and "no such file" in err
    retried, err = chat("hi\n/retry\n")
    assert retried == plain + plain
    m.close()
