"""The relay: a running generation (``generation``), its deadlines (``watchdog``) and the
continuation of a broken answer (``continuation``)."""

from app.relay.generation import Generation

__all__ = ["Generation"]
