"""The operator's web console at ``/ui/``, and the offline ``/docs``.

``routes.install_console`` adds the login, the page and its assets (``pages``),
the read endpoints the page needs (``read_api``, ``fleet_views``) and Swagger UI
and ReDoc with local assets (``api_docs``). Sessions and CSRF: ``session``,
which ``server.api.deps`` checks; this file imports nothing, so that works.
"""
