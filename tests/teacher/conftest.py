"""A tiny HF teacher shared by the teacher tests (and its LocalTeacher)."""
import pytest

from teacher import teacher_fixtures as fixtures


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
  pytest.importorskip("torch")
  return fixtures.make_teacher_dir(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def local_teacher(teacher_dir):
  return fixtures.load_teacher(teacher_dir)
