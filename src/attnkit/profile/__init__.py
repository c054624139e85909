"""Watching cost on real models: :func:`profile` (time and memory per component as the
context grows) and :func:`monitor` (every attention call of any code, as it runs)."""

from attnkit.profile.core import SCHEMA, Length, Profile, compare, profile
from attnkit.profile.generation import generation
from attnkit.profile.monitor import Monitor, monitor

__all__ = ["SCHEMA", "Length", "Monitor", "Profile", "compare", "generation", "monitor", "profile"]
