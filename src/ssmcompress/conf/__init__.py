"""The Hydra configs (a package, so that Hydra composes them from an installed wheel as from a checkout)."""
