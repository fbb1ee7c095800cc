"""Adapters for other projects' call sites: ``maxtext`` (megablox-signature ``gmm`` and MaxText's sort / all-to-all
helpers) and ``tokamax`` (an implementation for ``tokamax.ragged_dot``). Import the submodule you need; ``tokamax``
imports the optional ``tokamax`` package."""
