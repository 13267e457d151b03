"""Benchmarks for commet-middleware: ``python -m bench NAME`` (see ``python -m bench --help``)."""
