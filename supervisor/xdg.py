"""The XDG base directories, one way for every module (cache, data, state, config, runtime).

Per the XDG Base Directory spec: a variable that is unset, empty or relative is ignored and the
default under the home dir is used. The home dir is $HOME, else the user's passwd entry: a service
manager or `sudo -i` may leave HOME out, and guessing /root would put a user's files in root's home.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from pathlib import Path

APP = "agentvm-supervise"
CONFIG_FILE = "config.toml"

# variable -> its default, relative to the home dir
_DEFAULTS = {
    "XDG_CACHE_HOME": ".cache",
    "XDG_DATA_HOME": ".local/share",
    "XDG_STATE_HOME": ".local/state",
    "XDG_CONFIG_HOME": ".config",
}


def home(env: Mapping[str, str]) -> Path:
    raw = env.get("HOME", "")
    if raw and Path(raw).is_absolute():
        return Path(raw)
    return Path(pwd.getpwuid(os.geteuid()).pw_dir)


def base(variable: str, env: Mapping[str, str]) -> Path:
    """$XDG_CACHE_HOME, $XDG_DATA_HOME, $XDG_STATE_HOME or $XDG_CONFIG_HOME, or its default."""
    raw = env.get(variable, "")
    if raw and Path(raw).is_absolute():
        return Path(raw)
    return home(env) / _DEFAULTS[variable]


def runtime_dir(env: Mapping[str, str]) -> Path | None:
    """$XDG_RUNTIME_DIR when it is absolute and exists (the spec has no fallback; runtime.py has)."""
    raw = env.get("XDG_RUNTIME_DIR", "")
    if raw and Path(raw).is_absolute() and Path(raw).is_dir():
        return Path(raw)
    return None


def default_config(env: Mapping[str, str]) -> Path | None:
    """$XDG_CONFIG_HOME/agentvm-supervise/config.toml, if it exists: read when --config is not given."""
    path = base("XDG_CONFIG_HOME", env) / APP / CONFIG_FILE
    return path if path.exists() else None
