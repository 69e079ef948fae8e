"""The GGUF header reader the managed server's prompts rely on, against files written by the
`gguf` package (llama.cpp's own writer) and the bundled models."""
import pytest
from gguf import GGUFWriter

from builder.backends.gguf_header import GGUFHeaderError, read_facts
from builder.models import resolve_model


def write(path, tokenizer_model="llama", tokens=("<unk>", "<s>", "</s>", "hi"), **keys):
    writer = GGUFWriter(str(path), "llama")
    writer.add_string("tokenizer.ggml.model", tokenizer_model)
    writer.add_array("tokenizer.ggml.tokens", list(tokens))
    writer.add_array("tokenizer.ggml.scores", [0.0] * len(tokens))
    for key, value in keys.items():
        name = key.replace("__", ".")
        if isinstance(value, bool):
            writer.add_bool(name, value)
        elif isinstance(value, int):
            writer.add_uint32(name, value)
        else:
            writer.add_string(name, value)
    writer.add_string("general.license", "MIT")  # a key after the vocabulary
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def test_reads_what_the_prompt_needs(tmp_path):
    path = write(tmp_path / "m.gguf", tokenizer__ggml__bos_token_id=1, tokenizer__ggml__eos_token_id=2,
                 tokenizer__ggml__add_bos_token=True, tokenizer__chat_template="{{ messages }}")
    facts = read_facts(path)
    assert (facts.family, facts.bos, facts.eos, facts.add_bos, facts.n_vocab) == ("llama", "<s>", "</s>", True, 4)
    assert facts.chat_template == "{{ messages }}"


def test_missing_special_tokens_take_llama_cpps_defaults_and_ids_outside_the_vocabulary_name_none(tmp_path):
    facts = read_facts(write(tmp_path / "spm.gguf"))  # SPM: BOS 1, EOS 2, as llama.cpp assumes
    assert (facts.bos, facts.eos, facts.add_bos, facts.chat_template) == ("<s>", "</s>", False, None)
    facts = read_facts(write(tmp_path / "far.gguf", tokenizer__ggml__eos_token_id=4))  # == n_vocab
    assert facts.eos == "" and facts.bos == "<s>"  # not the text of whatever follows the vocabulary


def test_bad_files_get_an_error_that_names_them(tmp_path):
    for name, data in [("empty.gguf", b""), ("text.gguf", b"hello, not a model at all"),
                       ("cut.gguf", write(tmp_path / "whole.gguf").read_bytes()[:60])]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(GGUFHeaderError, match=str(path)):
            read_facts(path)


@pytest.mark.parametrize("name, family, bos, eos", [("smollm2", "llama", "<|im_start|>", "<|im_end|>"),
                                                    ("gemma3", "gemma3", "<bos>", "<eos>")])
def test_the_bundled_models(name, family, bos, eos):
    facts = read_facts(resolve_model(f"bundled:{name}"))
    assert (facts.family, facts.bos, facts.eos) == (family, bos, eos)
    assert facts.n_vocab == {"smollm2": 49152, "gemma3": 262144}[name]
    assert (facts.chat_template is None) == (name == "gemma3")  # Gemma 3 270M base ships no template
