"""jgradcheck internals: import from ``jgradcheck``, not from here."""
