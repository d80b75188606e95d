"""Content keys: equal inputs give equal keys; any change to config, inputs or version changes the key."""

from pydantic import SecretStr

from pipeline.config import StoreConfig, TrainConfig
from pipeline.refs import Ref, content_key


def ref(sha: str) -> Ref:
    return Ref(kind="collect", uri=f"collect/{sha}", sha256=sha)


def test_same_inputs_same_key():
    assert content_key("train", "1", {"a": ref("x"), "config": TrainConfig()}) == content_key(
        "train", "1", {"config": TrainConfig(), "a": ref("x")}
    )


def test_key_changes_with_config_input_and_version():
    base = content_key("train", "1", {"a": ref("x"), "config": TrainConfig()})
    assert content_key("train", "1", {"a": ref("x"), "config": TrainConfig(max_steps=3)}) != base
    assert content_key("train", "1", {"a": ref("y"), "config": TrainConfig()}) != base
    assert content_key("train", "2", {"a": ref("x"), "config": TrainConfig()}) != base


def test_ref_location_does_not_change_key():
    moved = Ref(kind="collect", uri="elsewhere/x", sha256="x", meta={"rows": 3})
    assert content_key("s", "1", {"a": moved}) == content_key("s", "1", {"a": ref("x")})


def test_secrets_never_enter_a_key():
    a = StoreConfig(uri="s3://b/p", access_key_id=SecretStr("k"), secret_access_key=SecretStr("one"))
    b = StoreConfig(uri="s3://b/p", access_key_id=SecretStr("k"), secret_access_key=SecretStr("two"))
    assert content_key("s", "1", {"store": a}) == content_key("s", "1", {"store": b})
