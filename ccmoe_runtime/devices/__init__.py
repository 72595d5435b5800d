"""Device profiles: the memory pools, bandwidths and backend facts of a target machine, built in (data/*.toml),
from a user's .toml, or read off this host (`auto`)."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import CcmoeError
from .detect import detect_host
from .profiles import DeviceProfile, load_profile_file, profile_names, profiles_dir


def get_profile(name: str) -> DeviceProfile:
    """A profile by name, a path to a TOML file, or `auto` for this host."""
    if name == "auto":
        return detect_host()
    if name.endswith(".toml"):
        if not Path(name).exists():
            raise CcmoeError(f"device profile {name} does not exist",
                             f"check the path, or choose one of: {', '.join(profile_names())}, auto")
        return load_profile_file(Path(name))
    path = profiles_dir() / f"{name}.toml"
    if not path.is_file():
        raise CcmoeError(f"unknown device {name!r}",
                         f"choose one of: {', '.join(profile_names())}, auto, or a path to a profile .toml")
    return load_profile_file(path)
