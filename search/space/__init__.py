"""Search spaces: the YAML schema, and a space resolved against a profile and a model."""

from search.space.resolve import ResolvedSpace, resolve_space
from search.space.schema import SearchSpace, available_spaces, load_space

__all__ = ["ResolvedSpace", "SearchSpace", "available_spaces", "load_space", "resolve_space"]
