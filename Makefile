# The README's two commands. Both create and use .venv at the project root and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_DIR ?= ../shared/data

.PHONY: demo test venv clean

venv: $(VENV)/.installed

# torch 2.13.0 is the CPU wheel that lies on the machine (an unpinned torch pulls a CUDA build);
# fastai 2.8.12 goes in with --no-deps so that it brings neither torchvision nor a CUDA torch.
$(VENV)/.installed: pyproject.toml requirements-reference.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[torch,text,test]'
	$(PY) -m pip install -q -r requirements-reference.txt
	$(PY) -m pip install -q --no-deps fastai==2.8.12
	$(PY) -m pip install -q --no-deps --target $(VENV)/fastai1 fastai==1.0.61 'setuptools<81'
	touch $@

test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile

demo: venv
	$(PY) scripts/demo.py --data-dir $(DATA_DIR)

clean:
	rm -rf $(VENV)
