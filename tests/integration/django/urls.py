"""The URLconf of the Django test project (ROOT_URLCONF of tests/integration/django)."""

from __future__ import annotations

from django.urls import include, path, re_path

from . import views

api = [
    path("items/<int:pk>/", views.item),
    path("aitems/<int:pk>/", views.aitem),
    re_path(r"^legacy/(?P<pk>[0-9]+)/$", views.item),
]

urlpatterns = [
    path("health", views.health),
    path("api/", include(api)),
    path("search/", views.search),
    path("asearch/", views.asearch),
    path("summarize/", views.summarize),
    path("asummarize/", views.asummarize),
    path("summarize-by-index/", views.summarize_by_index),
    path("status/<int:code>/", views.status),
    path("astatus/<int:code>/", views.astatus),
    path("boom/", views.boom),
    path("aboom/", views.aboom),
    path("login-as/<str:customer>/", views.login_as),
    path("tasks/", views.create_task),
    path("atasks/", views.acreate_task),
    path("tasks/<int:pk>/", views.delete_task),
    path("numbers/", views.add_number),
    path("anumbers/", views.aadd_number),
    path("stream/", views.stream),
    path("astream/", views.astream),
    path("slow-stream/", views.slow_stream),
    path("download/", views.download),
    path("drf/summary/", views.SummaryView.as_view()),
    path("drf/numbers/", views.TaskView.as_view()),
]
