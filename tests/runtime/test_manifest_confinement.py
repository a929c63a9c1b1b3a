"""Every path an artifact directory names stays inside it: manifest fields, files{}, the graphs'
own external-data entries, engines; and quantize writes only inside its output."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from calibration.quantize import QuantizeOptions, quantize
from runtime.artifact.manifest import load_manifest, sha256_file
from runtime.backends.tensorrt.engines import StaleEngineError, engine_dir, find_engine
from runtime.errors import ArtifactError, Blip2EdgeError
from runtime.pipeline import Blip2Pipeline
from tests.runtime.test_tensorrt import ORIN, add_vision_engine


@pytest.fixture()
def art(tmp_path, tiny_artifacts):
    return shutil.copytree(tiny_artifacts, tmp_path / "art")


def _rewrite(art, change) -> None:
    m = json.loads((art / "manifest.json").read_text())
    change(m)
    (art / "manifest.json").write_text(json.dumps(m))


def _field(m: dict, field: str, value) -> None:
    *parents, last = field.split(".")
    target = m
    for k in parents:
        target = target[k]
    target[last] = value


OUTSIDE = [
    ("stages.vision.file", "/etc/hostname", "absolute paths are not allowed"),
    ("stages.vision.file", "../art/vision.onnx", "'..' is not allowed"),
    ("stages.decoder.file", "sub/../../decoder.onnx", "'..' is not allowed"),
    ("embeddings.file", "/etc/passwd", "absolute paths are not allowed"),
    ("tokenizer.file", "../tokenizer.json", "'..' is not allowed"),
    ("stages.qformer.external_data", ["../qformer.onnx.data"], "'..' is not allowed"),
    ("stages.vision.quantization", {"trt_calibration_table": "/etc/passwd"}, "absolute paths are not allowed"),
]


@pytest.mark.parametrize("field, value, why", OUTSIDE, ids=[f"{f}={v}" for f, v, _ in OUTSIDE])
def test_paths_leaving_the_directory_are_refused(art, field, value, why):
    _rewrite(art, lambda m: _field(m, field, value))
    with pytest.raises(ArtifactError) as err:
        load_manifest(art)
    assert field in str(err.value) and why in str(err.value)


def test_files_entry_outside_is_refused_before_it_is_read(art, tmp_path):
    (tmp_path / "payload.txt").write_text("secret")
    _rewrite(art, lambda m: m["files"].update({"../payload.txt": sha256_file(tmp_path / "payload.txt")}))
    with pytest.raises(ArtifactError, match=r"files\['\.\./payload\.txt'\] = '\.\./payload\.txt': '\.\.' is not allowed"):
        load_manifest(art)


@pytest.mark.parametrize("field, name", [("embeddings.file", "embed_tokens.npy"), ("stages.vision.file", "vision.onnx")])
def test_symlink_leaving_the_directory_is_refused(art, tmp_path, field, name):
    """A listed file that is a symlink to a file outside (with the right hash) is still refused."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(art / name, outside / name)
    os.symlink(outside / name, art / name)
    with pytest.raises(ArtifactError, match=rf"{name}' resolves to .*elsewhere/{name}, outside"):
        load_manifest(art)


def test_symlink_inside_the_directory_is_fine(art):
    (art / "weights").mkdir()
    shutil.move(art / "embed_tokens.npy", art / "weights" / "table.npy")
    os.symlink("weights/table.npy", art / "embed_tokens.npy")
    assert Blip2Pipeline.from_artifacts(art).embed_table.shape == (512, 32)


def test_quantize_never_writes_outside_its_output(art, tmp_path):
    (tmp_path / "payload.txt").write_text("secret")
    _rewrite(art, lambda m: m["files"].update({"../payload.txt": sha256_file(tmp_path / "payload.txt"),
                                               "sub/../../../x.txt": "0" * 64}))
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(Blip2EdgeError, match=r"'\.\.' is not allowed"):
        quantize(art, tmp_path / "out" / "q", QuantizeOptions(num_calib=4, held_out=4, gate=False), log=lambda s: None)
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing created, linked or copied anywhere


# ---- external data named inside the graph's own protobuf ---------------------------------------


@pytest.fixture(scope="module")
def external(tmp_path_factory, tiny_checkpoint):
    """An export whose graphs keep their weights in <graph>.onnx.data."""
    from exporter.export import ExportOptions, export

    out = tmp_path_factory.mktemp("ext") / "art"
    export(str(tiny_checkpoint), out, ExportOptions(external_data_threshold=1, validate=False), log=lambda s: None)
    return out


def _relocate_external_data(art, graph: str, location: str) -> None:
    """Points every external tensor of `graph` at `location` and re-lists the graph's hash."""
    import onnx

    model = onnx.load(art / graph, load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(model, art / graph)
    _rewrite(art, lambda m: m["files"].update({graph: sha256_file(art / graph)}))


def test_external_data_export_loads_and_is_listed(external):
    m = load_manifest(external)
    assert m.stages["vision"]["external_data"] == ["vision.onnx.data"] and "vision.onnx.data" in m.data["files"]
    assert Blip2Pipeline(m).embed_table.shape == (512, 32)


@pytest.mark.parametrize("location, why", [
    ("../vision.onnx.data", "'..' is not allowed"),
    ("/etc/hostname", "absolute paths are not allowed"),
    ("escape/vision.onnx.data", "outside"),
    ("unlisted.data", "is loaded but not listed in files"),
])
def test_graph_external_data_outside_or_unlisted_is_refused(external, tmp_path, location, why):
    art = shutil.copytree(external, tmp_path / "art")
    os.symlink(tmp_path, art / "escape")
    shutil.copy(art / "vision.onnx.data", tmp_path / "vision.onnx.data")
    shutil.copy(art / "vision.onnx.data", art / "unlisted.data")
    _relocate_external_data(art, "vision.onnx", location)
    with pytest.raises(ArtifactError) as err:
        load_manifest(art)
    assert "stages.vision.file (vision.onnx: external data)" in str(err.value) and why in str(err.value)
    assert location in str(err.value)


def test_external_data_parser_matches_onnx(external):
    import onnx

    from runtime.artifact.external_data import external_data_locations

    for graph in ("vision.onnx", "qformer.onnx", "decoder.onnx"):
        model = onnx.load(external / graph, load_external_data=False)
        expected = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        fd = os.open(external / graph, os.O_RDONLY)
        try:
            assert set(external_data_locations(fd, graph)) == expected == {graph + ".data"}
        finally:
            os.close(fd)


def test_external_data_found_wherever_a_graph_holds_tensors(tmp_path):
    """Initializers, sparse initializers, Constant attributes (t and tensors), subgraphs and
    functions: every place onnx.proto lets a tensor live, checked against the onnx package."""
    import onnx
    from onnx import TensorProto, helper

    from runtime.artifact.external_data import external_data_locations

    def ext(name: str, location: str) -> TensorProto:
        t = helper.make_tensor(name, TensorProto.FLOAT, [1], [0.0])
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", "0"), ("length", "4")):
            t.external_data.add(key=k, value=v)
        return t

    sub = helper.make_graph([helper.make_node("Constant", [], ["y"], value=ext("c2", "in_subgraph.bin"))], "sub", [],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    nodes = [helper.make_node("Constant", [], ["a"], value=ext("c1", "in_attribute.bin")),
             helper.make_node("If", ["cond"], ["b"], then_branch=sub, else_branch=sub)]
    list_attr = helper.make_attribute("tensors", [ext("c3", "in_attribute_list.bin")])
    nodes[0].attribute.append(list_attr)
    sparse = helper.make_sparse_tensor(ext("sv", "in_sparse.bin"), helper.make_tensor("si", TensorProto.INT64, [1], [0]), [4])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])],
                              initializer=[ext("w", "in_initializer.bin")], sparse_initializer=[sparse])
    fn = onnx.FunctionProto(name="f", domain="local", output=["z"],
                            node=[helper.make_node("Constant", [], ["z"], value=ext("c4", "in_function.bin"))])
    fn.attribute_proto.append(helper.make_attribute("default_t", ext("c5", "in_function_attribute.bin")))
    model = helper.make_model(graph, functions=[fn])
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    fd = os.open(tmp_path / "m.onnx", os.O_RDONLY)
    try:
        found = external_data_locations(fd, "m.onnx")
    finally:
        os.close(fd)
    assert sorted(found) == ["in_attribute.bin", "in_attribute_list.bin", "in_function.bin",
                             "in_function_attribute.bin", "in_initializer.bin", "in_sparse.bin", "in_subgraph.bin"]


def test_truncated_graph_is_a_clear_error(art):
    raw = (art / "vision.onnx").read_bytes()
    (art / "vision.onnx").write_bytes(raw[: len(raw) // 3])
    _rewrite(art, lambda m: m["files"].update({"vision.onnx": sha256_file(art / "vision.onnx")}))
    with pytest.raises(ArtifactError, match=r"vision\.onnx: not a valid ONNX graph"):
        load_manifest(art)


# ---- TensorRT engines: confined, regular, hashed by identity -----------------------------------


@pytest.fixture()
def with_engine(art):
    return add_vision_engine(art)


def _edit_engines_json(m, change) -> None:
    path = engine_dir(m.root, ORIN) / "engines.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_engine_changed_with_restored_mtime_is_refused(with_engine):
    assert find_engine(with_engine, "vision", ORIN).path.name == "vision.engine"
    engine = engine_dir(with_engine.root, ORIN) / "vision.engine"
    st = engine.stat()
    engine.write_bytes(b"serialized engine byteZ")
    os.utime(engine, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(StaleEngineError, match="refusing to deserialise"):
        find_engine(with_engine, "vision", ORIN)


@pytest.mark.parametrize("engine", ["../../../vision.onnx", "/etc/hostname"])
def test_engine_path_outside_is_refused(with_engine, engine):
    _edit_engines_json(with_engine, lambda d: d["engines"]["vision"].update(engine=engine))
    with pytest.raises(ArtifactError, match=r"engines\.vision\.engine = .*(not allowed)"):
        find_engine(with_engine, "vision", ORIN)


def test_engine_fifo_is_refused(with_engine):
    engine = engine_dir(with_engine.root, ORIN) / "vision.engine"
    engine.unlink()
    os.mkfifo(engine)
    with pytest.raises(StaleEngineError, match="refusing to deserialise"):
        find_engine(with_engine, "vision", ORIN)


@pytest.mark.parametrize("change, field", [
    (lambda d: d.update(engines=[]), "engines: expected an object"),
    (lambda d: d["engines"]["vision"].update(engine_sha256=3), "engines.vision.engine_sha256: expected a string"),
    (lambda d: d["engines"]["vision"].pop("engine"), "engines.vision.engine: expected a value"),
])
def test_malformed_engine_manifest_names_the_field(with_engine, change, field):
    _edit_engines_json(with_engine, change)
    with pytest.raises(Blip2EdgeError, match=field):
        find_engine(with_engine, "vision", ORIN)


def test_engine_directory_symlinked_outside_is_refused(art, tmp_path):
    m = load_manifest(art)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (art / "engines").mkdir()
    os.symlink(elsewhere, engine_dir(art, ORIN))
    with pytest.raises(ArtifactError, match="engine directory = 'engines/trt10.3.0-sm87' resolves to .*outside"):
        find_engine(m, "vision", ORIN)
