"""``harness web``: a live dashboard and JSON API over one home (docs/web.md).

An ASGI app (Starlette, served by uvicorn: the optional ``web`` extra,
``pip install -e '.[web]'``). It reads the home only through the public functions the CLI
uses (the queue's public methods, ``coordination.metrics``, ``specs``, ``events``,
``control``) and makes the same write calls as the CLI. Modules:

- :mod:`.auth`: the write token (``HARNESS_WEB_TOKEN`` or a 0600 file) and CSRF checks;
- :mod:`.fleet`: every read and write the pages and the API make;
- :mod:`.sse`: one watcher of the home feeding every Server-Sent-Events client;
- :mod:`.api` (``/api/...``) and :mod:`.pages` (HTML, Jinja2 with autoescape);
- :mod:`.app`: the Starlette app, security headers and error mapping;
- :mod:`.server`: listen address, socket activation, uvicorn.
"""
