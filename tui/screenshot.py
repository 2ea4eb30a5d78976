"""Export an SVG screenshot of the chat UI showing a saved conversation with a code block:
`python -m tui.screenshot MODEL.gguf docs/chat.svg`. The conversation (`DEMO`) is written to a
temporary history directory and reopened with `/history 1`, so the picture is deterministic and
needs no generation; the status bar shows the real MODEL."""
from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from .chat import Settings
from .store import Conversation, Store

DEMO = Conversation(
    id="demo", title="Fibonacci in Python", created=1_700_000_000.0, updated=1_700_000_000.0,
    messages=[
        {"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."},
        {"role": "assistant", "content":
            "An iterative version runs in linear time and constant memory:\n\n"
            "```python\n"
            "def fib(n: int) -> int:\n"
            "    \"\"\"Return the n-th Fibonacci number (fib(0) == 0).\"\"\"\n"
            "    if n < 0:\n"
            "        raise ValueError(\"n must be non-negative\")\n"
            "    a, b = 0, 1\n"
            "    for _ in range(n):\n"
            "        a, b = b, a + b\n"
            "    return a\n"
            "```\n\n"
            "For example, `fib(10)` is `55`. Type `/copy` to put the code on your clipboard."},
    ])


def seed_store(root: Path, conv: Conversation = DEMO) -> Store:
    """A store under `root` holding `conv` with its timestamps preserved."""
    import json
    store = Store(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{conv.id}.json").write_text(json.dumps(conv.to_json()), encoding="utf-8")
    return store


async def open_first_conversation(pilot) -> None:
    """Pilot steps: wait for the model, reopen conversation 1, settle."""
    app = pilot.app
    for _ in range(500):
        if app.model is not None and app.screen is app.screen_stack[0]:
            break
        await pilot.pause(0.02)
    app.prompt.cursor_blink = False
    app.run_command("history", "1")
    await pilot.pause(0.2)
    await app.workers.wait_for_complete()
    await pilot.pause()


def export(model_path: str, out: str, size: tuple[int, int] = (100, 22), backend: str | None = None,
           prompt: str | None = None) -> None:
    """Save the screen as SVG: the saved DEMO conversation, or with `prompt` a live chat — the
    prompt typed and sent, the model's answer streamed to the end (greedy)."""
    from .app import ChatApp

    with tempfile.TemporaryDirectory() as d:
        store = seed_store(Path(d)) if prompt is None else Store(Path(d))
        app = ChatApp(model_path, {"backend": backend}, Settings(temperature=0.0), store=store)

        async def go() -> None:
            async with app.run_test(size=size) as pilot:
                if prompt is None:
                    await open_first_conversation(pilot)
                else:
                    while app.model is None or app.screen is not app.screen_stack[0]:
                        await pilot.pause(0.05)
                    app.prompt.cursor_blink = False
                    app.prompt.text = prompt
                    await pilot.press("enter")
                    await pilot.pause(0.2)
                    await app.workers.wait_for_complete()
                    await pilot.pause(0.3)
                app.save_screenshot(filename=Path(out).name, path=str(Path(out).parent or "."))
        asyncio.run(go())


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: python -m tui.screenshot MODEL.gguf OUT.svg [PROMPT]")
    export(sys.argv[1], sys.argv[2], prompt=sys.argv[3] if len(sys.argv) == 4 else None)
