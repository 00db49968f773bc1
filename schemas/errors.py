"""The one error type raised when untrusted bytes do not decode into a valid payload."""


class SchemaError(ValueError):
    """Bytes that are not a valid payload; `str()` names the field and the rule it broke."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
