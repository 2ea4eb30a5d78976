"""Saved conversations: one JSON file per conversation under
`$XDG_DATA_HOME/lite/conversations/` (default `~/.local/share/lite/conversations/`).

A file holds `{"version", "id", "title", "created", "updated", "model", "system", "messages"}`
where `messages` is a list of `{"role": "user" | "assistant", "content": str}`. Writes are atomic
(temporary file, then rename). A file that cannot be read or parsed is never deleted: it is renamed
aside to `NAME.corrupt` and reported, and the rest of the history still loads.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
ROLES = ("user", "assistant")


def data_dir() -> Path:
    """`$XDG_DATA_HOME/lite/conversations`, read at call time so tests can point it elsewhere."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "lite" / "conversations"


def new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


@dataclass
class Conversation:
    """One chat: an optional system prompt plus alternating user/assistant messages."""
    id: str = field(default_factory=new_id)
    title: str = ""
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    model: str = ""
    system: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)

    def prompt_messages(self) -> list[dict[str, str]]:
        """The messages to hand to `Model.chat`: the system prompt (when set) first."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def auto_title(self) -> str:
        for m in self.messages:
            if m["role"] == "user":
                line = m["content"].strip().splitlines()[0] if m["content"].strip() else ""
                return line[:60] + ("…" if len(line) > 60 else "")
        return "(empty)"

    def to_json(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, "id": self.id, "title": self.title or self.auto_title(),
                "created": self.created, "updated": self.updated, "model": self.model,
                "system": self.system, "messages": self.messages}

    @classmethod
    def from_json(cls, data: Any) -> "Conversation":
        """Validate and build; raises ValueError naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("top level is not a JSON object")
        msgs = data.get("messages")
        if not isinstance(msgs, list):
            raise ValueError("'messages' is missing or not a list")
        clean = []
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise ValueError(f"message {i} is not {{'role': 'user'|'assistant', 'content': str}}")
            clean.append({"role": m["role"], "content": m["content"]})
        system = data.get("system", "")
        if not isinstance(system, str):
            raise ValueError("'system' is not a string")
        cid = data.get("id")
        if not isinstance(cid, str) or not cid:
            raise ValueError("'id' is missing")
        try:
            created, updated = float(data.get("created", 0)), float(data.get("updated", 0))
        except (TypeError, ValueError):
            raise ValueError("'created'/'updated' are not numbers") from None
        return cls(id=cid, title=str(data.get("title", "")), created=created, updated=updated,
                   model=str(data.get("model", "")), system=system, messages=clean)


@dataclass
class Problem:
    """A history file that could not be loaded, and where it was moved."""
    path: Path
    reason: str
    moved_to: Path | None

    def message(self) -> str:
        where = f"moved aside to {self.moved_to.name}" if self.moved_to else "left in place (could not rename it)"
        return f"could not read saved conversation {self.path}: {self.reason}; {where}"


class Store:
    """The conversation directory. `save` is atomic; `list` returns newest first plus problems."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else data_dir()

    def path_of(self, conv: Conversation) -> Path:
        return self.root / f"{conv.id}.json"

    def save(self, conv: Conversation) -> Path:
        """Write `conv` (only when it has messages or a system prompt); returns its path."""
        conv.updated = time.time()
        if not conv.title:
            conv.title = conv.auto_title() if conv.messages else ""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path_of(conv)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(conv.to_json(), ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def load(self, path: Path) -> Conversation:
        """Read one file; on failure it is moved aside and a `CorruptConversation` is raised."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            conv = Conversation.from_json(data)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CorruptConversation(self._set_aside(path, _reason(e))) from e
        if path.stem != conv.id:
            conv.id = path.stem
        return conv

    def list(self) -> tuple[list[Conversation], list[Problem]]:
        """Every readable conversation (newest first) and the files that were set aside."""
        convs: list[Conversation] = []
        problems: list[Problem] = []
        if not self.root.is_dir():
            return convs, problems
        for path in sorted(self.root.glob("*.json")):
            try:
                convs.append(self.load(path))
            except CorruptConversation as e:
                problems.append(e.problem)
        convs.sort(key=lambda c: c.updated, reverse=True)
        return convs, problems

    def _set_aside(self, path: Path, reason: str) -> Problem:
        target = path.with_name(path.name + ".corrupt")
        n = 1
        while target.exists():
            target = path.with_name(f"{path.name}.corrupt{n}")
            n += 1
        try:
            os.replace(path, target)
        except OSError:
            return Problem(path, reason, None)
        return Problem(path, reason, target)


class CorruptConversation(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message())
        self.problem = problem


def _reason(e: BaseException) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    if isinstance(e, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)
