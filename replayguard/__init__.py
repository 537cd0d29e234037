"""replayguard: a host-side, rollback-proof memory of one-time credentials."""

__version__ = "0.1.0"
