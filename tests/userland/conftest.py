"""The userland projects are run by test_userland.py in their own pytest, not collected here."""

collect_ignore_glob = ["fastapi_project/*", "flask_project/*"]
