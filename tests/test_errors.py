"""runtime.errors.first_line: the one helper that makes an exception's message one line, everywhere."""
from runtime.errors import first_line


def test_first_line_of_a_message():
    assert first_line(ValueError("bad row 3\nmore detail")) == "bad row 3"
    assert first_line(ValueError("  \n  indented first\nsecond")) == "indented first"
    assert first_line(ValueError("ValueError: said twice")) == "said twice"


def test_an_error_from_a_data_loader_worker_gives_the_original_message():
    text = ("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 3, in f\n    raise ValueError("clip.mp4 is truncated")\n'
            "ValueError: clip.mp4 is truncated\n")
    assert first_line(ValueError(text)) == "clip.mp4 is truncated"  # torch re-raises the same type


def test_no_message():
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError(), empty="") == ""
