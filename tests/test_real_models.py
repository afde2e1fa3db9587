"""What broke on real models and real data, each on a small fixture.

- GGUF teachers (SmolLM2-135M ships as one): a tiny random Llama written to a GGUF file with the
  `gguf` package (byte-level BPE vocabulary, no pad token, as such files often have) loads through
  kdcache's loaders: dump-teacher takes the file (or its directory + `gguf_file`), the manifest
  records the file, init-student carves from it and the student trains on the cache.
- CoNLL-2003's files: runs of blank lines, blank lines of spaces, `-DOCSTART-`, no final newline.
- Partly labelled NER data (gold sentences plus raw text for the teacher to label).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from kdcache import open_cache
from kdcache.errors import KDCacheError
from kdcache.student import TrainSettings, evaluate, init_student, train_student
from kdcache.teacher import DumpSettings, dump_teacher

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from real_data import read_conll

gguf = pytest.importorskip("gguf")

TEXTS = ["the cat sat on the mat", "a dog ran to the cat", "the mat was red and the dog was not", "cats and dogs"]


def byte_level_vocabulary() -> tuple[list[str], list[str]]:
    """GPT-2 style tokens (the 256 byte symbols, a few merges, two specials) and their merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    symbols = list(bytes_to_unicode().values())
    merges = ["t h", "th e", "Ġ c", "Ġc a", "Ġca t", "Ġ d", "Ġd o", "Ġdo g", "Ġ the"]
    merged = [merge.replace(" ", "") for merge in merges]
    return symbols + merged + ["<|endoftext|>", "<|im_end|>"], merges


def permute_for_gguf(weights: torch.Tensor, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (transformers undoes it when it loads a GGUF)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape).numpy())


def write_gguf(path: Path, model, tokens: list[str], merges: list[str]) -> Path:
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(len(tokens) - 2)
    writer.add_eos_token_id(len(tokens) - 1)  # no pad token id: the tokenizer has none
    state = {name: tensor.detach().float() for name, tensor in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for layer in range(config.num_hidden_layers):
        names |= {f"model.layers.{layer}.{hf}.weight": f"blk.{layer}.{ours}.weight" for hf, ours in per_layer.items()}
    for name, tensor in state.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            array = permute_for_gguf(tensor, heads)
        else:
            array = tensor.numpy()
        writer.add_tensor(names[name], np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_teacher(tmp_path_factory):
    """(the GGUF file, the same weights saved the ordinary way)."""
    tokens, merges = byte_level_vocabulary()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).eval()
    directory = tmp_path_factory.mktemp("gguf-teacher")
    return write_gguf(directory / "tiny.Q0.gguf", model, tokens, merges), model


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    return path


def test_a_gguf_teacher_dumps_what_its_weights_compute(tmp_path, gguf_teacher, texts):
    path, model = gguf_teacher
    manifest = dump_teacher(str(path), str(texts), tmp_path / "cache", DumpSettings(top_k=4, codec="plain"),
                            progress=False)  # plain: ids in probability order, float16 log-probs
    record = manifest.teacher["gguf"]
    assert record == {"file": path.name, "bytes": path.stat().st_size,
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    for sequence in open_cache(tmp_path / "cache").sequences():
        with torch.inference_mode():
            logits = model(input_ids=torch.from_numpy(sequence.input_ids.astype(np.int64))[None]).logits[0]
        expected = logits.log_softmax(-1).topk(4)
        assert sequence.topk_ids.astype(np.int64).tolist() == expected.indices.tolist()
        np.testing.assert_allclose(sequence.topk_logprobs.astype(np.float32), expected.values.numpy(), atol=2e-3)

    # the directory + `gguf_file` form loads the same file
    again = dump_teacher(str(path.parent), str(texts), tmp_path / "again", DumpSettings(top_k=4, gguf_file=path.name),
                         progress=False)
    assert again.stats["content_sha256"] == manifest.stats["content_sha256"]


def test_a_student_carved_from_a_gguf_teacher_trains_on_its_cache(tmp_path, gguf_teacher, texts):
    path, _ = gguf_teacher
    dump_teacher(str(path), str(texts), tmp_path / "cache", DumpSettings(top_k=4), progress=False)
    record = init_student(str(path.parent), tmp_path / "carved", [1], gguf_file=path.name)
    assert record["mode"] == "carve" and (tmp_path / "carved" / "model.safetensors").exists()
    summary = train_student(tmp_path / "cache", tmp_path / "student", student=str(tmp_path / "carved"),
                            settings=TrainSettings(max_steps=2, batch_size=2), progress=False)
    assert summary["steps"] == 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert evaluate(model, tmp_path / "cache")["positions"] > 0


@pytest.mark.parametrize("teacher, settings, fragment", [
    ("missing.gguf", {}, "GGUF file not found"),
    ("DIR", {"gguf_file": "other.gguf"}, "GGUF file not found"),
    ("DIR", {"gguf_file": "../tiny.Q0.gguf"}, "`gguf_file` must be a file name inside the teacher directory"),
])
def test_gguf_user_errors_are_one_line(tmp_path, gguf_teacher, texts, teacher, settings, fragment):
    path, _ = gguf_teacher
    teacher = str(path.parent) if teacher == "DIR" else str(tmp_path / teacher)
    with pytest.raises(KDCacheError, match=fragment):
        dump_teacher(teacher, str(texts), tmp_path / "out", DumpSettings(**settings), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kept", [0.01, 0.6])  # cut inside the header (struct.error) and inside the tensors
def test_a_truncated_gguf_teacher_is_one_line(tmp_path, gguf_teacher, texts, kept):
    from click.testing import CliRunner

    from kdcache.cli import main
    path, _ = gguf_teacher
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:int(path.stat().st_size * kept)])
    result = CliRunner().invoke(main, ["dump-teacher", "--teacher", str(cut), "--data", str(texts),
                                       "--out", str(tmp_path / "cache"), "--top-k", "4"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output  # not a traceback
    assert result.output.count("\n") == 1 and f"cannot load teacher tokenizer from {cut}" in result.output
    assert not (tmp_path / "cache").exists()


def test_conll_files_with_blank_runs_docstart_and_no_final_newline(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\n   \n"
                    "-DOCSTART- -X- -X- O\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n \n"
                    "BRUSSELS NNP B-NP B-LOC")
    assert read_conll(path) == [{"tokens": ["EU", "rejects"], "ner_tags": ["B-ORG", "O"]},
                                {"tokens": ["Peter", "Blackburn"], "ner_tags": ["B-PER", "I-PER"]},
                                {"tokens": ["BRUSSELS"], "ner_tags": ["B-LOC"]}]


def test_gguf_teacher_from_the_command_line(tmp_path, gguf_teacher, texts):
    from click.testing import CliRunner

    from kdcache.cli import main
    path, _ = gguf_teacher
    runner = CliRunner()
    result = runner.invoke(main, ["dump-teacher", "--teacher", str(path.parent), "--gguf-file", path.name,
                                  "--data", str(texts), "--out", str(tmp_path / "cache"), "--top-k", "4"])
    assert result.exit_code == 0, result.output
    info = runner.invoke(main, ["info", str(tmp_path / "cache")])
    assert f"teacher file {path.name}  ({path.stat().st_size:,} bytes, GGUF" in info.output
    result = runner.invoke(main, ["init-student", "--teacher", str(path.parent), "--gguf-file", "nope.gguf",
                                  "--layers", "0", "--out", str(tmp_path / "s")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "GGUF file not found" in result.output
