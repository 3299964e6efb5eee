"""Profiles: the schema, YAML loading with ``extends`` and overrides, and profile lookup."""

from llavactl.config.loader import LoadedProfile, Origin, load_profile
from llavactl.config.schema import Profile

__all__ = ["LoadedProfile", "Origin", "Profile", "load_profile"]
