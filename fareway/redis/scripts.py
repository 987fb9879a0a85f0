"""Fareway's Lua scripts, kept as .lua files in fareway/redis/lua/ and read once per process.

A script is the concatenation of its files: shared pieces (clock.lua's `now_us`, reservation.lua's
`release`) come first, then the script's own body. `${NAME}` in a file is replaced by the value
given for NAME (a missing value is an error, not an empty string). Redis loads each script once per
connection (fareway/redis/batch.py sends its source ahead of its first call; on a Redis Cluster it loads
it on every primary). A script gets every key it touches as KEYS, all of one hash slot (keys.py), so a
cluster runs it on the node of its first key.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

_LUA = resources.files("fareway.redis") / "lua"
_PLACEHOLDER = re.compile(r"\$\{([A-Z_]+)\}")


@functools.cache
def _read(name: str) -> str:
    return (_LUA / f"{name}.lua").read_text(encoding="utf-8")


def lua(*names: str, **values: object) -> str:
    """The source of the script made of lua/<name>.lua for each name, in order, with ${NAME} replaced."""
    source = "\n".join(_read(name) for name in names)

    def value(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise KeyError(f"Lua script {'+'.join(names)} needs a value for ${{{match.group(1)}}}")
        return str(values[match.group(1)])
    return _PLACEHOLDER.sub(value, source)
