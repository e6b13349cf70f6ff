"""fedst ClientApp: one handler per phase. In deployment Flower starts a fresh process per message, so by default
(run config ``site-worker = "auto"``) the handlers are a shim: when the SuperNode's node config names a
``worker-socket``, the message goes to the site's long-lived worker (client/worker.py: torch, the C2L code and the
store already loaded) and this process imports no torch. Without a worker (``site-worker = "off"``, or none
configured) the phase runs here, every import beyond Flower's own lazy (client/handlers.py -> client/site.py ->
torch only when training). Models arrive packed (one buffer per dtype, client/wire.py): they are unpacked before
either path and the reply is packed the same way. Either way the phase runs under `client.guard.guarded`: a
failure leaves the site as a fixed code and category, its details stay in the site's log."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.guard import SiteFailure, guarded

app = ClientApp()


def run_phase(name: str, msg: Message, context: Context) -> Message:
    """Run handler ``client.handlers.<name>`` in the site worker when this run and node use one, else here."""
    return guarded(lambda m, c: _run_phase(name, m, c), msg, context)


def _run_phase(name: str, msg: Message, context: Context) -> Message:
    from client.wire import pack_content, unpack_content

    packed = unpack_content(msg.content)
    reply = _dispatch(name, msg, context)
    if packed and reply.has_content():
        pack_content(reply.content)
    return reply


def _dispatch(name: str, msg: Message, context: Context) -> Message:
    from client import worker_link as link
    from shared.contract import site_error_category, site_error_reason

    path = link.site_worker_socket(context)
    if path is not None:
        try:
            status, payload = link.forward(path, msg, context)
        except link.WorkerUnavailable:
            if link.site_worker_mode(context) == "required":
                raise
            import logging

            logging.getLogger("fedst.site").warning("no site worker at %s: running %s in this process", path, name)
        else:
            if status == link.OK:
                return link.reply_from(payload, msg)
            if status == link.FAILED:  # the worker's guard already logged the details and reduced them to this
                raise SiteFailure(site_error_reason(site_error_category(payload.decode(errors="replace"))))
            raise link.WorkerRefused(f"site worker at {path} refused {name}: {payload.decode(errors='replace')}")
    from client import handlers

    return getattr(handlers, name)(msg, context)


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
    return run_phase("secagg_pretrain", msg, context)


@app.train("pretrain")
def pretrain(msg: Message, context: Context) -> Message:
    return run_phase("pretrain", msg, context)


@app.train("adapt")
def adapt(msg: Message, context: Context) -> Message:
    return run_phase("adapt", msg, context)


@app.query("synthesize")
def synthesize(msg: Message, context: Context) -> Message:
    return run_phase("synthesize", msg, context)


@app.evaluate("downstream")
def downstream(msg: Message, context: Context) -> Message:
    return run_phase("downstream", msg, context)
