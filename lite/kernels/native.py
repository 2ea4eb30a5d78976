"""Finding and declaring lite's native libraries (CPU and CUDA) for cffi's ABI mode: the shared
library installed in `lite/_native/` (or named by an environment variable) and its header."""
from __future__ import annotations

import os
import re
from typing import Any


def library_path(env_var: str, filename: str, missing_hint: str) -> str:
    """`$env_var` if set, else `<p>/_native/<filename>` for p in `lite.__path__` (an editable
    install spreads the package over the source tree and site-packages)."""
    env = os.environ.get(env_var)
    if env:
        if not os.path.isfile(env):
            raise ImportError(f"{env_var}={env} does not exist")
        return env
    import lite
    for p in lite.__path__:
        cand = os.path.join(p, "_native", filename)
        if os.path.isfile(cand):
            return cand
    raise ImportError(f"{filename} is not built ({missing_hint})")


def header_path(lib_path: str, header: str, source_dir: str) -> str:
    """The ABI header installed beside the library, else the one in the source tree."""
    here = os.path.join(os.path.dirname(lib_path), header)
    if os.path.isfile(here):
        return here
    src = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", source_dir, header))
    if os.path.isfile(src):
        return src
    raise ImportError(f"{header} not found beside {lib_path}")


def cdef_source(text: str) -> str:
    """Keep what cffi understands: declarations and `#define NAME <integer>`."""
    keep = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            if re.match(r"#define\s+\w+\s+-?\d+\b", s):
                keep.append(re.sub(r"/\*.*?\*/", "", s))
            continue
        keep.append(line)
    return "\n".join(keep)


def open_library(prefix: str, env_var: str, filename: str, missing_hint: str, header: str,
                 source_dir: str) -> tuple[Any, Any, str]:
    """(ffi, lib, path) for the library whose ABI functions are named `<prefix>_*`, declared
    from its header. Raises ImportError with a one-line reason when the library is missing,
    cannot be opened, or is stale (a declared function is absent or `<prefix>_abi_version()`
    differs from the header's `<PREFIX>_ABI_VERSION`)."""
    from cffi import FFI

    path = library_path(env_var, filename, missing_hint)
    text = open(header_path(path, header, source_dir)).read()
    want = re.search(rf"#define\s+{prefix.upper()}_ABI_VERSION\s+(\d+)", text)
    if not want:
        raise ImportError(f"{header} has no {prefix.upper()}_ABI_VERSION")
    ffi = FFI()
    ffi.cdef(cdef_source(text))
    try:
        # Never unloaded: cffi closes the library when its object dies at interpreter exit, and
        # with OMP_WAIT_POLICY=active the OpenMP workers were still spinning in the runtime the
        # close took with it (a segfault after the program's last line).
        lib = ffi.dlopen(path, ffi.RTLD_NOW | ffi.RTLD_NODELETE)
    except OSError as e:
        raise ImportError(f"cannot open {path}: {str(e).splitlines()[0]}") from None
    for name in re.findall(rf"\b({prefix}_\w+)\s*\(", text):
        try:
            getattr(lib, name)
        except AttributeError:
            raise ImportError(f"{path} lacks {name} (stale build: reinstall)") from None
    got = getattr(lib, f"{prefix}_abi_version")()
    if got != int(want.group(1)):
        raise ImportError(f"{path} has ABI version {got}, {header} wants {want.group(1)} (stale build: reinstall)")
    return ffi, lib, path
