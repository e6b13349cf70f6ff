"""A failing site says only a fixed code and category; the details stay on the site.

An exception's message is written for the site's operator: it names files, spot ids and genes. Flower would send it
to the server as the error reply's reason (stored in results.json, shown by ``flwr log``), so every handler runs
under `guarded`: the full message and traceback go to the site's own log (the ClientApp's stderr, which stays with
the SuperNode, and ``<work-dir>/site-errors.log``), and what leaves is `shared.contract.site_error_reason`.
"""

from __future__ import annotations

import logging
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Callable

from flwr.app import Context, Message

from shared.contract import site_error_reason
from shared.errors import FedstError

SITE_ERROR_LOG = "site-errors.log"
log = logging.getLogger("fedst.site")


class SiteFailure(Exception):
    """Raised in place of the real exception; its whole text is the contract's fixed reason."""


def error_category(exc: BaseException) -> str:
    """The contract category of an exception: fedst's own errors carry one, anything else is a bug or the machine."""
    if isinstance(exc, FedstError):
        return exc.category
    if isinstance(exc, MemoryError):
        return "out-of-memory"
    return "internal"


def _site_log(context: Context) -> Path | None:
    """``<work-dir>/site-errors.log`` when the node config names a usable work dir (it may itself be the error)."""
    work = context.node_config.get("work-dir")
    if not isinstance(work, str) or not work:
        return None
    folder = Path(work).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder / SITE_ERROR_LOG


def record_locally(exc: BaseException, category: str, msg: Message, context: Context) -> None:
    """Write the failure with its full message and traceback where only the site reads it."""
    phase = msg.metadata.message_type
    log.error("%s failed (%s): %s", phase, category, exc, exc_info=exc)
    if (path := _site_log(context)) is not None:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        detail = "".join(traceback.format_exception(exc))
        try:
            with path.open("a", encoding="utf-8") as out:
                out.write(f"{stamp} {phase} run {context.run_id} failed ({category}): {exc}\n{detail}\n")
        except OSError:
            log.error("cannot append to %s", path)


def guarded(handler: Callable[[Message, Context], Message], msg: Message, context: Context) -> Message:
    """Run ``handler``; on failure, log the details locally and raise `SiteFailure` with the fixed reason only."""
    try:
        return handler(msg, context)
    except SiteFailure:  # already reduced by an inner guard (a mod around a handler)
        raise
    except Exception as exc:  # noqa: BLE001 - every failure leaves the site as a category, whatever its type
        category = error_category(exc)
        record_locally(exc, category, msg, context)
        raise SiteFailure(site_error_reason(category)) from None
