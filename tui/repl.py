"""The plain line-by-line chat used when stdout or stdin is not a terminal: each input line is a
user message (or a command), the answer streams to stdout followed by a newline. Notices and
errors go to stderr so stdout carries only answers. `/clear`, `/system`, `/file`, `/retry`,
`/help` and `/quit` work; conversations are not saved here."""
from __future__ import annotations

import sys
import threading
from typing import Any, TextIO

from lite.errors import LiteError

from .chat import AttachError, Attachment, Settings, compose, parse_command, read_attachment
from .store import Conversation


def run_repl(model: Any, settings: Settings, stdin: TextIO | None = None, stdout: TextIO | None = None,
             stderr: TextIO | None = None) -> int:
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    conv = Conversation(model=model.name)
    attachments: list[Attachment] = []

    def note(msg: str) -> None:
        print(f"lite: {msg}", file=err, flush=True)

    def answer() -> None:
        cancel = threading.Event()
        stream = model.chat(conv.prompt_messages(), settings.max_tokens, stream=True, cancel=cancel,
                            drop_oldest=True, **settings.sampling())
        parts: list[str] = []
        try:
            for piece in stream:
                parts.append(piece.text)
                out.write(piece.text)
                out.flush()
        except KeyboardInterrupt:
            cancel.set()
            note("stopped")
        out.write("\n")
        out.flush()
        conv.messages.append({"role": "assistant", "content": "".join(parts)})

    for line in stdin:
        text = line.rstrip("\n")
        cmd = parse_command(text)
        try:
            if cmd is None:
                if not text.strip() and not attachments:
                    continue
                conv.messages.append({"role": "user", "content": compose(text, attachments)})
                attachments = []
                answer()
            elif cmd.name in ("quit", "exit"):
                break
            elif cmd.name == "clear":
                conv = Conversation(model=model.name)
                attachments = []
                model.reset()
                note("new conversation")
            elif cmd.name == "system":
                conv.system = cmd.arg
                note("system prompt set" if cmd.arg else "system prompt cleared")
            elif cmd.name == "file":
                a = read_attachment(cmd.arg)
                attachments.append(a)
                note(f"attached {a.path} ({a.size:,} bytes) to the next message")
            elif cmd.name == "retry":
                if conv.messages and conv.messages[-1]["role"] == "assistant":
                    conv.messages.pop()
                if not conv.messages:
                    note("nothing to retry")
                else:
                    answer()
            elif cmd.name == "help":
                note("commands: /file PATH, /system TEXT, /clear, /retry, /help, /quit "
                     "(the full-screen UI also has /copy, /history, /settings)")
            else:
                note(f"/{cmd.name} is not available here (stdout is not a terminal); try /help")
        except AttachError as e:
            note(str(e))
        except LiteError as e:
            note(f"error: {e}")
            if conv.messages and conv.messages[-1]["role"] == "user":
                conv.messages.pop()
    return 0
