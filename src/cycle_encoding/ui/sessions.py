"""The browser editor's sessions and its working folder.
Design notes: docs/INTERNALS.md, "cycle_encoding.ui.sessions"."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..editing.editor import Editor

ROOT_PREFIX = "cycle-encoding-ui-"
DEFAULT_MAX_SESSIONS = 8


@dataclass(eq=False)
class Session:
    """One browser session: its editor (None once released), its folder and what its page shows."""

    editor: Editor | None
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)  # the downloads offered
    shown: dict[str, str | None] = field(default_factory=dict)  # the pictures of the image being edited
    strengths: dict[str, float] = field(default_factory=dict)  # of the edit shown
    info: str = ""  # the last status that was not an error
    job: dict[str, Any] | None = None  # the inversion under way or last run: name, stop (Event), state
    count: int = 0
    released: str | None = None  # why the session's image was let go

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job["state"] == "running"


class SessionPool:
    """The sessions held, least recently used first."""

    def __init__(self, template: Editor, root: Path, max_sessions: int) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        self.template, self.root, self.max_sessions = template, root, int(max_sessions)
        self._live: OrderedDict[int, Session] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, s: Session | None) -> Session:
        """``s`` marked as used now (a new session for None; a released one gets a fresh editor and folder); then
        the least recently used others beyond ``max_sessions`` are released."""
        with self._lock:
            if s is None or s.editor is None:
                # both made before the session holds them: a session never points at the pool's own folder
                editor, folder = self.template.fork(), Path(tempfile.mkdtemp(prefix="session-", dir=self.root))
                if s is None:
                    s = Session(editor, folder)
                else:
                    s.editor, s.folder = editor, folder
            self._live[id(s)] = s
            self._live.move_to_end(id(s))
            for t in [t for t in self._live.values() if t is not s and not t.busy]:
                if len(self._live) <= self.max_sessions:
                    break
                self._release(t, f"the server holds {self.max_sessions} sessions at a time and others came")
            return s

    def drop(self, s: Session | None) -> None:
        """Release ``s`` (its page was closed)."""
        if s is not None:
            with self._lock:
                self._release(s, "its page was closed")

    def held(self) -> list[Session]:
        with self._lock:
            return list(self._live.values())

    def _release(self, s: Session, why: str) -> None:
        self._live.pop(id(s), None)
        if s.editor is not None:
            s.editor, s.released = None, why
        for what in (s.files, s.shown, s.strengths):  # what its page showed and offered
            what.clear()
        shutil.rmtree(s.folder, ignore_errors=True)


def make_root(work_dir: str | Path | None = None) -> Path:
    """This server's folder (in ``work_dir``, default the system's temporary folder), after removing those of
    servers that are gone."""
    base = Path(work_dir) if work_dir is not None else Path(tempfile.gettempdir())
    remove_stale_roots(base)
    return Path(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}-", dir=base))


def remove_stale_roots(base: Path) -> None:
    """Remove the folders ``cycle-encoding-ui-PID-*`` in ``base`` that belong to this user and whose process PID
    is not running. Anything else (other names, links, other users' folders) is left alone."""
    if os.name != "posix":  # os.kill(pid, 0) only probes a process on POSIX
        return
    for d in base.glob(f"{ROOT_PREFIX}*"):
        m = re.fullmatch(rf"{re.escape(ROOT_PREFIX)}(\d+)-\w+", d.name)
        try:
            mine = m is not None and not d.is_symlink() and d.is_dir() and d.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and m is not None and not _running(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it exists
        return True
    return True
