"""The example scripts run against the same kind of tiny `tinkerd serve` as the e2e tests (their fixtures)."""

from tests.e2e.conftest import _sdk_env, server, tiny_model_dir, tokenizer_source

__all__ = ["_sdk_env", "server", "tiny_model_dir", "tokenizer_source"]
