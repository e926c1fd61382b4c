"""Counting the calls of a module's jitted functions: how tests show that a loop is one dispatch."""


def count_jitted_calls(monkeypatch, module) -> dict:
    """Wrap every jitted function of `module` (for the monkeypatch's lifetime) so that each call
    through the module's attribute is counted; returns the live {name: calls}."""
    calls = {}
    for name, function in list(vars(module).items()):
        if callable(function) and hasattr(function, "_cache_size") and hasattr(function, "lower"):
            calls[name] = 0

            def counted(*args, _name=name, _function=function, **kwargs):
                calls[_name] += 1
                return _function(*args, **kwargs)
            monkeypatch.setattr(module, name, counted)
    assert calls, f"no jitted function found in {module.__name__}"
    return calls
