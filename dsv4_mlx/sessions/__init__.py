"""On-disk sessions: KV snapshots, resume, prefix reuse (see store.py and docs/SESSIONS.md)."""

from .store import (CorruptSession, Fingerprints, IncompatibleSession, Loaded, SessionError,
                    SessionNotFound, SessionStore, default_root)

__all__ = ["SessionStore", "Fingerprints", "Loaded", "SessionError", "SessionNotFound",
           "IncompatibleSession", "CorruptSession", "default_root"]
