#!/usr/bin/env python3
"""Writes the hostile corpus replayed by tests/fuzz.rs (`the_hostile_corpus_is_refused`): one
directory per parser target, every file one that patchbay must refuse with a one-line error
(never a panic, never an allocation of the size a header claims). Standard library only;
deterministic. Run from the repository root: python3 tests/hostile/make_corpus.py"""
import json
import os
import shutil
import struct

ROOT = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(ROOT, "..", "fixtures", "llama")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def put_all(target, ext, cases):
    for name, data in cases.items():
        put(target, name + ext, data)


def st(header, data=b""):
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def safetensors_cases():
    # Small files: a header (with or without the tensors a checkpoint needs) and little data.
    one = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    return {
        "empty": b"",
        "seven_bytes": b"\x01\x00\x00\x00\x00\x00\x00",
        "header_len_max": struct.pack("<Q", 2**64 - 1) + b"{}",
        "header_len_past_end": struct.pack("<Q", 1000) + b"{}",
        "header_not_json": struct.pack("<Q", 5) + b"{nope",
        "header_array": st([1, 2, 3]),
        "header_not_utf8": struct.pack("<Q", 4) + b"{\xff\xfe}",
        "shape_overflow": st({"x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, b"\0" * 8),
        "shape_negative": st({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, b"\0" * 8),
        "offsets_max": st({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 2**64 - 1]}}, b"\0" * 8),
        "offsets_reversed": st({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8),
        "offsets_past_end": st({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
        "offsets_missing": st({"x": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
        "dtype_unknown": st({"x": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
        "dtype_missing": st({"x": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
        "bytes_not_shape": st({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
        "no_tensors": st({}),
        "only_metadata": st({"__metadata__": {"format": "pt"}}),
        "wrong_names": st(one, b"\0" * 8),
        "nested_header": struct.pack("<Q", 402) + b"{\"x\":" + b"[" * 200 + b"]" * 200 + b"}",
    }


def main():
    for d in os.listdir(ROOT):
        if os.path.isdir(os.path.join(ROOT, d)):
            shutil.rmtree(os.path.join(ROOT, d))
    for name, data in safetensors_cases().items():
        put("safetensors", name + ".safetensors", data)
        # A tensor file may hold any tensors, or none: only the malformed ones are hostile there.
        if name not in ("no_tensors", "only_metadata", "wrong_names"):
            put("tensorfile", name + ".safetensors", data)

    cfg = json.load(open(os.path.join(FIX, "config.json")))
    for name, edit in {
        "layers_1e9": {"num_hidden_layers": 10**9},
        "layers_zero": {"num_hidden_layers": 0},
        "layers_negative": {"num_hidden_layers": -1},
        "layers_float": {"num_hidden_layers": 2.5},
        "layers_string": {"num_hidden_layers": "2"},
        "hidden_zero": {"hidden_size": 0},
        "hidden_huge": {"hidden_size": 2**62},
        "vocab_huge": {"vocab_size": 2**63},
        "vocab_zero": {"vocab_size": 0},
        "intermediate_huge": {"intermediate_size": 10**15},
        "heads_zero": {"num_attention_heads": 0},
        "kv_heads_zero": {"num_key_value_heads": 0},
        "kv_heads_not_dividing": {"num_key_value_heads": 3},
        "head_dim_zero": {"head_dim": 0},
        "eps_negative": {"rms_norm_eps": -1e-5},
        "eps_nan": {"rms_norm_eps": "NaN"},
        "theta_zero": {"rope_theta": 0},
        "theta_negative": {"rope_theta": -10000.0},
        "theta_huge": {"rope_theta": 1e309},
        "max_position_zero": {"max_position_embeddings": 0},
        "model_type_unknown": {"model_type": "gpt17"},
        "model_type_missing": {"model_type": None},
        "rope_scaling_unknown": {"rope_scaling": {"rope_type": "yarn9", "factor": 2.0}},
        "hidden_act_unknown": {"hidden_act": "swishy"},
    }.items():
        c = dict(cfg)
        for k, v in edit.items():
            if v is None:
                c.pop(k, None)
            else:
                c[k] = v
        put("config", name + ".json", json.dumps(c).replace("Infinity", "1e999"))
    put("config", "empty_object.json", "{}")
    put("config", "array.json", "[1, 2]")
    put("config", "not_json.json", "{\"model_type\": \"llama\",")
    put("config", "bom.json", b"\xef\xbb\xbf" + json.dumps(cfg).encode())
    put("config", "not_utf8.json", b"{\"model_type\": \"\xff\"}")
    put("config", "empty.json", "")

    tc = json.load(open(os.path.join(FIX, "tokenizer_config.json")))
    for name, edit in {
        "template_nested_loops": {"chat_template": "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}"},
        "template_huge_output": {"chat_template": "{{ 'x' * 1000000000 }}"},
        "template_syntax_error": {"chat_template": "{% for m in messages %}{{ m.content }"},
        "template_raises": {"chat_template": "{{ raise_exception('no user messages here') }}"},
        "template_not_string": {"chat_template": 17},
        "template_unknown_name": {"chat_template": [{"name": "tool_use", "template": "{{ x }}"}]},
        "add_bos_string": {"add_bos_token": "yes"},
        "bos_number": {"bos_token": 5},
    }.items():
        c = dict(tc)
        c.update(edit)
        put("tokenizer_config", name + ".json", json.dumps(c))
    put("tokenizer_config", "not_json.json", "{\"chat_template\": ")
    put("tokenizer_config", "bom.json", b"\xef\xbb\xbf" + json.dumps(tc).encode())
    put("tokenizer_config", "array.json", "[]")

    csv = open(os.path.join(ROOT, "..", "data", "emotions.csv"), encoding="utf-8").read().splitlines()
    head, rows = csv[0], csv[1:6]
    put("csv", "empty.csv", "")
    put("csv", "header_only.csv", head + "\n")
    put("csv", "no_text_column.csv", head.replace("text", "txt", 1) + "\n" + "\n".join(rows) + "\n")
    put("csv", "no_label_column.csv", head.replace("emotion", "feeling", 1) + "\n" + "\n".join(rows) + "\n")
    cols = head.split(",")
    i = cols.index("pleasantness")
    bad = [r.split(",") for r in rows]
    put("csv", "numeric_not_a_number.csv", head + "\n" + "\n".join(rows[:2]) + "\n" + ",".join(c if j != i else "very" for j, c in enumerate(rows[2].split(","))) + "\n")
    put("csv", "unterminated_quote.csv", head + "\n" + "\n".join(rows[:2]) + "\n\"I got the job," + rows[2] + "\n")
    put("csv", "not_utf8.csv", (head + "\n" + rows[0] + "\n").encode() + b"caf\xe9 \xff\xfe,joy\n")
    put("csv", "short_row.csv", head + "\n" + "\n".join(rows[:2]) + "\nonly one field\n")
    put("csv", "binary.csv", bytes(range(256)) * 4)
    del bad

    lines = [json.dumps({"text": t, "emotion": e, "score": 0.5}) for t, e in [("I got the job", "joy"), ("My dog died", "sadness")]]
    put_all("jsonl", ".jsonl", {
        "empty": "",
        "not_json": lines[0] + "\n{\"text\": \n",
        "array_line": lines[0] + "\n[1, 2]\n",
        "no_text": lines[0] + "\n" + json.dumps({"emotion": "joy", "score": 1}) + "\n",
        "score_string": lines[0] + "\n" + json.dumps({"text": "x", "emotion": "joy", "score": "high"}) + "\n",
        "no_label": lines[0] + "\n" + json.dumps({"text": "x", "score": 1}) + "\n",
        "truncated": lines[0] + "\n" + lines[1][:10],
    })
    put("jsonl", "not_utf8.jsonl", lines[0].encode() + b"\n{\"text\": \"\xff\", \"emotion\": \"joy\", \"score\": 1}\n")

    put_all("pairs", ".jsonl", {
        "empty": "",
        "out_of_range": '{"source": 0, "target": 4}\n',
        "huge_index": '{"source": 0, "target": 18446744073709551615}\n',
        "negative": '{"source": -1, "target": 1}\n',
        "string_index": '{"source": "0", "target": 1}\n',
        "missing_target": '{"source": 0}\n',
        "not_json": '{"source": 0, "target": \n',
    })
    put("pairs", "not_utf8.jsonl", b'{"source": 0, "target": 1}\n\xff\n')

    # Relative to the repository root, where the tests run.
    vec = "tests/fixtures/llama/steer_vectors.safetensors"
    base = {"vector": vec + ":a", "site": "resid_post", "layers": "0..1", "positions": "-1", "betas": [2.0]}
    for name, edit in {
        "unknown_field": {"strength": 2},
        "betas_empty": {"betas": []},
        "betas_string": {"betas": ["NaN"]},
        "betas_overflow": {"betas": [1e39]},
        "layer_out_of_range": {"layers": "0..99999999999"},
        "layer_twice": {"layers": "1,1"},
        "layers_garbage": {"layers": "one"},
        "no_vector_nor_project": {"vector": None},
        "site_pattern": {"site": "pattern"},
        "site_unknown": {"site": "resid_middle"},
        "positions_garbage": {"positions": "last:-4+generated"},
        "positions_generated": {"positions": "all+generated"},
        "vector_missing_file": {"vector": "/nonexistent/v.safetensors:a"},
        "vector_unknown_name": {"vector": vec + ":zzz"},
        "vector_traversal": {"vector": "../../../../etc/passwd:a"},
        "project_not_subspace": {"project": vec + ":nothing"},
    }.items():
        c = dict(base)
        for k, v in edit.items():
            if v is None:
                c.pop(k)
            else:
                c[k] = v
        put("spec", name + ".json", json.dumps(c).replace("1e+39", "1e39"))
    put("spec", "not_json.json", "{\"betas\": [")
    put("spec", "bom.json", b"\xef\xbb\xbf" + json.dumps(base).encode())
    put("spec", "empty_list.json", "[]")
    put("spec", "number.json", "5")

    circ = {
        "format": "patchbay-circuit-1",
        "provenance": {"model": "m", "command": "c", "date": "2026-01-01T00:00:00Z", "sources": [], "rule": "r"},
        "circuits": {"joy": {"components": [{"layer": 0, "head": 1, "op": "scale", "weight": 1.0}]}},
    }

    def circuit(f):
        c = json.loads(json.dumps(circ))
        f(c)
        return json.dumps(c)

    comp = lambda c: c["circuits"]["joy"]["components"][0]
    put("circuit", "format_old.json", circuit(lambda c: c.update(format="patchbay-circuit-0")))
    put("circuit", "no_circuits.json", circuit(lambda c: c.update(circuits={})))
    put("circuit", "no_components.json", circuit(lambda c: c["circuits"]["joy"].update(components=[])))
    put("circuit", "layer_out_of_range.json", circuit(lambda c: comp(c).update(layer=2)))
    put("circuit", "layer_huge.json", circuit(lambda c: comp(c).update(layer=2**64 - 1)))
    put("circuit", "head_out_of_range.json", circuit(lambda c: comp(c).update(head=4)))
    put("circuit", "head_and_neurons.json", circuit(lambda c: comp(c).update(neurons=[1])))
    put("circuit", "neuron_out_of_range.json", circuit(lambda c: c["circuits"]["joy"]["components"].append({"layer": 0, "neurons": [96], "op": "scale", "weight": 1})))
    put("circuit", "op_unknown.json", circuit(lambda c: comp(c).update(op="zero")))
    put("circuit", "add_without_vector.json", circuit(lambda c: comp(c).update(op="add")))
    put("circuit", "unknown_field.json", circuit(lambda c: c["provenance"].update(author="x")))
    put("circuit", "weight_string.json", circuit(lambda c: comp(c).update(weight="1")))
    put("circuit", "duplicate.json", circuit(lambda c: c["circuits"]["joy"]["components"].append(dict(comp(c)))))
    put("circuit", "not_json.json", "{\"format\": ")
    put("circuit", "bom.json", b"\xef\xbb\xbf" + json.dumps(circ).encode())

    def gguf(version=3, n_tensors=0, n_kv=0, rest=b""):
        return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + rest

    def gstr(s):
        return struct.pack("<Q", len(s)) + s

    put("gguf", "empty.gguf", b"")
    put("gguf", "bad_magic.gguf", b"GGML" + b"\0" * 20)
    put("gguf", "version_99.gguf", gguf(version=99))
    put("gguf", "version_1.gguf", gguf(version=1))
    put("gguf", "truncated_header.gguf", gguf()[:10])
    put("gguf", "tensor_count_huge.gguf", gguf(n_tensors=2**63))
    put("gguf", "kv_count_huge.gguf", gguf(n_kv=2**63))
    put("gguf", "key_length_huge.gguf", gguf(n_kv=1, rest=struct.pack("<Q", 2**62) + b"abc"))
    put("gguf", "string_value_huge.gguf", gguf(n_kv=1, rest=gstr(b"general.name") + struct.pack("<I", 8) + struct.pack("<Q", 2**61)))
    put("gguf", "array_count_huge.gguf", gguf(n_kv=1, rest=gstr(b"tokenizer.ggml.tokens") + struct.pack("<I", 9) + struct.pack("<IQ", 8, 2**60)))
    put("gguf", "value_type_unknown.gguf", gguf(n_kv=1, rest=gstr(b"x") + struct.pack("<I", 77) + b"\0" * 8))
    put("gguf", "nested_arrays.gguf", gguf(n_kv=1, rest=gstr(b"x") + (struct.pack("<I", 9) + struct.pack("<IQ", 9, 1)) * 200))
    tensor = gstr(b"t") + struct.pack("<I", 2) + struct.pack("<QQ", 2**40, 2**40) + struct.pack("<I", 0) + struct.pack("<Q", 0)
    put("gguf", "tensor_shape_overflow.gguf", gguf(n_tensors=1, rest=tensor))
    tensor = gstr(b"t") + struct.pack("<I", 9) + struct.pack("<Q", 1) * 9 + struct.pack("<I", 0) + struct.pack("<Q", 0)
    put("gguf", "tensor_dims_9.gguf", gguf(n_tensors=1, rest=tensor))
    tensor = gstr(b"t") + struct.pack("<I", 1) + struct.pack("<Q", 32) + struct.pack("<I", 99) + struct.pack("<Q", 0)
    put("gguf", "tensor_type_unknown.gguf", gguf(n_tensors=1, rest=tensor))
    tensor = gstr(b"t") + struct.pack("<I", 1) + struct.pack("<Q", 32) + struct.pack("<I", 0) + struct.pack("<Q", 2**63)
    put("gguf", "tensor_offset_huge.gguf", gguf(n_tensors=1, rest=tensor))

    put_all("token_ids", ".json", {
        "empty_list": "[]",
        "empty_prompt": "[[]]",
        "negative": "[[1, -1]]",
        "float": "[[1.5]]",
        "string": '[["a"]]',
        "object": '{"ids": [[1]]}',
        "u32_overflow": "[[4294967296]]",
        "not_json": "[[1, 2",
        "flat": "[1, 2, 3]",
    })
    put("token_ids", "bom.json", b"\xef\xbb\xbf[[1, 2]]")


if __name__ == "__main__":
    main()
