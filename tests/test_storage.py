"""The storage seam against a real GCS JSON API on 127.0.0.1 (fake-gcs-server): paths stay URLs,
whole-object writes, ranged reads, globs, metrics as one object per write, a run checkpoint's
commit marker and set-aside marker, Orbax checkpoints whose newest step lost its marker or was
damaged, data files, tokenizer and images in a bucket. End-to-end runs, and the HF and PEFT
directories of a trained model, are in tests/train/test_gcs_runs.py (slow tier)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from t5gemma2_jax import storage


def test_a_url_stays_a_url_and_a_local_path_a_pathlib_path(tmp_path):
    p = storage.as_path("gs://bkt/run/checkpoints")
    assert str(p) == "gs://bkt/run/checkpoints" and str(p / "4") == "gs://bkt/run/checkpoints/4"
    assert str(p.parent) == "gs://bkt/run" and p.name == "checkpoints"
    assert storage.bucket("gs://bkt/run/x") == "gs://bkt" and storage.join("gs://bkt/run", "export") == "gs://bkt/run/export"
    assert isinstance(storage.as_path(tmp_path / "x"), pathlib.Path) and not storage.is_url(tmp_path)
    assert storage.absolute("gs://bkt/a") == storage.as_path("gs://bkt/a")


def test_whole_object_writes_ranged_reads_globs_and_removal(bucket):
    storage.write_text(f"{bucket}/d/a.jsonl", "0123456789")
    storage.write_bytes(f"{bucket}/d/b.jsonl", b"xyz")
    storage.write_text(f"{bucket}/d/sub/c.txt", "c")
    assert storage.read_range(f"{bucket}/d/a.jsonl", 3, 4) == b"3456"
    assert storage.glob(f"{bucket}/d/*.jsonl") == [f"{bucket}/d/a.jsonl", f"{bucket}/d/b.jsonl"]
    assert storage.glob(f"{bucket}/d/b.jsonl") == [f"{bucket}/d/b.jsonl"] and storage.glob(f"{bucket}/d/none.jsonl") == []
    assert storage.files_under(f"{bucket}/d") == [f"{bucket}/d/a.jsonl", f"{bucket}/d/b.jsonl", f"{bucket}/d/sub/c.txt"]
    assert storage.read_many([f"{bucket}/d/b.jsonl", f"{bucket}/d/a.jsonl"]) == [b"xyz", b"0123456789"]

    # A write that fails half-way leaves no object behind (nothing to read as whole).
    with pytest.raises(RuntimeError):
        with storage.open_write(f"{bucket}/d/half.bin") as f:
            f.write(b"part")
            raise RuntimeError("cut off")
    assert not storage.as_path(f"{bucket}/d/half.bin").exists()

    storage.remove_tree(f"{bucket}/d")
    assert storage.files_under(f"{bucket}/d") == []


def test_metrics_are_one_object_per_write_every_row_kept_and_truncated_on_resume(bucket):
    from t5gemma2_jax.train.metrics import MetricsWriter, read_metrics

    run = f"{bucket}/run"
    w = MetricsWriter(run, tensorboard=False)
    for step in range(1, 6):
        w.write(step, {"loss": float(step)})
    w.write(5, {"eval_loss": 0.5})
    w.close()
    assert [(r["step"], r.get("loss", r.get("eval_loss"))) for r in read_metrics(run)] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (5, 0.5)]
    assert len(storage.files_under(f"{run}/metrics")) == 6
    assert not storage.as_path(f"{run}/metrics.jsonl").exists()       # never appended in place

    # Resumed from step 3: the interrupted run's later rows go, new rows follow in order.
    w = MetricsWriter(run, resume_step=3, tensorboard=False)
    w.write(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(run)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def _fake_step(root: str, step: int, *, committed: bool = True) -> None:
    for item in ("state", "meta"):
        storage.write_text(f"{root}/checkpoints/{step}/{item}/x", "x")
    storage.write_text(f"{root}/checkpoints/{step}/meta/metadata", json.dumps({"step": step}))
    if committed:
        storage.write_text(f"{root}/checkpoints/{step}/commit_success.txt", "ok")


def test_a_step_without_its_commit_marker_or_set_aside_is_never_picked(bucket):
    from t5gemma2_jax.checkpoints.run import SET_ASIDE_FILE, run_checkpoint
    from t5gemma2_jax.checkpoints.safetensors_io import CheckpointError

    run = f"{bucket}/run"
    _fake_step(run, 2)
    _fake_step(run, 4)
    _fake_step(run, 6, committed=False)           # a save cut off: objects, no marker
    assert str(run_checkpoint(run)) == f"{run}/checkpoints/4"
    storage.write_text(f"{run}/checkpoints/4/{SET_ASIDE_FILE}", "{}")
    assert str(run_checkpoint(f"{run}/checkpoints")) == f"{run}/checkpoints/2"
    with pytest.raises(CheckpointError, match="commit_success.txt"):
        run_checkpoint(f"{run}/checkpoints/6")


def test_data_files_tokenizer_and_images_in_a_bucket_read_as_local_ones(bucket, tmp_path):
    import io

    from PIL import Image

    from t5gemma2_jax.data.images import load_image
    from t5gemma2_jax.data.sources import JsonlSource, open_source
    from t5gemma2_jax.data.tiny_tokenizer import tiny_tokenizer_path
    from t5gemma2_jax.data.tokenizer import Tokenizer

    lines = [json.dumps({"text": f"record {i}", "image": "img/a.png"}) for i in range(5)]
    text = "\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:])        # a blank line, no final newline
    (tmp_path / "a.jsonl").write_text(text)
    storage.write_text(f"{bucket}/data/a.jsonl", text)
    storage.write_text(f"{bucket}/data/b.jsonl", lines[0] + "\n")
    local, remote = JsonlSource([str(tmp_path / "a.jsonl")]), open_source(f"{bucket}/data/a*.jsonl")
    assert isinstance(remote, JsonlSource) and len(remote) == len(local) == 5
    assert [remote[i].payload for i in range(5)] == [local[i].payload for i in range(5)]
    assert [remote[i].line for i in range(5)] == [1, 2, 3, 5, 6]
    assert len(open_source(f"{bucket}/data/*.jsonl")) == 6

    png = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(png, format="PNG")
    storage.write_bytes(f"{bucket}/data/img/a.png", png.getvalue())
    img = load_image("img/a.png", base_dir=remote.base_dirs[0])      # relative to the data file's folder
    assert img.size == (8, 8) and img.convert("RGB").getpixel((3, 3)) == (255, 0, 0)

    storage.put_file(tiny_tokenizer_path(), f"{bucket}/tok.model")
    tok, ref = Tokenizer(f"{bucket}/tok.model"), Tokenizer(tiny_tokenizer_path())
    assert tok.vocab_size == ref.vocab_size and list(tok.encode("a red circle")) == list(ref.encode("a red circle"))


def _damage(step_dir: str, how: str) -> None:
    """Every array object of a step truncated to half, or 400 of its bytes inverted. Every one: the
    largest is not always one a restore reads (an OCDBT data object may hold only bytes no array
    refers to any more; a step cut that way once restored intact under load)."""
    files = [p for p in storage.files_under(f"{step_dir}/state") if "/d/" in p]
    assert files
    for name in files:
        data = bytearray(storage.read_bytes(name))
        if how == "truncated":
            data = data[: len(data) // 2]
        else:
            start = len(data) // 3
            data[start:start + 400] = bytes(b ^ 0xFF for b in data[start:start + 400])
        storage.write_bytes(name, bytes(data))


@pytest.mark.parametrize("how", ["truncated", "changed"])
def test_orbax_checkpoints_in_a_bucket_skip_uncommitted_and_set_damaged_steps_aside(bucket, how):
    import jax
    import jax.numpy as jnp

    from t5gemma2_jax.checkpoints.run import COMMIT_FILE, SET_ASIDE_FILE
    from t5gemma2_jax.train.checkpoint import Checkpointer

    directory = f"{bucket}/run/checkpoints"
    states = {s: {"w": jnp.arange(4096, dtype=jnp.float32) * s, "step": jnp.int32(s)} for s in (2, 4, 6)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), states[2])
    ck = Checkpointer(directory, every=2, keep=5)
    for s, state in states.items():
        ck.save(s, state, {"next": s}, {"step": s}, force=True)
    ck.close()
    storage.remove(f"{directory}/6/{COMMIT_FILE}")        # 6: a save cut off before its marker
    _damage(f"{directory}/4", how)

    ck = Checkpointer(directory, every=2, keep=5)
    assert ck.all_steps() == [2, 4]
    restored = ck.restore_latest(abstract)
    assert restored.step == 2 and restored.data == {"next": 2}
    assert np.array_equal(np.asarray(restored.state["w"]), np.asarray(states[2]["w"]))
    marker = json.loads(storage.read_text(f"{directory}/4/{SET_ASIDE_FILE}"))   # marked, nothing renamed
    assert marker["step"] == 4 and marker["reason"]
    assert ck.all_steps() == [2]

    # Reaching step 4 again, the run saves it anew; the damaged one is moved out of its way.
    ck.save(4, states[4], {"next": 4}, {"step": 4}, force=True)
    ck.close()
    ck = Checkpointer(directory, every=2, keep=5)
    assert ck.all_steps() == [2, 4] and ck.restore_latest(abstract).step == 4
    assert storage.as_path(f"{bucket}/run/checkpoints.quarantine/4/{SET_ASIDE_FILE}").exists()
    ck.close()


def test_ruler_files_in_a_bucket_are_written_listed_read_and_tabulated_as_local_ones(bucket, tmp_path):
    """scripts/ruler.py with --out, --data, --predictions and --markdown in a bucket: the same files
    as on a disk."""
    from scripts_loader import load_script
    from t5gemma2_jax.data.tiny_tokenizer import tiny_tokenizer_path
    from t5gemma2_jax.evaluation import ruler, ruler_score

    script = load_script("ruler")
    args = ["generate", "--tokenizer", tiny_tokenizer_path(), "--lengths", "300", "--tasks", "niah_single,qa",
            "--samples", "3", "--chat", "--sft"]
    script.run([*args, "--out", str(tmp_path)])
    script.run([*args, "--out", f"{bucket}/ruler"])
    names = ["niah_single_300.jsonl", "niah_single_300.sft.jsonl", "qa_300.jsonl", "qa_300.sft.jsonl"]
    for name in names:
        assert storage.read_text(f"{bucket}/ruler/{name}") == (tmp_path / name).read_text(), name
    # A directory stands for its generated files (the conversations beside them are left out).
    assert [str(p) for p in script._files([f"{bucket}/ruler"])] == [f"{bucket}/ruler/niah_single_300.jsonl",
                                                                   f"{bucket}/ruler/qa_300.jsonl"]
    records = ruler.read_records(f"{bucket}/ruler/qa_300.jsonl")
    rows = [{**r, "prediction": r["answers"][0] if i else "no idea"} for i, r in enumerate(records)]
    ruler_score.write_results(ruler_score.table(ruler_score.rescore(rows)), rows,
                              out=f"{bucket}/out/table.json", predictions=f"{bucket}/out/predictions.jsonl")
    assert json.loads(storage.read_text(f"{bucket}/out/table.json"))["tasks"]["qa"]["300"] == 66.67
    script.run(["score", "--predictions", f"{bucket}/out/predictions.jsonl", "--markdown", f"{bucket}/out/t.md"])
    assert "| qa | 66.7 |" in storage.read_text(f"{bucket}/out/t.md")
