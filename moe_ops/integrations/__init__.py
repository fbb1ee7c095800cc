"""Adapters for other projects' call sites: ``maxtext`` (megablox-signature ``gmm`` and MaxText's sort / all-to-all
helpers) and ``tokamax`` (an implementation for ``tokamax.ragged_dot(..., implementation=[...])``; it does not import
tokamax itself). Import the submodule you need."""
