"""``qwen3vl_ray.errors.error_line``: the one line that names an error, for output rows and status reports."""

from qwen3vl_ray.errors import error_line


class RemoteError(Exception):
    """Shaped like ray.exceptions.RayTaskError: a traceback text and the original as ``.cause``."""

    def __init__(self, cause):
        super().__init__("ray::Worker.process() (pid=1)\n  File x.py, line 3\n    boom\nValueError: bad image")
        self.cause = cause


def test_a_remote_failure_is_named_by_its_cause():
    assert error_line(RemoteError(ValueError("bad image"))) == "ValueError: bad image"


def test_an_actor_start_failure_is_named_by_the_original_error_without_its_module_path():
    wrapped = RuntimeError("The actor died because of an error raised in its creation task, ray::Agent.__init__\n"
                           "Traceback (most recent call last):\n  File \"disk.py\", line 9\n"
                           "qwen3vl_ray.tiers.private_dirs.UnsafeDirectoryError: disk tier refuses /tmp/x: mode 0777\n")
    assert error_line(wrapped) == "UnsafeDirectoryError: disk tier refuses /tmp/x: mode 0777"


def test_plain_errors_give_their_type_and_last_line_and_long_ones_are_cut():
    assert error_line(RuntimeError("a\nb\n")) == "RuntimeError: b"
    assert error_line(KeyError()) == "KeyError:"
    assert len(error_line(RuntimeError("x" * 5000))) == 1000
    assert error_line(RuntimeError("x" * 50), limit=20) == "RuntimeError: xxx..."
