"""Session fixtures for the postgres service used by the tests (filled in by its owner)."""
