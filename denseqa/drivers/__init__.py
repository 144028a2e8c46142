"""The jobs: one driver per command, each read top to bottom as config -> checks -> run on Ray -> publish ->
record. The library (every other ``denseqa`` module) never imports a driver; ``lint-imports`` checks it (the
contract is in pyproject.toml)."""
