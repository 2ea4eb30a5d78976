"""The Textual chat app behind `lite chat`.

Layout, top to bottom: the conversation (a scrolling column of Markdown messages; code blocks are
syntax highlighted), a line listing pending `/file` attachments, the multi-line prompt, and the
status bar. The model is loaded, and answers are generated, in thread workers; each `Piece` is
handed to the UI thread with `call_from_thread` and appended to the answer's `MarkdownStream`,
so only the growing answer re-renders and the prompt stays live while the model runs.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.events import Key
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Input, Label, LoadingIndicator, Markdown, OptionList, Static, TextArea
from textual.widgets.markdown import MarkdownStream
from textual.widgets.option_list import Option

from .chat import (HELP, AttachError, Attachment, Settings, clean, code_blocks, compose, osc52, parse_command,
                   pick_block, read_attachment)
from .store import Conversation, Store


# ---------------------------------------------------------------------------------------- widgets

class PromptArea(TextArea):
    """The prompt: Enter sends, Shift+Enter or Ctrl+J inserts a newline."""

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    async def _on_key(self, event: Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self.text))
            return
        if event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.delete(*self.selection)
            self.insert("\n")
            return
        await super()._on_key(event)


class UserMessage(Markdown):
    pass


class AssistantMessage(Markdown):
    pass


class Note(Static):
    """An informational line in the conversation (not part of what the model sees)."""
    plain = ""   # the note's source text


class StatusBar(Static):
    pass


# ---------------------------------------------------------------------------------------- screens

class LoadingScreen(Screen):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def compose(self) -> ComposeResult:
        with Vertical(id="loading-box"):
            yield Label(f"Loading {self.path.name} …", id="loading-label")
            yield LoadingIndicator()


class SettingsScreen(ModalScreen["Settings | None"]):
    """Temperature, top-p and max tokens; Save applies them to the next answers."""
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        s = self.settings
        with Grid(id="settings-box"):
            yield Label("Settings", id="settings-title")
            yield Label("temperature")
            yield Input(str(s.temperature), type="number", id="temperature")
            yield Label("top-p")
            yield Input(str(s.top_p), type="number", id="top_p")
            yield Label("max tokens")
            yield Input(str(s.max_tokens), type="integer", id="max_tokens")
            yield Label("", id="settings-error")
            with Horizontal(id="settings-buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def _read(self) -> Settings | None:
        try:
            new = Settings(temperature=float(self.query_one("#temperature", Input).value),
                           top_p=float(self.query_one("#top_p", Input).value),
                           max_tokens=int(self.query_one("#max_tokens", Input).value),
                           seed=self.settings.seed)
            new.validate()
        except ValueError as e:
            msg = str(e) if "must" in str(e) else "enter numbers"
            self.query_one("#settings-error", Label).update(msg)
            return None
        return new

    @on(Button.Pressed, "#save")
    @on(Input.Submitted)
    def save(self) -> None:
        new = self._read()
        if new is not None:
            self.dismiss(new)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class HistoryScreen(ModalScreen["Conversation | None"]):
    """Saved conversations, newest first; Enter reopens one."""
    BINDINGS = [Binding("escape", "cancel", "Close")]

    def __init__(self, conversations: list[Conversation]) -> None:
        super().__init__()
        self.conversations = conversations

    def compose(self) -> ComposeResult:
        with Vertical(id="history-box"):
            yield Label(f"Saved conversations ({len(self.conversations)}) — Enter opens, Escape closes",
                        id="history-title")
            options = [Option(describe(i, c), id=str(i)) for i, c in enumerate(self.conversations)]
            yield OptionList(*options, id="history-list")

    @on(OptionList.OptionSelected)
    def picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.conversations[event.option_index])

    def action_cancel(self) -> None:
        self.dismiss(None)


def describe(i: int, c: Conversation) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.updated))
    n = sum(1 for m in c.messages if m["role"] == "user")
    return f"{i + 1:>3}. {c.title or c.auto_title()}  ({n} prompt{'s' if n != 1 else ''}, {when})"


# ---------------------------------------------------------------------------------------- the app

class ChatApp(App[int]):
    TITLE = "lite chat"
    CSS = """
    Screen { layout: vertical; }
    #log { height: 1fr; padding: 0 1; scrollbar-size-vertical: 1; }
    UserMessage { margin: 1 0 0 0; padding: 0 1; background: $boost; border-left: outer $accent; }
    AssistantMessage { margin: 1 0 0 0; padding: 0 1; border-left: outer $success; }
    Note { margin: 1 0 0 0; padding: 0 1; color: $text-muted; }
    Note.error { color: $text-error; }
    Markdown > MarkdownBlock:last-child { margin-bottom: 0; }
    #attachments { height: auto; padding: 0 1; color: $text-accent; display: none; }
    #attachments.shown { display: block; }
    PromptArea { height: auto; min-height: 3; max-height: 10; border: round $primary; }
    StatusBar { height: 1; padding: 0 1; background: $panel; color: $text; }
    #loading-box { align: center middle; height: 1fr; }
    #loading-label { width: 100%; content-align: center middle; }
    SettingsScreen, HistoryScreen { align: center middle; }
    #settings-box { grid-size: 2; grid-columns: 14 24; grid-rows: auto; grid-gutter: 1 1; width: 44;
                    height: auto; padding: 1 2; border: round $primary; background: $surface; }
    #settings-title, #settings-error, #settings-buttons { column-span: 2; }
    #settings-title { text-style: bold; }
    #settings-error { color: $text-error; }
    #settings-box Label { padding: 1 0 0 0; }
    #settings-buttons { height: auto; align: right middle; }
    #settings-buttons Button { margin: 0 0 0 1; }
    #history-box { width: 90%; height: 70%; border: round $primary; background: $surface; padding: 0 1; }
    #history-list { height: 1fr; }
    """
    BINDINGS = [
        Binding("escape", "stop", "Stop answer"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, model_path: str | Path, load_kwargs: dict[str, Any] | None = None,
                 settings: Settings | None = None, store: Store | None = None, model: Any = None) -> None:
        super().__init__()
        self.model_path = Path(model_path)
        self.load_kwargs = dict(load_kwargs or {})
        self.settings = settings or Settings()
        self.store = store or Store()
        self.model: Any = model
        self.load_error: str | None = None
        self.conv = Conversation()
        self.attachments: list[Attachment] = []
        # generation state (touched only on the UI thread)
        self.generating = False
        self.cancel_event: threading.Event | None = None
        self._md_stream: MarkdownStream | None = None
        self._answer_widget: AssistantMessage | None = None
        self._answer_parts: list[str] = []
        self._first_piece_at = 0.0
        self._last_piece_at = 0.0
        self._n_pieces = 0
        self.tok_s: float | None = None       # shown in the status bar
        self.last_result: Any = None          # the last Generation

    # ------------------------------------------------------------------ layout and loading

    def compose(self) -> ComposeResult:
        # Kept as attributes: App.query_one searches the active screen, which may be a modal.
        self.log_view = VerticalScroll(id="log")
        self.attach_bar = Static("", id="attachments", markup=False)
        self.prompt = PromptArea(id="prompt", soft_wrap=True, show_line_numbers=False, tab_behavior="focus",
                                 placeholder="Message — Enter sends, Shift+Enter/Ctrl+J newline, /help for commands")
        self.status_bar = StatusBar("", id="status", markup=False)
        yield self.log_view
        yield self.attach_bar
        yield self.prompt
        yield self.status_bar

    def on_mount(self) -> None:
        self.log_view.anchor()
        self.set_interval(0.5, self.refresh_status)
        if self.model is None:
            self.push_screen(LoadingScreen(self.model_path))
            self._load_model()
        else:
            self._model_ready(self.model)

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def _load_model(self) -> None:
        import lite
        try:
            model = lite.load(self.model_path, **self.load_kwargs)
        except lite.LiteError as e:
            self.call_from_thread(self._load_failed, str(e))
            return
        except OSError as e:
            self.call_from_thread(self._load_failed, f"{e.filename or self.model_path}: {e.strerror or e}")
            return
        except Exception as e:  # an unexpected failure still ends the app cleanly
            self.call_from_thread(self._load_failed, f"{self.model_path}: {type(e).__name__}: {e}")
            return
        self.call_from_thread(self._model_ready, model)

    def _load_failed(self, message: str) -> None:
        self.load_error = message
        self.exit(1, return_code=1)

    def _model_ready(self, model: Any) -> None:
        self.model = model
        self.conv.model = model.name
        if isinstance(self.screen, LoadingScreen):
            self.pop_screen()
        self.note(f"**{model.name}** loaded on the **{model.backend.name}** backend "
                  f"(context {model.n_ctx} tokens). Type a message, or `/help`.")
        self.refresh_status()
        self.prompt.focus()

    # ------------------------------------------------------------------ conversation log

    def note(self, markdown_or_text: str, error: bool = False) -> Note:
        from rich.markdown import Markdown as RichMarkdown
        w = Note(RichMarkdown(markdown_or_text) if not error else markdown_or_text,
                 classes="error" if error else "", markup=False)
        w.plain = markdown_or_text
        self.log_view.mount(w)
        return w

    def show_help(self) -> None:
        w = Markdown(HELP, classes="help")
        self.log_view.mount(w)

    def render_conversation(self) -> None:
        """Rebuild the log from `self.conv` (after /clear or reopening from /history)."""
        log = self.log_view
        log.remove_children()
        if self.conv.system:
            self.note(f"System prompt: {self.conv.system}")
        for m in self.conv.messages:
            cls = UserMessage if m["role"] == "user" else AssistantMessage
            log.mount(cls(clean(m["content"])))
        log.anchor()

    # ------------------------------------------------------------------ input

    @on(PromptArea.Submitted)
    def submitted(self, event: PromptArea.Submitted) -> None:
        text = event.text
        cmd = parse_command(text)
        if cmd is None and not text.strip() and not self.attachments:
            return
        if cmd is None and self.generating:
            self.notify("Still answering — press Escape to stop it first.", severity="warning")
            return
        self.prompt.clear()
        if cmd is not None:
            self.run_command(cmd.name, cmd.arg)
            return
        content = compose(text, self.attachments)
        self.attachments = []
        self._show_attachments()
        self.conv.messages.append({"role": "user", "content": content})
        self.log_view.mount(UserMessage(clean(content)))
        self.start_answer()

    def run_command(self, name: str, arg: str) -> None:
        busy = name in ("clear", "retry", "history") and self.generating
        if busy:
            self.notify(f"/{name}: still answering — press Escape to stop it first.", severity="warning")
            return
        handler = getattr(self, f"cmd_{name}", None)
        if handler is None:
            self.note(f"Unknown command /{name}. /help lists the commands.", error=True)
            return
        handler(arg)

    def cmd_help(self, arg: str) -> None:
        self.show_help()

    def cmd_quit(self, arg: str) -> None:
        self.action_quit_app()

    cmd_exit = cmd_quit

    def cmd_file(self, arg: str) -> None:
        try:
            a = read_attachment(arg)
        except AttachError as e:
            self.note(f"/file: {e}", error=True)
            return
        self.attachments.append(a)
        self._show_attachments()
        self.note(f"Attached `{a.path}` ({a.size:,} bytes); it goes with your next message.")

    def _show_attachments(self) -> None:
        bar = self.attach_bar
        bar.update("attached: " + ", ".join(f"{a.path.name} ({a.size:,} B)" for a in self.attachments)
                   if self.attachments else "")
        bar.set_class(bool(self.attachments), "shown")

    def cmd_system(self, arg: str) -> None:
        self.conv.system = arg
        self.note(f"System prompt set: {arg}" if arg else "System prompt cleared.")
        if self.conv.messages:
            self.save()

    def cmd_clear(self, arg: str) -> None:
        if self.conv.messages:
            self.save()
        self.conv = Conversation(model=self.model.name if self.model else "")
        self.attachments = []
        self._show_attachments()
        self.model.reset()
        self.log_view.remove_children()
        self.note("New conversation.")
        self.refresh_status()

    def cmd_retry(self, arg: str) -> None:
        msgs = self.conv.messages
        if msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
            answers = self.log_view.query(AssistantMessage)
            if answers:
                answers.last().remove()
        if not msgs or msgs[-1]["role"] != "user":
            self.note("/retry: there is no answer to regenerate.", error=True)
            return
        self.start_answer()

    def cmd_copy(self, arg: str) -> None:
        last = next((m["content"] for m in reversed(self.conv.messages) if m["role"] == "assistant"), None)
        if last is None:
            self.note("/copy: there is no answer yet.", error=True)
            return
        try:
            code = pick_block(code_blocks(last), arg)
        except ValueError as e:
            self.note(f"/copy: {e}", error=True)
            return
        self.copy_code(code)
        lines = code.count("\n") + (not code.endswith("\n"))
        self.notify(f"Copied {lines} line{'s' if lines != 1 else ''} to the clipboard (OSC 52).")

    def copy_code(self, text: str) -> str:
        """Put `text` on the clipboard with OSC 52 (Textual writes the sequence to the terminal);
        returns the sequence, which is also kept in `last_osc52`."""
        self.copy_to_clipboard(text)
        self.last_osc52 = osc52(text)
        return self.last_osc52

    def cmd_settings(self, arg: str) -> None:
        def apply(new: Settings | None) -> None:
            if new is not None:
                self.settings = new
                self.notify(f"temperature {new.temperature}, top-p {new.top_p}, max tokens {new.max_tokens}")
                self.refresh_status()
        self.push_screen(SettingsScreen(self.settings), apply)

    def cmd_history(self, arg: str) -> None:
        convs, problems = self.store.list()
        for p in problems:
            self.note(p.message(), error=True)
            self.notify(p.message(), severity="error", timeout=8)
        if arg:
            try:
                n = int(arg)
                chosen = convs[n - 1] if n >= 1 else None
            except (ValueError, IndexError):
                chosen = None
            if chosen is None:
                self.note(f"/history: no conversation {arg!r} ({len(convs)} saved).", error=True)
                return
            self.open_conversation(chosen)
            return
        if not convs:
            self.note(f"No saved conversations in `{self.store.root}`.")
            return
        self.push_screen(HistoryScreen(convs), lambda c: c is not None and self.open_conversation(c))

    def open_conversation(self, conv: Conversation) -> None:
        if self.conv.messages and self.conv.id != conv.id:
            self.save()
        self.conv = conv
        self.model.reset()
        self.render_conversation()
        self.refresh_status()

    def save(self) -> None:
        try:
            self.store.save(self.conv)
        except OSError as e:
            self.note(f"Could not save the conversation to {self.store.root}: {e.strerror or e}", error=True)

    # ------------------------------------------------------------------ generation

    def start_answer(self) -> None:
        self.generating = True
        self.cancel_event = threading.Event()
        self._answer_parts = []
        self._n_pieces = 0
        self._first_piece_at = self._last_piece_at = 0.0
        self.tok_s = None
        widget = AssistantMessage()
        self._answer_widget = widget
        self.log_view.mount(widget)
        self.log_view.anchor()
        self._md_stream = Markdown.get_stream(widget)
        self.refresh_status()
        self._generate(self.conv.prompt_messages(), self.settings, self.cancel_event)

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def _generate(self, messages: list[dict[str, str]], settings: Settings, cancel: threading.Event) -> None:
        import lite
        result, error = None, None
        try:
            stream = self.model.chat(messages, settings.max_tokens, stream=True, cancel=cancel,
                                     drop_oldest=True, **settings.sampling())
            for piece in stream:
                if cancel.is_set():
                    continue   # the token loop sees the event before its next token and returns
                try:
                    self.call_from_thread(self._on_piece, piece)
                except RuntimeError:   # the app is shutting down
                    cancel.set()
            result = stream.result
        except lite.LiteError as e:
            error = str(e)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        try:
            self.call_from_thread(self._on_done, result, error)
        except RuntimeError:
            pass

    async def _on_piece(self, piece: Any) -> None:
        if self.cancel_event is None or self.cancel_event.is_set() or self._md_stream is None:
            return
        now = time.perf_counter()
        if self._n_pieces == 0:
            self._first_piece_at = now
        self._n_pieces += 1
        self._last_piece_at = now
        self._answer_parts.append(piece.text)
        await self._md_stream.write(clean(piece.text))

    async def _on_done(self, result: Any, error: str | None) -> None:
        if self._md_stream is not None:
            await self._md_stream.stop()
            self._md_stream = None
        self.generating = False
        self.last_result = result
        text = "".join(self._answer_parts)
        stopped = self.cancel_event is not None and self.cancel_event.is_set()
        if result is not None and result.completion_tokens and result.timings.get("decode_tok_s"):
            self.tok_s = float(result.timings["decode_tok_s"])
        elif self._n_pieces >= 2 and self._last_piece_at > self._first_piece_at:
            self.tok_s = (self._n_pieces - 1) / (self._last_piece_at - self._first_piece_at)
        if error is not None:
            if not text and self._answer_widget is not None:
                self._answer_widget.remove()
            self.note(f"Error: {error}", error=True)
            if text:
                self.conv.messages.append({"role": "assistant", "content": text})
        else:
            self.conv.messages.append({"role": "assistant", "content": text})
            if stopped:
                self.note("(stopped)")
            elif not text and self._answer_widget is not None:
                await self._answer_widget.update("*(empty answer)*")
            elif result is not None and result.finish_reason == "length":
                self.note(f"(stopped at max tokens: {self.settings.max_tokens})")
        self.save()
        self.refresh_status()

    def action_stop(self) -> None:
        if self.generating and self.cancel_event is not None:
            self.cancel_event.set()
            self.refresh_status()

    async def action_quit_app(self) -> None:
        await self.action_quit()

    async def action_quit(self) -> None:
        if self.cancel_event is not None:
            self.cancel_event.set()
        self.exit(0)

    # ------------------------------------------------------------------ status bar

    def status_text(self) -> str:
        m = self.model
        if m is None:
            return f"loading {self.model_path.name} …"
        parts = [m.name, m.backend.name]
        if self.generating:
            if self.cancel_event is not None and self.cancel_event.is_set():
                rate = "stopping"
            elif self._n_pieces >= 2 and time.perf_counter() > self._first_piece_at:
                rate = f"{(self._n_pieces - 1) / (time.perf_counter() - self._first_piece_at):.1f} tok/s"
            else:
                rate = "… tok/s"
        else:
            rate = f"{self.tok_s:.1f} tok/s" if self.tok_s is not None else "– tok/s"
        parts.append(rate)
        st = m.stats
        parts.append(f"ctx {st.get('context_used', 0)}/{st.get('n_ctx', m.n_ctx)}")
        hits, misses = st.get("expert_hits"), st.get("expert_misses")
        if hits is not None and misses is not None:
            rate_e = hits / (hits + misses) if hits + misses else 0.0
            parts.append(f"experts {100 * rate_e:.0f}% hit")
        if st.get("resident_bytes") is not None and st.get("ram_budget_bytes"):
            parts.append(f"RAM {fmt_bytes(st['resident_bytes'])}/{fmt_bytes(st['ram_budget_bytes'])}")
        s = self.settings
        parts.append(f"T {s.temperature:g} · top-p {s.top_p:g} · max {s.max_tokens}")
        return " │ ".join(parts)

    def refresh_status(self) -> None:
        if hasattr(self, "status_bar"):
            self.status_bar.update(self.status_text())


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
