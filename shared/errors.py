"""The one error type users see: a message naming the file/field and what was expected.

Each error also carries a ``category``: the only part of a site's failure that leaves the site (shared/contract.py,
``site_error_reason``). The message names files, spots and genes for the site's operator; the category tells the
consortium what kind of thing went wrong without revealing any of it.
"""


class FedstError(Exception):
    """Bad input or an impossible request. The CLI prints ``error: <message>`` and exits 2, no traceback."""

    category = "data-invalid"


class ConfigError(FedstError):
    """A run-config or node-config value is missing, mistyped or out of range."""

    category = "config-invalid"


class PanelMismatchError(FedstError):
    """The site's gene panel differs from the consortium's."""

    category = "panel-mismatch"


class PrivacyBudgetError(FedstError):
    """Running would spend more differential-privacy budget than the site has left."""

    category = "privacy-budget"


class SiteWorkerError(FedstError):
    """The site's worker process (client/worker.py) is missing, stopped or refused the message."""

    category = "site-worker"


class ContractError(FedstError):
    """A reply would carry something the privacy contract does not allow."""

    category = "contract"


def require(condition: bool, message: str) -> None:
    """Raise FedstError(message) unless condition holds."""
    if not condition:
        raise FedstError(message)
