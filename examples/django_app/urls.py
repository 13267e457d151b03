"""The example's URLs (no trailing slashes, like the other examples)."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("health", views.health),
    path("search", views.search),
    path("search/async", views.search_async),
    path("summarize", views.summarize),
    path("export.csv", views.export_csv),
    path("documents/<str:doc_id>.txt", views.download),
    path("tasks", views.create_task),
    path("tasks/<int:task_id>", views.delete_task),
    path("reports/usage", views.usage_report),
]
