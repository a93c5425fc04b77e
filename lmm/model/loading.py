"""The one path by which pretrained parts are loaded: a hub name or a local directory."""

from __future__ import annotations

import os
from typing import Any

from lmm.errors import MissingWeightsError


def load_pretrained(factory: Any, name_or_path: str, what: str, **kwargs: Any) -> Any:
    """``factory.from_pretrained(name_or_path)`` with an error that says what to do offline."""
    try:
        return factory.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        local = os.path.isdir(name_or_path)
        hint = (
            f"the directory {name_or_path!r} exists but does not hold a loadable {what}"
            if local
            else f"{name_or_path!r} is not a local directory and could not be fetched from the hub "
            f"(offline?). Download it where you have network (e.g. `hf download "
            f"{name_or_path} --local-dir DIR`) and point the config at DIR"
        )
        raise MissingWeightsError(f"cannot load {what} weights: {hint}. ({err})") from err
