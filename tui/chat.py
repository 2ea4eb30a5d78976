"""UI-independent chat logic shared by the Textual app and the plain REPL: settings, slash-command
parsing, `/file` attachments as fenced code blocks, code-block extraction for `/copy`, the OSC 52
clipboard sequence, and text cleaning for display."""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt

MAX_ATTACH_BYTES = 64 * 1024

HELP = """\
| command | what it does |
|---|---|
| `/file PATH` | attach a file (up to 64 KB) to your next message as a code block |
| `/system TEXT` | set the system prompt of this conversation (`/system` alone clears it) |
| `/clear` | start a new conversation, without system prompt (the current one stays in `/history`) |
| `/retry` | regenerate the last answer |
| `/copy [N]` | copy the last (or N-th) code block of the last answer to the clipboard |
| `/history [N]` | list saved conversations and reopen one |
| `/settings` | temperature, top-p, max tokens |
| `/help` | this table |
| `/quit` | leave |

Keys: **Enter** sends, **Shift+Enter** or **Ctrl+J** inserts a newline, **Escape** stops the answer,
**Ctrl+Q** quits."""

COMMANDS = ("file", "system", "clear", "retry", "copy", "history", "settings", "help", "quit", "exit")

_LANGS = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript", ".ts": "typescript",
    ".tsx": "tsx", ".jsx": "jsx", ".rs": "rust", ".go": "go", ".c": "c", ".h": "c", ".cc": "cpp",
    ".cpp": "cpp", ".hpp": "cpp", ".cu": "cuda", ".java": "java", ".kt": "kotlin", ".rb": "ruby",
    ".sh": "bash", ".bash": "bash", ".zsh": "bash", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml",
    ".json": "json", ".md": "markdown", ".html": "html", ".css": "css", ".sql": "sql", ".lua": "lua",
    ".php": "php", ".swift": "swift", ".cs": "csharp", ".scala": "scala", ".r": "r", ".jl": "julia",
    ".txt": "text", ".cmake": "cmake", ".xml": "xml", ".ini": "ini", ".dockerfile": "dockerfile",
}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass
class Settings:
    temperature: float = 0.3
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int | None = None

    def validate(self) -> None:
        if not 0.0 <= self.temperature <= 5.0:
            raise ValueError("temperature must be between 0 and 5")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top-p must be in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError("max tokens must be at least 1")

    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


@dataclass
class Command:
    name: str
    arg: str = ""


def parse_command(text: str) -> Command | None:
    """`/name rest…` → Command; None for ordinary text (and for `//…`, an escaped slash)."""
    s = text.strip()
    if not s.startswith("/") or s.startswith("//"):
        return None
    name, _, arg = s[1:].partition(" ")
    name = name.strip().lower()
    if "\n" in name:
        name, _, more = name.partition("\n")
        arg = more + " " + arg
    return Command(name, arg.strip())


class AttachError(Exception):
    """A `/file` that cannot be attached; the message says why."""


@dataclass
class Attachment:
    path: Path
    text: str

    @property
    def size(self) -> int:
        return len(self.text.encode("utf-8"))

    def fenced(self) -> str:
        lang = _LANGS.get(self.path.suffix.lower(), "")
        if not lang and self.path.name.lower() == "dockerfile":
            lang = "dockerfile"
        longest = max((len(m) for m in re.findall(r"`{3,}", self.text)), default=2)
        fence = "`" * (longest + 1)
        body = self.text if self.text.endswith("\n") else self.text + "\n"
        return f"{self.path.name}:\n{fence}{lang}\n{body}{fence}"


def read_attachment(arg: str, limit: int = MAX_ATTACH_BYTES) -> Attachment:
    if not arg:
        raise AttachError("usage: /file PATH")
    path = Path(arg.strip().strip("'\"")).expanduser()
    if not path.exists():
        raise AttachError(f"no such file: {path}")
    if not path.is_file():
        raise AttachError(f"not a regular file: {path}")
    try:
        size = path.stat().st_size
        if size > limit:
            raise AttachError(f"{path} is {size:,} bytes; /file attaches at most {limit // 1024} KB "
                              f"(the model's context is small: paste the part that matters)")
        data = path.read_bytes()
    except OSError as e:
        raise AttachError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AttachError(f"{path} is not UTF-8 text (binary files cannot be attached)") from None
    return Attachment(path, text)


def compose(prompt: str, attachments: list[Attachment]) -> str:
    """The user message: the typed text followed by each attachment as a fenced block."""
    parts = [prompt.strip()] if prompt.strip() else []
    parts += [a.fenced() for a in attachments]
    return "\n\n".join(parts)


_md = MarkdownIt("gfm-like")   # the parser Textual's Markdown widget renders with


def code_blocks(markdown: str) -> list[str]:
    """Contents of the fenced (and indented) code blocks of a Markdown text, in order."""
    return [t.content for t in _md.parse(markdown) if t.type in ("fence", "code_block")]


def osc52(text: str) -> str:
    """The OSC 52 sequence that asks the terminal to put `text` on the clipboard."""
    return "\x1b]52;c;" + base64.b64encode(text.encode("utf-8")).decode("ascii") + "\x07"


def pick_block(blocks: list[str], arg: str) -> str:
    """`/copy` (last block) or `/copy N` (1-based); ValueError with a message otherwise."""
    if not blocks:
        raise ValueError("the last answer has no code block")
    if not arg:
        return blocks[-1]
    try:
        n = int(arg)
    except ValueError:
        raise ValueError(f"usage: /copy [N] (N is a block number, got {arg!r})") from None
    if not 1 <= n <= len(blocks):
        raise ValueError(f"the last answer has {len(blocks)} code block(s); /copy 1..{len(blocks)}")
    return blocks[n - 1]


def clean(text: str) -> str:
    """Text safe to draw: control characters (other than newline and tab) become U+FFFD."""
    return _CONTROL.sub("\ufffd", text)
