import pytest

from builder.config import ConfigError, RatchetConfig, load_config, starter_config


def test_starter_config_is_valid_and_shows_the_defaults(tmp_path):
    path = tmp_path / "ratchet.toml"
    path.write_text(starter_config())
    assert load_config(path) == RatchetConfig()


def test_typo_names_the_key_the_file_and_a_suggestion(tmp_path):
    path = tmp_path / "ratchet.toml"
    path.write_text("[corpus]\nchunk_token = 100\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    message = str(exc.value)
    assert str(path) in message
    assert "corpus.chunk_token" in message
    assert "did you mean 'chunk_tokens'" in message


def test_unknown_section_is_an_error(tmp_path):
    path = tmp_path / "ratchet.toml"
    path.write_text("[sampleing]\nseed = 1\n")
    with pytest.raises(ConfigError, match="unknown key 'sampleing'.*did you mean 'sampling'"):
        load_config(path)


def test_wrong_type_names_the_key_and_the_value(tmp_path):
    path = tmp_path / "ratchet.toml"
    path.write_text("[sampling]\nmax_tokens = 'lots'\n")
    with pytest.raises(ConfigError, match=r"'sampling.max_tokens'.*'lots'"):
        load_config(path)


def test_bad_toml_names_the_file_and_line(tmp_path):
    path = tmp_path / "ratchet.toml"
    path.write_text("[corpus]\npath = \n")
    with pytest.raises(ConfigError, match=rf"{path}: not valid TOML.*line 2"):
        load_config(path)


def test_missing_config_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match="ratchet init"):
        load_config(tmp_path / "ratchet.toml")


def test_out_of_range_value(tmp_path):
    path = tmp_path / "ratchet.toml"
    path.write_text("[corpus]\non_bad_file = 'ignore'\n")
    with pytest.raises(ConfigError, match="corpus.on_bad_file"):
        load_config(path)


def test_passages_that_cannot_fit_the_context_window_are_a_config_error(tmp_path):
    """corpus.chunk_tokens + the prompt + the output budget over n_ctx: an error naming the keys
    and the largest chunk_tokens that fits, not a rejection per passage mid-build (#15.8)."""
    path = tmp_path / "ratchet.toml"
    path.write_text("[corpus]\nchunk_tokens = 4000\n")
    with pytest.raises(ConfigError, match=r"corpus.chunk_tokens \(4000\).*sampling.max_tokens \(512\).*n_ctx = 4096; "
                                          r"lower corpus.chunk_tokens to at most 2560 or raise annotator.n_ctx"):
        load_config(path)
    path.write_text("[corpus]\nchunk_tokens = 4000\n[annotator]\nn_ctx = 8192\n")
    assert load_config(path).corpus.chunk_tokens == 4000
    # an engine without a window of its own to check (a served model) is not refused
    path.write_text("[corpus]\nchunk_tokens = 4000\n[annotator]\nbackend = 'openai'\nbase_url = 'http://127.0.0.1:9'\n"
                    "model = 'served'\n[ensemble]\nk = 0\nmembers = [{persona = 'empiricist'}]\n")
    assert load_config(path).corpus.chunk_tokens == 4000


def test_a_licence_that_is_not_a_hub_id_is_a_config_error(tmp_path):
    path = tmp_path / "ratchet.toml"
    path.write_text("[publish]\nlicense = 'CC BY 4.0'\n")
    with pytest.raises(ConfigError, match=r"publish.license.*not a Hub licence id"):
        load_config(path)
