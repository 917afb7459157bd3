"""Session fixtures for the orthanc service used by the tests (filled in by its owner)."""
