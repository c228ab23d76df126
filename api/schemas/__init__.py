"""Pydantic schemas of the HTTP API, kept apart from ORM rows and core dataclasses."""
