"""EdgeConfig: precedence, env vars, validation, masking and the 0600 config file."""

import json
import os
import stat

import pytest

from fmedge.config import EdgeConfig, FIELDS, mask, set_config_value, unset_config_value
from fmedge.errors import ConfigError
from conftest import clean_env


def test_defaults_follow_the_seed(tmp_path):
    config = EdgeConfig(data_dir=str(tmp_path))
    assert (config.max_concurrent, config.execution_timeout) == (2, 300)
    assert (config.pipeline_cache_size_mb, config.pipeline_ttl_days) == (100, 30)
    assert (config.model_cache_size_gb, config.result_retention_days) == (50, 30)
    assert (config.sync_interval, config.auto_sync) == (60, True)
    assert (config.llm_backend, config.llm_model) == ("ollama", "llama2")
    assert (config.host, config.port) == ("127.0.0.1", 8080)
    assert config.pipeline_cache_dir == str(tmp_path / "pipelines")
    assert config.result_store_dir == str(tmp_path / "results")
    assert config.model_cache_dir == str(tmp_path / "models")


def test_precedence_file_then_env_then_flag(tmp_path):
    root = str(tmp_path)
    set_config_value(root, "max_concurrent", "3")
    set_config_value(root, "sync_interval", "30")
    set_config_value(root, "llm_model", "from-file")
    env = {"FLOWMASON_EDGE_MAX_CONCURRENT": "5", "FLOWMASON_LLM_MODEL": "from-env"}
    config = EdgeConfig.load(data_dir=root, env=env, flags={"max_concurrent": "7"})
    assert config.max_concurrent == 7 and config.sources["max_concurrent"] == "flag"
    assert config.llm_model == "from-env" and config.sources["llm_model"] == "env"
    assert config.sync_interval == 30 and config.sources["sync_interval"] == "file"
    assert config.sources["execution_timeout"] == "default"
    no_flag = EdgeConfig.load(data_dir=root, env=env)
    assert no_flag.max_concurrent == 5


def test_seed_environment_variables(tmp_path):
    env = {"FLOWMASON_EDGE_DATA_DIR": str(tmp_path / "d"),
           "FLOWMASON_CLOUD_URL": "https://studio.example/",
           "FLOWMASON_API_KEY": "k-123", "FLOWMASON_LLM_BACKEND": "llamacpp",
           "FLOWMASON_LLM_MODEL": "tiny"}
    config = EdgeConfig.load(env=env)
    assert config.data_dir == str(tmp_path / "d")
    assert config.cloud_url == "https://studio.example"
    assert (config.api_key, config.llm_backend, config.llm_model) == ("k-123", "llamacpp",
                                                                     "tiny")


@pytest.mark.parametrize("raw,url", [
    ("1.2.3.4", "http://1.2.3.4:11434"), (":1234", "http://127.0.0.1:1234"),
    ("[::1]:1337", "http://[::1]:1337"), ("http://1.2.3.4", "http://1.2.3.4:80"),
    ("https://example.com/ollama", "https://example.com:443/ollama"),
    ("' 1.2.3.4 '", "http://1.2.3.4:11434"), (":66000", "http://127.0.0.1:11434"),
    ("ollama.com", "https://ollama.com:443"), ("0.0.0.0", "http://127.0.0.1:11434"),
])
def test_ollama_host_is_parsed_like_ollama(tmp_path, raw, url):
    config = EdgeConfig.load(data_dir=str(tmp_path), env={"OLLAMA_HOST": raw})
    assert config.llm_base_url == url
    assert config.effective_llm_base_url() == url


def test_ollama_host_ignored_for_other_backends_and_below_explicit_url(tmp_path):
    env = {"OLLAMA_HOST": "1.2.3.4", "FLOWMASON_LLM_BACKEND": "openai"}
    assert EdgeConfig.load(data_dir=str(tmp_path), env=env).llm_base_url == ""
    env = {"OLLAMA_HOST": "1.2.3.4", "FLOWMASON_EDGE_LLM_BASE_URL": "http://h:1"}
    assert EdgeConfig.load(data_dir=str(tmp_path), env=env).llm_base_url == "http://h:1"
    no_host = EdgeConfig.load(data_dir=str(tmp_path), env={})
    assert no_host.effective_llm_base_url() == "http://127.0.0.1:11434"


def test_every_field_has_an_env_var_that_works(tmp_path):
    samples = {"int": "3", "float": "2.5", "bool": "false", "list": "A,B",
               "choice": None, "url": "http://x.example", "str": "value", "path": "/tmp/p"}
    for spec in FIELDS:
        if spec.name == "data_dir":
            continue
        raw = spec.choices[-1] if spec.kind == "choice" else samples[spec.kind]
        if spec.kind == "int" and spec.minimum and spec.minimum > 3:
            raw = str(int(spec.minimum))
        config = EdgeConfig.load(data_dir=str(tmp_path), env={spec.env_var: raw})
        assert config.sources[spec.name] == "env", spec.name


@pytest.mark.parametrize("key,value,words", [
    ("max_concurrent", "0", ["max_concurrent", "0", ">= 1"]),
    ("max_concurrent", "two", ["max_concurrent", "'two'", "an integer"]),
    ("llm_backend", "gpt", ["llm_backend", "'gpt'", "ollama, llamacpp, openai"]),
    ("auto_sync", "maybe", ["auto_sync", "true or false"]),
    ("cloud_url", "studio.example", ["cloud_url", "http://"]),
    ("execution_timeout", "nan", ["execution_timeout"]),
    ("port", "70000", ["port", "<= 65535"]),
])
def test_bad_values_are_refused_naming_key_value_and_allowed(tmp_path, key, value, words):
    with pytest.raises(ConfigError) as info:
        set_config_value(str(tmp_path), key, value)
    for word in words:
        assert word in str(info.value)
    assert not os.path.exists(tmp_path / "config.json")


def test_bad_env_value_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="FLOWMASON_EDGE_MAX_CONCURRENT"):
        EdgeConfig.load(data_dir=str(tmp_path), env={"FLOWMASON_EDGE_MAX_CONCURRENT": "-1"})


def test_unknown_keys_are_refused_everywhere(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'colour'.*max_concurrent"):
        set_config_value(str(tmp_path), "colour", "blue")
    with pytest.raises(ConfigError, match="unknown flag key"):
        EdgeConfig.load(data_dir=str(tmp_path), env={}, flags={"colour": "blue"})
    (tmp_path / "config.json").write_text(json.dumps({"colour": "blue"}))
    with pytest.raises(ConfigError, match="colour"):
        EdgeConfig.load(data_dir=str(tmp_path), env={})
    with pytest.raises(TypeError):
        EdgeConfig(colour="blue")


def test_broken_config_file_is_reported_not_overwritten(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read config file"):
        EdgeConfig.load(data_dir=str(tmp_path), env={})
    with pytest.raises(ConfigError):
        set_config_value(str(tmp_path), "max_concurrent", "2")
    assert (tmp_path / "config.json").read_text() == "{not json"


def test_config_file_is_0600_and_unset_removes(tmp_path):
    root = str(tmp_path)
    set_config_value(root, "api_key", "secret-key-1234567")
    mode = stat.S_IMODE(os.stat(tmp_path / "config.json").st_mode)
    assert mode == 0o600
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "api_key": "secret-key-1234567"}
    assert unset_config_value(root, "api_key") is True
    assert unset_config_value(root, "api_key") is False
    assert json.loads((tmp_path / "config.json").read_text()) == {}


def test_data_dir_cannot_live_in_the_file(tmp_path):
    with pytest.raises(ConfigError, match="FLOWMASON_EDGE_DATA_DIR"):
        set_config_value(str(tmp_path), "data_dir", "/elsewhere")


def test_secrets_are_masked_in_repr_and_as_dict(tmp_path):
    config = EdgeConfig(data_dir=str(tmp_path), api_key="abcdefghijkl-SECRET-wxyz",
                        api_token="short")
    assert "SECRET" not in repr(config) and "short" not in repr(config)
    shown = config.as_dict()
    assert shown["api_key"] == "****wxyz" and shown["api_token"] == "****"
    assert config.as_dict(mask_secrets=False)["api_key"] == "abcdefghijkl-SECRET-wxyz"
    assert mask("") == ""


def test_cli_config_set_get_show_masks_and_exit_codes(cli, data_dir):
    assert cli("config", "set", "api_key", "abcdefghijkl-SECRET-wxyz").code == 0
    shown = cli("config", "show")
    assert shown.code == 0 and "SECRET" not in shown.out and "****wxyz" in shown.out
    assert "(file)" in shown.out
    got = cli("config", "get", "api_key")
    assert got.out.strip() == "****wxyz"
    assert cli("config", "get", "api_key", "--reveal").out.strip().endswith("SECRET-wxyz")
    bad = cli("config", "set", "max_concurrent", "0")
    assert bad.code == 2 and "max_concurrent" in bad.err and bad.err.count("\n") == 1
    unknown = cli("config", "get", "nope")
    assert unknown.code == 2 and "unknown config key 'nope'" in unknown.err


def test_cli_flag_beats_env_beats_file(cli, data_dir):
    from conftest import run_cli

    assert cli("config", "set", "max_concurrent", "3").code == 0
    env = clean_env(FLOWMASON_EDGE_MAX_CONCURRENT="5")
    got = run_cli("--data-dir", data_dir, "config", "get", "max_concurrent", "--json", env=env)
    assert got.json() == {"key": "max_concurrent", "value": 5, "source": "env"}
    got = run_cli("--data-dir", data_dir, "--set", "max_concurrent=9", "config", "get",
                  "max_concurrent", "--json", env=env)
    assert got.json()["value"] == 9 and got.json()["source"] == "flag"
    assert cli("config", "get", "max_concurrent").out.strip() == "3"
