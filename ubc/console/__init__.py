"""The web console: server-rendered pages for the public, members and the operator
(DESIGN section 8: the public pages start at ``/``; the API stays under ``/api``, ``/v1``
and ``/journal``). Pages read through the same services as the API; every action that
moves value is an envelope signed in the browser (``static/js``), never by the server."""
