"""scripts/gpu_check.sh and scripts/device_wheels.py on a machine without a GPU: the arguments, the
wheel list the GPU image needs, the install from a wheel folder without an index, the requirement
check, and the refusal of a machine whose JAX sees no GPU."""

from __future__ import annotations

import base64
import gzip
import json
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from scripts_loader import load_script
from xla_env import script_env

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"
dw = load_script("device_wheels")


def gpu_check(*args, env=None, cwd=ROOT):
    # Of the session's environment only the compilation cache and the cheap code generation (xla_env).
    compiling = {k: v for k, v in script_env().items()
                 if k == "XLA_FLAGS" or k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "JAX_DISABLE_MOST"))}
    base = {"PY": sys.executable, "PATH": os.environ["PATH"], "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""), **compiling}
    return subprocess.run(["bash", str(GPU_CHECK), *args], capture_output=True, text=True, cwd=cwd,
                          env=base | (env or {}))


def make_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = (), body: str = "") -> Path:
    """A pure-Python wheel of one module `name` (VALUE = body). Written with zipfile: the test
    environment need not have a build backend, and a wheel is a zip with three metadata files."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}.py": f"VALUE = {body or repr(version)}\n",
             f"{dist}/METADATA": "Metadata-Version: 2.1\n" f"Name: {name}\nVersion: {version}\n"
                                 + "".join(f"Requires-Dist: {r}\n" for r in requires),
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(c.encode()).digest()).rstrip(b'=').decode()},"
                     f"{len(c.encode())}\n" for p, c in files.items()) + f"{dist}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, c in files.items():
            z.writestr(p, c)
        z.writestr(f"{dist}/RECORD", record)
    return path


def test_arguments_usage_and_one_line_errors():
    r = gpu_check("--help")
    assert r.returncode == 0 and "--prepare" in r.stdout and "gpu_check.jsonl" in r.stdout
    for args, message in ((["--bogus"], "unknown argument '--bogus' (see --help)"), (["--batch", "eight"], "'eight' is not a whole number"),
                          (["--out"], "--out needs a value"), (["--presets", ""], "--presets is empty")):
        r = gpu_check(*args)
        assert r.returncode == 2 and r.stderr == f"error: gpu_check.sh: {message}\n", args


def test_a_machine_without_a_gpu_is_refused_in_one_line(tmp_path):
    r = gpu_check("--no-install", "--out", str(tmp_path))
    assert r.returncode == 2 and r.stderr == ("error: gpu_check.sh: JAX sees no GPU (run it on a GPU machine whose "
                                              "jax has the CUDA plugin)\n")
    assert not (tmp_path / "gpu_check.jsonl").exists() and "JAX sees no GPU" in (tmp_path / "gpu_check.log").read_text()


def test_no_wheels_asks_for_prepare(tmp_path):
    r = gpu_check("--out", str(tmp_path / "out"), "--wheels", str(tmp_path / "none"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "did not install" in r.stderr
    assert "run scripts/gpu_check.sh --prepare" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_the_install_step_uses_the_wheel_folder_alone(tmp_path):
    """gpu_check.sh installs the folder's wheels (no index) into the PYTHONPATH directory before it
    looks for the GPU; what it installed imports from there."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "gpuprobe_a", "1.0", requires=("gpuprobe_b>=2",))
    make_wheel(wheels, "gpuprobe_b", "2.1")
    site = tmp_path / "site"
    # An index that does not exist: any lookup beyond the folder would fail the install.
    r = gpu_check("--out", str(tmp_path / "out"), "--wheels", str(wheels),
                  env={"SITE": str(site), "PIP_INDEX_URL": "http://127.0.0.1:9/simple"})
    assert r.returncode == 2 and "JAX sees no GPU" in r.stderr, r.stderr
    assert "installed into" in r.stdout and "gpuprobe-a gpuprobe-b" in r.stdout
    out = subprocess.run([sys.executable, "-c", "import gpuprobe_a, gpuprobe_b; print(gpuprobe_a.VALUE, gpuprobe_b.VALUE)"],
                         env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert out.stdout.split() == ["1.0", "2.1"]


def test_the_wheel_list_is_what_the_image_lacks():
    image = dw.image_packages()
    # What the image is known to hold, pinned; what it lacks is not listed.
    assert image["jax"] == "0.11.2" and image["jaxlib"] == "0.11.2" and image["transformers"] == "5.17.0"
    assert "torch" in image and "flax" in image and image["flax"] is None and "huggingface-hub" in image
    assert "grain" not in image and "array-record" not in image
    resolved = [("grain", "0.2.18"), ("array_record", "0.8.6"), ("jax", "0.11.2"), ("Flax", "0.12.12"),
                ("rouge-score", "0.1.2"), ("absl_py", "2.5.1"), ("tensorboardX", "2.6.5")]
    assert dw.missing(resolved, image) == [("array_record", "0.8.6"), ("grain", "0.2.18"), ("rouge-score", "0.1.2"),
                                           ("tensorboardX", "2.6.5")]
    reqs = dw.requirements()
    assert any(r.startswith("grain") for r in reqs) and not any(r.startswith("torch") for r in reqs)


def test_prepare_resolves_downloads_and_prunes_from_a_local_index(tmp_path):
    """The whole of `prepare` against a local folder as the index: the closure of the requirement
    less what the image holds, one wheel each; a stale wheel is removed; the size cap holds."""
    index = tmp_path / "index"
    index.mkdir()
    make_wheel(index, "gpuprobe_a", "1.0", requires=("gpuprobe_b>=2", "gpuprobe_img"))
    make_wheel(index, "gpuprobe_b", "2.1")
    make_wheel(index, "gpuprobe_b", "1.0")
    make_wheel(index, "gpuprobe_img", "3.0")
    out = tmp_path / "wheels"
    out.mkdir()
    make_wheel(out, "gpuprobe_old", "0.1")
    local = ("--no-index", "--find-links", str(index))
    wheels = dw.prepare(out, reqs=["gpuprobe_a"], image={"gpuprobe-img": "3.0"}, index_args=local)
    assert [w.name for w in wheels] == ["gpuprobe_a-1.0-py3-none-any.whl", "gpuprobe_b-2.1-py3-none-any.whl"]
    with pytest.raises(dw.WheelError, match="over the 0 MiB"):
        dw.prepare(out, reqs=["gpuprobe_a"], image={"gpuprobe-img": "3.0"}, index_args=local, max_bytes=10)
    # The image pins a version nothing offers: pip's reason, in one error.
    with pytest.raises(dw.WheelError, match="gpuprobe_img"):
        dw.prepare(out, reqs=["gpuprobe_a"], image={"gpuprobe-img": "2.0"}, index_args=local)


def test_check_names_every_unmet_requirement():
    assert dw.check(["pytest>=1", "numpy>=1"])[0].startswith("pytest ")
    with pytest.raises(dw.WheelError) as e:
        dw.check(["pytest>=1", "numpy<1", "gpuprobe-absent>=1", "pytest; python_version < '3'"])
    message = str(e.value)
    assert "numpy<1 (installed " in message and "gpuprobe-absent>=1 (not installed)" in message
    assert "pytest>=1" not in message and message.count("\n") == 0


def test_the_command_line_reports_errors_in_one_line(tmp_path, capsys):
    assert dw.main(["install", "--dir", str(tmp_path), "--target", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device_wheels.py: no wheels in") and err.count("\n") == 1


@pytest.mark.slow
def test_prepare_against_pypi_fits_and_holds_grain(tmp_path):
    """The real preparation (PyPI): grain and array_record for Python 3.12 manylinux, rouge-score
    built into a pure wheel, nothing the image holds, under the size cap."""
    wheels = dw.prepare(tmp_path)
    names = {dw.canonical(w.name.split("-")[0]) for w in wheels}
    assert {"grain", "array-record", "rouge-score", "tensorboardx"} <= names
    assert not names & set(dw.image_packages())
    assert all("cp312" in w.name or "py3-none-any" in w.name or "py2.py3-none-any" in w.name for w in wheels)


# ---------------------------------------------------------------------------------------------
# The benchmark's parts as gpu_check.sh runs them: the command line, the summary, and (slow: a train
# step and generation compiled in each framework) every field of their JSON lines on CPU.

SHAPE = ["--preset", "tiny", "--encoder-length", "16", "--decoder-length", "8", "--batch", "2", "--steps", "1",
         "--new-tokens", "2", "--dtype", "bfloat16"]
bench = load_script("benchmark")


def test_benchmark_arguments_are_checked_before_any_work(tmp_path, capsys):
    for args, message in ((["--what", "train,decode"], "--what: unknown parts ['decode']"),
                          (["--steps", "0"], "--steps must be at least 1"),
                          (["--framework", "torch"], "argument --framework: invalid choice"),
                          (["--summarize", str(tmp_path / "absent.jsonl")], "--summarize: cannot read")):
        with pytest.raises(SystemExit) as e:
            bench.main(SHAPE + args)
        assert e.value.code == 2 and message in capsys.readouterr().err, args


def _line(**fields):
    base = dict(preset="1b-1b", batch=8, encoder_length=2048, decoder_length=512, dtype="bfloat16",
                device="gpu:NVIDIA H100 80GB HBM3", peak_tflops=989.0)
    return base | fields


def test_the_summary_joins_the_parts_against_the_targets(tmp_path, capsys):
    """One row per shape from the parts' lines (and gpu_check.sh's error and skip lines): the
    frameworks' ratios, each target met, missed or unknown."""
    lines = [_line(framework="jax", part="train", train_step_s=1.0, train_mfu=0.45, measured_peak_tflops=790.0,
                   train_mfu_measured=0.56, train_peak_device_memory_gb=40.0, generate_s=None),
             _line(framework="hf", part="generate,train", hf_train_step_s=1.2, hf_generate_s=4.0,
                   hf_generate_tokens_per_s=256.0, hf_precision="autocast"),
             _line(framework="jax", part="generate", generate_s=1.0, generate_tokens_per_s=1024.0),
             _line(preset="270m-270m", part="jax train", error="timed out after 150s"),
             _line(preset="270m-270m", part="transformers", hf_skipped="transformers 5.17.0 has no model"),
             {"unrelated": 1}]
    big, small = bench.summarize(lines)
    assert big["train_speedup_vs_hf"] == pytest.approx(1.2) and big["generate_speedup_vs_hf"] == pytest.approx(4.0)
    assert big["targets"] == {"train_mfu": True, "train_speedup_vs_hf": False, "generate_speedup_vs_hf": True}
    assert big["generate_s"] == 1.0 and big["train_peak_device_memory_gb"] == 40.0   # a None never hides a value
    assert small["errors"] == ["jax train: timed out after 150s"]
    assert small["targets"] == {"train_mfu": None, "train_speedup_vs_hf": None, "generate_speedup_vs_hf": None}
    path = tmp_path / "gpu_check.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert len(bench.main(["--summarize", str(path)])) == 2
    text = capsys.readouterr().out
    assert "1b-1b batch 8 x (2048 + 512) bfloat16 on gpu:NVIDIA H100 80GB HBM3" in text
    assert "MFU 45.0% of 989 (datasheet), 56.0% of 790 TFLOP/s (measured)" in text and "->  1.20x" in text
    assert "train_speedup_vs_hf >= 1.5: MISSED" in text and "generate_speedup_vs_hf >= 2.0: met" in text
    assert "transformers skipped: transformers 5.17.0 has no model" in text
    assert "failed: jax train: timed out after 150s" in text


@pytest.fixture(scope="module")
def benchmark_lines(tmp_path_factory):
    """JAX's train step (with the matmul peak and the profile) and generation, and transformers'
    train step and generation, each a `main` call of its own as gpu_check.sh runs them."""
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "gpu_check.jsonl"
    bench.main(SHAPE + ["--what", "train", "--peak-matmul", "128", "--profile", str(tmp / "profile_tiny.txt"),
                        "--json", str(out)])
    bench.main(SHAPE + ["--what", "generate", "--json", str(out)])
    bench.main(SHAPE + ["--framework", "hf", "--what", "train,generate", "--json", str(out)])
    return tmp, [json.loads(x) for x in out.read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.heavy
def test_every_field_of_the_jax_parts(benchmark_lines):
    tmp, (train, generate, _) = benchmark_lines
    for line in (train, generate):
        assert line["framework"] == "jax" and line["preset"] == "tiny" and line["dtype"] == "bfloat16"
        assert (line["batch"], line["encoder_length"], line["decoder_length"], line["new_tokens"]) == (2, 16, 8, 2)
        assert line["attention"] == "auto" and line["device"].startswith("cpu:") and line["versions"]["jax"]
        assert line["peak_tflops"] > 0 and line["peak_host_memory_gb"] > 0.1
    assert train["part"] == "train" and generate["part"] == "generate"
    assert train["train_step_s"] > 0 and train["train_tokens_per_s"] == pytest.approx(2 * 24 / train["train_step_s"])
    assert train["train_tflops"] * 1e12 == pytest.approx(train["train_flops_per_step"] / train["train_step_s"])
    assert 0 < train["train_mfu"] < 1 and train["measured_peak_tflops"] > 0
    assert train["train_mfu_measured"] == pytest.approx(train["train_tflops"] / train["measured_peak_tflops"])
    assert train["measured_peak_source"] == "bfloat16 matmul 128^3 on " + train["device"]
    # CPU keeps no device memory statistics: the fields are there, empty.
    assert train["train_peak_device_memory_gb"] is None and generate["generate_peak_device_memory_gb"] is None
    assert generate["generate_tokens_per_s"] == pytest.approx(2 * 2 / generate["generate_s"])
    assert "train_step_s" not in generate and "generate_s" not in train
    # The profile: the train step's ops, their shares summing to at most one, and its text file.
    assert train["profile"] == str(tmp / "profile_tiny.txt") and 1 <= len(train["profile_top"]) <= 5
    assert 0 < sum(t["share"] for t in train["profile_top"]) <= 1 + 1e-9
    assert "matmul" in train["profile_by_kind"] and sum(train["profile_by_kind"].values()) > 0
    text = (tmp / "profile_tiny.txt").read_text()
    assert text.startswith("tiny train step, batch 2 x (16 + 8) bfloat16") and "by kind: " in text


@pytest.mark.slow
@pytest.mark.heavy
def test_every_field_of_the_transformers_parts(benchmark_lines):
    _, (*_, hf) = benchmark_lines
    assert hf["framework"] == "hf" and hf["hf_precision"] == "autocast" and hf["versions"]["transformers"]
    assert hf["hf_train_step_s"] > 0 and hf["hf_generate_s"] > 0
    assert hf["hf_generate_tokens_per_s"] == pytest.approx(2 * 2 / hf["hf_generate_s"])
    assert hf["hf_train_peak_device_memory_gb"] is None and hf["hf_generate_peak_device_memory_gb"] is None
    assert "train_step_s" not in hf and "generate_s" not in hf
    row, = bench.summarize(benchmark_lines[1])
    assert row["train_speedup_vs_hf"] == pytest.approx(hf["hf_train_step_s"] / row["train_step_s"])


def _trace(folder: Path, events: list[dict]) -> Path:
    run = folder / "plugins" / "profile" / "run"
    run.mkdir(parents=True)
    with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    return folder


def test_the_profile_summary_reads_a_gpu_trace(tmp_path):
    """A GPU trace as the profiler writes it: the device's XLA op track is read (not its kernel
    streams, not the host), each op counted without what is nested in it."""
    from t5gemma2_jax.train.trace_summary import summarize

    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0 NVIDIA H100"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "XLA Ops"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "Stream #13(Compute)"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 1, "args": {"name": "python"}}]
    ops = [("while.3", 0, 1000), ("dot.7", 0, 600), ("cudnn-fmha.2", 600, 300), ("all-reduce.1", 1000, 100),
           ("loop_fusion.9", 1100, 50)]
    events = meta + [{"ph": "X", "pid": 1, "tid": 1, "name": n, "ts": t, "dur": d} for n, t, d in ops]
    events += [{"ph": "X", "pid": 1, "tid": 2, "name": "sm90_xmma_gemm", "ts": 0, "dur": 600},
               {"ph": "X", "pid": 2, "tid": 1, "name": "PjitFunction(step)", "ts": 0, "dur": 5000}]
    s = summarize(_trace(tmp_path / "a", events), steps=2, wall_s=0.002)
    assert s.source == "/device:GPU:0 NVIDIA H100 (XLA ops)"
    assert dict(s.by_name) == pytest.approx({"dot.7": 600e-6, "cudnn-fmha.2": 300e-6, "while.3": 100e-6,
                                             "all-reduce.1": 100e-6, "loop_fusion.9": 50e-6})
    assert s.busy_s == pytest.approx(1150e-6) and s.by_name[0][0] == "dot.7"
    assert s.by_kind == pytest.approx({"matmul": 600e-6, "attention": 300e-6, "other": 150e-6, "collective": 100e-6})
    assert s.top(2) == [{"name": "dot.7", "share": pytest.approx(600 / 1150)},
                        {"name": "cudnn-fmha.2", "share": pytest.approx(300 / 1150)}]
    assert "  52.2%     0.300  dot.7" in s.text() and "by kind: matmul 52.2%, attention 26.1%" in s.text()
    # Without an op track the kernels of the device's streams are read.
    no_ops = [e for e in events if not (e.get("tid") == 1 and e["pid"] == 1)]
    k = summarize(_trace(tmp_path / "b", no_ops))
    assert k.source == "/device:GPU:0 NVIDIA H100 (kernels)" and k.by_kind == pytest.approx({"matmul": 600e-6})


@pytest.mark.slow
@pytest.mark.heavy
def test_the_whole_command_on_cpu(tmp_path):
    """gpu_check.sh --cpu with tiny shapes: every part in its own process, one JSON line each, the
    profile, and the summary at the end of the log."""
    out = tmp_path / "out"
    r = gpu_check("--cpu", "--no-install", "--presets", "tiny", "--batch", "2", "--encoder-length", "16",
                  "--decoder-length", "8", "--steps", "1", "--new-tokens", "2", "--peak-matmul", "128",
                  "--out", str(out), env={"JAX_PLATFORMS": ""})
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (out / "gpu_check.jsonl").read_text().splitlines()]
    assert [(x["framework"], x["part"]) for x in lines] == [("jax", "train"), ("hf", "generate,train"), ("jax", "generate")]
    assert not any("error" in x for x in lines)
    log = (out / "gpu_check.log").read_text()
    assert "== tiny jax train" in log and "== summary" in log and "train_mfu >= 0.4: " in log
    assert (out / "profile_tiny.txt").read_text().startswith("tiny train step")
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.jsonl", "gpu_check.log", "profile_tiny.txt"]
