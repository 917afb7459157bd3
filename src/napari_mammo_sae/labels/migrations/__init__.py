"""Alembic schema versions of the verdict database (shipped inside the package)."""
