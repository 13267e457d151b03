"""A Django project whose usage is billed through Commet (``commet_middleware.django``)."""
