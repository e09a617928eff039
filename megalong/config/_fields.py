"""From an argparse namespace to a frozen dataclass: fields are named after their flags
(Megatron-LM's names), so parsing is one generic step and nothing downstream sees a Namespace."""

import dataclasses

from megalong.errors import MegalongError


def from_namespace(cls, namespace, **converted):
    """cls(**flags): every field that is a flag, `converted` overriding (lists to tuples...)."""
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)
              if hasattr(namespace, f.name)}
    return cls(**{**values, **converted})


def as_tuple(value):
    return None if value is None else tuple(value)


def check_positive(flag: str, value, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise MegalongError(f"--{flag} must be positive, got {value}")
