"""The run folder's writers: a folder replaced in one atomic step, whatever moment a kill strikes."""

import os

import pytest

from cart import files


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
