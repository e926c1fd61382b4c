"""The README's examples run as written."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_custom_training_loop_trains_a_classifier():
    code = re.search(r"<!-- custom-loop -->\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(code, "README.md (custom loop)", "exec"), namespace)
    assert printed.getvalue().startswith("loss ")
    accuracy = (namespace["probabilities"].argmax(1) == namespace["labels"]).mean()
    assert accuracy > 0.9 and float(namespace["metrics"]["loss"]) < 0.5
    assert int(namespace["state"].step) == 2 * 3 * 8
