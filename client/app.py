"""fedst ClientApp: one handler per phase; each is a fresh process per message in deployment, so every import
beyond Flower's own is lazy (client/handlers.py -> shared/federation/site.py -> torch only when training)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train("pretrain")
def pretrain(msg: Message, context: Context) -> Message:
    from client import handlers

    return handlers.pretrain(msg, context)


@app.train("adapt")
def adapt(msg: Message, context: Context) -> Message:
    from client import handlers

    return handlers.adapt(msg, context)


@app.query("synthesize")
def synthesize(msg: Message, context: Context) -> Message:
    from client import handlers

    return handlers.synthesize(msg, context)


@app.evaluate("downstream")
def downstream(msg: Message, context: Context) -> Message:
    from client import handlers

    return handlers.downstream(msg, context)
