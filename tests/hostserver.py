"""One "host": ``faultapp`` served by Werkzeug's threaded server on 127.0.0.1, for the two-hosts clock test.

``python hostserver.py PORT`` builds the app from the environment (see ``faultapp``) and adds
``GET /host-clock``: this process's ``time.time()``, so a test can check the clock this server really runs on
(e.g. under ``faketime``). Werkzeug rather than gunicorn: gunicorn's arbiter misbehaves under libfaketime.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from faultapp import create_app
from flask import jsonify
from werkzeug.serving import make_server


def main(port: int) -> None:
    app = create_app()

    @app.get("/host-clock")
    def host_clock() -> Any:
        return jsonify(time=time.time())

    make_server("127.0.0.1", port, app, threaded=True).serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]))
