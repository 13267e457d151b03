"""Runnable example apps, importable as modules: ``uvicorn examples.fastapi_app:app``."""
