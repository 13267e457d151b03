"""Tests of the quota gate: the framework-independent core of quota_guard."""
