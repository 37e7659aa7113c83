"""The run folder's writers: a folder replaced in one atomic step, whatever moment a kill strikes; what a
killed writer left is cleared; manifests check their own content; one writer at a time; an output later
outputs were built from is replaced only with force."""

import contextlib
import errno
import json
import os
import subprocess
import sys

import pytest

from cart import files
from cart.errors import CartError
from conftest import ROOT, dead_pid


def folder_with(path, text):
    path.mkdir(parents=True)
    (path / "weights").write_text(text)
    return path


class Killed(BaseException):
    pass


@pytest.mark.parametrize("kill_at", range(4))
def test_a_published_folder_is_always_whole_old_or_new(tmp_path, monkeypatch, kill_at):
    model = tmp_path / "model"
    files.publish_folder(folder_with(tmp_path / ".model.tmp", "old"), model)
    calls = []
    real_replace, real_symlink = os.replace, os.symlink

    def counting(real):
        def step(*args):
            calls.append(args)
            if len(calls) > kill_at:
                raise Killed  # the process dies here: nothing after this call happens
            return real(*args)
        return step

    monkeypatch.setattr(os, "replace", counting(real_replace))
    monkeypatch.setattr(os, "symlink", counting(real_symlink))
    new = folder_with(tmp_path / ".model.tmp", "new")
    try:
        files.publish_folder(new, model)
        finished = True
    except Killed:
        finished = False
    monkeypatch.undo()
    # the calls: rename the new folder to its version name, make the link, swap the link in
    assert finished == (kill_at >= 3)
    assert (model / "weights").read_text() == ("new" if finished else "old")
    files.remove_stale(tmp_path, ".model.*")  # what the next start does
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", os.readlink(model)])


def test_publishing_replaces_a_plain_folder_and_remove_folder_follows_the_link(tmp_path):
    model = folder_with(tmp_path / "model", "plain")  # as an older cart wrote it
    files.publish_folder(folder_with(tmp_path / ".model.tmp", "new"), model)
    assert model.is_symlink() and (model / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", os.readlink(model)])
    files.remove_folder(model)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kill_at", range(3))
def test_a_plain_folder_replaced_by_a_kill_is_restored_on_the_next_start(tmp_path, monkeypatch, kill_at):
    model = folder_with(tmp_path / "model", "plain")  # as an older cart wrote it
    real_replace, real_symlink, calls = os.replace, os.symlink, []

    def counting(real):
        def step(*args):
            calls.append(args)
            if len(calls) > kill_at + 2:  # the new folder renamed and its link made: then the migration
                raise Killed
            return real(*args)
        return step

    monkeypatch.setattr(os, "replace", counting(real_replace))
    monkeypatch.setattr(os, "symlink", counting(real_symlink))
    try:
        files.publish_folder(folder_with(tmp_path / ".model.tmp", "new"), model)
    except Killed:
        pass
    monkeypatch.undo()
    files.finish_publish(model)  # what the next start does, before removing what is stale
    files.remove_stale(tmp_path, ".model.*")
    assert (model / "weights").read_text() in ("plain", "new")


def test_an_atomic_write_clears_what_a_killed_writer_of_the_same_file_left(tmp_path):
    dead, alive = tmp_path / f".report.html.tmp-{dead_pid()}", tmp_path / f".report.html.tmp-{os.getppid()}"
    other = tmp_path / f".eval.json.tmp-{dead_pid()}"
    for leftover in (dead, alive, other):
        leftover.write_text("half")
    files.write_text(tmp_path / "report.html", "whole")
    assert (tmp_path / "report.html").read_text() == "whole"
    assert not dead.exists() and alive.exists() and other.exists()  # a live writer's, another file's: kept
    (tmp_path / f".gen.tmp-{dead_pid()}").mkdir()
    files.remove_dead_temporaries(tmp_path)  # of any name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["report.html", alive.name])


def test_an_edited_manifest_is_refused_like_an_edited_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights")
    files.write_manifest(path, "train", {"retrieve": {"rerank": True}}, {}, rerank_weight=0.05)
    assert files.verified_input(tmp_path, "model.safetensors")[1]["rerank_weight"] == 0.05
    where = files.manifest_path(path)
    for edit in ({"rerank_weight": 0.9}, {"config": {"retrieve": {"rerank": False}}}, {"manifest_sha256": "0" * 64}):
        manifest = json.loads(where.read_text()) | edit
        where.write_text(json.dumps(manifest))
        with pytest.raises(CartError, match="model.manifest.json does not match its own checksum"):
            files.verified_input(tmp_path, "model.safetensors")
        files.write_manifest(path, "train", {"retrieve": {"rerank": True}}, {}, rerank_weight=0.05)


def test_a_second_writer_of_a_run_folder_is_refused_until_the_first_ends(tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    with files.run_lock(run_dir, "cart train"):
        with pytest.raises(CartError, match=rf"{run_dir} is being written by `cart train` \(PID {os.getpid()}\): "
                                            "wait for it to end, or stop it"):
            with files.run_lock(run_dir, "cart embed"):
                pass
    with files.run_lock(run_dir, "cart embed"):  # free again
        pass
    assert not run_dir.exists()  # made for the lock alone: removed again


def test_the_lock_of_a_killed_writer_is_taken_over_and_the_cli_names_a_live_one(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom cart import files\n"
                               f"with files.run_lock({str(run_dir)!r}, 'cart train'):\n"
                               "    print('held', flush=True)\n    time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = subprocess.run([sys.executable, "-m", "cart", "embed", "--config", "configs/tiny.yaml",
                               f"output_dir={tmp_path / 'runs'}"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr == (f"cart embed: error: {run_dir} is being written by `cart train` (PID {holder.pid}): "
                               f"wait for it to end, or stop it\n")
    finally:
        holder.kill()
        holder.wait()
    with files.run_lock(run_dir, "cart embed"):
        assert (run_dir / files.LOCK).read_text() == f"`cart embed` (PID {os.getpid()})\n"


@pytest.mark.parametrize("output_dir", ["/proc/cart-runs", "FILE"])
def test_an_output_dir_that_cannot_hold_a_run_is_one_line(tmp_path, output_dir):
    if output_dir == "FILE":
        output_dir = tmp_path / "a-file"
        output_dir.write_text("")
    done = subprocess.run([sys.executable, "-m", "cart", "corpus", "--config", "configs/tiny.yaml",
                           f"output_dir={output_dir}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith(f"cart corpus: error: cannot write the run folder {output_dir}/tiny: ")


def test_a_file_the_system_refuses_mid_stage_is_one_line(monkeypatch, capsys):
    from cart import cli
    from cart.data import corpus

    def read_only(cfg, force=False):
        raise OSError(errno.EROFS, "Read-only file system", str(cfg.run_dir / files.CORPUS))

    monkeypatch.setattr(corpus, "run", read_only)
    monkeypatch.setattr(files, "run_lock", lambda *args: contextlib.nullcontext())
    with pytest.raises(SystemExit) as exit_code:
        cli.main(["corpus", "--config", str(ROOT / "configs/tiny.yaml"), "output_dir=/mnt/ro"])
    assert exit_code.value.code == 2
    assert capsys.readouterr().err == "cart corpus: error: /mnt/ro/tiny/corpus.jsonl: Read-only file system\n"


def test_an_output_is_kept_when_up_to_date_and_replaced_only_when_nothing_current_was_built_from_it(tmp_path):
    def output(name, content, inputs=(), recipe=None):
        path = tmp_path / name
        path.write_text(content)
        files.write_manifest(path, "stage", {}, {i: files.sha256_file(tmp_path / i) for i in inputs}, recipe=recipe)

    output(files.CORPUS, "items")
    output(files.EMBEDDINGS, "rows", [files.CORPUS], recipe={"encoder": "a"})
    assert not files.check_replace(tmp_path, files.IDS, {}, force=False)  # nothing there yet
    assert files.check_replace(tmp_path, files.EMBEDDINGS, {"encoder": "a"}, force=False)  # up to date
    assert not files.check_replace(tmp_path, files.EMBEDDINGS, {"encoder": "b"}, force=False)  # nothing built on it
    output(files.IDS, "codes", [files.EMBEDDINGS], recipe={})
    with pytest.raises(CartError, match="embeddings.safetensors exists, made from other inputs or settings, and "
                                        "ids.safetensors were built from it: .* `cart embed --force`"):
        files.check_replace(tmp_path, files.EMBEDDINGS, {"encoder": "b"}, force=False)
    assert not files.check_replace(tmp_path, files.EMBEDDINGS, {"encoder": "b"}, force=True)
    assert not files.check_replace(tmp_path, files.EMBEDDINGS, {"encoder": "a"}, force=True)  # force: again
    output(files.CORPUS, "other items")  # the embeddings are stale themselves: replacing them loses nothing
    assert not files.check_replace(tmp_path, files.EMBEDDINGS, {"encoder": "b"}, force=False)
