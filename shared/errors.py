"""The one error type users see: a message naming the file/field and what was expected."""


class FedstError(Exception):
    """Bad input or an impossible request. The CLI prints ``error: <message>`` and exits 2, no traceback."""


def require(condition: bool, message: str) -> None:
    """Raise FedstError(message) unless condition holds."""
    if not condition:
        raise FedstError(message)
