"""The manifest's git revision: "-dirty" when code differs from HEAD, not when a run's own outputs
under results/ do (one reference run writing its folder must not mark the next run dirty)."""
import subprocess

from quantbench.run.manifest import git_revision


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_outputs_under_results_do_not_make_the_tree_dirty(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "results" / "reference" / "a").mkdir(parents=True)
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "reference" / "a" / "rows.jsonl").write_text("{}\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "init")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_revision(tmp_path / "pkg") == head
    (tmp_path / "results" / "reference" / "a" / "rows.jsonl").write_text("{}\n{}\n")
    assert git_revision(tmp_path / "pkg") == head
    (tmp_path / "pkg" / "code.py").write_text("x = 2\n")
    assert git_revision(tmp_path / "pkg") == head + "-dirty"
