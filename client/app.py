"""fedst ClientApp: one handler per phase; each is a fresh process per message in deployment, so every import
beyond Flower's own is lazy (client/handlers.py -> client/site.py -> torch only when training). Every handler runs
under `client.guard.guarded`: a failure leaves the site as a fixed code and category, its details stay in the site's
log."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.guard import guarded

app = ClientApp()


def secaggplus(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod``, imported only when a site is asked to take part in secure aggregation."""
    return guarded(lambda m, c: _secaggplus(m, c, call_next), msg, context)


def _secaggplus(msg: Message, context: Context, call_next) -> Message:
    from shared.config import RunConfig
    from shared.errors import ConfigError

    if not RunConfig.from_mapping(context.run_config).secure_aggregation.enabled:
        raise ConfigError(
            "this site answers plain 'train' messages only under SecAgg+ "
            "(run config 'secure-aggregation.enabled = true')"
        )
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, context, call_next)


@app.train(mods=[secaggplus])
def secagg_pretrain(msg: Message, context: Context) -> Message:
    """Plain ``train`` messages: pretraining under SecAgg+ (run config ``secure-aggregation.enabled = true``),
    Flower's legacy path."""
    from client import handlers

    return guarded(handlers.secagg_pretrain, msg, context)


@app.train("pretrain")
def pretrain(msg: Message, context: Context) -> Message:
    from client import handlers

    return guarded(handlers.pretrain, msg, context)


@app.train("adapt")
def adapt(msg: Message, context: Context) -> Message:
    from client import handlers

    return guarded(handlers.adapt, msg, context)


@app.query("synthesize")
def synthesize(msg: Message, context: Context) -> Message:
    from client import handlers

    return guarded(handlers.synthesize, msg, context)


@app.evaluate("downstream")
def downstream(msg: Message, context: Context) -> Message:
    from client import handlers

    return guarded(handlers.downstream, msg, context)
