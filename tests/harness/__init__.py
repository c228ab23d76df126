"""Pytest plugins of the suite itself: which tests run serially, and the PostgreSQL requirement."""
