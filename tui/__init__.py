"""`lite chat`: a terminal coding assistant on lite's public API.

`main()` is the entry point `lite chat` calls. With a terminal on stdin and stdout it runs the
Textual app (`tui.app.ChatApp`); otherwise a plain line-by-line REPL (`tui.repl`).
"""
from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["main"]


def main(model_path: str, backend: str | None = None, ram_budget: str | int | None = None,
         vram_budget: str | int | None = None, temperature: float = 0.3, top_p: float = 1.0,
         max_tokens: int = 512, n_ctx: int | None = None,
         seed: int | None = None) -> int:
    """Chat with the GGUF model at `model_path`; returns the process exit status."""
    from .chat import Settings

    settings = Settings(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    try:
        settings.validate()
    except ValueError as e:
        print(f"lite chat: error: {e}", file=sys.stderr)
        return 2
    path = Path(model_path)
    if not path.exists():
        print(f"lite chat: error: model file not found: {path}", file=sys.stderr)
        return 1
    if not path.is_file():
        print(f"lite chat: error: not a GGUF file: {path} is a directory", file=sys.stderr)
        return 1
    load_kwargs: dict = {"backend": backend, "n_ctx": n_ctx}
    if ram_budget is not None:
        load_kwargs["ram_budget"] = ram_budget
    if vram_budget is not None:
        load_kwargs["vram_budget"] = vram_budget

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return _plain(path, load_kwargs, settings)

    from .app import ChatApp
    app = ChatApp(path, load_kwargs, settings)
    app.run()
    if app.model is not None:
        app.model.close()
    if app.load_error is not None:
        print(f"lite chat: error: {app.load_error}", file=sys.stderr)
        return 1
    return int(app.return_code or 0)


def _plain(path: Path, load_kwargs: dict, settings) -> int:
    import lite

    from .repl import run_repl

    print(f"lite: loading {path} …", file=sys.stderr, flush=True)
    try:
        model = lite.load(path, **load_kwargs)
    except lite.LiteError as e:
        print(f"lite chat: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"lite chat: error: {e.filename or path}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"lite: {model.name} on {model.backend.name}, context {model.n_ctx}; one message per line, "
          f"/help for commands", file=sys.stderr, flush=True)
    try:
        return run_repl(model, settings)
    except KeyboardInterrupt:
        return 130
    finally:
        model.close()
