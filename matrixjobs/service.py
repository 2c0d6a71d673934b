"""Build the whole service from a config: the core App plus the interfaces it enables.

The core never imports an interface; this module is where they meet.
"""

from __future__ import annotations

from matrixjobs.app import App
from matrixjobs.config import Config
from matrixjobs.errors import ConfigError
from matrixjobs.standby import BOT_ROLE, HotStandby


def build_service(config: Config) -> App:
    app = App(config)
    if config.matrix is not None:
        from matrixjobs.matrix.bot import MatrixBot  # only load nio when Matrix is on

        matrix = config.matrix

        def bot() -> MatrixBot:
            return MatrixBot(app, matrix, config.progress.interval_ms)

        if app.store.shared:
            # Nodes sharing the store: one runs the bot, the others stand by (standby.py).
            app.components.append(HotStandby(app.store, BOT_ROLE, config.queue.lease_s, bot))
        else:
            app.components.append(bot())
    if config.api.enabled:
        from matrixjobs.api import ApiServer  # only load the web stack when the API is on

        api = ApiServer(app, config.api, config.api_token)
        if config.mcp.enabled:
            from matrixjobs.mcp.http import mount_mcp  # only load the MCP SDK when MCP is on

            mount_mcp(api, app)
        app.components.append(api)
    return app


def build_worker(config: Config) -> App:
    """`matrixjobs worker`: the queue alone, on a store other processes share."""
    if config.store.backend != "postgresql":
        raise ConfigError('a worker needs a PostgreSQL store (store.backend = "postgresql") '
                          "that the service shares; with SQLite, `matrixjobs run` runs the jobs")
    if config.queue.workers == 0:
        raise ConfigError("queue.workers = 0: a worker with no job slots would do nothing")
    return App(config, role="worker")
