"""The test run is hermetic: its EARLYEXIT_HOME is fresh, and only the model cache is shared."""

from __future__ import annotations

from earlyexit import paths


def test_the_run_home_is_fresh_and_shares_only_the_model_cache() -> None:
    home = paths.home()
    assert home.name.startswith("earlyexit-test-home-")
    assert (home / "models").is_symlink() and (home / "models").resolve().is_dir()
    assert (home / "models").resolve().parent != home  # the user's cache, outside this run
