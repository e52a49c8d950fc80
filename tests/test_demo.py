"""Component tests for the embedded demo checkpoints (real diffusers folders, CPU)."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from deployments import demo
from deployments.demo import (
    DEMO_CHECKPOINTS,
    MARKER_NAME,
    build_demo_checkpoint,
    default_demo_dir,
    demo_registry_entries,
    ensure_demo_checkpoints,
)
from deployments.pipelines import load_pipeline, run_pipeline

SPECS = {spec.name: spec for spec in DEMO_CHECKPOINTS}
NAMES = [spec.name for spec in DEMO_CHECKPOINTS]


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def test_names_and_order():
    assert NAMES == ["demo-xs", "demo-s", "demo-m", "demo-l"]


def test_folder_layout(demo_dir):
    assert set(demo_dir) == set(NAMES)
    for name, folder in demo_dir.items():
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusionPipeline"
        for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            assert (folder / component).is_dir(), f"{name}: no {component}/"
        for component in ("unet", "vae", "text_encoder"):
            assert list((folder / component).glob("*.safetensors")), f"{name}: {component} has no safetensors"
        assert (folder / "tokenizer" / "vocab.json").is_file()
        assert (folder / "tokenizer" / "merges.txt").read_text().startswith("#version")
        assert (folder / MARKER_NAME).is_file()
        assert not [p for p in folder.rglob("*") if p.suffix in {".bin", ".ckpt", ".pt", ".pth", ".pkl"}]
        text_config = json.loads((folder / "text_encoder" / "config.json").read_text())
        vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text())
        assert text_config["vocab_size"] == len(vocab)
        assert text_config["max_position_embeddings"] == 77


def test_two_builds_are_byte_identical(demo_dir, tmp_path):
    # The session fixture is one build (via ensure_demo_checkpoints); this is the second.
    for name in ("demo-xs", "demo-s"):
        again = build_demo_checkpoint(SPECS[name], tmp_path / name)
        first, second = file_hashes(demo_dir[name]), file_hashes(again)
        assert first.keys() == second.keys()
        differing = [f for f in first if first[f] != second[f]]
        assert not differing, f"{name}: files differ between builds: {differing}"


def test_each_checkpoint_is_at_least_3x_the_previous(demo_dir):
    sizes = [safetensors_bytes(demo_dir[name]) for name in NAMES]
    for (small, big), (a, b) in zip(zip(NAMES, NAMES[1:]), zip(sizes, sizes[1:])):
        assert b >= 3 * a, f"{big} ({b} bytes) is not >= 3x {small} ({a} bytes)"
    assert 1_000_000 < sizes[0] < 4_000_000
    assert 60_000_000 < sizes[-1] < 160_000_000


def test_tokenizer_handles_any_prompt(demo_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(demo_dir["demo-xs"] / "tokenizer")
    assert tok.model_max_length == 77
    for prompt in ["", "a photo of an astronaut", "ünïcödé 日本語 😀 \t\n tabs", "x" * 500]:
        ids = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(ids) == 77
        assert ids[0] == tok.bos_token_id
    # Byte-level: a word never falls back to the unknown token.
    inner = tok("héllo wörld 😀").input_ids[1:-1]
    assert tok.unk_token_id not in inner


@pytest.mark.parametrize("name", NAMES)
def test_generates_64px_in_2_steps_deterministically(demo_dir, name):
    pipe = load_pipeline(demo_dir[name], dtype="float32")
    kwargs = dict(prompt="a red fox in the snow", width=64, height=64, num_inference_steps=2,
                  guidance_scale=5.0, num_images=1)
    first = run_pipeline(pipe, seed=7, **kwargs)
    again = run_pipeline(pipe, seed=7, **kwargs)
    other = run_pipeline(pipe, seed=8, **kwargs)
    assert len(first) == 1 and first[0].size == (64, 64) and first[0].mode == "RGB"
    a, b, c = (np.asarray(im[0]) for im in (first, again, other))
    assert np.array_equal(a, b), "same seed gave different pixels"
    assert not np.array_equal(a, c), "different seeds gave identical pixels"
    assert a.std() > 0, "image is a flat color (NaNs decoded as black?)"


def test_ensure_is_idempotent(demo_dir):
    root = demo_dir["demo-xs"].parent
    markers = {n: (p / MARKER_NAME).stat().st_mtime_ns for n, p in demo_dir.items()}
    assert ensure_demo_checkpoints(root) == demo_dir
    assert {n: (p / MARKER_NAME).stat().st_mtime_ns for n, p in demo_dir.items()} == markers


def test_concurrent_ensure_leaves_one_complete_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_CHECKPOINTS", (SPECS["demo-xs"],))
    results, errors = [], []

    def worker():
        try:
            results.append(ensure_demo_checkpoints(tmp_path))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r == {"demo-xs": tmp_path / "demo-xs"} for r in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-xs"], "temp build folders left behind"
    assert (tmp_path / "demo-xs" / MARKER_NAME).is_file()


def test_incomplete_folder_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_CHECKPOINTS", (SPECS["demo-xs"],))
    stale = tmp_path / "demo-xs"
    stale.mkdir()
    (stale / "model_index.json").write_text("{}")  # as if a build died before its marker
    folders = ensure_demo_checkpoints(tmp_path)
    assert (folders["demo-xs"] / MARKER_NAME).is_file()
    assert json.loads((folders["demo-xs"] / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-xs"]


def test_build_refuses_non_empty_destination(tmp_path):
    (tmp_path / "junk").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        build_demo_checkpoint(SPECS["demo-xs"], tmp_path)


def test_default_demo_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMROUTER_DEMO_DIR", str(tmp_path / "here"))
    assert default_demo_dir() == tmp_path / "here"
    monkeypatch.delenv("MEMROUTER_DEMO_DIR")
    assert default_demo_dir() == Path.home() / ".cache" / "memrouter" / "demo-v1"


def test_registry_entries_validate(demo_dir):
    from router.registry import Registry

    root = demo_dir["demo-xs"].parent
    entries = demo_registry_entries(root)
    assert [e["name"] for e in entries] == NAMES
    assert entries[0] == {
        "name": "demo-xs", "path": str(root / "demo-xs"), "dtype": "float32", "family": "tiny",
        "max_width": 256, "max_height": 256, "max_batch": 4, "max_steps": 10,
        "default_width": 64, "default_height": 64, "default_steps": 2,
    }
    registry = Registry.from_entries(entries)  # also checks the folders are loadable-safe
    assert registry.names() == NAMES


def test_demo_without_a_serve_config_says_where_it_looked_and_starts_nothing(tmp_path, monkeypatch, capsys):
    import sys

    from deployments import cli, demo_run

    monkeypatch.setattr(demo_run, "DEFAULT_CONFIG", tmp_path / "site-packages" / "serve_config.yaml")  # a wheel install
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no serve config at" in err and "--config PATH" in err and "site-packages" in err
    assert cli.main(["demo", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()
    assert not (tmp_path / "out").exists()  # nothing written


def test_demo_finds_the_checkouts_serve_config_or_the_one_in_the_working_directory(tmp_path, monkeypatch):
    from deployments import demo_run

    assert demo_run.find_config() == demo_run.DEFAULT_CONFIG  # a checkout
    monkeypatch.setattr(demo_run, "DEFAULT_CONFIG", tmp_path / "missing.yaml")
    (tmp_path / "serve_config.yaml").write_text("applications: []\n")
    monkeypatch.chdir(tmp_path)
    assert demo_run.find_config() == tmp_path / "serve_config.yaml"


@pytest.mark.parametrize("argv_tail, setup, message", [
    (["--requests", "0"], None, "demo --requests must be >= 1"),
    (["--out", "{tmp}/file"], lambda tmp: (tmp / "file").write_text("x"), "exists and is not a folder"),
    (["--config", "{tmp}/empty.yaml"], lambda tmp: (tmp / "empty.yaml").write_text("applications: []\n"),
     "no 'applications' list with an application in it"),
    (["--config", "{tmp}/bad.yaml"], lambda tmp: (tmp / "bad.yaml").write_text("applications: [\n"), "invalid YAML"),
])
def test_demo_refuses_bad_arguments_in_one_line_and_starts_nothing(tmp_path, capsys, argv_tail, setup, message):
    import sys

    from deployments import cli

    if setup is not None:
        setup(tmp_path)
    argv = ["demo", "--out", str(tmp_path / "out")] + [a.format(tmp=tmp_path) for a in argv_tail]
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own refusal
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()
    assert not (tmp_path / "out").exists()


def test_the_demo_output_folder_holds_one_runs_files_and_never_the_users(tmp_path):
    from deployments.demo_run import MANIFEST_NAME, DemoOutput

    first = DemoOutput(tmp_path)
    written = [first.write_bytes("memory-timeline-deadbeef.png", b"png"), first.write_bytes("images/007-demo-s.png", b"x")]
    mine = [tmp_path / "images" / "logo.png", tmp_path / "images" / "001-my-own.png", tmp_path / "memory-timeline-x.png"]
    for p in mine:
        p.write_bytes(b"mine")
    second = DemoOutput(tmp_path)  # the next run
    assert not any(p.exists() for p in written)
    assert all(p.read_bytes() == b"mine" for p in mine)  # only what the last run listed goes
    kept = second.write_bytes("images/000-demo-xs.png", b"png")
    kept.write_bytes(b"the user's edit")  # changed since the demo wrote it: not the demo's any more
    (tmp_path / MANIFEST_NAME).open("a").write("4\t0\tREADME.md\n\xff\n../../etc/passwd\n")  # hand edits
    (tmp_path / "README.md").write_text("mine")
    DemoOutput(tmp_path)
    assert kept.read_bytes() == b"the user's edit" and (tmp_path / "README.md").read_text() == "mine"
    assert all(p.exists() for p in mine)


def test_a_manifest_that_is_a_link_is_replaced_not_written_through(tmp_path):
    from deployments.demo_run import MANIFEST_NAME, DemoOutput

    target = tmp_path / "precious.txt"
    target.write_text("keep")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / MANIFEST_NAME).symlink_to(target)
    DemoOutput(tmp_path / "out").write_bytes("images/000-x.png", b"png")
    assert target.read_text() == "keep" and not (tmp_path / "out" / MANIFEST_NAME).is_symlink()


def test_memrouter_demo_local_runs_and_writes_one_runs_images(tmp_path, capsys):
    """The README's first command, in its no-Ray form (--local): the whole path it prints
    and writes."""
    from deployments import cli

    assert cli.main(["demo", "--local", "--requests", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("-> replica") == 3 and "leaked modules 0" in out
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000-demo-xs.png", "001-demo-xs.png",
                                                                        "002-demo-s.png"]
    assert cli.main(["demo", "--local", "--requests", "1", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000-demo-xs.png"]


def test_memrouter_demo_runs_the_serve_app_end_to_end(tmp_path):
    """``memrouter demo`` itself (Ray and Serve in a child process, as a user runs it)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "deployments.cli", "demo", "--requests", "4", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "4/4 requests answered 200" in r.stdout
    assert len(list(tmp_path.glob("memory-timeline-*.png"))) == 2 and (tmp_path / "final_status.json").is_file()


def test_the_demo_client_retries_a_503_and_turns_odd_answers_into_error_rows():
    """A review found that a plain-text answer (Serve's proxy) or a transport error ended the
    demo with a traceback, and a 503 with Retry-After was never retried."""
    import httpx

    from deployments.demo_run import post_generate

    answers = iter([
        httpx.Response(503, headers={"Retry-After": "1"}, json={"error": {"code": "overloaded", "message": "m"}}),
        httpx.Response(200, json={"checkpoint": "demo-xs", "images": []}),
        httpx.Response(503, text="Request dropped due to backpressure"),
        httpx.Response(500, json={"error": {"code": "internal_error", "message": "m"}}),
    ])

    def handler(request):
        return next(answers)

    slept = []
    body = {"checkpoint": "demo-xs", "prompt": "p"}
    with httpx.Client(base_url="http://app", transport=httpx.MockTransport(handler)) as client:
        assert post_generate(client, body, sleep=slept.append) == {"checkpoint": "demo-xs", "images": []}
        assert slept == [1.0]
        assert post_generate(client, body, sleep=slept.append) == {
            "checkpoint": "demo-xs", "error": "503 Request dropped due to backpressure"}  # no Retry-After
        assert post_generate(client, body, sleep=slept.append)["error"] == "500 internal_error"

    def refuse(request):
        raise httpx.ConnectError("connection refused")

    with httpx.Client(base_url="http://app", transport=httpx.MockTransport(refuse)) as client:
        assert post_generate(client, body)["error"] == "ConnectError: connection refused"
